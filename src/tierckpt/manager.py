"""``CheckpointManager``: when to save, where, what to keep, restore-latest, preemption.

One object in the training loop::

    with tierckpt.CheckpointManager(cfg, every_steps=1, durable_every_steps=100) as mgr:
        start = (mgr.restore(state) or 0) + 1
        for step in range(start, steps + 1):
            train_step()
            mgr.save(step, state)

The manager composes the public pieces (:class:`TieredStorageWriter`, ``dcp.async_save``,
:func:`tierckpt.load`, the policies of :mod:`tierckpt.policies`); it adds no storage logic.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import signal
import time
import weakref
from collections.abc import Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from . import metrics
from ._dist import dist_ready, process_rank
from ._log import logger_for
from .api import _typed
from .api import load as tierckpt_load
from .config import CheckpointConfig, require_config
from .dcp.plan_cache import CachedSavePlanner, forget_plans, new_cache_key, plan_caching_available
from .dcp.writer import TieredStorageWriter
from .durable_gc import apply_gc, plan_gc
from .errors import CheckpointNotFoundError, ConfigError
from .policies import AnyOf, EveryNSeconds, EveryNSteps, Never, RetentionPolicy, SaveContext
from .preemption import Preempted, PreemptionWatcher
from .prefault import prefault
from .tiers.durable import open_durable_tier

__all__ = ["CheckpointManager", "PendingSave"]


@dataclass
class PendingSave:
    """A save this manager started."""

    step: int
    durable: bool
    committed: Future[Any]
    """Completes when the step is committed in the memory tier (raises if the save failed)."""
    durable_done: Future[None]
    """Completes when the step is committed in the durable tier (at once if not durable)."""
    started: float


class CheckpointManager:
    """Saves by policy, keeps one async save in flight, restores the newest restorable save.

    ``every_steps`` / ``every_seconds`` (or ``policy``) decide which steps are saved to the
    memory tier; ``durable_every_steps`` (or ``durable_policy``) which of them also drain to
    the durable tier (a durable step is always saved). ``keep`` is a retention policy for the
    durable tier (an int ``K`` means :class:`~tierckpt.KeepLastK`), applied by rank 0 after
    each durable commit; the memory tier keeps ``config.memory_keep_last``. With
    ``preemption=True`` a SIGTERM makes the next :meth:`save` save its step to the durable
    tier, wait for it for at most ``grace_s`` and raise :class:`~tierckpt.Preempted`.
    ``plan_caching`` (default on) reuses DCP's save plans while the state's layout stays the
    same (:class:`~tierckpt.dcp.CachedSavePlanner`, under a key of this manager's own);
    ``False`` plans every save from scratch.

    Collective: build it, call :meth:`save` with the same steps, and :meth:`restore`, on
    every rank. Saves run on a gloo group of their own; agreement on time-based decisions
    and on preemption uses a second one, from the calling thread.
    """

    def __init__(
        self,
        config: CheckpointConfig,
        every_steps: int | None = 1,
        durable_every_steps: int | None = None,
        *,
        every_seconds: float | None = None,
        keep: int | RetentionPolicy | None = None,
        policy: Any = None,
        durable_policy: Any = None,
        async_save: bool = True,
        process_group: dist.ProcessGroup | None = None,
        preemption: bool = True,
        grace_s: float = 120.0,
        exit_code: int = 143,
        signals: Sequence[int] = (signal.SIGTERM,),
        plan_caching: bool = True,
    ) -> None:
        self.config = require_config(config)
        self.log: logging.Logger = logger_for(self.config)
        self.policy = policy if policy is not None else _save_policy(every_steps, every_seconds)
        if durable_policy is None:
            durable_policy = (
                EveryNSteps(durable_every_steps) if durable_every_steps is not None else Never()
            )
        self.durable_policy = durable_policy
        self.keep: RetentionPolicy | None = (
            _keep_last(keep) if isinstance(keep, int) and not isinstance(keep, bool) else keep  # type: ignore[assignment]
        )
        self.async_save = async_save
        self.grace_s, self.exit_code = float(grace_s), exit_code
        self.rank = process_rank()
        world = dist.get_world_size() if dist_ready() else 1
        self._save_pg = process_group
        self._own_pg = process_group is not None
        self._decide_pg: dist.ProcessGroup | None = None
        if dist_ready() and world > 1:
            if self._save_pg is None:
                self._save_pg = dist.new_group(backend="gloo")
            self._decide_pg = dist.new_group(backend="gloo")
        self._pending: PendingSave | None = None
        self._durable_futures: list[PendingSave] = []
        self._last_step: int | None = None
        self._last_time: float | None = time.monotonic()
        self.last_saved_step: int | None = None
        """The newest step this manager saved (committed in memory) or restored."""
        self.last_restore: dict[str, Any] = {}
        """``{"step", "seconds", "bytes_by_tier"}`` of this rank's newest restore."""
        self.watcher = PreemptionWatcher(signals, self.log) if preemption else None
        if self.watcher is not None:
            self.watcher.install()
        self._plan_key: str | None = None
        if plan_caching and plan_caching_available():
            self._plan_key = new_cache_key("CheckpointManager")
            weakref.finalize(self, forget_plans, self._plan_key)
        self._closed = False
        metrics.track(self.config)

    # ------------------------------------------------------------------ saving

    @property
    def pending(self) -> PendingSave | None:
        """The save in flight (or the newest one started), None before the first."""
        return self._pending

    @property
    def preempted(self) -> bool:
        """True once a preemption signal arrived on this rank."""
        return self.watcher is not None and self.watcher.requested

    def save(self, step: int, state: dict[str, Any], *, force: bool = False) -> bool:
        """Save ``state`` at ``step`` if the policies say so (or ``force``); True if it started.

        Raises the previous save's error if it failed. On preemption, saves this step to the
        durable tier, waits for it and raises :class:`~tierckpt.Preempted`.
        """
        self._check_open()
        self._raise_if_failed()
        now = time.monotonic()
        ctx = SaveContext(step, now, self._last_step, self._last_time)
        preempt, save, durable = self._decide(ctx)
        save = save or force or durable or preempt
        if not save:
            return False
        durable = durable or preempt or self.config.save_to_durable
        self.wait()
        self._start(step, state, durable)
        if preempt:
            self._finish_preemption(step)
        return True

    def _decide(self, ctx: SaveContext) -> tuple[bool, bool, bool]:
        """(preempt, save, durable), the same on every rank."""
        save = bool(self.policy.should_save(ctx))
        durable = bool(self.durable_policy.should_save(ctx))
        preempt = self.preempted
        agree = self._decide_pg is not None and (
            self.watcher is not None
            or not getattr(self.policy, "deterministic", False)
            or not getattr(self.durable_policy, "deterministic", False)
        )
        if not agree:
            return preempt, save, durable
        if self.rank != 0:  # rank 0 decides what depends on more than the step
            save = save and getattr(self.policy, "deterministic", False)
            durable = durable and getattr(self.durable_policy, "deterministic", False)
        flags = torch.tensor([preempt, save, durable], dtype=torch.int32)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self._decide_pg)
        return bool(flags[0]), bool(flags[1]), bool(flags[2])

    def _start(self, step: int, state: dict[str, Any], durable: bool) -> None:
        t0 = time.perf_counter()
        writer = TieredStorageWriter(self.config, step=step, save_to_durable=durable)
        planner = CachedSavePlanner(self._plan_key) if self._plan_key is not None else None
        try:
            if self.async_save:
                resp: Any = dcp.async_save(
                    state, storage_writer=writer, planner=planner, process_group=self._save_pg
                )
                fut = getattr(resp, "upload_completion", resp)
            else:
                dcp.save(state, storage_writer=writer, planner=planner, process_group=self._save_pg)
                fut = Future()
                fut.set_result(None)
        except CheckpointException as e:
            metrics.observe_failure(self.config.namespace, "save")
            raise _typed(e) from e
        pending = PendingSave(step, durable, fut, writer.durable_done, t0)
        self._pending = pending
        self._last_step, self._last_time = step, time.monotonic()
        fut.add_done_callback(lambda f: self._on_committed(pending, f))
        if durable:
            self._durable_futures = [p for p in self._durable_futures if not p.durable_done.done()]
            self._durable_futures.append(pending)
            if self.keep is not None and self.rank == 0:
                writer.durable_done.add_done_callback(self._apply_keep)

    def _on_committed(self, pending: PendingSave, fut: Future[Any]) -> None:
        if fut.cancelled() or fut.exception() is not None:
            metrics.observe_failure(self.config.namespace, "save")
            return
        if self.last_saved_step is None or self._pending is pending:
            self.last_saved_step = pending.step

    def _apply_keep(self, done: Future[None]) -> None:
        if done.exception() is not None or self.keep is None:
            return
        try:
            durable = open_durable_tier(self.config, check=False)
            plan = plan_gc(self.config, durable, self.keep, self.log)
            deleted = apply_gc(self.config, durable, plan, self.log)
            if deleted:
                self.log.debug(
                    "tierckpt: durable retention %r deleted steps %s", self.keep, deleted
                )
        except Exception as e:  # retention never fails a save
            self.log.warning("tierckpt: durable retention %r failed: %s", self.keep, e)

    def _raise_if_failed(self) -> None:
        p = self._pending
        if p is not None and p.committed.done():
            self._result(p, timeout=0)

    def _result(self, p: PendingSave, timeout: float | None) -> None:
        try:
            p.committed.result(timeout=timeout)
        except CheckpointException as e:
            self._pending = None
            raise _typed(e) from e
        except FutureTimeout:
            raise
        except BaseException:
            self._pending = None
            raise

    def wait(self, *, durable: bool = False, timeout: float | None = None) -> None:
        """Wait until the save in flight is committed in memory (raises if it failed); with
        ``durable=True`` also until every durable save this manager started is durable."""
        p = self._pending
        if p is not None:
            self._result(p, timeout)
        if durable:
            for d in list(self._durable_futures):
                d.durable_done.result(timeout=timeout)

    def _finish_preemption(self, step: int) -> None:
        assert self.watcher is not None
        received = self.watcher.received_at or time.monotonic()
        left = max(0.0, self.grace_s - (time.monotonic() - received))
        ok = False
        try:
            self.wait(timeout=left)
            p = self._pending
            assert p is not None
            p.durable_done.result(timeout=max(0.0, self.grace_s - (time.monotonic() - received)))
            ok = True
        except FutureTimeout:
            self.log.error(
                "tierckpt: step %d was not durable within the %.0f s grace period; exiting anyway "
                "(the next run resumes the drain from memory if the node survives).",
                step,
                self.grace_s,
            )
        except Exception as e:
            self.log.error("tierckpt: the preemption save of step %d failed: %s", step, e)
        if ok:
            self.log.warning("tierckpt: step %d is durable; exiting for preemption.", step)
        self.close(wait=False)
        raise Preempted(self.exit_code, step, ok)

    # ------------------------------------------------------------------ restoring

    def reform(self, timeout_s: float = 60.0) -> None:
        """After the default process group was re-formed (in-process recovery does it):
        drop the save in flight, its group is gone (waited for at most ``timeout_s``), and
        make this manager's groups anew on the new default group, each bounded by
        ``timeout_s`` (aborting a gloo group does not interrupt another thread's collective).
        Collective over the new group. A group passed as ``process_group`` is not replaced."""
        self._check_open()
        pending, self._pending = self._pending, None
        if pending is not None:
            with contextlib.suppress(BaseException):
                pending.committed.result(timeout=timeout_s + 5.0)
        self._durable_futures = []
        if self._plan_key is not None:  # plans of the old group's ranks: plan anew
            self._forget_plans(pending)
            self._plan_key = new_cache_key("CheckpointManager")
            weakref.finalize(self, forget_plans, self._plan_key)
        if not dist_ready():
            return
        self.rank = dist.get_rank()
        limit = datetime.timedelta(seconds=timeout_s)
        if dist.get_world_size() > 1:
            if not self._own_pg:
                self._save_pg = dist.new_group(backend="gloo", timeout=limit)
            self._decide_pg = dist.new_group(backend="gloo", timeout=limit)

    def restore(self, state: dict[str, Any], step: int | None = None) -> int | None:
        """Load the newest restorable save (or ``step``) into ``state`` in place; its step.

        None when nothing is saved yet (with ``step=None``); a missing ``step`` raises
        :class:`~tierckpt.CheckpointNotFoundError`. ``Stateful`` values get
        ``load_state_dict``. Collective.
        """
        self._check_open()
        self.wait()
        t0 = time.perf_counter()
        try:
            loaded = tierckpt_load(
                state, config=self.config, step=step, process_group=self._save_pg
            )
        except CheckpointNotFoundError:
            if step is not None:
                raise
            self._prefault(state)
            return None
        except Exception:
            metrics.observe_failure(self.config.namespace, "load")
            raise
        self._prefault(state)
        info = metrics.last_load(self.config.namespace)
        self.last_restore = {
            "step": loaded,
            "seconds": time.perf_counter() - t0,
            "bytes_by_tier": info.get("bytes_by_tier", {}),
        }
        self._last_step, self._last_time = loaded, time.monotonic()
        self.last_saved_step = loaded
        return loaded

    def _prefault(self, state: dict[str, Any]) -> None:
        """Start paying for the next save's memory-tier pages now, in the background."""
        try:
            prefault(self.config, state)
        except Exception as e:  # an optimisation: never a reason for a restore to fail
            self.log.warning(f"tierckpt: could not prefault a buffer: {e}")

    # ------------------------------------------------------------------ lifetime

    def close(self, *, wait: bool = True) -> None:
        """Wait for the save in flight (raises if it failed) and for durable copies (at most
        ``config.durable_exit_wait_s``; a failure there is logged), then drop the signal
        handlers. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            if wait:
                self.wait()
                deadline = time.monotonic() + self.config.durable_exit_wait_s
                for d in self._durable_futures:
                    try:
                        d.durable_done.result(timeout=max(0.0, deadline - time.monotonic()))
                    except Exception as e:
                        self.log.error("tierckpt: step %d not durable at close: %s", d.step, e)
        finally:
            self._forget_plans(self._pending)
            if self.watcher is not None:
                self.watcher.uninstall()

    def _forget_plans(self, pending: PendingSave | None) -> None:
        """Free this manager's cached plans once ``pending`` (which may still read them, DCP
        plans an async save on its own thread) is done."""
        key = self._plan_key
        if key is None:
            return
        if pending is None or pending.committed.done():
            forget_plans(key)
        else:
            pending.committed.add_done_callback(lambda _: forget_plans(key))

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc is None:
            self.close()
            return
        try:
            self.close()
        except Exception as e:  # keep the error that ended the block
            self.log.error("tierckpt: closing the manager after an error failed: %s", e)

    def _check_open(self) -> None:
        if self._closed:
            raise ConfigError("This CheckpointManager is closed: build a new one.")


def _save_policy(every_steps: int | None, every_seconds: float | None) -> Any:
    if every_steps is None and every_seconds is None:
        raise ConfigError("Give every_steps, every_seconds or policy= to CheckpointManager.")
    parts: list[Any] = []
    if every_steps is not None:
        parts.append(EveryNSteps(every_steps))
    if every_seconds is not None:
        parts.append(EveryNSeconds(every_seconds))
    return parts[0] if len(parts) == 1 else AnyOf(*parts)


def _keep_last(k: int) -> RetentionPolicy:
    from .policies import KeepLastK

    return KeepLastK(k)
