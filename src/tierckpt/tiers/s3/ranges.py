"""Reads from S3: one ranged GET per ``part_size`` piece, pieces fetched in parallel."""

from __future__ import annotations

import bisect
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from ...errors import DurableTierError
from ..base import Buffer, KeyNotFoundError
from .errors import ErrorHandling, status_of

if TYPE_CHECKING:
    from obstore import GetOptions, ObjectMeta

__all__ = ["RangedReads"]


class RangedReads(ErrorHandling):
    """``read`` and ``read_ranges`` of :class:`~tierckpt.tiers.s3.S3Tier`."""

    part_size: int
    max_concurrency: int
    _pool: ThreadPoolExecutor | None
    _pool_lock: threading.Lock

    def _head(self, key: str) -> ObjectMeta | None:
        try:
            meta: ObjectMeta = self._call("HEAD", key, lambda: self._ob.head(self._store, key))
        except KeyNotFoundError:
            return None
        return meta

    def _get_piece(
        self, key: str, start: int, end: int, etag: str | None
    ) -> tuple[memoryview, int, str | None]:
        """Bytes ``[start, end)`` (fewer if the object ends first), its size and ETag.

        With ``etag``, the GET carries ``If-Match`` so every piece of one read comes from
        the same version of the object.
        """
        exc = self._ob.exceptions
        options: GetOptions = {"range": (start, end)}
        if etag:
            options["if_match"] = etag

        def fetch() -> tuple[memoryview, int, str | None]:
            result = self._ob.get(self._store, key, options=options)
            data = memoryview(result.bytes())
            meta = result.meta
            return data, int(meta["size"]), meta.get("e_tag")

        try:
            return self._call("GET", key, fetch)
        except DurableTierError as e:
            if isinstance(e.__cause__, exc.PreconditionError):
                raise DurableTierError(
                    f"{self._object(key)} was overwritten while it was being read; read it again."
                ) from e
            raise

    def _pool_for_reads(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(
                    max_workers=self.max_concurrency, thread_name_prefix="tierckpt-s3"
                )
            return self._pool

    def _fetch(
        self,
        key: str,
        pieces: Sequence[tuple[int, int]],
        etag: str | None,
        into: tuple[memoryview, int] | None = None,
    ) -> list[memoryview]:
        """Every piece, exactly (else :class:`KeyNotFoundError`), ``max_concurrency`` at a time.

        With ``into=(view, base)``, the thread that fetched a piece copies it to
        ``view[start - base:]`` and drops it, so at most ``max_concurrency`` pieces are held
        at once; the list returned is then of empty views.
        """

        def one(piece: tuple[int, int]) -> memoryview:
            s, e = piece
            try:
                data, size, _ = self._get_piece(key, s, e, etag)
            except DurableTierError as err:
                if status_of(err.__cause__ or err) == 416:  # starts past the end
                    raise self._short(key, s, e) from err
                raise
            if len(data) != e - s:
                raise self._short(key, size, e)
            if into is not None:
                view, base = into
                view[s - base : e - base] = data
                return memoryview(b"")
            return data

        if len(pieces) <= 1:
            return [one(p) for p in pieces]
        futures = [self._pool_for_reads().submit(one, p) for p in pieces]
        try:
            return [f.result() for f in futures]
        finally:
            for f in futures:
                f.cancel()

    def _pieces(self, start: int, end: int) -> list[tuple[int, int]]:
        return [(s, min(s + self.part_size, end)) for s in range(start, end, self.part_size)]

    def read(self, key: str, offset: int = 0, length: int | None = None) -> Buffer:
        """Bytes ``[offset, offset+length)`` of ``key`` (to the end when ``length`` is None).

        Up to ``part_size`` bytes come from one ranged GET; the rest of a longer read is
        fetched as ``part_size`` ranged GETs in parallel (``max_concurrency``), pinned with
        ``If-Match`` to the version the first answer came from. Returns a new ``bytearray``.
        """
        self._check_key(key)
        if offset < 0 or (length is not None and length < 0):
            raise ValueError(f"invalid range offset={offset} length={length} for {key}")
        if length == 0:
            if self._head(key) is None:
                raise self._missing(key)
            return bytearray()
        first_end = offset + (self.part_size if length is None else min(length, self.part_size))
        try:
            first, size, etag = self._get_piece(key, offset, first_end, None)
        except DurableTierError as e:
            if status_of(e.__cause__ or e) != 416:
                raise
            # 416: the range starts at or past the end of the object.
            meta = self._head(key)
            if meta is None:
                raise self._missing(key) from e
            if length is None and offset == meta["size"]:
                return bytearray()
            raise self._short(key, meta["size"], offset + (length or 1)) from e
        end = size if length is None else offset + length
        if end > size:
            raise self._short(key, size, end)
        first_want = min(first_end, end) - offset
        if len(first) < first_want:
            raise self._short(key, offset + len(first), offset + first_want)
        out = bytearray(end - offset)  # writable, like DirectoryTier's (torch.frombuffer)
        view = memoryview(out)
        view[:first_want] = first[:first_want]
        del first
        self._fetch(key, self._pieces(first_end, end), etag, into=(view, offset))
        return out

    def read_ranges(
        self, key: str, ranges: Sequence[tuple[int, int]], *, coalesce: int = 2**20
    ) -> list[Buffer]:
        """The bytes of each ``(offset, length)`` range of ``key``, in the order given.

        Ranges less than ``coalesce`` bytes apart share one request, as in
        ``obstore.get_ranges``; unlike it, no request exceeds ``part_size`` (obstore merges
        adjacent ranges without limit, so a plan covering a whole file would become one huge
        GET under one timeout) and requests run ``max_concurrency`` at a time. A range within
        one request is returned as a read-only, zero-copy ``memoryview`` of its answer; one
        that spans requests as a ``bytearray``.
        """
        self._check_key(key)
        for off, n in ranges:
            if off < 0 or n < 0:
                raise ValueError(f"invalid range offset={off} length={n} for {key}")
        wanted = sorted({(off, off + n) for off, n in ranges if n > 0})
        if not wanted:
            if self._head(key) is None:
                raise self._missing(key)
            return [b"" for _ in ranges]
        spans: list[list[int]] = []
        for s, e in wanted:
            if spans and s - spans[-1][1] <= coalesce:
                spans[-1][1] = max(spans[-1][1], e)
            else:
                spans.append([s, e])
        pieces = [p for s, e in spans for p in self._pieces(s, e)]
        # The first piece alone: its ETag pins the others to the same version.
        try:
            first, _, etag = self._get_piece(key, *pieces[0], None)
        except DurableTierError as e:
            if status_of(e.__cause__ or e) == 416:
                raise self._short(key, pieces[0][0], pieces[0][1]) from e
            raise
        if len(first) != pieces[0][1] - pieces[0][0]:
            raise self._short(key, pieces[0][0] + len(first), pieces[0][1])
        got = [first, *self._fetch(key, pieces[1:], etag)]
        starts = [p[0] for p in pieces]
        out: list[Buffer] = []
        for off, n in ranges:
            if n == 0:
                out.append(b"")
                continue
            i = bisect.bisect_right(starts, off) - 1
            ps, pe = pieces[i]
            if off + n <= pe:
                out.append(got[i][off - ps : off - ps + n])
                continue
            buf = bytearray(n)
            pos = off
            while pos < off + n:
                ps, pe = pieces[i]
                take = min(pe, off + n) - pos
                buf[pos - off : pos - off + take] = got[i][pos - ps : pos - ps + take]
                pos += take
                i += 1
            out.append(buf)
        return out
