"""``TieredStorageWriter``: DCP's StorageWriter over the memory tier, draining to durable.

A thin adapter: staging (``_stage``), plan data (``_plan``), writing a rank's part and the
memory commit (``tierckpt.saving``) and starting the drain (``tierckpt._drain_start``).
"""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItemType
from torch.distributed.checkpoint.staging import AsyncStager
from torch.distributed.checkpoint.storage import StorageWriter, WriteResult

from .. import layout, metrics
from .._dist import dist_ready, process_rank
from .._drain_start import start_durable_commit, start_upload, watch_commit
from .._gcpause import PauseSlot
from .._log import logger_for, megabytes, step_message, summary
from ..config import CheckpointConfig, require_config
from ..destination import record_destination
from ..drain import set_exit_wait
from ..history import begin_upload, next_generation
from ..hugepages import log_huge_pages_hint
from ..leases import AttemptLease, lease_name
from ..manifest import BlobInfo, RankManifest
from ..nodemem import hold_namespace
from ..peer.node import PeerNode, peer_node
from ..peer.placement import Peers, plan_peers
from ..peer.publish import push_commit
from ..peer.replicate import replicate_part
from ..resume import resume_pending_once
from ..saving import PartItem, RankPart, WrittenPart, commit_memory, write_rank_part
from ..staging import PrivateBuffer, StagingBuffer
from ..tiers.base import Tier
from ..tiers.durable import open_durable_tier
from ..tiers.memory import open_memory_tier
from ._destroy_guard import install as install_destroy_guard
from ._inflight import Turn, take_turn
from ._plan import (
    PartReport,
    check_reports,
    fresh_answer,
    global_plans,
    local_plan,
    new_token,
    report_result,
    split_results,
)
from ._stage import stage_for_rank, staged_sizes

__all__ = ["TieredStorageWriter"]


