"""The process-wide state of tierckpt, owned by one object: :data:`RUNTIME`.

Everything tierckpt remembers between calls in one process lives here, grouped by concern,
each group with its own lock: what this process saved and restored (generations, commits to
hand to other nodes, unloadable saves), its background drains, its resume and retry threads,
its staging mappings, and its log handlers. Nothing else in the package keeps module-level
mutable state, so tests and forked workers have one place to look.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .constants import EXIT_WAIT_S

if TYPE_CHECKING:
    from ._retry import Retrier

__all__ = ["RUNTIME", "Runtime"]


@dataclass
class SaveHistory:
    """Saves this process made or restored, per namespace."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    newest_generation: dict[str, int] = field(default_factory=dict)
    """namespace -> newest generation this process saved or restored."""
    unloadable: set[tuple[str, int, str]] = field(default_factory=set)
    """(namespace, step, attempt) this process could not load."""
    uploading: dict[str, dict[tuple[int, str], frozenset[str]]] = field(default_factory=dict)
    """namespace -> (step, coordinator attempt) -> every rank's attempt, of durable saves this
    process coordinates whose durable commit it has not yet seen."""
    last_commit: dict[tuple[str, str], tuple[int, str, bytes, bytes]] = field(default_factory=dict)
    """Coordinator: (memory root, namespace) -> (step, attempt, commit JSON, metadata) of its
    last memory commit, handed with the next plan to nodes that lack it."""


@dataclass
class Drains:
    """Background uploads and durable commits of this process."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    pending: dict[Future[Any], tuple[logging.Logger, str] | None] = field(default_factory=dict)
    """Jobs awaited at exit -> (logger, what the job is) for the log line if abandoned."""
    in_flight: set[tuple[str, int, str, int]] = field(default_factory=set)
    """(namespace, step, attempt, rank) of uploads running in this process."""
    committing: set[tuple[str, int, str]] = field(default_factory=set)
    """(namespace, step, coordinator attempt) of durable commits running in this process."""
    exit_wait_s: float = EXIT_WAIT_S
    """How long interpreter exit waits for the jobs in ``pending``."""
    exit_wait_set: bool = False
    """Whether a config has set ``exit_wait_s`` (later ones can only raise it)."""


@dataclass
class Resumes:
    """Resumption and retries of interrupted or failed drains."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    resumed: set[tuple[str, str]] = field(default_factory=set)
    """(memory root, namespace) whose pending drains this process has resumed once."""
    failed: dict[tuple[str, str, int, str, int], str] = field(default_factory=dict)
    """(memory root, namespace, step, attempt, rank) of parts whose drain failed -> error."""
    retriers: dict[tuple[str, str, int | None], Retrier] = field(default_factory=dict)
    """(memory root, namespace, rank) -> the thread retrying its failed drains."""
    resume_locks: dict[tuple[str, str, int | None], threading.Lock] = field(default_factory=dict)
    """(memory root, namespace, rank) -> held while one resume of it runs."""


@dataclass
class Logs:
    """Log handlers tierckpt attached, and warnings it gives only once."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    file_handlers: dict[tuple[str, str], logging.Handler] = field(default_factory=dict)
    """(logger name, log file) -> the file handler attached to that logger."""
    default_handler: logging.Handler | None = None
    """The stderr handler attached to the ``tierckpt`` logger while nothing is configured."""
    default_set_level: bool = False
    """Whether tierckpt set the ``tierckpt`` logger's level (undone when the handler goes)."""
    warned: set[tuple[str, ...]] = field(default_factory=set)
    """Keys of the warnings already given (:func:`tierckpt._log.warn_once`)."""


@dataclass
class Owners:
    """Owner leases this process holds on node-memory namespaces (see :mod:`tierckpt.nodemem`)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    held: dict[tuple[str, str], Any] = field(default_factory=dict)
    """(memory root, namespace) -> the owner lease, held for the life of the process."""


@dataclass
class Collectives:
    """tierckpt's own collective steps: how many of each this process has entered."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    sequence: dict[tuple[str, ...], int] = field(default_factory=dict)
    """(kind, namespace, ranks) -> how many such steps this process entered (the store key)."""
    last_save: dict[tuple[str, str], Any] = field(default_factory=dict)
    """(memory root, namespace) -> the turn (:class:`tierckpt.dcp._inflight.Turn`) of the
    newest save started in this process: the next save waits for it to finish."""


@dataclass
class Runtime:
    """All process-wide state of tierckpt."""

    history: SaveHistory = field(default_factory=SaveHistory)
    drains: Drains = field(default_factory=Drains)
    resumes: Resumes = field(default_factory=Resumes)
    logs: Logs = field(default_factory=Logs)
    owners: Owners = field(default_factory=Owners)
    collectives: Collectives = field(default_factory=Collectives)


RUNTIME = Runtime()
"""The one instance: this process's tierckpt state."""
