"""DNS discovery: one hostname resolving to many workers (docker compose --scale, Kubernetes headless
services). Every `interval_s` the name is resolved; new addresses are added as workers, addresses
that disappeared are removed (their in-flight requests finish). A failed lookup changes nothing, so
a DNS hiccup never empties the fleet.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from typing import TYPE_CHECKING, Awaitable, Callable, Iterable

from router.background import BackgroundLoop

if TYPE_CHECKING:  # pragma: no cover
    from router.app import RouterState

log = logging.getLogger("radixfleet.router.discovery")

Resolver = Callable[[str, int], Awaitable[list[str]]]


def address_url(scheme: str, address: str, port: int) -> str:
    host = f"[{address}]" if ipaddress.ip_address(address).version == 6 else address
    return f"{scheme}://{host}:{port}"


def diff_members(current: Iterable[str], resolved: Iterable[str]) -> tuple[list[str], list[str]]:
    """(to add, to remove) to turn the DNS-sourced worker set `current` into `resolved`. Pure."""
    current_set, resolved_set = set(current), set(resolved)
    return sorted(resolved_set - current_set), sorted(current_set - resolved_set)


async def resolve_with_loop(hostname: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(hostname, port, type=socket.SOCK_STREAM)
    return sorted({info[4][0] for info in infos})


class DnsDiscovery(BackgroundLoop):
    def __init__(self, state: "RouterState", target: str, interval_s: float = 5.0, scheme: str = "http",
                 resolver: Resolver = resolve_with_loop) -> None:
        host, _, port = target.rpartition(":")
        self.state = state
        self.hostname = host.strip("[]")
        self.port = int(port)
        self.interval_s = interval_s
        self.scheme = scheme
        self.resolver = resolver

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.refresh()

    async def refresh(self) -> tuple[list[str], list[str]]:
        """Resolve once and apply the difference. Returns (added urls, removed urls)."""
        try:
            addresses = await self.resolver(self.hostname, self.port)
        except (OSError, socket.gaierror) as exc:
            log.warning("DNS lookup of %s failed (%s): keeping the current workers", self.hostname, exc)
            return [], []
        resolved = [address_url(self.scheme, a, self.port) for a in addresses]
        current = [w.url for w in self.state.pool if w.source == "dns"]
        to_add, to_remove = diff_members(current, resolved)
        for url in to_add:
            worker = self.state.add_worker(url, source="dns")
            log.info("DNS: worker %s joined", worker.worker_id)
        for url in to_remove:
            worker = self.state.remove_worker(url)
            if worker is not None:
                log.info("DNS: worker %s left", worker.worker_id)
        return to_add, to_remove
