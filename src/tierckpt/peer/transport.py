"""The peer transport: a per-process TCP service over a node's memory root, and its client.

Protocol (version 1). Every integer is big-endian; a *header* is a 4-byte length and that
many bytes of UTF-8 JSON (an object, at most 16 MiB).

1. Handshake, before anything else (mutual HMAC-SHA256 with the job secret, fresh nonces):
   server -> ``b"TCKP"``, version (1 byte), status (1 byte: 0 ready, 1 busy), nonce_s (32);
   client -> nonce_c (32), ``HMAC(secret, "tierckpt-peer-client" + nonce_s + nonce_c)``;
   server -> 1 byte (0 accepted, 2 denied), then when accepted
   ``HMAC(secret, "tierckpt-peer-server" + nonce_c + nonce_s)``; the client checks it.
   Both compare in constant time. A busy server (``max_connections`` handlers running)
   sends status 1 and closes; a client that fails the challenge gets one denial byte and
   the connection is closed: no request of it is ever read.
2. Requests, one at a time per connection; each answer header has ``"ok"``; a refusal is
   ``{"ok": false, "error": <class name>, "message": ...}`` and the connection stays usable.
   The client raises ``IntegrityError`` / ``KeyNotFoundError`` for those names, otherwise
   :class:`~tierckpt.errors.PeerError` (its ``remote_type`` is the name).

   - ``READ {key, ranges: [[offset, length], ...]}`` -> ``{ok, size}`` (or a refusal, then
     nothing more), then per range ``{ok, length}`` + that many bytes (``os.sendfile``), or
     a refusal of that range (beyond the end of the file).
   - ``STAT {key}`` -> ``{ok, size}`` (``null`` when missing).
   - ``LIST {prefix}`` -> ``{ok, files: {relative name: size}}`` (regular files, recursive,
     no temporaries).
   - ``PUT {key, length, blobs: [[offset, length, xxh3-128 hex], ...]}`` -> ``{ok}`` once
     space is reserved (the ``reserve`` hook, the file system's free space; a refusal ends it
     here), then the client sends ``length`` bytes (``os.sendfile``) and the server answers
     ``{ok}`` once every blob's checksum matched and the file was renamed to ``key``, or a
     refusal (``IntegrityError``; ``TierFullError`` when a write failed with ENOSPC). Bytes
     outside every blob (alignment padding) are stored but not checked.
   - ``PUTB {key, length, checksum}`` + ``length`` bytes (at most 64 MiB) -> ``{ok}``: a
     small file, checksum over the whole payload.
   - ``CALL {name, length}`` + payload -> ``{ok, length}`` + the handler's answer.

Security model: only holders of the per-job secret can connect (mutual authentication at
connection start); the service binds one interface (:func:`~tierckpt.peer.address.bind_host`),
never ``0.0.0.0`` unless told; it serves and accepts only keys ``allow`` accepts, walking every
path from the root with ``O_NOFOLLOW`` (no symlink, no ``..``, nothing outside the root). After
the handshake the stream is neither encrypted nor MAC'd per message: an attacker on the path
could read or alter it, which the checksums of every blob (checked on receipt, and by readers
against the commit) detect but do not prevent. Run it on the cluster's own network.

Bounds: ``max_connections`` handler threads (more connections are refused at once),
``RING`` x ``CHUNK`` (3 x 4 MiB) of buffers per PUT and none per READ (``sendfile``), and ``timeout_s`` on every socket operation, so a
dead or stalled peer raises :class:`~tierckpt.errors.PeerError` within ``timeout_s``.
"""

from __future__ import annotations

import atexit
import builtins
import contextlib
import errno
import hmac
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any

from ..errors import IntegrityError, PeerError, TierckptError, TierFullError
from ..manifest import checksum
from ..tiers.base import KeyNotFoundError
from . import _wire
from ._files import Root, default_allow, temporary_name
from ._receive import Blob, Receipt, receive_file
from ._wire import MAX_SMALL, Closed, ProtocolError

__all__ = ["PeerClient", "PeerService", "get_service"]

_log = logging.getLogger("tierckpt.peer")
_AUTH_TIMEOUT_S = 10.0
_MAX_IDLE_S = 10.0
"""A pooled connection idle longer is not reused (services drop idle ones after timeout_s)."""


