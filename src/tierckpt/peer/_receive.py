"""Receiving a pushed file: from the socket into a tmpfs file, every blob hashed on the way.

The connection's thread ``recv_into``s a ring of fixed-size chunk buffers; for each full
chunk a hashing thread feeds the xxh3-128 of every blob it overlaps while a writing thread
``pwrite``s it to the file (allocating tmpfs pages), and the buffer is reused once both are
done. The three stages overlap (socket copies, hashing and writes all release the GIL): with
the hashing in the writer thread, a quick benchmark run here gave 1.19 GiB/s against 1.47
for the same put without checksums. Memory: ``RING`` chunks per transfer, whatever the file's size. Small files
skip the thread. A write that fails (ENOSPC) stops writing but the rest of the stream is
still read, so the connection stays in step and the refusal can be answered.
"""

from __future__ import annotations

import queue
import socket
import threading

import xxhash

from ..staging import pwrite_all
from ._wire import CHUNK, recv_into_exact

__all__ = ["RING", "Blob", "Receipt", "receive_file"]

Blob = tuple[int, int, str]
"""``(offset, length, xxh3-128 hex)`` of one blob of a file."""
RING = 3
"""Chunk buffers per transfer (``RING * CHUNK`` bytes of memory)."""


class _Hashers:
    """One xxh3-128 per blob, fed with whatever part of a chunk overlaps the blob."""

    def __init__(self, blobs: list[Blob]) -> None:
        self._blobs = blobs
        self._order = sorted(range(len(blobs)), key=lambda i: blobs[i][0])
        self._hashers = [xxhash.xxh3_128() for _ in blobs]
        self._first = 0  # position in _order of the first blob not complete yet

    def update(self, pos: int, data: memoryview) -> None:
        end = pos + len(data)
        order, blobs = self._order, self._blobs
        j = self._first
        while j < len(order) and blobs[order[j]][0] < end:
            off, n, _ = blobs[order[j]]
            lo, hi = max(off, pos), min(off + n, end)
            if lo < hi:
                self._hashers[order[j]].update(data[lo - pos : hi - pos])
            j += 1
        while self._first < len(order) and sum(blobs[order[self._first]][:2]) <= end:
            self._first += 1

    def mismatches(self) -> list[Blob]:
        pairs = zip(self._blobs, self._hashers, strict=True)
        return [b for b, h in pairs if h.hexdigest() != b[2]]


class Receipt:
    """What arrived: the blobs whose checksum did not match, or the write error."""

    def __init__(self, mismatches: list[Blob], write_error: OSError | None) -> None:
        self.mismatches = mismatches
        self.write_error = write_error


def receive_file(sock: socket.socket, fd: int, length: int, blobs: list[Blob]) -> Receipt:
    """Receive ``length`` bytes from ``sock`` into ``fd`` at offset 0, hashing every blob.

    Transport failures (closed, timed out) raise; a failing write is returned in the
    :class:`Receipt` after the whole stream was read.
    """
    hashers = _Hashers(blobs)
    if length <= 2 * CHUNK:
        return _receive_inline(sock, fd, length, hashers)
    free: queue.SimpleQueue[int] = queue.SimpleQueue()
    buffers = [memoryview(bytearray(CHUNK)) for _ in range(RING)]
    users = [0] * RING  # stages still using each buffer
    lock = threading.Lock()
    for i in range(RING):
        free.put(i)
    failed: list[OSError] = []

    def done(i: int) -> None:
        with lock:
            users[i] -= 1
            if users[i] == 0:
                free.put(i)

    def hash_stage(q: queue.SimpleQueue[tuple[int, int, int] | None]) -> None:
        while (item := q.get()) is not None:
            i, pos, n = item
            hashers.update(pos, buffers[i][:n])
            done(i)

    def write_stage(q: queue.SimpleQueue[tuple[int, int, int] | None]) -> None:
        while (item := q.get()) is not None:
            i, pos, n = item
            part = buffers[i][:n]
            if not failed:
                try:
                    pwrite_all(fd, part, pos)
                except OSError as e:
                    failed.append(e)
            done(i)

    stages = [write_stage, hash_stage]
    queues: list[queue.SimpleQueue[tuple[int, int, int] | None]] = [
        queue.SimpleQueue() for _ in stages
    ]
    threads = [
        threading.Thread(target=f, args=(q,), name="tierckpt-peer-receive", daemon=True)
        for f, q in zip(stages, queues, strict=True)
    ]
    for t in threads:
        t.start()
    try:
        pos = 0
        while pos < length:
            n = min(CHUNK, length - pos)
            i = free.get()
            recv_into_exact(sock, buffers[i][:n])
            users[i] = len(stages)
            for q in queues:
                q.put((i, pos, n))
            pos += n
    finally:
        for q in queues:
            q.put(None)
        for t in threads:
            t.join()
    return Receipt(hashers.mismatches(), failed[0] if failed else None)


def _receive_inline(sock: socket.socket, fd: int, length: int, hashers: _Hashers) -> Receipt:
    buf = memoryview(bytearray(min(CHUNK, length)))
    error: OSError | None = None
    pos = 0
    while pos < length:
        part = buf[: min(CHUNK, length - pos)]
        recv_into_exact(sock, part)
        if error is None:
            hashers.update(pos, part)
            try:
                pwrite_all(fd, part, pos)
            except OSError as e:
                error = e
        pos += len(part)
    return Receipt(hashers.mismatches(), error)
