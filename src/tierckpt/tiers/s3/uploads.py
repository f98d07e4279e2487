"""Writes to S3: one PUT up to ``part_size``, else a streamed multipart upload."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ...errors import DurableTierError
from ..base import Buffer
from .client import boto3_client
from .errors import ErrorHandling, first_line

__all__ = ["Uploads", "byte_view"]

_log = logging.getLogger("tierckpt")
_warned_no_boto3 = threading.Event()


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
    prefix: str
    region: str | None
    _provider: Any
    _boto3: Any

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
            self._abort_left_open(key)
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
        try:
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
        except Exception:
            if size > self.part_size:
                self._abort_left_open(key)
            raise
        return size

    def _abort_left_open(self, key: str) -> None:
        """After a failed multipart upload of ``key``: abort what it left open.

        obstore aborts a failed upload itself, but when that abort fails too (the endpoint
        that failed the part is often still failing) the parts stay, billed, until a
        lifecycle rule removes them. This upload was the key's only writer (keys name their
        attempt and rank) and has stopped, so every open upload of exactly ``key`` is its.
        Best effort: the upload's own error is what the caller gets.
        """
        try:
            aborted = self._abort_uploads(key, exact=True)
        except Exception as e:
            _log.warning(
                "The failed upload of %s may have left its parts open in S3 (aborting them "
                "failed too: %s); a later resume aborts them, or give the bucket a lifecycle "
                "rule with AbortIncompleteMultipartUpload.",
                self._object(key),
                first_line(e),
            )
            return
        if aborted:
            _log.debug(
                "Aborted %d multipart upload(s) left open by a failed upload of %s.",
                aborted,
                self._object(key),
            )

    def discard_partial(self, prefix: str) -> int:
        """Abort the open multipart uploads of keys that start with ``prefix``; how many.

        ``prefix`` is a string prefix of keys (``ns/step_1/`` or ``ns/step_1/<attempt>-r0.``),
        as in S3's ListMultipartUploads. A writer killed mid-upload leaves its upload open,
        and S3 bills its parts until it is aborted. An upload still in progress is aborted
        too: call this only where the writers of those keys are known to be gone.

        obstore can neither list nor abort multipart uploads, so this goes through boto3 (same
        endpoint, the standard credential chain). Without boto3 it aborts nothing and warns
        once: give the bucket a lifecycle rule with ``AbortIncompleteMultipartUpload``.
        """
        if prefix.startswith("/") or ".." in prefix.split("/"):
            raise ValueError(f"invalid prefix {prefix!r}")
        return self._abort_uploads(prefix, exact=False)

    def _abort_uploads(self, prefix: str, *, exact: bool) -> int:
        """Abort the open uploads of keys under ``prefix`` (only of key ``prefix`` if
        ``exact``); how many."""
        if self._boto3 is None:
            self._boto3 = boto3_client(
                endpoint_url=self.endpoint_url,
                region=self.region,
                provider=self._provider,
                timeout_s=self.timeout_s,
                retries=self.max_retries,
            )
        client = self._boto3
        if client is None:
            if not _warned_no_boto3.is_set():
                _warned_no_boto3.set()
                _log.warning(
                    "Cannot abort the multipart uploads left in %s by a killed or failed writer: "
                    "that needs boto3 (pip install boto3). Give the bucket a lifecycle rule with "
                    "AbortIncompleteMultipartUpload instead.",
                    self.url,
                )
            return 0
        full = f"{self.prefix}/{prefix}" if self.prefix else prefix
        aborted = 0
        try:
            pages = client.get_paginator("list_multipart_uploads")
            for page in pages.paginate(Bucket=self.bucket, Prefix=full):
                for up in page.get("Uploads", []):
                    if exact and up["Key"] != full:
                        continue
                    try:
                        client.abort_multipart_upload(
                            Bucket=self.bucket, Key=up["Key"], UploadId=up["UploadId"]
                        )
                    except client.exceptions.NoSuchUpload:
                        continue  # finished or aborted meanwhile
                    aborted += 1
        except Exception as e:
            if "NoSuchBucket" in str(e):
                raise self._unavailable("no such bucket") from e
            raise DurableTierError(
                f"S3 abort of the multipart uploads under {self._object(prefix)} failed: "
                f"{first_line(e)}; check the endpoint, the credentials and the "
                "s3:ListBucketMultipartUploads / s3:AbortMultipartUpload permissions."
            ) from e
        return aborted
