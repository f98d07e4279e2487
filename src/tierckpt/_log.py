"""Log lines of the form ``[Rank r] Step s: ...`` and the optional per-namespace log file."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ._runtime import RUNTIME

if TYPE_CHECKING:
    from .config import CheckpointConfig

__all__ = ["logger_for", "rate", "step_message", "warn_once"]

_FORMAT = "[%(asctime)s] [{ns}] [%(name)s] [%(levelname)s] [%(filename)s:%(lineno)d] %(message)s"


def logger_for(config: CheckpointConfig) -> logging.Logger:
    """The configured logger, with the namespace's log file attached once if asked for."""
    log = config.log
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
