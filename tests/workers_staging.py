"""Rank workers and helper processes for the staging-safety tests (``test_safe_staging.py``).

Every public ``w_*`` function runs inside a spawned gloo rank (``fixtures_dist.run_ranks``)
with the signature ``fn(rank, world_size, *args)`` and returns a picklable result. Values are
compared through ``distworkers.fingerprint`` (equal fingerprints mean bit-exact).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import threading
import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.tensor import Shard, distribute_tensor
from torch.utils._python_dispatch import TorchDispatchMode

import distworkers as dw
from tierckpt import CheckpointConfig, TieredStorageReader, TieredStorageWriter, layout
from tierckpt.tiers.memory import MemoryTier

# --------------------------------------------------------------------------- states


def sharded_tensors(seed: int, world_size: int, rows: int = 64) -> dict[str, Any]:
    """Tensor-only state: two DTensors sharded on dim 0 (no byte items, no replicated part)."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world_size,))
    g = torch.Generator().manual_seed(seed)
    return {
        "w": distribute_tensor(torch.randn(rows * world_size, 64, generator=g), mesh, [Shard(0)]),
        "v": distribute_tensor(torch.randn(rows * world_size, generator=g), mesh, [Shard(0)]),
    }


def data_files(root: str, namespace: str, step: int) -> dict[str, os.stat_result]:
    """``name -> stat`` of the data files of one step in a memory root."""
    base = os.path.join(root, namespace, f"step_{step}")
    out = {}
    for name in dw.step_dirs(root, namespace).get(step, []):
        if name.endswith(".data"):
            out[name] = os.stat(os.path.join(base, name))
    return out


# --------------------------------------------------------------------------- d04


class CoordinatorSweepsLast(TieredStorageWriter):
    """Fault injection for an ordering: the coordinator starts ``write_data`` (whose first act
    is a retention sweep) only once every other rank's part of this attempt is written.

    It makes deterministic the interleaving a 2-rank re-save hits by chance.
    """

    def write_data(self, plan: Any, planner: Any) -> Any:
        if self.is_coordinator:
            base = os.path.join(self.memory.root, self.config.namespace, f"step_{self.step}")
            names = [
                layout.manifest_name(a, r) for r, a in self._rank_attempts.items() if r != self.rank
            ]
            assert dw.wait_for(
                lambda: all(os.path.exists(os.path.join(base, n)) for n in names), timeout=30
            ), f"the other ranks never wrote {names}"
        return super().write_data(plan, planner)


def w_resave_committed_steps(rank: int, world_size: int, cfg: CheckpointConfig, rounds: int) -> Any:
    """Each round: save step k, re-save it with other values, load; one entry per round."""
    out = []
    for k in range(1, rounds + 1):
        dw.save(cfg, sharded_tensors(seed=k, world_size=world_size), k)
        dist.barrier()
        again = sharded_tensors(seed=1000 + k, world_size=world_size)
        dcp.save(again, storage_writer=CoordinatorSweepsLast(cfg, step=k))
        dist.barrier()
        target = sharded_tensors(seed=999_999, world_size=world_size)
        info = dw.try_load(cfg, target)
        out.append(
            {
                "round": k,
                "load": info,
                "exact": dw.fingerprint(target) == dw.fingerprint(again),
                "files": dw.step_dirs(cfg.memory_root or "", cfg.namespace).get(k, []),
            }
        )
        dist.barrier()
    return out


# --------------------------------------------------------------------------- d06


def reader_state(seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(256, 64, generator=g),
        "v": torch.randn(1000, generator=g),
        "extra": dw.extra_values(seed),
    }


def reader_target() -> dict[str, Any]:
    """A load target for :func:`reader_state` whose ``w`` is not contiguous (no direct read)."""
    return {
        "w": torch.zeros(64, 256).t(),
        "v": torch.zeros(1000),
        "extra": dw.blank_extra(),
    }


