"""Peer transport throughput on loopback: PeerClient.put_file / read_into vs a bare socket.

    python -m benchmarks.peer_transport --gib 1 --reps 5
    python -m benchmarks.peer_transport --quick            # 128 MiB, 2 reps

One run, a server process (a :class:`~tierckpt.peer.PeerService` over a tmpfs root, and a
bare socket server beside it) and this process as the client; per repetition, in rotated
order:

- ``ceiling push``: ``os.sendfile`` of a tmpfs file into a socket, the other side
  ``recv_into`` one preallocated, already-touched buffer; no auth, no header, no checksum.
- ``ceiling pull``: the same the other way (the server sends, this process receives).
- ``put_file``: ``PeerClient.put_file`` of the same tmpfs file (16 MiB blobs): the peer writes
  a new tmpfs file, verifies every blob's xxh3-128 and renames it before it acks.
- ``bare push into a tmpfs file``: the bare push, received into a reused 4 MiB buffer and
  ``pwrite``n into a new tmpfs file: what any receiver that stores the bytes must pay.
- ``put_file, no blobs to verify``: ``put_file`` with an empty blob list (no checksum).
- ``read_into``: ``PeerClient.read_into`` of the file into a preallocated buffer.

With ``--streams 2`` (default) each is also run as 2 parallel streams over halves of the
bytes. GiB/s = bytes / wall time; the table shows the median and the worst repetition, and
each transport op's median relative to the ceiling in its direction. Results go to
``benchmarks/results/peer_transport/`` (JSON with every repetition, and a markdown table).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import platform
import shlex
import shutil
import signal
import socket
import statistics
import struct
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from tierckpt.manifest import checksum
from tierckpt.peer import PeerClient, PeerService
from tierckpt.peer._wire import sendfile_all

__all__ = ["main"]

GIB = 2**30
BLOB = 16 << 20
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "peer_transport")
SECRET = os.urandom(32)
_OP = struct.Struct(">cQQ")  # op (P push / G pull), offset, nbytes


def _like_the_transport(sock: socket.socket) -> None:
    """The socket options of the transport's sockets (a timeout: non-blocking underneath)."""
    sock.settimeout(60)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


# -- the server process -------------------------------------------------------------------


def _bare_serve(conn: socket.socket, src_fd: int, buf: memoryview, dst_dir: str) -> None:
    """The ceiling: push = recv_into the warm buffer, pull = sendfile; 1-byte ack.

    ``F`` (push into a tmpfs file): recv_into a reused 4 MiB buffer and pwrite it into a new
    file, what any receiver that stores the bytes in tmpfs must pay at least.
    """
    chunk = memoryview(bytearray(4 << 20))
    _like_the_transport(conn)
    with conn:
        while True:
            head = bytearray(_OP.size)
            if conn.recv_into(head, _OP.size, socket.MSG_WAITALL) < _OP.size:
                return
            op, off, n = _OP.unpack(head)
            if op == b"P":
                view, got = buf[off : off + n], 0
                while got < n:
                    got += conn.recv_into(view[got:], n - got)
                conn.sendall(b"k")
            elif op == b"F":
                fd = os.open(
                    os.path.join(dst_dir, f"bare-{off}-{time.monotonic_ns()}.bin"),
                    os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                    0o600,
                )
                os.ftruncate(fd, n)
                pos = 0
                while pos < n:
                    part, got = chunk[: min(len(chunk), n - pos)], 0
                    while got < len(part):
                        got += conn.recv_into(part[got:], len(part) - got)
                    os.pwrite(fd, part, pos)
                    pos += len(part)
                os.close(fd)
                conn.sendall(b"k")
            else:
                sendfile_all(conn, src_fd, off, n, 60)
                conn.recv(1)


def _server_main(root: str, src: str, nbytes: int, secret: bytes, pipe: Any) -> None:
    service = PeerService(root, secret, max_connections=8)
    bare = socket.create_server(("127.0.0.1", 0))
    buf = memoryview(bytearray(nbytes))
    buf[:] = b"\x01" * nbytes  # touched: no page faults in the ceiling's receive
    src_fd = os.open(src, os.O_RDONLY)

    def accept() -> None:
        while True:
            c, _ = bare.accept()
            threading.Thread(
                target=_bare_serve, args=(c, src_fd, buf, os.path.join(root, "dst")), daemon=True
            ).start()

    threading.Thread(target=accept, daemon=True).start()
    pipe.send((service.address, bare.getsockname()[:2]))
    pipe.recv()  # until the client is done
    service.close()


# -- client-side operations (each moves `n` bytes at `off`) ----------------------------------


