"""Writes to S3: one PUT up to ``part_size``, else a streamed multipart upload."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from ..base import Buffer
from .errors import ErrorHandling

__all__ = ["Uploads", "byte_view"]


def byte_view(chunk: Buffer) -> memoryview:
    """A flat unsigned-byte view of any contiguous buffer (obstore takes uint8 only)."""
    view = memoryview(chunk)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def _parts(chunks: Iterable[Buffer], part_size: int) -> Iterator[bytearray]:
    """Re-cut ``chunks`` into fresh ``part_size`` buffers (the last one shorter).

    Copying into new buffers keeps the upload correct when a caller reuses one buffer
    between yields: obstore keeps a reference to each item until its part is sent.
    """
    part = bytearray(part_size)
    filled = 0
    for chunk in chunks:
        view = byte_view(chunk)
        while view:
            take = min(part_size - filled, len(view))
            part[filled : filled + take] = view[:take]
            filled += take
            view = view[take:]
            if filled == part_size:
                yield part
                part = bytearray(part_size)
                filled = 0
    if filled:
        del part[filled:]
        yield part


class Uploads(ErrorHandling):
    """``write`` and ``put_file`` of :class:`~tierckpt.tiers.s3.S3Tier`."""

    part_size: int
    max_concurrency: int

    def write(self, key: str, chunks: Iterable[Buffer]) -> int:
        """Store the concatenated chunks: one PUT up to ``part_size``, else a multipart upload."""
        self._check_key(key)
        parts = _parts(chunks, self.part_size)
        first = next(parts, bytearray())
        second = next(parts, None)
        if second is None:
            return self._put_one(key, first)
        head = [first, second]
        del first, second
        total = [0]
        raised: list[BaseException] = []

        def stream() -> Iterator[bytearray]:
            try:
                while head:
                    part = head.pop(0)  # no reference kept once obstore has it
                    total[0] += len(part)
                    yield part
                for part in parts:
                    total[0] += len(part)
                    yield part
            except Exception as e:  # from ``chunks``: re-raised to the caller unchanged
                raised.append(e)
                raise

        # Any failure, including an exception from ``chunks``, aborts the multipart upload:
        # readers never see a partial object (and an earlier version stays in place).
        try:
            self._ob.put(
                self._store,
                key,
                stream(),
                use_multipart=True,
                chunk_size=self.part_size,
                max_concurrency=self.max_concurrency,
            )
        except Exception as e:
            if raised and e is raised[0]:
                raise
            err = self._translate(e, "multipart PUT", key)
            if err is e:
                raise
            raise err from e
        return total[0]

    def _put_one(self, key: str, data: bytearray) -> int:
        self._call("PUT", key, lambda: self._ob.put(self._store, key, data, use_multipart=False))
        return len(data)

    def put_file(self, key: str, path: str) -> int:
        """Upload a local file; obstore reads it part by part (multipart above ``part_size``)."""
        self._check_key(key)
        size = os.stat(path).st_size
        self._call(
            "PUT",
            key,
            lambda: self._ob.put(
                self._store,
                key,
                Path(path),
                chunk_size=self.part_size,
                max_concurrency=self.max_concurrency,
            ),
        )
        return size