class _Pause:
    """Pause the calling thread once: announce ``paused``, wait for ``resume`` in the store."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.done = False
        self.where = ""
        self._lock = threading.Lock()

    def __call__(self, where: str) -> None:
        with self._lock:
            if self.done:
                return
            self.done = True
        self.where = where
        self.store.set("paused", where)
        self.store.wait(["resume"], timedelta(seconds=60))


class _PausingMemory(MemoryTier):
    """The real memory tier, pausing once right after a data file is opened for reading."""

    def __init__(self, root: str, pause: _Pause) -> None:
        super().__init__(root)
        self._pause = pause

    def open_shared(self, key: str) -> Any:
        handle = super().open_shared(key)  # type: ignore[misc]
        if key.endswith(".data"):
            self._pause("after open")
        return handle


class PausingReader(TieredStorageReader):
    """Fault injection: the real reader, paused once between opening a memory-tier data file
    and copying its bytes out (for a reader that copies in ``_apply``, before ``_apply``)."""

    def __init__(self, cfg: CheckpointConfig, pause: _Pause, **kwargs: Any) -> None:
        super().__init__(cfg, **kwargs)
        self.memory = _PausingMemory(self.memory.root, pause)
        self.tiers[0] = self.memory
        self._pause = pause

    def _apply(self, *args: Any) -> None:
        self._pause("before apply")
        super()._apply(*args)


def w_read_while_the_trainer_recycles(rank: int, world_size: int, cfg: CheckpointConfig) -> Any:
    """Rank 0 trains (saves), rank 1 restores step 1; both are 1-rank jobs on one memory root.

    The reader pauses with step 1's data file open; meanwhile the trainer saves steps 2..4
    (memory_keep_last=1), so step 1 is evicted and its file goes to the staging pool.
    """
    groups = [dist.new_group([r]) for r in range(world_size)]
    mine = groups[rank]
    store = dist.distributed_c10d._get_default_store()
    root = cfg.memory_root or ""
    if rank == 0:
        w = TieredStorageWriter(cfg, step=1, save_to_durable=True)
        dcp.save(reader_state(1), storage_writer=w, process_group=mine)
        w.durable_done.result(timeout=60)
        store.set("saved", "1")
        store.wait(["paused"], timedelta(seconds=60))
        held = {st.st_ino for st in data_files(root, cfg.namespace, 1).values()}
        new: list[int] = []
        for step in (2, 3, 4):
            dcp.save(
                reader_state(step),
                storage_writer=TieredStorageWriter(cfg, step=step),
                process_group=mine,
            )
            new += [st.st_ino for st in data_files(root, cfg.namespace, step).values()]
        evicted = 1 not in dw.step_dirs(root, cfg.namespace)
        store.set("resume", "1")
        return {"held": sorted(held), "new": new, "step_1_evicted": evicted}
    store.wait(["saved"], timedelta(seconds=60))
    pause = _Pause(store)
    target = reader_target()
    try:
        reader = PausingReader(cfg, pause, step=1, process_group=mine)
        dcp.load(target, storage_reader=reader, process_group=mine)
        result: dict[str, Any] = {"bytes": dict(reader.bytes_read_by_tier)}
    except BaseException as e:
        result = {"errors": dw.describe_error(e)}
    if not pause.done:  # never paused: release the trainer anyway, and say so
        store.set("paused", "never")
    result.update(
        {
            "paused_at": pause.where,
            "loaded": dw.fingerprint(target),
            "expected": dw.fingerprint(reader_state(1)),
        }
    )
    return result


# --------------------------------------------------------------------------- d15


class _CopyCounter(TorchDispatchMode):
    """Bytes written by ``aten.copy_`` while active, and by ``os.pwrite`` from tierckpt's
    staging module (it fills new tmpfs pages with write() instead of a mapped copy)."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __enter__(self) -> Any:
        import tierckpt.staging as staging_module

        real = os.pwrite

        def counted(fd: int, data: Any, offset: int) -> int:
            n = real(fd, data, offset)
            self.bytes += n
            return n

        self._patch = (staging_module, real)
        staging_module.os = _OsWith(pwrite=counted)  # type: ignore[attr-defined]
        return super().__enter__()

    def __exit__(self, *exc: Any) -> Any:
        module, _real = self._patch
        module.os = os  # type: ignore[attr-defined]
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is torch.ops.aten.copy_.default:
            dst = args[0]
            self.bytes += dst.numel() * dst.element_size()
        return func(*args, **(kwargs or {}))


class _OsWith:
    """``os`` with some functions replaced."""

    def __init__(self, **replaced: Any) -> None:
        self._replaced = replaced

    def __getattr__(self, name: str) -> Any:
        return self._replaced.get(name) or getattr(os, name)