def _bare(address: tuple[str, int]) -> Callable[[str, int, int, memoryview, int], None]:
    local = threading.local()

    def op(kind: str, off: int, n: int, out: memoryview, src_fd: int) -> None:
        sock = getattr(local, "sock", None)
        if sock is None:
            sock = local.sock = socket.create_connection(address)
            _like_the_transport(sock)
        sock.sendall(_OP.pack({"push": b"P", "file": b"F", "pull": b"G"}[kind], off, n))
        if kind in ("push", "file"):
            sendfile_all(sock, src_fd, off, n, 60)
            sock.recv(1)
        else:
            view, got = out[off : off + n], 0
            while got < n:
                got += sock.recv_into(view[got:], n - got)
            sock.sendall(b"k")

    return op


def _timed(fn: Callable[[int], None], streams: int) -> float:
    """Wall seconds of ``fn(i)`` for i in range(streams), run in parallel threads."""
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            fn(i)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(streams)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    dt = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return dt


def _blobs(path: str, off: int, n: int) -> list[tuple[int, int, str]]:
    """16 MiB blobs of ``path[off:off+n]`` (offsets relative to ``off``)."""
    out = []
    with open(path, "rb") as f:
        f.seek(off)
        pos = 0
        while pos < n:
            chunk = f.read(min(BLOB, n - pos))
            out.append((pos, len(chunk), checksum(chunk)))
            pos += len(chunk)
    return out


def _make_source(path: str, nbytes: int) -> None:
    with open(path, "wb") as f:
        left = nbytes
        while left:
            n = min(64 << 20, left)
            f.write(os.urandom(n))
            left -= n


# -- the run ------------------------------------------------------------------------------


def _measure(args: argparse.Namespace, work: str) -> dict[str, Any]:
    nbytes = int(args.gib * GIB)
    root = os.path.join(work, "root")
    os.makedirs(os.path.join(root, "dst"), mode=0o700)
    src = os.path.join(root, "src.bin")
    _make_source(src, nbytes)
    halves = [(0, nbytes // 2), (nbytes // 2, nbytes - nbytes // 2)]
    # each stream of a 2-stream put pushes its own half-size file
    half_src = [os.path.join(root, f"half{i}.bin") for i in range(2)]
    for path, (off, n) in zip(half_src, halves, strict=True):
        with open(src, "rb") as f:
            f.seek(off)
            data = f.read(n)
        with open(path, "wb") as f:
            f.write(data)
    blobs_whole = _blobs(src, 0, nbytes)
    blobs_half = [_blobs(p, 0, n) for p, (_, n) in zip(half_src, halves, strict=True)]

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    server = ctx.Process(target=_server_main, args=(root, src, nbytes, SECRET, child), daemon=True)
    server.start()
    peer_addr, bare_addr = parent.recv()
    src_fd = os.open(src, os.O_RDONLY)
    half_fds = [os.open(p, os.O_RDONLY) for p in half_src]
    out = memoryview(bytearray(nbytes))
    out[:] = b"\x02" * nbytes
    clients = [PeerClient(peer_addr, SECRET, timeout_s=60) for _ in range(2)]
    bare = _bare(bare_addr)
    counter = [0]

    def put(streams: int, verify: bool = True) -> Callable[[int], None]:
        def fn(i: int) -> None:
            counter[0] += 1
            key = f"dst/put-{counter[0]}-{i}.bin"
            if streams == 1:
                clients[i].put_file(src, key, blobs_whole if verify else [])
            else:
                clients[i].put_file(half_src[i], key, blobs_half[i] if verify else [])

        return fn

    def read(streams: int) -> Callable[[int], None]:
        def fn(i: int) -> None:
            off, n = (0, nbytes) if streams == 1 else halves[i]
            clients[i].read_into("src.bin", off, out[off : off + n])

        return fn

    def ceiling(kind: str, streams: int) -> Callable[[int], None]:
        def fn(i: int) -> None:
            off, n = (0, nbytes) if streams == 1 else halves[i]
            bare(kind, off, n, out, src_fd)

        return fn

    systems: dict[str, tuple[Callable[[int], None], int]] = {}
    for s in [1] + ([args.streams] if args.streams > 1 else []):
        tag = "" if s == 1 else f" x{s}"
        systems[f"ceiling push{tag}"] = (ceiling("push", s), s)
        systems[f"bare push into a tmpfs file{tag}"] = (ceiling("file", s), s)
        systems[f"put_file{tag}"] = (put(s), s)
        if s == 1:
            systems["put_file, no blobs to verify"] = (put(s, verify=False), s)
        systems[f"ceiling pull{tag}"] = (ceiling("pull", s), s)
        systems[f"read_into{tag}"] = (read(s), s)
    names = list(systems)
    times: dict[str, list[float]] = {n: [] for n in names}
    try:
        for rep in range(args.warmup + args.reps):
            order = names[rep % len(names) :] + names[: rep % len(names)]
            for name in order:
                fn, streams = systems[name]
                dt = _timed(fn, streams)
                if rep >= args.warmup:
                    times[name].append(dt)
                for f in os.listdir(os.path.join(root, "dst")):
                    os.unlink(os.path.join(root, "dst", f))
        with open(src, "rb") as f:  # the reads were bit-exact
            assert checksum(out) == checksum(f.read()), "read_into returned other bytes"
    finally:
        for c in clients:
            c.close()
        parent.send("done")
        server.join(30)
        for fd in [src_fd, *half_fds]:
            os.close(fd)
    return {"bytes": nbytes, "times_s": times}


def _summarise(raw: dict[str, Any]) -> dict[str, Any]:
    nbytes = raw["bytes"]
    rows: dict[str, dict[str, float]] = {}
    for name, ts in raw["times_s"].items():
        rates = [nbytes / t / GIB for t in ts]
        rows[name] = {
            "median_gibs": statistics.median(rates),
            "worst_gibs": min(rates),
            "best_gibs": max(rates),
        }
    for name, row in rows.items():
        head, sep, streams = name.rpartition(" x")
        tag = sep + streams if sep and streams.isdigit() else ""
        base = (head if tag else name).split(",")[0]
        ref = {"put_file": "ceiling push", "read_into": "ceiling pull"}.get(base)
        if ref is not None:
            row["vs_ceiling"] = row["median_gibs"] / rows[ref + tag]["median_gibs"]
            row["vs_ceiling_1_stream"] = row["median_gibs"] / rows[ref]["median_gibs"]
        if base == "put_file":
            row["vs_bare_tmpfs_file"] = (
                row["median_gibs"] / rows["bare push into a tmpfs file" + tag]["median_gibs"]
            )
    return rows


def _table(rows: dict[str, dict[str, float]]) -> str:
    lines = [
        "| operation | median GiB/s | worst GiB/s | vs ceiling | vs 1-stream ceiling "
        "| vs bare push into a tmpfs file |",
        "|---|---:|---:|---:|---:|---:|",
    ]

    def ratio(r: dict[str, float], k: str) -> str:
        return f"{r[k]:.2f}x" if k in r else "-"

    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['median_gibs']:.2f} | {r['worst_gibs']:.2f} "
            f"| {ratio(r, 'vs_ceiling')} | {ratio(r, 'vs_ceiling_1_stream')} "
            f"| {ratio(r, 'vs_bare_tmpfs_file')} |"
        )
    return "\n".join(lines)


