"""Can the router listen on its address? Asked before anything starts, answered in one line naming the flag."""

from __future__ import annotations

import errno
import socket


class ListenError(Exception):
    """The router cannot listen where it was told to; the message names the flag to change."""


def listen_problem(host: str, port: int) -> str | None:
    """Why the router could not listen on host:port, in one line naming the flag to change; None if it can.

    Binds a throwaway socket the way the server will (SO_REUSEADDR, so a port left in TIME_WAIT counts
    as free, while one another process listens on does not), then closes it.
    """
    try:
        addresses = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError, OverflowError) as exc:
        return f"--host {host!r} is not an address this machine has ({exc}): try 0.0.0.0 or 127.0.0.1"
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                return bind_error_line(host, port, exc)
    return None


def bind_error_line(host: str, port: int, exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return f"port {port} on {host} is already in use: stop what listens there, or pick another --port"
    if exc.errno == errno.EACCES:
        return f"no permission to listen on port {port} (ports below 1024 need root): pick another --port"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"--host {host} is not an address of this machine: try 0.0.0.0 or 127.0.0.1"
    return f"cannot listen on {host}:{port} ({exc.strerror or exc}): check --host and --port"
