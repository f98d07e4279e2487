"""tierckpt's log lines: one summary per save / drain / load, per-rank detail, the log file.

Summary lines (``tierckpt: step 40 saved to memory in 0.031 s (1.0 MB, 32.3 MB/s)``) are
INFO, written by rank 0 (the coordinator); per-rank detail lines (``[Rank r] Step s: ...``)
are DEBUG. When nothing is configured (no ``logger=``, no handler on the ``tierckpt``
logger or the root logger: what a torchrun user has), a stderr handler is attached once on
rank 0 at ``$TIERCKPT_LOG_LEVEL`` (default INFO), so each save, drain and load prints one
line; it steps aside as soon as the user configures logging. ``TIERCKPT_LOG_LEVEL=WARNING``
quiets it (and sets the ``tierckpt`` logger's level when the user left it unset).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TYPE_CHECKING

import torch.distributed as dist

from ._runtime import RUNTIME

if TYPE_CHECKING:
    from .config import CheckpointConfig

__all__ = ["LEVEL_ENV", "logger_for", "megabytes", "rate", "step_message", "summary", "warn_once"]

LEVEL_ENV = "TIERCKPT_LOG_LEVEL"

_FORMAT = "[%(asctime)s] [{ns}] [%(name)s] [%(levelname)s] [%(filename)s:%(lineno)d] %(message)s"


def _rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def _env_level() -> int | None:
    """The level ``$TIERCKPT_LOG_LEVEL`` names (a name or a number); None when unset or bad."""
    text = os.environ.get(LEVEL_ENV, "").strip().upper()
    if not text:
        return None
    if text.isdigit():
        return int(text)
    level = logging.getLevelName(text)
    return level if isinstance(level, int) else None


class _DefaultHandler(logging.Handler):
    """stderr (looked up at each line, like Python's last-resort handler); summary lines as
    they are, others with their level; INFO and below on rank 0 only."""

    def __init__(self, level: int) -> None:
        super().__init__(level)
        self.setFormatter(logging.Formatter("%(message)s"))

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING and _rank() != 0:
            return False
        return bool(super().filter(record))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
            if record.levelno != logging.INFO:
                text = f"tierckpt {record.levelname}: {text}"
            sys.stderr.write(text + "\n")
            sys.stderr.flush()
        except Exception:
            self.handleError(record)


def _user_configured(log: logging.Logger) -> bool:
    """True when the user set up logging: a root handler, or one of theirs on ``log``."""
    ours = {RUNTIME.logs.default_handler, *RUNTIME.logs.file_handlers.values()}
    return bool(logging.getLogger().handlers) or any(h not in ours for h in log.handlers)


def _sync_default_handler(log: logging.Logger) -> None:
    """Attach the default stderr handler (rank 0, nothing configured) or take it away."""
    logs = RUNTIME.logs
    with logs.lock:
        env = _env_level()
        if env is not None and log.level == logging.NOTSET:
            log.setLevel(env)
            logs.default_set_level = True
        handler = logs.default_handler
        if _user_configured(log):
            if handler is not None:
                log.removeHandler(handler)
                logs.default_handler = None
                if logs.default_set_level and env is None:
                    log.setLevel(logging.NOTSET)
                    logs.default_set_level = False
            return
        if handler is not None or _rank() != 0:
            return
        level = logging.INFO if env is None else env
        handler = logs.default_handler = _DefaultHandler(level)
        log.addHandler(handler)
        if log.level == logging.NOTSET:
            log.setLevel(level)
            logs.default_set_level = True


def logger_for(config: CheckpointConfig) -> logging.Logger:
    """The configured logger, with the namespace's log file attached once if asked for.

    Without ``logger=``, the ``tierckpt`` logger, with the default stderr handler attached
    on rank 0 while nothing else is configured (see the module docstring).
    """
    log = config.log
    if config.logger is None:
        _sync_default_handler(log)
    if config.log_file:
        key = (log.name, config.log_file)
        logs = RUNTIME.logs
        with logs.lock:
            if key not in logs.file_handlers:
                handler = logging.FileHandler(config.log_file)
                handler.setFormatter(logging.Formatter(_FORMAT.format(ns=config.namespace)))
                log.addHandler(handler)
                if log.level == logging.NOTSET:
                    log.setLevel(logging.INFO)
                logs.file_handlers[key] = handler
    return log


def step_message(rank: int, step: int | None, text: str) -> str:
    """``[Rank r] Step s: text``."""
    return f"[Rank {rank}] Step {step}: {text}"


def summary(log: logging.Logger, text: str) -> None:
    """One INFO summary line, ``tierckpt: text`` (callers log it on rank 0 only)."""
    log.info(f"tierckpt: {text}")


def megabytes(nbytes: int) -> str:
    """``'1.0 MB'``."""
    return f"{nbytes / 1e6:.1f} MB"


def rate(nbytes: int, seconds: float) -> str:
    """``'<n> bytes in <t>s (<x> MB/s)'``."""
    mbs = nbytes / 1e6 / seconds if seconds > 0 else float("inf")
    return f"{nbytes} bytes in {seconds:.3f}s ({mbs:.1f} MB/s)"


def warn_once(log: logging.Logger, key: tuple[str, ...], message: str) -> None:
    """Log ``message`` as a WARNING the first time this process sees ``key``."""
    logs = RUNTIME.logs
    with logs.lock:
        if key in logs.warned:
            return
        logs.warned.add(key)
    log.warning(message)
