"""What a worker URL given to the admin API (`POST /workers`) may be.

The router sends health polls and client prompts to whatever URL it is given, with the workers' API
key, so a URL is refused unless it is plainly a worker's base address: http(s), a host, a port in
1-65535, nothing else. Refused with a message naming the problem: credentials in the URL (they would
be sent in every poll and in the Host header), a path, query or fragment, control characters or
spaces, and addresses that are never a worker but often a target: link-local (169.254.0.0/16, where
cloud metadata services answer; fe80::/10), unspecified (0.0.0.0, ::) and multicast addresses, and
the metadata host names of the big clouds. Names are not resolved here (no I/O in validation).
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

MAX_URL_CHARS = 2048
_METADATA_HOSTS = frozenset({"metadata", "metadata.google.internal", "metadata.azure.internal",
                             "instance-data", "instance-data.ec2.internal"})


class BadWorkerUrl(ValueError):
    """The admin API's 400: the message says what is wrong with the URL."""


def _check_host(host: str, url: str) -> None:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        if host.rstrip(".").lower() in _METADATA_HOSTS:
            raise BadWorkerUrl(f"worker url {url!r} names a cloud metadata service, not a worker") from None
        return
    if address.is_link_local:
        raise BadWorkerUrl(f"worker url {url!r} is a link-local address ({address}): cloud metadata services "
                           "answer there, workers do not")
    if address.is_unspecified or address.is_multicast:
        raise BadWorkerUrl(f"worker url {url!r} has address {address}, which no worker can be reached at")


def validate_worker_url(url: object) -> str:
    """The URL unchanged if it is a plain worker base URL; BadWorkerUrl otherwise."""
    if not isinstance(url, str) or not url.strip():
        raise BadWorkerUrl("worker url must be a non-empty string like http://host:port")
    if len(url) > MAX_URL_CHARS:
        raise BadWorkerUrl(f"worker url is {len(url)} characters long; the limit is {MAX_URL_CHARS}")
    if any(ord(ch) < 0x21 or ord(ch) == 0x7F for ch in url.strip()):
        raise BadWorkerUrl("worker url must not contain spaces or control characters (CR, LF, tab...)")
    url = url.strip()
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https"):
        raise BadWorkerUrl(f"worker url {url!r} must start with http:// or https://")
    if "@" in parts.netloc:
        raise BadWorkerUrl("worker url must not carry credentials (user:password@): give the workers' key "
                           "to the router with --worker-api-key instead")
    if "#" in url or parts.query:
        raise BadWorkerUrl(f"worker url {url!r} must not have a query or fragment: give http://host:port")
    if parts.path not in ("", "/"):
        raise BadWorkerUrl(f"worker url {url!r} must not have a path: give the base url, e.g. http://host:port")
    if not parts.hostname:
        raise BadWorkerUrl(f"worker url {url!r} has no host: give http://host:port")
    try:
        port = parts.port
    except ValueError:
        raise BadWorkerUrl(f"worker url {url!r} has a port outside 1-65535") from None
    if port == 0 or (port is None and parts.netloc.endswith(":")):
        raise BadWorkerUrl(f"worker url {url!r} has a port outside 1-65535")
    _check_host(parts.hostname, url)
    return url
