"""Bytes on the wire of the peer transport: framing, the handshake, bulk send and receive.

See :mod:`tierckpt.peer.transport` for the protocol these pieces make up.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import select
import socket
import struct
from typing import Any

from ..errors import IntegrityError, PeerError, TierckptError
from ..tiers.base import KeyNotFoundError

__all__ = [
    "CHUNK",
    "MAX_HEADER",
    "MAX_SMALL",
    "Closed",
    "ProtocolError",
    "client_handshake",
    "error_header",
    "raise_remote",
    "recv_exact",
    "recv_header",
    "recv_into_exact",
    "refuse_busy",
    "send_header",
    "sendfile_all",
    "server_handshake",
]

MAGIC = b"TCKP"
VERSION = 1
NONCE = 32
GREET_OK, GREET_BUSY = 0, 1
AUTH_OK, AUTH_DENIED = 0, 2
_GREETING = len(MAGIC) + 2 + NONCE
_CLIENT_LABEL = b"tierckpt-peer-client"
_SERVER_LABEL = b"tierckpt-peer-server"

CHUNK = 4 << 20
"""Bytes received (and hashed) at a time: what one connection buffers, at most."""
MAX_HEADER = 16 << 20
"""Largest JSON header accepted (a PUT of a file with many blobs, a LIST of a big prefix)."""
MAX_SMALL = 64 << 20
"""Largest PUTB payload or CALL payload/answer (these are buffered whole)."""

_LEN = struct.Struct(">I")
_REMOTE_TYPES: dict[str, type[TierckptError]] = {
    "IntegrityError": IntegrityError,
    "KeyNotFoundError": KeyNotFoundError,
}


class Closed(ConnectionError):
    """The other side closed the connection."""


class ProtocolError(ConnectionError):
    """The other side sent something that is not this protocol; the connection is dropped."""


# -- framing ----------------------------------------------------------------------------


def send_header(sock: socket.socket, obj: dict[str, Any]) -> None:
    data = json.dumps(obj, separators=(",", ":")).encode()
    sock.sendall(_LEN.pack(len(data)) + data)


def recv_header(sock: socket.socket, limit: int = MAX_HEADER) -> dict[str, Any]:
    (n,) = _LEN.unpack(recv_exact(sock, _LEN.size))
    if n > limit:
        raise ProtocolError(f"header of {n} bytes (limit {limit})")
    try:
        obj = json.loads(recv_exact(sock, n))
    except (ValueError, UnicodeDecodeError) as e:
        raise ProtocolError(f"header is not JSON ({e})") from e
    if not isinstance(obj, dict):
        raise ProtocolError("header is not a JSON object")
    return obj


def recv_exact(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    recv_into_exact(sock, memoryview(buf))
    return buf


def recv_into_exact(sock: socket.socket, view: memoryview) -> None:
    """Fill ``view`` (a byte view) from ``sock``; :class:`Closed` on a short stream."""
    got, want = 0, len(view)
    while got < want:
        n = sock.recv_into(view[got:], want - got)
        if n == 0:
            raise Closed(f"connection closed after {got} of {want} bytes")
        got += n


def sendfile_all(sock: socket.socket, fd: int, offset: int, count: int, timeout: float) -> None:
    """Send ``count`` bytes of ``fd`` at ``offset`` with ``os.sendfile`` (zero-copy).

    The socket has a timeout, so it is non-blocking underneath: wait for room with poll,
    at most ``timeout`` seconds without progress.
    """
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLOUT)
    sent = 0
    while sent < count:
        try:
            n = os.sendfile(sock.fileno(), fd, offset + sent, count - sent)
        except BlockingIOError:
            if not poller.poll(timeout * 1000):
                raise TimeoutError(f"no progress sending for {timeout:g} s") from None
            continue
        if n == 0:
            raise Closed(f"the file ended after {offset + sent} bytes, {count - sent} short")
        sent += n


# -- errors -----------------------------------------------------------------------------


def error_header(e: BaseException) -> dict[str, Any]:
    return {"ok": False, "error": type(e).__name__, "message": str(e)}


def raise_remote(hdr: dict[str, Any], where: str) -> None:
    """Raise the error a peer answered with: the matching tierckpt class, else PeerError."""
    if hdr.get("ok") is True:
        return
    name = str(hdr.get("error", "PeerError"))
    message = str(hdr.get("message", ""))
    cls = _REMOTE_TYPES.get(name)
    if cls is not None:
        raise cls(f"{message} (peer {where})")
    err = PeerError(f"The peer {where} refused: {name}: {message}")
    err.remote_type = name
    raise err


# -- handshake: mutual HMAC-SHA256 challenge-response -----------------------------------


def _mac(secret: bytes, label: bytes, first: bytes, second: bytes) -> bytes:
    return hmac.new(secret, label + first + second, hashlib.sha256).digest()


def refuse_busy(sock: socket.socket) -> None:
    sock.sendall(MAGIC + bytes([VERSION, GREET_BUSY]) + bytes(NONCE))


def server_handshake(sock: socket.socket, secret: bytes) -> bool:
    """Challenge the client; prove ourselves only once it has proved itself. False: a stranger."""
    nonce_s = os.urandom(NONCE)
    sock.sendall(MAGIC + bytes([VERSION, GREET_OK]) + nonce_s)
    answer = bytes(recv_exact(sock, NONCE + hashlib.sha256().digest_size))
    nonce_c, proof = answer[:NONCE], answer[NONCE:]
    if not hmac.compare_digest(proof, _mac(secret, _CLIENT_LABEL, nonce_s, nonce_c)):
        sock.sendall(bytes([AUTH_DENIED]))
        return False
    sock.sendall(bytes([AUTH_OK]) + _mac(secret, _SERVER_LABEL, nonce_c, nonce_s))
    return True


def client_handshake(sock: socket.socket, secret: bytes, where: str) -> None:
    """Answer the peer's challenge and check its proof; :class:`PeerError` on any refusal."""
    greeting = bytes(recv_exact(sock, _GREETING))
    if greeting[: len(MAGIC)] != MAGIC:
        raise PeerError(f"{where} is not a tierckpt peer service (bad greeting).")
    version, status = greeting[len(MAGIC)], greeting[len(MAGIC) + 1]
    if version != VERSION:
        raise PeerError(
            f"The peer {where} speaks peer protocol {version}, this tierckpt {VERSION}: "
            "use the same tierckpt version on every node."
        )
    if status == GREET_BUSY:
        raise PeerError(
            f"The peer {where} refused the connection: it is already serving its maximum "
            "number of connections (max_connections); retry later or use fewer parallel streams."
        )
    nonce_s = greeting[len(MAGIC) + 2 :]
    nonce_c = os.urandom(NONCE)
    sock.sendall(nonce_c + _mac(secret, _CLIENT_LABEL, nonce_s, nonce_c))
    if recv_exact(sock, 1)[0] != AUTH_OK:
        raise PeerError(
            f"The peer {where} refused authentication: its job secret differs from this "
            "process's (TIERCKPT_PEER_SECRET or the rendezvous store of another job?)."
        )
    proof = bytes(recv_exact(sock, hashlib.sha256().digest_size))
    if not hmac.compare_digest(proof, _mac(secret, _SERVER_LABEL, nonce_c, nonce_s)):
        raise PeerError(f"The peer {where} could not prove it knows the job secret.")
