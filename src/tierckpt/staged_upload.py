"""Uploading a rank's data file to the durable tier while it is still being staged
(``CheckpointConfig.durable_stream``).

The staging buffer tells its upload how far its bytes are written (a prefix: copies run
in allocation order) and, at the end of the write, the file's size. The upload reads that
prefix through a descriptor of its own (it survives the buffer's rename into the step)
and hands it to ``Tier.write``, which sends parts as they come (an S3 multipart upload):
the first parts are on the wire while later tensors are still being copied. The drain
then waits for this upload instead of starting one (:func:`tierckpt.drain.upload_rank_part`).

A save that stops (it failed, it is not durable after all, it continues in another
process, or it makes no progress for ``STREAM_IDLE_FACTOR x collective_timeout_s``)
cancels the upload: the multipart upload is aborted and nothing is left under the key.
A cancelled upload reports ``None`` and the drain uploads the file whole, as without one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator

from . import layout
from ._exit import run_in_background
from .config import CheckpointConfig
from .constants import STREAM_CHUNK, STREAM_IDLE_FACTOR
from .errors import DurableTierError
from .staging import StagingBuffer
from .tiers.base import Tier

__all__ = ["StagedUpload", "data_key", "follow_buffer", "staged_upload_wanted"]


class _Cancelled(Exception):
    """Raised into the tier's write to abort it (never leaves this module)."""


def data_key(config: CheckpointConfig, step: int, attempt: str, rank: int) -> str:
    """The tier key of this rank's data file of the step (what a staged upload writes)."""
    return layout.step_key(config.namespace, step, layout.data_name(attempt, rank))


def staged_upload_wanted(config: CheckpointConfig, durable: Tier | None) -> bool:
    """Whether a durable part's data should upload while it is staged (``durable_stream``)."""
    return durable is not None and config.durable_stream


class StagedUpload:
    """The upload of one data file to ``key`` that follows its staging buffer at ``path``."""

    def __init__(
        self,
        durable: Tier,
        key: str,
        path: str,
        *,
        idle_s: float,
        log: logging.Logger,
        chunk: int = STREAM_CHUNK,
    ) -> None:
        self.key = key
        self._durable = durable
        self._fd = os.open(path, os.O_RDONLY)
        self._chunk = chunk
        self._idle_s = idle_s
        self._log = log
        self._cond = threading.Condition()
        self._upto = 0
        self._told = 0  # unlocked read in staged(): a hint, re-checked under the lock
        self._size: int | None = None
        self._cancelled: str | None = None
        self._future = run_in_background(
            self._run, name="tierckpt-staged-upload", wait_at_exit=False
        )

    # -- told by the save --

    def staged(self, upto: int) -> None:
        """Bytes ``[0, upto)`` of the file are written (cheap: wakes the upload per chunk)."""
        if upto - self._told < self._chunk:
            return
        with self._cond:
            if upto > self._upto:
                self._upto = self._told = upto
                self._cond.notify_all()

    def finish(self, size: int) -> None:
        """The file is complete at ``size`` bytes: upload the rest and complete the object."""
        with self._cond:
            self._size = size
            self._cond.notify_all()

    def cancel(self, reason: str) -> None:
        """Abort the upload (a no-op once it has sent everything)."""
        with self._cond:
            if self._cancelled is None:
                self._cancelled = reason
                self._cond.notify_all()

    def result(self) -> int | None:
        """Bytes uploaded once done; ``None`` if cancelled; raises what the tier raised."""
        return self._future.result()

    # -- the upload thread --

    def _run(self) -> int | None:
        try:
            check = getattr(self._durable, "check_available", None)
            if check is not None:
                check(create=True)
            return self._durable.write(self.key, self._chunks())
        except BaseException:
            if self._cancelled is not None:
                self._log.debug("Staged upload of %s cancelled: %s", self.key, self._cancelled)
                return None
            raise
        finally:
            with contextlib.suppress(OSError):
                os.close(self._fd)

    def _next_end(self, pos: int) -> int | None:
        """Where the next chunk from ``pos`` ends (``None``: the file is all sent)."""
        last, since = -1, time.monotonic()
        with self._cond:
            while True:
                if self._cancelled is not None:
                    raise _Cancelled(self._cancelled)
                if self._size is not None:
                    return min(pos + self._chunk, self._size) if pos < self._size else None
                if self._upto - pos >= self._chunk:
                    return pos + self._chunk
                if self._upto != last:
                    last, since = self._upto, time.monotonic()
                elif time.monotonic() - since >= self._idle_s:
                    self._cancelled = f"its save made no progress for {self._idle_s:.0f} s"
                    raise _Cancelled(self._cancelled)
                self._cond.wait(timeout=min(self._idle_s, 60.0))

    def _chunks(self) -> Iterator[bytes]:
        pos = 0
        while (end := self._next_end(pos)) is not None:
            data = os.pread(self._fd, end - pos, pos)
            if len(data) != end - pos:
                raise DurableTierError(
                    f"The staged file of {self.key} is shorter ({pos + len(data)} bytes) than "
                    f"its save said ({end}); the drain uploads it again from the memory tier."
                )
            pos = end
            yield data


def follow_buffer(
    config: CheckpointConfig,
    durable: Tier | None,
    buffer: StagingBuffer,
    *,
    step: int | None,
    attempt: str,
    rank: int,
    log: logging.Logger,
) -> StagedUpload | None:
    """Start uploading ``buffer`` as this rank's data file of the step while it is written
    (when :func:`staged_upload_wanted`); the buffer then reports to it as it fills."""
    if step is None or buffer.watcher is not None or not staged_upload_wanted(config, durable):
        return None
    assert durable is not None
    key = data_key(config, step, attempt, rank)
    idle_s = STREAM_IDLE_FACTOR * config.collective_timeout_s
    upload = StagedUpload(durable, key, buffer.path, idle_s=idle_s, log=log)
    buffer.watcher = upload
    upload.staged(buffer.used)
    return upload
