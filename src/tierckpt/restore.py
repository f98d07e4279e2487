"""Choosing the save to restore: this rank's view, the gathered choice, the same error everywhere.

Nothing here knows DCP or process groups: the collective is passed in as a function that
gathers one picklable object per rank (``[view]`` in a one-rank job).
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import errors as _errors
from . import layout
from ._log import step_message
from .catalog import StepCatalog, StepSource
from .config import CheckpointConfig
from .errors import (
    CheckpointNotFoundError,
    DurableUnavailableError,
    IntegrityError,
    StepUnloadableError,
    TierckptError,
)
from .history import abandoned, mark_unloadable, marked_unloadable, newest_key, observe
from .manifest import CommitRecord
from .peer.node import peer_node
from .peer.tier import PeerTier
from .peer.view import PeerView, is_node_leader
from .resume import resume_pending_once
from .tiers.base import Buffer, Tier
from .tiers.memory import MemoryTier

__all__ = ["Choice", "Finder", "View", "same_error"]

Choice = tuple[int, str]  # (step, attempt)
AllGather = Callable[[Any], list[Any]]
"""Gathers one object from every rank, in rank order."""


@dataclass
class View:
    """What one rank found, exchanged in the agreement."""

    restorable: dict[Choice, int] = field(default_factory=dict)
    """(step, attempt) -> generation of every save this rank can restore from some tier."""
    saves: set[tuple[int, str, int]] = field(default_factory=set)
    """(step, attempt, generation) of every commit this rank sees (rewinds abandon some)."""
    unloadable: dict[Choice, str] = field(default_factory=dict)
    """Saves this rank (or its node) found a blob of with no valid copy anywhere, and why."""
    durable_error: str | None = None
    """Why the durable tier did not answer on this rank (it then counts as empty)."""
    error: tuple[list[str], str] | None = None
    """(names of the error's classes, message) when building the view failed."""
    node_id: str = ""
    """This rank's node."""
    peer_address: tuple[str, int] | None = None
    """This rank's peer service (None in a one-node job)."""
    needs: dict[Choice, tuple[int, list[str]]] = field(default_factory=dict)
    """Saves this rank sees but cannot restore from its own tiers: generation and the files
    it lacks (another node may hold them)."""
    leader: bool = False
    """Whether this rank reports its node's holdings (one rank per node does)."""
    listing: dict[int, dict[str, int]] = field(default_factory=dict)
    """Leader only: the files of each step in its node's memory tier."""
    record_files: dict[Choice, tuple[int, dict[str, int]]] = field(default_factory=dict)
    """Leader only: generation and files of every commit in its node's memory tier (for
    ranks whose node lacks the commit, e.g. a replacement node)."""


def same_error(errors: list[tuple[list[str], str]]) -> TierckptError:
    """One typed error for every rank: the first rank's tierckpt class, every rank's message."""
    cls: type[TierckptError] = TierckptError
    for name in errors[0][0]:
        found = getattr(_errors, name, None)
        if isinstance(found, type) and issubclass(found, TierckptError):
            cls = found
            break
    return cls("Finding checkpoints failed: " + "; ".join(msg for _, msg in errors))


class Finder:
    """One rank's side of restoring: its tiers (nearest first), what it can restore, the choice."""

    def __init__(
        self,
        config: CheckpointConfig,
        memory: MemoryTier,
        durable: Tier,
        rank: int,
        log: logging.Logger,
    ) -> None:
        self.config = config
        self.memory = memory
        self.durable = durable
        self.rank = rank
        self.log = log
        self.tiers: list[Tier] = [memory, durable]
        self.peer_tiers: list[PeerTier] = []
        self._durable_error: str | None = None
        self._durable_checked = False

    def check_durable(self) -> str | None:
        """Whether the durable tier answers (once per reader); an outage is logged, not raised.

        An unreachable durable tier counts as empty: memory restores go on without it.
        """
        if self._durable_checked:
            return self._durable_error
        self._durable_checked = True
        check = getattr(self.durable, "check_available", None)
        try:
            if check is not None:
                check(create=False)  # a reader creates nothing
        except Exception as e:
            self._durable_error = f"{type(e).__name__}: {e}"
            self.tiers = [self.memory]
            self.log.warning(
                f"[Rank {self.rank}] The durable tier {self.durable.url} is unreachable ({e}); "
                "this rank restores from the memory tier alone."
            )
            return self._durable_error
        try:
            resume_pending_once(self.config)
        except Exception as e:
            self.log.warning(f"Resuming pending durable drains failed: {e}")
        return None

    def sources(self, requested: int | None) -> tuple[dict[Choice, StepSource], View]:
        """Every (step, attempt) this rank can restore, with the tier holding its commit;
        and this rank's view for the agreement."""
        ns = self.config.namespace
        self.memory.check_trusted(ns)  # inside the gathered part: every rank sees a refusal
        view = View(durable_error=self.check_durable())
        catalogs = [StepCatalog(t, ns, self.log) for t in self.tiers]
        records: dict[Choice, StepSource] = {}
        listings: dict[tuple[str, int], dict[str, int]] = {}
        in_memory: dict[int, CommitRecord] = {}
        steps = sorted({s for c in catalogs for s in c.steps()}, reverse=True)
        for step in steps:
            for cat in catalogs:
                record = cat.commit(step)
                if record is None:
                    continue
                if cat is catalogs[0]:
                    in_memory[step] = record
                choice = (step, record.attempt)
                view.saves.add((step, record.attempt, record.generation))
                if choice in records or requested not in (None, step):
                    continue
                missing = set(record.files())
                for other in catalogs:
                    key = (other.tier.name, step)
                    if key not in listings:
                        listings[key] = other.files(step)
                    missing &= set(other.missing_files(record, listings[key]))
                if missing and self.config.multi_node:
                    view.needs[choice] = (record.generation, sorted(missing))
                    continue
                if missing:
                    self.log.warning(
                        step_message(
                            self.rank,
                            step,
                            f"Not restorable from any tier: missing {sorted(missing)}",
                        )
                    )
                    continue
                records[choice] = StepSource(cat.tier, record)
                view.restorable[choice] = record.generation
                why = self.unloadable(step, record.attempt, listings[(self.memory.name, step)])
                if why is not None:
                    view.unloadable[choice] = why
        if self.config.multi_node:
            self._report_node(view, catalogs[0], in_memory, listings)
        return records, view

    def _report_node(
        self,
        view: View,
        memory: StepCatalog,
        commits: dict[int, CommitRecord],
        listings: dict[tuple[str, int], dict[str, int]],
    ) -> None:
        """Fill this rank's peer fields: its service, and (one rank per node) what the
        node's memory tier holds (``commits`` and ``listings``: what :meth:`sources`
        already read of it)."""
        node = peer_node(self.config)
        view.node_id = self.config.node_id or ""
        view.peer_address = node.address if node is not None else None
        view.leader = is_node_leader(self.config, self.rank)
        if not view.leader:
            return
        for step in memory.steps():
            listing = listings.get((memory.tier.name, step))
            view.listing[step] = listing if listing is not None else memory.files(step)
            record = commits.get(step)
            if record is not None:
                view.record_files[(step, record.attempt)] = (record.generation, record.files())

    def unloadable(self, step: int, attempt: str, listing: dict[str, int]) -> str | None:
        """Why this rank or its node could not load that attempt before, or None."""
        if marked_unloadable(self.config.namespace, step, attempt):
            return "this process found a blob with no valid copy in any tier"
        for name in sorted(n for n in listing if layout.is_unloadable_mark(n, attempt)):
            try:
                raw = self.memory.read(layout.step_key(self.config.namespace, step, name))
                return str(json.loads(bytes(raw))["reason"])
            except Exception:
                return f"marked by {name}"
        return None

    def agree(self, all_gather: AllGather, requested: int | None) -> tuple[Choice, StepSource]:
        """Agree with every rank on (step, attempt) and the tier holding its commit.

        Everything a rank finds (or fails to find) travels in one ``all_gather``, so
        every rank raises the same typed error, or every rank chooses the same save: the
        newest (by generation) that every rank can restore, that no rewind abandoned and
        that no rank found unloadable (unless that step was asked for by number).
        """
        sources: dict[Choice, StepSource] = {}
        view = View()
        try:
            sources, view = self.sources(requested)
        except Exception as e:  # surfaced after the collective, on every rank
            view.error = (
                [c.__name__ for c in type(e).__mro__],
                f"rank {self.rank}: {type(e).__name__}: {e}",
            )
        gathered: list[View] = all_gather(view)
        errors = [v.error for v in gathered if v.error]
        if errors:
            raise same_error(errors)
        gone = abandoned(s for v in gathered for s in v.saves)
        generation = {c: g for v in gathered for c, g in v.restorable.items()}
        restorable = [set(v.restorable) for v in gathered]
        peers = PeerView.of(gathered, self.config)
        if peers is not None:
            restorable = peers.restorable(gathered, generation)
            self._use_peers(peers, gathered[self.rank])
        common: set[Choice] = set.intersection(*restorable) - gone
        marks: dict[Choice, list[str]] = defaultdict(list)
        for rank, v in enumerate(gathered):
            for c, why in v.unloadable.items():
                marks[c].append(f"rank {rank}: {why}")
        candidates = common if requested is not None else common - set(marks)
        if not candidates:
            raise self.not_found(requested, sources, gathered, gone, marks)

        def key(c: Choice) -> tuple[int, int, str]:
            return newest_key(c[0], generation[c], c[1])

        choice = max(candidates, key=key)
        for c in sorted(set(marks) & common - candidates):
            if key(c) > key(choice):
                self.log.warning(
                    step_message(
                        self.rank,
                        c[0],
                        f"Skipping step {c[0]} (attempt {c[1]}): it cannot be loaded "
                        f"({'; '.join(marks[c])}). Falling back to step {choice[0]}.",
                    )
                )
        newer_abandoned = sorted({s for s, _ in gone if s > choice[0]})
        if newer_abandoned:
            self.log.debug(
                step_message(
                    self.rank,
                    choice[0],
                    f"Steps {newer_abandoned} belong to saves a later rewind abandoned; skipped.",
                )
            )
        observe(self.config.namespace, generation[choice])
        if choice not in sources:  # this rank's node lacks the commit: a peer has it
            sources[choice] = self._peer_source(choice)
        return choice, sources[choice]

    def _use_peers(self, peers: PeerView, mine: View) -> None:
        """Read from the other nodes' memory tiers after this node's own, before durable."""
        self.peer_tiers = peers.tiers(mine.node_id, self.config)
        memory, rest = self.tiers[0], self.tiers[1:]
        self.tiers = [memory, *self.peer_tiers, *rest]

    def _peer_source(self, choice: Choice) -> StepSource:
        """The commit of ``choice`` read from a peer that holds it (verified by attempt)."""
        step, attempt = choice
        problems = []
        for tier in self.peer_tiers:
            try:
                record, problem = StepCatalog(tier, self.config.namespace, self.log).read_commit(
                    step
                )
            except Exception as e:
                problems.append(f"{tier.url}: {e}")
                continue
            if record is not None and record.attempt == attempt:
                return StepSource(tier, record)
            problems.append(f"{tier.url}: {problem or 'another attempt'}")
        raise CheckpointNotFoundError(
            f"Step {step} (attempt {attempt}): no peer returned its commit ({'; '.join(problems)})."
        )

    def not_found(
        self,
        requested: int | None,
        local: dict[Choice, StepSource],
        gathered: list[View],
        gone: set[Choice],
        marks: dict[Choice, list[str]],
    ) -> TierckptError:
        """The error every rank raises when no save is restorable by all of them."""
        where = f"memory ({self.memory.root}) or durable ({self.durable.url})"
        ns = self.config.namespace
        outages = [
            f"rank {r}: {v.durable_error}" for r, v in enumerate(gathered) if v.durable_error
        ]
        if outages:
            return DurableUnavailableError(
                f"No step of namespace {ns!r} is restorable by every rank, and the durable tier "
                f"is unreachable on {'; '.join(outages)}. Fix the durable tier (or its "
                "configuration) on those ranks, or restore from a memory tier that holds a "
                "complete step."
            )
        why = ""
        if marks:
            why += f" Unloadable: {sorted(s for s, _ in marks)}."
        if gone:
            why += f" Abandoned by a later rewind: {sorted({s for s, _ in gone})}."
        if requested is not None:
            return CheckpointNotFoundError(
                f"Step {requested} of namespace {ns!r} is not restorable by every rank from "
                f"{where}: it is uncommitted, was evicted, or lost files.{why} Load another step or pass step=None."
            )
        if local:
            return CheckpointNotFoundError(
                f"No step of namespace {ns!r} is restorable by every rank (this rank could load "
                f"{sorted(s for s, _ in local)}); check that every node sees the durable tier {self.durable.url}.{why}"
            )
        return CheckpointNotFoundError(
            f"No committed checkpoint of namespace {ns!r} in {where}: start from scratch or check "
            f"namespace, memory_root and durable_base_path.{why}"
        )

    def read_metadata(self, source: StepSource, parse: Callable[[Buffer], Any]) -> Any:
        """The step's metadata, parsed (``parse`` returns None for a foreign object); each
        copy is parsed only once its checksum matches, nearest the commit's tier first."""
        record = source.record
        last: Exception | None = None
        for tier in [source.tier, *[t for t in self.tiers if t is not source.tier]]:
            try:
                data = StepCatalog(tier, self.config.namespace, self.log).read_metadata(record)
            except Exception as e:  # missing, unreachable, or not the bytes the commit vouches for
                if isinstance(e, IntegrityError):
                    self.log.warning(step_message(self.rank, record.step, str(e)))
                last = e
                continue
            try:
                metadata = parse(data)
            except Exception as e:
                last = e
                continue
            if metadata is not None:
                return metadata
        raise IntegrityError(
            f"Step {record.step}: no copy of its DCP metadata {record.metadata} is readable and "
            f"matches its commit's checksum ({last})."
        )

    def mark_unloadable(self, step: int, attempt: str, error: Exception) -> StepUnloadableError:
        """Record that this rank cannot load that save, so the next agreement skips it.

        The marker ``<attempt>.unloadable-r<rank>`` goes into the step's directory in this
        node's memory tier (and this process remembers it).
        """
        ns = self.config.namespace
        mark_unloadable(ns, step, attempt)
        name = layout.unloadable_name(attempt, self.rank)
        body = {"rank": self.rank, "step": step, "attempt": attempt}
        try:
            self.memory.ensure_root()
            self.memory.write(
                layout.step_key(ns, step, name),
                [json.dumps({**body, "reason": str(error), "time": time.time()}).encode()],
            )
            where = f"marked unloadable ({name} in the memory tier {self.memory.root})"
        except Exception as e:
            where = f"marked unloadable in this process (writing {name} failed: {e})"
        return StepUnloadableError(
            f"{error} Step {step} is now {where}: the next load with step=None falls back "
            "to the newest step before it (tierckpt.load does so at once)."
        )