def _machine() -> dict[str, Any]:
    cpu = None
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cores_usable": len(os.sched_getaffinity(0)),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg": os.getloadavg(),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gib", type=float, default=1.0, help="bytes per transfer (GiB)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--streams", type=int, default=2, help="also run N parallel streams (1: off)")
    p.add_argument("--quick", action="store_true", help="128 MiB, 2 reps, no warm-up")
    p.add_argument("--shm-dir", default="/dev/shm")
    p.add_argument("--name", default=None, help="results file name (default from --gib)")
    args = p.parse_args(argv)
    if args.quick:
        args.gib, args.reps, args.warmup = 0.125, 2, 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the tmpfs files go too
    work = os.path.join(args.shm_dir, f"tierckpt-bench-peer-{os.getpid()}")
    os.makedirs(work, mode=0o700)
    machine = _machine()
    try:
        raw = _measure(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = _summarise(raw)
    command = "python -m benchmarks.peer_transport " + shlex.join(
        sys.argv[1:] if argv is None else argv
    )
    table = _table(rows)
    print(f"{raw['bytes'] / GIB:g} GiB per transfer, medians of {args.reps} reps\n")
    print(table)
    os.makedirs(RESULTS_DIR, exist_ok=True)
    name = args.name or f"peer-transport-{args.gib:g}g"
    result = {
        "command": command.strip(),
        "machine": machine,
        "config": vars(args),
        "summary": rows,
        "raw": raw,
        "loadavg_end": os.getloadavg(),
    }
    with open(os.path.join(RESULTS_DIR, name + ".json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(RESULTS_DIR, name + ".md"), "w") as f:
        f.write(
            f"# Peer transport on loopback\n\n```\n{command.strip()}\n```\n\n"
            f"Machine: {machine['cpu']}, {machine['cores_usable']} cores, Linux "
            f"{machine['kernel']}, Python {machine['python']}; load average at start "
            f"{machine['loadavg'][0]:.2f}. {raw['bytes'] / GIB:g} GiB per transfer, medians of "
            f"{args.reps} reps (+{args.warmup} warm-up).\n\n{table}\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
