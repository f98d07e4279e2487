"""The peer transport (issue 8): an authenticated TCP service over a tmpfs root, real sockets.

Each test starts a real :class:`PeerService` on loopback over a fresh directory under
``/dev/shm/tierckpt-test-peer-*`` (removed by the fixture) and talks to it with a real
:class:`PeerClient` or a raw socket.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import socket
import stat
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tierckpt.errors import IntegrityError, MemoryBudgetError, PeerError, TierckptError
from tierckpt.manifest import checksum
from tierckpt.peer import (
    PeerClient,
    PeerService,
    _wire,
    bind_host,
    close_services,
    get_service,
    job_secret,
)
from tierckpt.tiers.base import KeyNotFoundError

SECRET = b"k" * 32
MIB = 1 << 20


@pytest.fixture
def root() -> Iterator[str]:
    path = os.path.join("/dev/shm", f"tierckpt-test-peer-{uuid.uuid4().hex}")
    os.mkdir(path, 0o700)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def service(root: str) -> Iterator[PeerService]:
    os.mkdir(os.path.join(root, "node"), 0o700)
    svc = PeerService(os.path.join(root, "node"), SECRET, timeout_s=5)
    try:
        yield svc
    finally:
        svc.close()


@pytest.fixture
def client(service: PeerService) -> Iterator[PeerClient]:
    with PeerClient(service.address, SECRET, timeout_s=5) as c:
        yield c


def _write(path: str, data: bytes) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return path


def _blobs(data: bytes, size: int) -> list[tuple[int, int, str]]:
    return [
        (o, len(data[o : o + size]), checksum(data[o : o + size]))
        for o in range(0, len(data), size)
    ]


def _tree(path: str) -> list[str]:
    return sorted(
        os.path.relpath(os.path.join(d, f), path) for d, _, fs in os.walk(path) for f in fs
    )


# -- reads ---------------------------------------------------------------------------------


def test_reads_are_bit_exact_into_the_callers_buffer(
    service: PeerService, client: PeerClient
) -> None:
    node = service.root.path
    data = os.urandom(10 * MIB + 123)
    _write(os.path.join(node, "ns/step_1/data.bin"), data)

    out = bytearray(len(data))
    client.read_into("ns/step_1/data.bin", 0, memoryview(out))
    assert out == data
    assert (
        client.read("ns/step_1/data.bin", 5 * MIB + 7, 1000) == data[5 * MIB + 7 : 5 * MIB + 1007]
    )
    # a view of another format (a float tensor's buffer) is filled byte for byte
    floats = memoryview(bytearray(4096)).cast("f")
    client.read_into("ns/step_1/data.bin", 64, floats)
    assert bytes(floats.cast("B")) == data[64 : 64 + 4096]

    got = client.read_ranges(
        "ns/step_1/data.bin", [(0, 10), (len(data) - 3, 3), (len(data) - 1, 2), (100, 0)]
    )
    assert got[0] == data[:10] and got[1] == data[-3:] and got[3] == b""
    assert isinstance(got[2], KeyNotFoundError) and "beyond its end" in str(got[2])

    with pytest.raises(KeyNotFoundError):
        client.read("ns/step_1/missing.bin", 0, 1)
    with pytest.raises(KeyNotFoundError):
        client.read_ranges("ns/nope/x", [(0, 1)])
    assert client.stat("ns/step_1/data.bin") == len(data)
    assert client.stat("ns/step_1/missing.bin") is None

    _write(os.path.join(node, "ns/step_1/data.bin.tmp-12-0123456789abcdef"), b"partial")
    _write(os.path.join(node, "ns/step_1/sub/m.json"), b"{}")
    assert client.list("ns") == {"step_1/data.bin": len(data), "step_1/sub/m.json": 2}
    assert client.list("ns/none") == {}


# -- writes --------------------------------------------------------------------------------


def test_put_file_is_verified_renamed_into_place_and_announced(
    root: str, service: PeerService, client: PeerClient
) -> None:
    seen: list[tuple[str, str]] = []
    service.on_put(lambda key, path: seen.append((key, path)))
    for size in (12 * MIB + 5, 3000, 0):  # the pipelined path, the inline path, empty
        data = os.urandom(size)
        src = _write(os.path.join(root, "local", f"f{size}.bin"), data + b"tail not sent")
        key = f"ns/step_2/replica/f{size}.bin"
        client.put_file(src, key, _blobs(data, 4 * MIB + 1), length=size)
        final = os.path.join(service.root.path, key)
        with open(final, "rb") as f:
            assert f.read() == data
        assert stat.S_IMODE(os.stat(final).st_mode) == 0o600
        assert seen[-1] == (key, final)
    assert stat.S_IMODE(os.stat(os.path.join(service.root.path, "ns/step_2")).st_mode) == 0o700

    client.put_bytes("ns/step_2/COMMIT", b'{"step": 2}')
    assert client.read("ns/step_2/COMMIT", 0, 11) == b'{"step": 2}'
    assert _tree(service.root.path) == sorted(
        ["ns/step_2/COMMIT"] + [f"ns/step_2/replica/f{s}.bin" for s in (12 * MIB + 5, 3000, 0)]
    )


def test_a_corrupt_blob_raises_integrity_error_and_leaves_nothing(
    root: str, service: PeerService, client: PeerClient
) -> None:
    released: list[tuple[str, int]] = []
    service._release = lambda key, n: released.append((key, n))
    data = os.urandom(12 * MIB)
    src = _write(os.path.join(root, "local", "a.bin"), data)
    blobs = _blobs(data, 4 * MIB)
    blobs[1] = (blobs[1][0], blobs[1][1], checksum(b"something else"))
    with pytest.raises(IntegrityError, match="1 of 3 blobs arrived corrupt"):
        client.put_file(src, "ns/step_3/a.bin", blobs)
    small = [(0, 100, checksum(data[:99] + b"x"))]
    with pytest.raises(IntegrityError):
        client.put_file(src, "ns/step_3/b.bin", small, length=100)
    assert _tree(service.root.path) == []  # no file, no temporary
    assert released == [("ns/step_3/a.bin", 12 * MIB), ("ns/step_3/b.bin", 100)]
    # the connection stays usable after a refusal
    client.put_file(src, "ns/step_3/a.bin", _blobs(data, 4 * MIB))
    assert client.stat("ns/step_3/a.bin") == 12 * MIB


def test_put_bytes_verifies_the_whole_payload(service: PeerService, client: PeerClient) -> None:
    sock = client._take()
    _wire.send_header(
        sock, {"op": "PUTB", "key": "ns/m.json", "length": 4, "checksum": checksum(b"good")}
    )
    sock.sendall(b"evil")
    with pytest.raises(IntegrityError):
        _wire.raise_remote(_wire.recv_header(sock), "test")
    sock.close()
    assert _tree(service.root.path) == []


def test_reserve_hook_and_a_full_tmpfs_refuse_the_put_before_any_byte(
    root: str, service: PeerService, client: PeerClient
) -> None:
    def reserve(key: str, nbytes: int) -> None:
        if nbytes > MIB:
            raise MemoryBudgetError(f"{key} needs {nbytes} bytes, the node budget has 1 MiB left")

    service._reserve = reserve
    data = os.urandom(2 * MIB)
    src = _write(os.path.join(root, "local", "big.bin"), data)
    with pytest.raises(PeerError, match="MemoryBudgetError: ns/big.bin needs 2097152") as info:
        client.put_file(src, "ns/big.bin", _blobs(data, MIB))
    assert info.value.remote_type == "MemoryBudgetError"
    client.put_file(src, "ns/small.bin", _blobs(data[:MIB], MIB), length=MIB)

    # a (sparse) file larger than the free space of the peer's tmpfs: refused up front
    service._reserve = None
    free = os.statvfs(service.root.path).f_bavail * os.statvfs(service.root.path).f_frsize
    sparse = os.path.join(root, "local", "sparse.bin")
    with open(sparse, "wb") as f:
        f.truncate(free + 64 * MIB)
    t0 = time.monotonic()
    with pytest.raises(PeerError, match="no room for ns/huge.bin") as info:
        client.put_file(sparse, "ns/huge.bin", [])
    assert info.value.remote_type == "TierFullError"
    assert time.monotonic() - t0 < 2  # nothing was sent
    assert _tree(service.root.path) == ["ns/small.bin"]


# -- authentication ------------------------------------------------------------------------


def test_a_client_with_another_secret_can_read_or_write_nothing(
    root: str, service: PeerService
) -> None:
    _write(os.path.join(service.root.path, "ns/secret.bin"), b"private")
    src = _write(os.path.join(root, "local", "x.bin"), b"planted")
    with PeerClient(service.address, b"another job's secret", timeout_s=5) as stranger:
        with pytest.raises(PeerError, match="refused authentication"):
            stranger.read("ns/secret.bin", 0, 7)
        with pytest.raises(PeerError, match="refused authentication"):
            stranger.put_file(src, "ns/planted.bin", [(0, 7, checksum(b"planted"))])
        with pytest.raises(PeerError, match="refused authentication"):
            stranger.put_bytes("ns/planted.json", b"{}")
    assert _tree(service.root.path) == ["ns/secret.bin"]


def test_a_raw_stranger_gets_a_challenge_and_a_denial_only(service: PeerService) -> None:
    _write(os.path.join(service.root.path, "ns/secret.bin"), b"private")
    request = b'{"op":"READ","key":"ns/secret.bin","ranges":[[0,7]]}'
    for garbage in (
        os.urandom(64),  # a wrong proof
        len(request).to_bytes(4, "big") + request + os.urandom(8),  # a request, no handshake
    ):
        with socket.create_connection(service.address, timeout=5) as s:
            greeting = _wire.recv_exact(s, 38)
            assert greeting[:4] == b"TCKP"
            s.sendall(garbage)
            received = b""
            try:
                while chunk := s.recv(4096):
                    received += chunk
            except ConnectionResetError:  # closed with our surplus bytes unread
                pass
            assert received in (bytes([_wire.AUTH_DENIED]), b"")
    # a stranger who connects and says nothing is dropped too, and the service still serves
    with socket.create_connection(service.address, timeout=5) as s:
        s.recv(38)
        with PeerClient(service.address, SECRET, timeout_s=5) as ok:
            assert ok.read("ns/secret.bin", 0, 7) == b"private"
    assert _tree(service.root.path) == ["ns/secret.bin"]


def test_the_client_refuses_a_server_that_cannot_prove_the_secret() -> None:
    listener = socket.create_server(("127.0.0.1", 0))

    def impostor() -> None:  # accepts any proof, then answers with a made-up one
        conn, _ = listener.accept()
        with conn:
            conn.sendall(b"TCKP" + bytes([_wire.VERSION, _wire.GREET_OK]) + os.urandom(32))
            _wire.recv_exact(conn, 64)
            conn.sendall(bytes([_wire.AUTH_OK]) + os.urandom(32))
            conn.recv(1)

    t = threading.Thread(target=impostor, daemon=True)
    t.start()
    try:
        with (
            pytest.raises(PeerError, match="could not prove it knows the job secret"),
            PeerClient(listener.getsockname(), SECRET, timeout_s=5) as c,
        ):
            c.stat("x")
    finally:
        t.join(5)
        listener.close()


# -- paths ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key", ["../outside.bin", "/etc/hostname", "ns/../../outside.bin", "ns//x", "./x", ""]
)
def test_keys_that_escape_the_root_are_refused(
    root: str, service: PeerService, client: PeerClient, key: str
) -> None:
    _write(os.path.join(root, "outside.bin"), b"not yours")
    src = _write(os.path.join(root, "local", "p.bin"), b"planted")
    for op in (
        lambda: client.read(key, 0, 1),
        lambda: client.stat(key),
        lambda: client.put_file(src, key, [(0, 7, checksum(b"planted"))]),
        lambda: client.put_bytes(key, b"planted"),
    ):
        with pytest.raises(PeerError, match="is not served by this peer"):
            op()
    assert _tree(service.root.path) == []
    with open(os.path.join(root, "outside.bin"), "rb") as f:
        assert f.read() == b"not yours"


def test_symlinks_inside_the_root_are_never_followed(
    root: str, service: PeerService, client: PeerClient
) -> None:
    node = service.root.path
    outside = os.path.join(root, "outside")
    _write(os.path.join(outside, "secret.bin"), b"not yours")
    os.symlink(os.path.join(outside, "secret.bin"), os.path.join(node, "link.bin"))
    os.symlink(outside, os.path.join(node, "dirlink"))
    src = _write(os.path.join(root, "local", "p.bin"), b"planted")
    with pytest.raises(PeerError, match="symlink"):
        client.read("link.bin", 0, 1)
    with pytest.raises(PeerError, match="symlink"):
        client.read("dirlink/secret.bin", 0, 1)
    with pytest.raises(PeerError, match="symlink"):
        client.put_file(src, "dirlink/planted.bin", [(0, 7, checksum(b"planted"))])
    with pytest.raises(PeerError, match="symlink"):
        client.list("dirlink")
    assert client.stat("link.bin") is None
    assert client.list("") == {}
    assert sorted(os.listdir(outside)) == ["secret.bin"]


# -- dead and stalled peers, bounds ----------------------------------------------------------


def _fake_peer(behaviour: str) -> tuple[socket.socket, threading.Thread, threading.Event]:
    """A listener that accepts and then stalls (``silent``), or authenticates, answers a
    READ with half its bytes and stalls (``half``)."""
    listener = socket.create_server(("127.0.0.1", 0))
    done = threading.Event()

    def run() -> None:
        conn, _ = listener.accept()
        with conn:
            if behaviour == "half":
                conn.settimeout(5)
                _wire.server_handshake(conn, SECRET)
                _wire.recv_header(conn)
                _wire.send_header(conn, {"ok": True, "size": 1000})
                _wire.send_header(conn, {"ok": True, "length": 1000})
                conn.sendall(b"x" * 500)
            done.wait(10)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return listener, t, done


@pytest.mark.parametrize("behaviour", ["silent", "half"])
def test_a_peer_that_stalls_raises_peer_error_within_the_timeout(behaviour: str) -> None:
    listener, t, done = _fake_peer(behaviour)
    try:
        c = PeerClient(listener.getsockname(), SECRET, timeout_s=0.5)
        t0 = time.monotonic()
        with pytest.raises(PeerError, match="stopped answering for 0.5 s"):
            c.read("x", 0, 1000)
        assert time.monotonic() - t0 < 1.5
    finally:
        done.set()
        listener.close()
        t.join()


def test_a_dead_peer_and_a_closed_service_raise_peer_error_at_once(root: str) -> None:
    os.mkdir(os.path.join(root, "n"))
    svc = PeerService(os.path.join(root, "n"), SECRET)
    c = PeerClient(svc.address, SECRET, timeout_s=5)
    assert c.stat("x") is None
    svc.close()
    t0 = time.monotonic()
    with pytest.raises(PeerError, match="Cannot connect to the peer"):
        c.stat("x")  # the pooled connection was closed by the service: not reused
    assert time.monotonic() - t0 < 1


def test_connections_beyond_max_connections_are_refused_clearly(root: str) -> None:
    os.mkdir(os.path.join(root, "n"))
    with PeerService(os.path.join(root, "n"), SECRET, max_connections=2, timeout_s=5) as svc:
        holders = [PeerClient(svc.address, SECRET) for _ in range(2)]
        for h in holders:
            assert h.stat("x") is None  # each keeps its connection (and a handler) open
        with pytest.raises(PeerError, match="maximum number of connections"):
            PeerClient(svc.address, SECRET).stat("x")
        holders[0].close()
        deadline = time.monotonic() + 5
        while True:  # the handler notices the close and frees its slot
            try:
                assert PeerClient(svc.address, SECRET).stat("x") is None
                break
            except PeerError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        holders[1].close()


def test_idle_pooled_connections_dropped_by_the_service_are_replaced(root: str) -> None:
    os.mkdir(os.path.join(root, "n"))
    with PeerService(os.path.join(root, "n"), SECRET, timeout_s=0.3) as svc:
        c = PeerClient(svc.address, SECRET)
        assert c.stat("x") is None
        time.sleep(0.6)  # the service's idle timeout closes the connection
        assert c.stat("x") is None


def test_calls_reach_registered_handlers_and_errors_come_back_typed(
    service: PeerService, client: PeerClient
) -> None:
    service.register("echo", lambda payload: payload[::-1])

    def fail(payload: bytes) -> bytes:
        raise IntegrityError("the inventory is corrupt")

    service.register("fail", fail)
    assert client.call("echo", b"abc") == b"cba"
    with pytest.raises(IntegrityError, match="the inventory is corrupt"):
        client.call("fail", b"")
    with pytest.raises(PeerError, match="no handler 'nope'"):
        client.call("nope", b"")


def test_get_service_is_one_service_per_root(root: str) -> None:
    os.mkdir(os.path.join(root, "n"))
    try:
        a = get_service(os.path.join(root, "n"), SECRET, "127.0.0.1")
        assert get_service(os.path.join(root, "n") + "/", SECRET, "127.0.0.1") is a
        with pytest.raises(PeerError, match="already runs"):
            get_service(os.path.join(root, "n"), b"other", "127.0.0.1")
    finally:
        close_services()


# -- secret and address ----------------------------------------------------------------------


def _secret_in_rank(rank: int, port: int, out: Any) -> None:
    from torch.distributed import TCPStore

    store = TCPStore(
        "127.0.0.1", port, 2, rank == 0, timeout=__import__("datetime").timedelta(seconds=30)
    )
    os.environ.pop("TIERCKPT_PEER_SECRET", None)
    first = job_secret(store)
    assert job_secret(store) is first  # cached per store
    store.set(f"done{rank}", "1")
    store.wait([f"done{1 - rank}"])
    out.put((rank, first.hex()))


def test_job_secret_is_agreed_through_a_real_tcpstore_by_two_processes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_secret_in_rank, args=(r, port, out)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict(out.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert got[0] == got[1] and len(bytes.fromhex(got[0])) == 32

    monkeypatch.setenv("TIERCKPT_PEER_SECRET", "00ff" * 8)
    assert job_secret() == bytes.fromhex("00ff" * 8)
    monkeypatch.setenv("TIERCKPT_PEER_SECRET", "a passphrase, not hex")
    assert job_secret() == b"a passphrase, not hex"
    monkeypatch.delenv("TIERCKPT_PEER_SECRET")
    with pytest.raises(PeerError, match="TIERCKPT_PEER_SECRET"):
        job_secret()  # no process group here: no default store


def test_bind_host_uses_the_interface_of_the_job(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TIERCKPT_PEER_HOST", raising=False)
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    assert bind_host() == "127.0.0.1"
    assert bind_host("localhost") == "127.0.0.1"
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.2")
    assert bind_host() == "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.77", 9))  # any routed address: the local end is ours
            mine = s.getsockname()[0]
        except OSError:
            mine = None
    if mine is not None and not mine.startswith("127."):
        assert bind_host(mine) == mine
        assert bind_host("192.0.2.77") == mine
    monkeypatch.setenv("TIERCKPT_PEER_HOST", "10.1.2.3")
    assert bind_host() == "10.1.2.3"
    assert issubclass(PeerError, TierckptError)


def test_a_put_is_received_into_a_recycled_resident_file_when_the_node_offers_one(
    root: str,
) -> None:
    """The receiver's pool offers a resident file: the bytes land in it (its inode), bigger
    than needed is cut to size, and the data is verified like any put's."""
    from tierckpt.staging import StagingPool
    from tierckpt.tiers.memory import MemoryTier

    node = os.path.join(root, "node")
    os.mkdir(node, 0o700)
    pool = StagingPool(MemoryTier(node), "ns")
    os.makedirs(pool.pool_dir, mode=0o700)
    sizes = {"a.buf": 8 * MIB, "b.buf": 6 * MIB}
    inodes = {}
    for name, size in sizes.items():
        path = _write(os.path.join(pool.pool_dir, name), b"\1" * size)
        inodes[name] = os.stat(path).st_ino
    offered: list[str] = []

    def recycled(key: str, nbytes: int, dest: str) -> bool:
        offered.append(key)
        return pool.claim_into(nbytes, dest)

    svc = PeerService(node, SECRET, timeout_s=5, recycled=recycled)
    try:
        with PeerClient(svc.address, SECRET, timeout_s=5) as c:
            data = os.urandom(5 * MIB + 7)
            src = _write(os.path.join(root, "local", "part.data"), data)
            c.put_file(src, "ns/step_1/part.data", _blobs(data, MIB), length=len(data))
            second = os.urandom(MIB)
            src2 = _write(os.path.join(root, "local", "two.data"), second)
            c.put_file(src2, "ns/step_1/two.data", _blobs(second, MIB), length=len(second))
    finally:
        svc.close()
    final = os.path.join(node, "ns/step_1/part.data")
    with open(final, "rb") as f:
        assert f.read() == data  # cut to size: no byte of the old contents past the end
    assert os.stat(final).st_ino == inodes["b.buf"], "the smallest pooled file that fits"
    assert offered == ["ns/step_1/part.data", "ns/step_1/two.data"]
    # The last pooled file is left for this node's next save: the second put got a new file.
    assert os.listdir(pool.pool_dir) == ["a.buf"]
    assert os.stat(os.path.join(node, "ns/step_1/two.data")).st_ino not in inodes.values()