class PeerService:
    """A TCP service over one node's memory root (see the module docstring for the protocol).

    ``allow(key)`` decides which keys may be read or written (default: plain relative
    names). ``reserve(key, nbytes)`` is called before a PUT allocates space; whatever it
    raises refuses the PUT with that error's type and message. ``release(key, nbytes)`` is
    called when a PUT that reserved space fails afterwards (its file never appears).
    """

    def __init__(
        self,
        root: str,
        secret: bytes,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        allow: Callable[[str], bool] = default_allow,
        max_connections: int = 16,
        timeout_s: float = 30.0,
        reserve: Callable[[str, int], None] | None = None,
        release: Callable[[str, int], None] | None = None,
        recycled: Callable[[str, int, str], bool] | None = None,
    ) -> None:
        if not secret:
            raise PeerError("The peer service needs a non-empty job secret (job_secret()).")
        self.root = Root(root)
        self._secret = bytes(secret)
        self.host = host
        self.timeout_s = timeout_s
        self.max_connections = max_connections
        self._allow = allow
        self._reserve = reserve
        self._release = release
        self._recycled = recycled
        self._handlers: dict[str, Callable[[bytes], bytes]] = {}
        self._put_hooks: list[Callable[[str, str], None]] = []
        self._slots = threading.BoundedSemaphore(max_connections)
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._threads: set[threading.Thread] = set()
        self._closed = False
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            self._listener = socket.create_server(
                (host, port), family=family, backlog=max(64, 2 * max_connections)
            )
        except OSError as e:
            raise PeerError(
                f"The peer service cannot listen on {host}:{port} ({e}); set TIERCKPT_PEER_HOST "
                "to an address of this node."
            ) from e
        bound = self._listener.getsockname()
        self.address: tuple[str, int] = (str(bound[0]), int(bound[1]))
        self._ops: dict[str, Callable[[socket.socket, dict[str, Any]], None]] = {
            "READ": self._op_read,
            "STAT": self._op_stat,
            "LIST": self._op_list,
            "PUT": self._op_put,
            "PUTB": self._op_putb,
            "CALL": self._op_call,
        }
        self._acceptor = threading.Thread(
            target=self._accept_loop, name=f"tierckpt-peer-{self.address[1]}", daemon=True
        )
        self._acceptor.start()

    # -- public ---------------------------------------------------------------------------

    def register(self, name: str, handler: Callable[[bytes], bytes]) -> None:
        """Answer ``CALL name`` with ``handler(payload)`` (run on a connection's thread)."""
        self._handlers[name] = handler

    def on_put(self, hook: Callable[[str, str], None]) -> None:
        """Call ``hook(key, final_path)`` after each verified PUT/PUTB is renamed in place.

        A hook that raises makes the client's put raise PeerError; the file stays.
        """
        self._put_hooks.append(hook)

    def close(self) -> None:
        """Stop accepting, drop every connection, and wait (briefly) for the handler threads."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            conns = list(self._conns)
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
        self._acceptor.join(5)
        for t in list(self._threads):
            t.join(5)

    def __enter__(self) -> PeerService:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- connections ------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError as e:
                if self._closed:
                    return
                _log.warning("peer service %s: accept failed (%s)", self.address, e)
                threading.Event().wait(0.1)  # EMFILE and friends: do not spin
                continue
            if self._closed:
                conn.close()
                return
            if not self._slots.acquire(blocking=False):
                with contextlib.suppress(OSError):
                    conn.settimeout(1.0)
                    _wire.refuse_busy(conn)
                conn.close()
                continue
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            with self._lock:
                self._conns.add(conn)
                self._threads.add(t)
            t.start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.settimeout(min(self.timeout_s, _AUTH_TIMEOUT_S))
            if not _wire.server_handshake(conn, self._secret):
                return
            conn.settimeout(self.timeout_s)
            while not self._closed:
                try:
                    hdr = _wire.recv_header(conn)
                except (Closed, TimeoutError):
                    return  # the client went away, or an idle pooled connection timed out
                op = self._ops.get(str(hdr.get("op")))
                if op is None:
                    _wire.send_header(
                        conn, _wire.error_header(ProtocolError(f"op {hdr.get('op')!r}"))
                    )
                    return
                op(conn, hdr)
        except (OSError, ValueError, TypeError, KeyError) as e:
            # transport trouble or a malformed request: drop this connection only
            _log.debug("peer service %s: connection dropped (%s)", self.address, e)
        finally:
            with self._lock:
                self._conns.discard(conn)
                self._threads.discard(threading.current_thread())
            conn.close()
            self._slots.release()

    def _key(self, key: Any) -> str:
        if not isinstance(key, str) or not self._allow(key):
            raise PeerError(f"the key {key!r} is not served by this peer")
        return key

    # -- ops: each answers one request; an exception drops the connection ---------------------

    def _op_read(self, conn: socket.socket, hdr: dict[str, Any]) -> None:
        ranges = [(int(o), int(n)) for o, n in hdr["ranges"]]
        try:
            key = self._key(hdr.get("key"))
            fd = self.root.open_read(key)
        except (TierckptError, OSError) as e:
            _wire.send_header(conn, _wire.error_header(e))
            return
        try:
            size = os.fstat(fd).st_size
            _wire.send_header(conn, {"ok": True, "size": size})
            for off, n in ranges:
                if off < 0 or n < 0 or off + n > size:
                    err = KeyNotFoundError(
                        f"{key}: bytes [{off}, {off + n}) beyond its end ({size})"
                    )
                    _wire.send_header(conn, _wire.error_header(err))
                    continue
                _wire.send_header(conn, {"ok": True, "length": n})
                _wire.sendfile_all(conn, fd, off, n, self.timeout_s)
        finally:
            os.close(fd)

    def _op_stat(self, conn: socket.socket, hdr: dict[str, Any]) -> None:
        try:
            answer: dict[str, Any] = {"ok": True, "size": self.root.size(self._key(hdr.get("key")))}
        except TierckptError as e:
            answer = _wire.error_header(e)
        _wire.send_header(conn, answer)

    def _op_list(self, conn: socket.socket, hdr: dict[str, Any]) -> None:
        prefix = str(hdr.get("prefix", "")).strip("/")
        try:
            if prefix:
                self._key(prefix)
            files = self.root.list(prefix)
            base = prefix + "/" if prefix else ""
            answer = {
                "ok": True,
                "files": {k: v for k, v in files.items() if self._allow(base + k)},
            }
        except (TierckptError, OSError) as e:
            answer = _wire.error_header(e)
        _wire.send_header(conn, answer)

    def _op_put(self, conn: socket.socket, hdr: dict[str, Any]) -> None:
        length = int(hdr["length"])
        blobs: list[Blob] = [(int(o), int(n), str(c)) for o, n, c in hdr["blobs"]]
        try:
            key = self._key(hdr.get("key"))
            if length < 0 or any(o < 0 or n < 0 or o + n > length for o, n, _ in blobs):
                raise PeerError(f"PUT of {key}: a blob lies outside its {length} bytes")
            if self._reserve is not None:
                self._reserve(key, length)
        except Exception as e:  # the reserve hook's own errors travel back by name
            _wire.send_header(conn, _wire.error_header(e))
            return
        try:
            refusal = self._put_reserved(conn, key, length, blobs)
        except BaseException:
            if self._release is not None:
                self._release(key, length)
            raise
        if refusal is not None:
            if self._release is not None:
                self._release(key, length)
            _wire.send_header(conn, _wire.error_header(refusal))
            return
        self._published(conn, key)

    def _put_reserved(
        self, conn: socket.socket, key: str, length: int, blobs: list[Blob]
    ) -> Exception | None:
        """Receive into a temporary and rename it to ``key``: None once it is in place.

        A refusal before the bytes flow (no room, a bad path) or after they all arrived (a
        checksum mismatch) is returned, to be answered; a transport failure while they flow
        raises (the connection is dropped). Either way the temporary is gone on return.
        """
        name = key.rsplit("/", 1)[-1]
        tmp = temporary_name(name)
        recycled = False

        def open_tmp(dfd: int) -> int:
            nonlocal recycled
            where = os.path.join(self.root.path, os.path.dirname(key), tmp)
            recycled = (
                bool(length) and self._recycled is not None and self._recycled(key, length, where)
            )
            if recycled:  # a resident file of the receiver's pool: pages written, not faulted
                return os.open(tmp, os.O_RDWR | os.O_NOFOLLOW, dir_fd=dfd)
            flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
            return os.open(tmp, flags, 0o600, dir_fd=dfd)

        try:
            dfd, fd = self.root.open_new(key, open_tmp)
        except (TierckptError, OSError) as e:
            return e
        try:
            try:
                if recycled:
                    os.ftruncate(fd, length)
                else:
                    self._allocate(fd, key, length)
            except (TierckptError, OSError) as e:
                return e
            _wire.send_header(conn, {"ok": True})
            receipt = receive_file(conn, fd, length, blobs)
            err = _receipt_error(key, length, len(blobs), receipt, self.root.path)
            if err is not None:
                return err
            try:
                os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
            except OSError as e:
                return PeerError(f"{key} arrived but could not be renamed into place: {e}")
            tmp = ""
            return None
        finally:
            if fd >= 0:
                os.close(fd)
            if tmp:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=dfd)
            os.close(dfd)

    def _allocate(self, fd: int, key: str, length: int) -> None:
        """Size the temporary; refuse (TierFullError) before any byte flows when it cannot fit.

        Pages are allocated as the bytes are written (overlapped with the receive); a file
        system that fills meanwhile fails that write, which is answered the same way.
        """
        st = os.fstatvfs(fd)
        free = st.f_bavail * st.f_frsize
        if length > free:
            raise _no_room(key, length, self.root.path, f"{free} bytes free")
        os.ftruncate(fd, length)

    def _op_putb(self, conn: socket.socket, hdr: dict[str, Any]) -> None:
        length = int(hdr["length"])
        if not 0 <= length <= MAX_SMALL:
            raise ProtocolError(f"PUTB of {length} bytes (limit {MAX_SMALL})")
        data = _wire.recv_exact(conn, length)
        try:
            key = self._key(hdr.get("key"))
            if checksum(data) != hdr.get("checksum"):
                raise IntegrityError(f"{key}: the {length} bytes arrived corrupt; nothing was kept")
            if self._reserve is not None:
                self._reserve(key, length)
        except Exception as e:
            _wire.send_header(conn, _wire.error_header(e))
            return
        try:
            self._write_small(key, data)
        except (TierckptError, OSError) as e:
            if self._release is not None:
                self._release(key, length)
            _wire.send_header(conn, _wire.error_header(e))
            return
        self._published(conn, key)

    def _write_small(self, key: str, data: bytearray) -> None:
        name = key.rsplit("/", 1)[-1]
        tmp = temporary_name(name)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
        dfd, fd = self.root.open_new(key, lambda d: os.open(tmp, flags, 0o600, dir_fd=d))
        try:
            try:
                self._allocate(fd, key, len(data))
                view, done = memoryview(data), 0
                while done < len(data):
                    done += os.write(fd, view[done:])
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise _no_room(key, len(data), self.root.path, str(e.strerror)) from e
                raise
            finally:
                os.close(fd)
            os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
            tmp = ""
        finally:
            if tmp:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=dfd)
            os.close(dfd)

    def _published(self, conn: socket.socket, key: str) -> None:
        try:
            for hook in self._put_hooks:
                hook(key, os.path.join(self.root.path, key))
        except Exception as e:
            _wire.send_header(conn, _wire.error_header(e))
            return
        _wire.send_header(conn, {"ok": True})

    def _op_call(self, conn: socket.socket, hdr: dict[str, Any]) -> None:
        length = int(hdr["length"])
        if not 0 <= length <= MAX_SMALL:
            raise ProtocolError(f"CALL payload of {length} bytes (limit {MAX_SMALL})")
        payload = bytes(_wire.recv_exact(conn, length))
        handler = self._handlers.get(str(hdr.get("name")))
        try:
            if handler is None:
                raise PeerError(f"no handler {hdr.get('name')!r} is registered")
            answer = handler(payload)
            if len(answer) > MAX_SMALL:
                raise PeerError(f"the answer of {hdr.get('name')!r} exceeds {MAX_SMALL} bytes")
        except Exception as e:
            _wire.send_header(conn, _wire.error_header(e))
            return
        _wire.send_header(conn, {"ok": True, "length": len(answer)})
        conn.sendall(answer)


def _no_room(key: str, length: int, root: str, why: str) -> TierFullError:
    return TierFullError(f"no room for {key} ({length} bytes) in {root}: {why}")


def _receipt_error(
    key: str, length: int, nblobs: int, receipt: Receipt, root: str
) -> TierckptError | None:
    if receipt.write_error is not None:
        e = receipt.write_error
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            return _no_room(key, length, root, str(e.strerror))
        return PeerError(f"writing {key} failed on the peer: {e}")
    if receipt.mismatches:
        o, n, c = receipt.mismatches[0]
        return IntegrityError(
            f"{key}: {len(receipt.mismatches)} of {nblobs} blobs arrived corrupt (first at offset "
            f"{o}, {n} bytes, expected xxh3-128 {c}); nothing was kept"
        )
    return None


# -- client -------------------------------------------------------------------------------


class PeerClient:
    """Requests to one peer service; thread-safe, idle connections are reused.

    Every failure to reach or hear from the peer (refused, timed out, closed mid-transfer,
    wrong secret) raises :class:`~tierckpt.errors.PeerError`; what the peer refused raises
    its typed error (``KeyNotFoundError``, ``IntegrityError``, else PeerError).
    """

    def __init__(self, address: tuple[str, int], secret: bytes, timeout_s: float = 30.0) -> None:
        self.address = (str(address[0]), int(address[1]))
        self.timeout_s = timeout_s
        self._secret = bytes(secret)
        self._where = f"{self.address[0]}:{self.address[1]}"
        self._idle: list[tuple[socket.socket, float]] = []  # (connection, when it went idle)
        self._lock = threading.Lock()
        self._closed = False

    # -- connections ------------------------------------------------------------------------

    def _connect(self) -> socket.socket:
        try:
            sock = socket.create_connection(self.address, timeout=self.timeout_s)
        except OSError as e:
            raise PeerError(
                f"Cannot connect to the peer {self._where} within {self.timeout_s:g} s ({e}): "
                "the node is down, or its service bound another interface (TIERCKPT_PEER_HOST)."
            ) from e
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            _wire.client_handshake(sock, self._secret, self._where)
        except BaseException as e:
            sock.close()
            if isinstance(e, TierckptError):
                raise
            raise self._transport_error(e) from e
        return sock

    def _take(self) -> socket.socket:
        with self._lock:
            if self._closed:
                raise PeerError(f"The client of {self._where} is closed.")
            while self._idle:
                sock, since = self._idle.pop()
                # readable while idle = the peer closed it (EOF) or sent junk; and one idle for
                # long may be closed by the peer's idle timeout while we send: not reused
                poller = select.poll()
                poller.register(sock.fileno(), select.POLLIN)
                if time.monotonic() - since < _MAX_IDLE_S and not poller.poll(0):
                    return sock
                sock.close()
        return self._connect()

    @contextlib.contextmanager
    def _conn(self) -> Iterator[socket.socket]:
        sock = self._take()
        reusable = False
        try:
            yield sock
            reusable = True
        except TierckptError:
            reusable = True  # a complete refusal: the stream is in step
            raise
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise self._transport_error(e) from e
        finally:
            with self._lock:
                if reusable and not self._closed:
                    self._idle.append((sock, time.monotonic()))
                else:
                    sock.close()

    def _transport_error(self, e: BaseException) -> PeerError:
        if isinstance(e, TimeoutError):
            return PeerError(f"The peer {self._where} stopped answering for {self.timeout_s:g} s.")
        return PeerError(
            f"The connection to the peer {self._where} failed: {type(e).__name__}: {e}"
        )

    def _request(self, sock: socket.socket, hdr: dict[str, Any]) -> dict[str, Any]:
        _wire.send_header(sock, hdr)
        return self._answer(sock)

    def _answer(self, sock: socket.socket) -> dict[str, Any]:
        hdr = _wire.recv_header(sock)
        _wire.raise_remote(hdr, self._where)
        return hdr

    # -- reads ------------------------------------------------------------------------------

    def read_into(self, key: str, offset: int, out: memoryview) -> None:
        """Receive ``len(out)`` bytes of ``key`` at ``offset`` straight into ``out``."""
        view = _byte_view(out)
        with self._conn() as sock:
            self._request(sock, {"op": "READ", "key": key, "ranges": [[offset, len(view)]]})
            self._range_into(sock, view)

    def _range_into(self, sock: socket.socket, view: memoryview) -> None:
        hdr = self._answer(sock)
        if int(hdr["length"]) != len(view):
            raise ProtocolError(f"asked for {len(view)} bytes, the peer sends {hdr['length']}")
        _wire.recv_into_exact(sock, view)

    def read(self, key: str, offset: int, length: int) -> bytearray:
        buf = bytearray(length)
        self.read_into(key, offset, memoryview(buf))
        return buf

    def read_ranges(self, key: str, ranges: list[tuple[int, int]]) -> list[bytearray | Exception]:
        """Several ``(offset, length)`` ranges of ``key`` over one connection.

        A range the peer refuses (beyond the end) is its error in the list; a missing key
        raises ``KeyNotFoundError``, a failed connection PeerError.
        """
        out: list[bytearray | Exception] = []
        with self._conn() as sock:
            self._request(sock, {"op": "READ", "key": key, "ranges": [list(r) for r in ranges]})
            for _off, n in ranges:
                buf = bytearray(n)
                try:
                    self._range_into(sock, memoryview(buf))
                except TierckptError as e:
                    out.append(e)
                    continue
                out.append(buf)
        return out

    def stat(self, key: str) -> int | None:
        """Size of ``key`` on the peer, None when it has no such file."""
        with self._conn() as sock:
            size = self._request(sock, {"op": "STAT", "key": key})["size"]
        return None if size is None else int(size)

    def list(self, prefix: str) -> dict[str, int]:
        """Files under ``prefix/`` on the peer (names relative to it) and their sizes."""
        with self._conn() as sock:
            files = self._request(sock, {"op": "LIST", "prefix": prefix})["files"]
        return {str(k): int(v) for k, v in files.items()}

    # -- writes -----------------------------------------------------------------------------

    def put_file(
        self,
        local_path: str,
        key: str,
        blobs: builtins.list[tuple[int, int, str]],
        *,
        length: int | None = None,
    ) -> None:
        """Push a local file (its first ``length`` bytes) to ``key`` on the peer.

        The peer verifies every ``(offset, length, xxh3-128)`` blob on receipt and renames the
        file into place before it acks; only then does this return. A mismatch raises
        ``IntegrityError`` (the peer kept nothing); a refusal (no room) PeerError.
        """
        fd = os.open(local_path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            n = size if length is None else length
            if not 0 <= n <= size:
                raise PeerError(
                    f"put_file of {local_path}: length {n} but the file has {size} bytes"
                )
            with self._conn() as sock:
                hdr = {"op": "PUT", "key": key, "length": n, "blobs": [list(b) for b in blobs]}
                self._request(sock, hdr)
                _wire.sendfile_all(sock, fd, 0, n, self.timeout_s)
                self._answer(sock)
        finally:
            os.close(fd)

    def put_bytes(self, key: str, data: bytes) -> None:
        """Store a small file (at most 64 MiB) at ``key`` on the peer, checksum-verified."""
        if len(data) > MAX_SMALL:
            raise PeerError(f"put_bytes of {len(data)} bytes: use put_file above {MAX_SMALL}")
        with self._conn() as sock:
            hdr = {"op": "PUTB", "key": key, "length": len(data), "checksum": checksum(data)}
            _wire.send_header(sock, hdr)
            sock.sendall(data)
            self._answer(sock)

    def call(self, name: str, payload: bytes) -> bytes:
        """The answer of the peer's handler ``name`` to ``payload``."""
        if len(payload) > MAX_SMALL:
            raise PeerError(f"call payload of {len(payload)} bytes exceeds {MAX_SMALL}")
        with self._conn() as sock:
            _wire.send_header(sock, {"op": "CALL", "name": name, "length": len(payload)})
            sock.sendall(payload)
            hdr = self._answer(sock)
            n = int(hdr["length"])
            if not 0 <= n <= MAX_SMALL:
                raise ProtocolError(f"CALL answer of {n} bytes")
            return bytes(_wire.recv_exact(sock, n))

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for s, _ in idle:
            s.close()

    def __enter__(self) -> PeerClient:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _byte_view(out: memoryview | bytearray) -> memoryview:
    view = memoryview(out)
    if view.readonly:
        raise ValueError("read_into needs a writable buffer")
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


# -- the process-wide service -------------------------------------------------------------

_services: dict[str, PeerService] = {}
_services_lock = threading.Lock()
_atexit_registered = False


def get_service(root: str, secret: bytes, host: str, **options: Any) -> PeerService:
    """This process's service over ``root``, started on first use (thread-safe).

    ``options`` (``port``, ``allow``, ``reserve``, ...) apply when it starts. Asking again
    with another secret or host raises PeerError. Every service is closed at exit.
    """
    global _atexit_registered
    path = os.path.realpath(root)
    with _services_lock:
        svc = _services.get(path)
        if svc is not None and not svc._closed:
            if not hmac.compare_digest(svc._secret, bytes(secret)) or svc.host != host:
                raise PeerError(
                    f"The peer service over {path} already runs with another secret or host "
                    f"({svc.host}); one service per memory root and job."
                )
            return svc
        svc = PeerService(path, secret, host, **options)
        _services[path] = svc
        if not _atexit_registered:
            atexit.register(close_services)
            _atexit_registered = True
        return svc


def close_services() -> None:
    """Close every service :func:`get_service` started (at exit, and in tests)."""
    with _services_lock:
        services = list(_services.values())
        _services.clear()
    for svc in services:
        svc.close()