class TieredStorageWriter(StorageWriter, AsyncStager):
    """Saves a DCP checkpoint to the node's memory tier; chosen steps drain to durable.

    ``dcp.save`` / ``dcp.async_save`` complete once the memory tier has committed the
    step; :attr:`durable_done` completes once the durable tier has committed it.
    """

    def __init__(
        self,
        config: CheckpointConfig,
        step: int | None = None,
        path: str | os.PathLike[str] | None = None,
        save_to_durable: bool | None = None,
    ) -> None:
        super().__init__()
        self.config = require_config(config)
        self._explicit_step = layout.parse_step(step) if step is not None else None
        self.step: int | None = self._explicit_step
        if self.step is None and path is not None:
            self.step = layout.step_from_path(path)
        self.path = path
        self.save_to_durable = (
            config.save_to_durable if save_to_durable is None else bool(save_to_durable)
        )
        self.attempt = layout.new_attempt_id()
        self.rank = 0
        self.is_coordinator = True
        self.durable_done: Future[None] = Future()
        self.peer_done: Future[None] = Future()
        """Completes when this rank's part of the save is replicated to its peers (at once
        when nothing is replicated); fails with :class:`ReplicationError` if it cannot be."""
        self._durable = self.save_to_durable
        self._used = False
        self._staged_attempt = False
        self._lease: AttemptLease | None = None
        self._watching = False
        self._token = new_token()
        self._newest_generation = 0
        self._rank_attempts: dict[int, str] = {}
        """Coordinator: each rank's attempt as its plan reports it (a hint; see ``_plan``)."""
        self._upload: Future[int] | None = None
        self._staging: StagingBuffer | None = None
        self._private: PrivateBuffer | None = None
        self._turn: Turn | None = None
        self._gc = PauseSlot()
        if not self.save_to_durable:
            self.durable_done.set_result(None)
        self.memory = open_memory_tier(config)  # refuses an untrusted root; creates nothing
        hold_namespace(config, self.memory)  # this process owns the namespace's node memory
        if process_rank() == 0:  # a tmpfs without huge pages: how to get faster saves
            log_huge_pages_hint(self.memory.root, logger_for(config))
        # Never raises for the durable tier here: a rank failing alone before DCP's
        # collectives would hang the others. An unreachable tier fails the drain instead.
        self.durable = open_durable_tier(config, check=False) if self.save_to_durable else None
        if self.save_to_durable:
            set_exit_wait(config.durable_exit_wait_s)
        resume_pending_once(config)

    # -- pickling (DCP's PROCESS checkpointer ships the writer to a subprocess) --

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["durable_done"] = None
        state["peer_done"] = None
        state["_upload"] = None
        state["durable"] = None  # reopened on the other side; clients may not pickle
        if self._staging is not None:  # the other process writes (and uploads) the file
            self._staging.abandon("the save continues in another process")
        state["_staging"] = None  # staged tensors travel with the state dict
        state["_private"] = None
        state["_lease"] = None  # the lease stays with (and dies with) this process
        if self._turn is not None:  # it runs in another process: the next save cannot wait
            self._turn.started.set()
        state["_turn"] = None  # threads do not travel; the other process orders its own saves
        state["_gc"] = PauseSlot()  # a pause belongs to this process
        if self.save_to_durable and not self._watching and self.step is not None:
            self._watching = True
            self._watch_from_parent()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.peer_done = Future()
        self.durable_done = Future()
        if not self.save_to_durable:
            self.durable_done.set_result(None)

    def _watch_from_parent(self) -> None:
        """In the training process, resolve ``durable_done`` from the durable tier itself."""
        assert self.step is not None and self.durable is not None
        watch_commit(
            self.config,
            self.durable,
            self.step,
            self.attempt,
            process_rank(),
            self.durable_done,
        )

    # -- StorageWriter --

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        if checkpoint_id is not None and self._explicit_step is None:
            self.step = layout.step_from_path(checkpoint_id)
            self.path = checkpoint_id

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=layout.step_dir(self.config.namespace, self.step or 0))

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return False

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        if self.step is None:
            raise layout.no_step_error(self.path)
        # Until this rank's last call (write_data, or finish on the coordinator).
        self._gc.start(
            self.config.pause_gc, f"step {self.step} save", 2 * self.config.collective_timeout_s
        )
        # Before this save's first collective: wait for the previous save of the namespace.
        turn, self._turn = self._turn or take_turn(self.config, self.step), None
        turn.run(self.config)
        self.is_coordinator = is_coordinator
        self.rank = int(kwargs.get("rank", process_rank()))
        if self._staged_attempt:
            self._staged_attempt = False  # stage() began this save's attempt
        else:
            self._begin_attempt(self.rank)

    def _begin_attempt(self, rank: int) -> None:
        """Start a save attempt: a fresh id (after the first) and a lease proving it is live.

        The lease is held until the next attempt of this writer or until it is collected or
        its process dies; sweeps never remove files of an attempt whose lease is held.
        """
        if self._used:
            self.attempt = layout.new_attempt_id()
            if self.peer_done.done():
                self.peer_done = Future()
        self._token = new_token()
        self._used = True
        self.memory.ensure_root(self.config.namespace)
        if self._lease is not None:
            self._lease.release()
        ns_dir = self.memory.path(self.config.namespace)
        self._lease = AttemptLease(ns_dir, lease_name(self.attempt, rank))

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        assert self.step is not None
        planned, self._newest_generation = local_plan(
            plan, self.memory, self.config, self.rank, self._token, self.attempt
        )
        return planned

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        decided = global_plans(
            plans, self.memory, self.config, self.step or 0, self.attempt, self.save_to_durable
        )
        self._rank_attempts = decided.attempt_hints
        return decided.plans

    # -- AsyncStager: dcp.async_save copies the state dict once, into the memory tier --

    _synchronize_after_execute = False

    def stage(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """Copy every tensor once: the shards this rank writes into its staging buffer in the
        memory tier; replicated tensors of a multi-rank job into a private, reused buffer
        (DCP's plan gives each to one rank, and only that rank copies it into the tier)."""
        t0 = time.perf_counter()
        rank = process_rank()
        sizes = staged_sizes(state_dict, replicated_private=self.config.world_size > 1)
        if self._staging is not None:  # staged before and never written
            self._staging.abandon("the writer staged a new save")
        self._begin_attempt(rank)
        self._staged_attempt = True
        staged, self._staging, self._private = stage_for_rank(
            self.memory,
            self.config,
            state_dict,
            sizes,
            step=self.step,
            attempt=self.attempt,
            rank=rank,
            started=t0,
            durable=self.durable if self.save_to_durable else None,
        )
        self._turn = take_turn(self.config, self.step)  # in program order, as on every rank
        if dist_ready():  # destroying the group under this save would fail it
            install_destroy_guard()
        return staged

    def synchronize_staging(self) -> None:
        """Staging is synchronous: nothing to wait for."""

    def close(self) -> None:
        """Nothing to release: buffers return to the pool when their step is evicted."""

    def write_data(
        self, plan: SavePlan, planner: SavePlanner
    ) -> torch.futures.Future[list[WriteResult]]:
        ended = not self.is_coordinator  # the coordinator's pause lasts through finish()
        try:
            return self._write_data(plan, planner)
        except BaseException:
            ended = True
            raise
        finally:
            if ended:
                self._gc.end()

    def _write_data(
        self, plan: SavePlan, planner: SavePlanner
    ) -> torch.futures.Future[list[WriteResult]]:
        assert self.step is not None
        log = logger_for(self.config)
        # The coordinator's answer to this save's local plan; a replayed plan (DCP's plan
        # caching) answers an earlier save: each rank then follows its own writer.
        answer = fresh_answer(plan, self._token)
        self._durable = answer.durable if answer is not None else self.save_to_durable
        if self._durable != self.save_to_durable:
            log.warning(
                step_message(
                    self.rank,
                    self.step,
                    "save_to_durable differs from the coordinator's; following the coordinator.",
                )
            )
        t0 = self._write_started = time.perf_counter()
        log.debug(
            step_message(
                self.rank, self.step, f"Starting checkpoint write ({len(plan.items)} items)"
            )
        )

        def resolved() -> Any:
            for item in plan.items:
                data: PartItem = planner.resolve_data(item)
                assert item.type != WriteItemType.BYTE_IO or isinstance(data, io.BytesIO)
                yield data

        part = RankPart(
            self.step,
            self.attempt,
            self.rank,
            self._durable,
            resolved(),
            self._staging,
            self._private,
        )
        self._staging = self._private = None
        if self._durable:  # before the manifest that says durable: resumes find where to go
            record_destination(self.memory, self.config)
        written = write_rank_part(
            self.memory,
            self.config,
            part,
            install=answer.install if answer is not None else None,
            started=t0,
            durable=self._durable_tier() if self._durable else None,
        )
        if self._durable:
            self._start_drain(written)
        elif not self.durable_done.done():
            self.durable_done.set_result(None)
        results = [
            WriteResult(
                index=item.index,
                size_in_bytes=info.length,
                storage_data=dataclasses.replace(info, file_size=written.file_size),
            )
            for item, info in zip(plan.items, written.blobs, strict=True)
        ]
        node = peer_node(self.config)
        report = PartReport(
            self.rank,
            self.step,
            self.attempt,
            self._durable,
            self._newest_generation,
            node_id=self.config.node_id or "",
            peer_address=node.address if node is not None else None,
        )
        self._start_replication(node, written.manifest)
        results.append(report_result(report))
        fut: torch.futures.Future[list[WriteResult]] = torch.futures.Future()
        fut.set_result(results)
        return fut

    def _start_replication(self, node: PeerNode | None, manifest: RankManifest) -> None:
        """Copy this rank's part to its peers once the step is committed (in the background;
        the targets come with the commit). At once done in a one-node job."""
        if node is None:
            if not self.peer_done.done():
                self.peer_done.set_result(None)
            return
        replicate_part(self.config, self.memory, node, manifest, self.peer_done)

    def _durable_tier(self) -> Tier:
        self.durable = self.durable or open_durable_tier(self.config, check=False)
        return self.durable

    def _start_drain(self, written: WrittenPart) -> None:
        self._upload = start_upload(
            self.config,
            self.memory,
            self._durable_tier(),
            written.manifest,
            coordinator=self.is_coordinator,
            done=self.durable_done,
            staged=written.upload,
        )

    def _publish_commit(self, peers: Peers) -> Callable[[bytes, bytes], None] | None:
        """Installs the commit on every other node before this one, so that every node holds
        it when ``dcp.save`` returns and replicas never arrive before it."""
        node = peer_node(self.config)
        if node is None or len(set(peers.nodes)) <= 1:
            return None
        step = self.step or 0

        def publish(record_json: bytes, metadata: bytes) -> None:
            push_commit(
                self.config, node, peers.nodes, peers.addresses, record_json, metadata, step=step
            )

        return publish

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        try:
            self._finish(metadata, results)
        finally:
            self._gc.end()

    def _finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        assert self.step is not None
        t0 = time.perf_counter()
        items, maybe_reports = split_results(results)
        reports = check_reports(maybe_reports, self.step, self._durable)
        storage_data: dict[Any, BlobInfo] = {}
        parts: list[tuple[str, list[BlobInfo]]] = []
        for report, rank_results in zip(reports, items, strict=True):
            storage_data.update((wr.index, wr.storage_data) for wr in rank_results)
            parts.append((report.attempt, [wr.storage_data for wr in rank_results]))
        ns = self.config.namespace
        if self._durable:  # every rank's actual attempt, for what protects its upload
            begin_upload(ns, self.step, self.attempt, [r.attempt for r in reports])
        # "Newest" is the newest save: above the clock, every rank's tier and this process.
        generation = next_generation(ns, (r.newest_generation for r in reports))
        metadata.storage_data = storage_data
        md_bytes = pickle.dumps(metadata)
        peers = plan_peers(self.config, reports)
        record = commit_memory(
            self.memory,
            self.config,
            step=self.step,
            attempt=self.attempt,
            rank=self.rank,
            generation=generation,
            durable=self._durable,
            parts=parts,
            metadata=md_bytes,
            started=t0,
            peers=peers,
            publish=self._publish_commit(peers),
        )
        seconds = time.perf_counter() - getattr(self, "_write_started", t0)
        nbytes = sum(b.length for _, blobs in parts for b in blobs)
        summary(
            logger_for(self.config),
            f"step {self.step} saved to memory in {seconds:.3f} s ({megabytes(nbytes)}, "
            f"{nbytes / 1e6 / max(seconds, 1e-9):.1f} MB/s)",
        )
        metrics.observe_save(self.config.namespace, seconds, nbytes)
        if self._durable:
            start_durable_commit(
                self.config,
                self.memory,
                self._durable_tier(),
                record,
                md_bytes,
                attempt=self.attempt,
                rank=self.rank,
                upload=self._upload,
                done=self.durable_done,
            )