class CopyCountingWriter(TieredStorageWriter):
    """The real writer; records how many bytes its ``stage`` (the blocking part) copies."""

    staged_copy_bytes = -1
    tmpfs_bytes_during_stage = -1

    def stage(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        before = dw.tree_size(self.memory.root) if os.path.isdir(self.memory.root) else 0
        with _CopyCounter() as counter:
            out = super().stage(state_dict)
        self.staged_copy_bytes = counter.bytes
        self.tmpfs_bytes_during_stage = dw.tree_size(self.memory.root) - before
        return out


def _big_ddp(seed: int) -> tuple[Any, Any]:
    torch.manual_seed(seed)
    model = torch.nn.parallel.DistributedDataParallel(
        torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 128))
    )
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(seed)
    model(torch.randn(8, 256, generator=g)).pow(2).sum().backward()
    opt.step()
    opt.zero_grad()
    return model, opt


def _tensor_bytes(obj: Any) -> int:
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    return 0


def w_ddp_async_save(rank: int, world_size: int, cfg: CheckpointConfig) -> Any:
    """``dcp.async_save`` of DDP model + AdamW state; the step's tmpfs bytes; a bit-exact load."""
    model, opt = _big_ddp(seed=1)
    sd = dw._model_state(model, opt, seed=1)
    saved = dw.fingerprint(sd)
    w = CopyCountingWriter(cfg, step=1)
    group = dist.new_group(backend="gloo")
    res = dcp.async_save(sd, storage_writer=w, process_group=group)
    upload = res.upload_completion if hasattr(res, "staging_completion") else res
    upload.result(timeout=120)
    dist.barrier()
    files = data_files(cfg.memory_root or "", cfg.namespace, 1)
    fresh_model, fresh_opt = _big_ddp(seed=2)
    target = dw._model_state(fresh_model, fresh_opt, seed=0)
    target["extra"] = dw.blank_extra()
    info = dw.load(cfg, target)
    dw._apply(fresh_model, fresh_opt, target)
    loaded = dw.fingerprint(
        dw._model_state(fresh_model, fresh_opt, seed=0) | {"extra": target["extra"]}
    )
    return {
        "state_tensor_bytes": _tensor_bytes(sd),
        "data_file_bytes": {n: st.st_size for n, st in files.items()},
        "staged_copy_bytes": w.staged_copy_bytes,
        "tmpfs_bytes_during_stage": w.tmpfs_bytes_during_stage,
        "load": info,
        "saved": saved,
        "loaded": loaded,
    }


def mixed_state(seed: int, world_size: int) -> dict[str, Any]:
    """A DTensor sharded over the ranks, a replicated plain tensor and byte items."""
    g = torch.Generator().manual_seed(seed)
    state = sharded_tensors(seed, world_size, rows=128)
    state["rep"] = torch.randn(128, 64, generator=g)
    state["extra"] = dw.extra_values(seed)
    return state


def w_mixed_async_save(rank: int, world_size: int, cfg: CheckpointConfig) -> Any:
    """``dcp.async_save`` of shards + a replicated tensor + byte items; sizes; a load."""
    sd = mixed_state(seed=3, world_size=world_size)
    saved = dw.fingerprint(sd)
    w = CopyCountingWriter(cfg, step=1)
    res = dcp.async_save(sd, storage_writer=w, process_group=dist.new_group(backend="gloo"))
    upload = res.upload_completion if hasattr(res, "staging_completion") else res
    upload.result(timeout=120)
    dist.barrier()
    files = data_files(cfg.memory_root or "", cfg.namespace, 1)
    target = mixed_state(seed=4, world_size=world_size)
    target["extra"] = dw.blank_extra()
    info = dw.load(cfg, target)
    return {
        "full_sharded_bytes": sum(_tensor_bytes(t.full_tensor()) for t in (sd["w"], sd["v"])),
        "rep_bytes": _tensor_bytes(sd["rep"]),
        "local_tensor_bytes": _tensor_bytes(
            {"w": sd["w"].to_local(), "v": sd["v"].to_local(), "rep": sd["rep"]}
        ),
        "staged_copy_bytes": w.staged_copy_bytes,
        "data_file_bytes": {n: st.st_size for n, st in files.items()},
        "load": info,
        "saved": saved,
        "loaded": dw.fingerprint(target),
    }


# --------------------------------------------------------------------------- d18


def bytes_state(seed: int, blob_bytes: int) -> dict[str, Any]:
    """A small tensor and a big byte item (a non-tensor value DCP pickles)."""
    g = torch.Generator().manual_seed(seed)
    return {"t": torch.randn(64, generator=g), "blob": bytes([seed % 256]) * blob_bytes}


def _free(path: str) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _async_save(cfg: CheckpointConfig, sd: dict[str, Any], step: int) -> None:
    res = dcp.async_save(sd, storage_writer=TieredStorageWriter(cfg, step=step))
    upload = res.upload_completion if hasattr(res, "staging_completion") else res
    upload.result(timeout=60)


