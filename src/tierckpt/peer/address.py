"""Which local address the peer service binds to: the interface the job already uses."""

from __future__ import annotations

import ipaddress
import os
import socket

from ..errors import PeerError

__all__ = ["ENV_HOST", "bind_host"]

ENV_HOST = "TIERCKPT_PEER_HOST"
"""Environment variable naming the address to bind (and advertise) explicitly."""

_PROBE_PORT = 9  # discard; connect() on a UDP socket sends nothing


def bind_host(master_addr: str | None = None) -> str:
    """The local address to bind the peer service to (never ``0.0.0.0`` by default).

    ``$TIERCKPT_PEER_HOST`` when set; else the local address of the route to
    ``master_addr`` (default ``$MASTER_ADDR``), found by connecting a UDP socket (no packet
    is sent); ``127.0.0.1`` when that is a loopback address or unset. Advertising the
    interface the job's rendezvous already uses avoids picking a slow or unrouted one.
    """
    env = os.environ.get(ENV_HOST)
    if env:
        return env
    addr = master_addr or os.environ.get("MASTER_ADDR")
    if not addr:
        return "127.0.0.1"
    try:
        infos = socket.getaddrinfo(addr, _PROBE_PORT, type=socket.SOCK_DGRAM)
    except OSError as e:
        raise PeerError(
            f"Cannot resolve MASTER_ADDR {addr!r} to pick the peer service's interface ({e}); "
            f"set {ENV_HOST} to this node's address."
        ) from e
    family, _, _, _, sockaddr = infos[0]
    if ipaddress.ip_address(str(sockaddr[0]).split("%")[0]).is_loopback:
        return "127.0.0.1"
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect(sockaddr)
            return str(s.getsockname()[0])
    except OSError as e:
        raise PeerError(
            f"No route to MASTER_ADDR {addr!r} to pick the peer service's interface ({e}); "
            f"set {ENV_HOST} to this node's address."
        ) from e