def w_byte_items_overflow_the_tmpfs(
    rank: int, world_size: int, cfg: CheckpointConfig, big: int
) -> Any:
    """Step 1 small; steps 2 (dcp.save) and 3 (async_save) carry a byte item larger than the
    tmpfs; then a small step 4. Free space before and after each failure."""
    root = cfg.memory_root or ""
    dw.save(cfg, bytes_state(1, 1000), 1)
    dist.barrier()
    out: dict[str, Any] = {"failures": []}
    for step, how in ((2, "save"), (3, "async_save")):
        free_before = _free(root)
        dist.barrier()
        try:
            if how == "save":
                dw.save(cfg, bytes_state(step, big), step)
            else:  # with a shard of its own, staged first into the memory tier
                state = bytes_state(step, big) | sharded_tensors(step, world_size, rows=16)
                _async_save(cfg, state, step)
            error = None
        except BaseException as e:
            error = dw.describe_error(e)
        dist.barrier()
        out["failures"].append(
            {
                "how": how,
                "error": error,
                "free_before": free_before,
                "free_after": _free(root),
                "staging": sorted(os.listdir(os.path.join(root, cfg.namespace, ".staging"))),
                "files": dw.list_tree(root),
            }
        )
        dist.barrier()
    out["later"] = dw.try_save(cfg, bytes_state(4, 1000), 4)
    dist.barrier()
    sd = bytes_state(0, 0)
    out["load"] = dw.try_load(cfg, sd)
    out["exact"] = dw.fingerprint(sd) == dw.fingerprint(bytes_state(4, 1000))
    return out


# --------------------------------------------------------------------------- d19


def _rendezvous_after_make_room(flags: str, rank: int, world_size: int, wait_s: float) -> None:
    """Fault injection for a race: after a rank's budget check passed, wait (up to ``wait_s``)
    until every other rank's check passed too, so that checks and allocations overlap."""
    from tierckpt import saving as writer

    real = writer.make_room

    def make_room(*args: Any, **kwargs: Any) -> None:
        real(*args, **kwargs)
        open(os.path.join(flags, f"passed-r{rank}"), "w").close()
        others = [os.path.join(flags, f"passed-r{r}") for r in range(world_size) if r != rank]
        dw.wait_for(lambda: all(os.path.exists(p) for p in others), timeout=wait_s)

    writer.make_room = make_room  # type: ignore[assignment]


def w_ranks_race_for_the_last_room(
    rank: int, world_size: int, cfg: CheckpointConfig, flags: str
) -> Any:
    """Step 1 without a budget; step 2 under a budget that fits one rank's part beyond step 1.

    Rank 0 samples the tier's usage during step 2.
    """
    root = cfg.memory_root or ""
    dw.save(cfg, sharded_tensors(seed=1, world_size=world_size, rows=512), 1)
    dist.barrier()
    part = max(st.st_size for st in data_files(root, cfg.namespace, 1).values())
    used = dw.tree_size(root)
    budget = used + part + part // 2
    bounded = dataclasses.replace(cfg, memory_budget=budget)
    _rendezvous_after_make_room(flags, rank, world_size, wait_s=2.0)
    samples: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            try:
                samples.append(dw.tree_size(root))
            except FileNotFoundError:
                continue
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    if rank == 0:
        sampler.start()
    dist.barrier()
    error = dw.try_save(bounded, sharded_tensors(seed=2, world_size=world_size, rows=512), 2)
    dist.barrier()
    stop.set()
    if rank == 0:
        sampler.join()
    return {
        "budget": budget,
        "part": part,
        "used_before": used,
        "error": error,
        "max_sampled": max(samples, default=0),
        "after": dw.tree_size(root),
        "files": dw.list_tree(root),
    }


# --------------------------------------------------------------------------- d16 helpers


def hold_staging_file(root: str, namespace: str, attempt: str) -> None:
    """A writer that stays alive: the lease of ``attempt`` (rank 0) and its staging buffer.

    Prints the staging file's path, then waits until stdin closes.
    """
    from tierckpt.leases import AttemptLease, lease_name
    from tierckpt.staging import StagingPool

    tier = MemoryTier(root)
    tier.ensure_root()
    lease = AttemptLease(tier.path(namespace), lease_name(attempt, 0))
    buffer = StagingPool(tier, namespace).acquire(4096, name=f"{attempt}-r0", rank=0)
    print(f"ready {os.getpid()} {buffer.path}", flush=True)
    sys.stdin.read()
    buffer.close()
    lease.release()
