"""Worker functions run inside spawned gloo ranks (see ``fixtures_dist.run_ranks``).

Every public ``w_*`` function has the signature ``fn(rank, world_size, *args)`` and returns
a picklable result. Values are compared through *fingerprints* (dtype, shape and the
xxh3-128 of the raw bytes of every tensor; ``repr`` of every other value), so "equal
fingerprints" means "bit-exact".
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import xxhash
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from tierckpt import CheckpointConfig, TieredStorageReader, TieredStorageWriter

# --------------------------------------------------------------------------- values


def fingerprint(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Flat ``path -> description`` of a state dict; equal iff bit-exact equal."""
    out: dict[str, Any] = {}
    if isinstance(obj, dict):
        for k in sorted(obj, key=str):
            out.update(fingerprint(obj[k], f"{prefix}/{k}"))
    elif isinstance(obj, DTensor):
        local = obj.to_local()
        out[prefix] = (
            "DTensor",
            str(obj.dtype),
            tuple(obj.shape),
            repr(obj.placements),
            tuple(local.shape),
            _digest(local),
        )
    elif isinstance(obj, torch.Tensor):
        out[prefix] = ("Tensor", str(obj.dtype), tuple(obj.shape), _digest(obj))
    else:
        out[prefix] = (type(obj).__name__, repr(obj))
    return out


def full_fingerprint(obj: dict[str, Any]) -> dict[str, Any]:
    """Like :func:`fingerprint` but DTensors are gathered to full tensors (collective)."""
    return fingerprint(
        _map_tensors(obj, lambda t: t.full_tensor() if isinstance(t, DTensor) else t)
    )


def _digest(t: torch.Tensor) -> str:
    flat = t.detach().cpu().contiguous().reshape(-1)
    return (
        xxhash.xxh3_128_hexdigest(flat.view(torch.uint8).numpy().tobytes()) if flat.numel() else ""
    )


def _map_tensors(obj: Any, fn: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    return obj


def extra_values(seed: int) -> dict[str, Any]:
    """Non-tensor values of a state dict: ints, a nested dict, bytes, str, float, list."""
    return {
        "epoch": seed,
        "name": f"run-{seed}",
        "blob": bytes([seed % 256, 0, 255, 7]) * 3,
        "nested": {"lr": 0.125 * seed, "ids": [seed, seed + 1], "inner": {"tag": "x" * seed}},
    }


def blank_extra() -> dict[str, Any]:
    """A load target with the structure of :func:`extra_values` and other values."""
    return {
        "epoch": -1,
        "name": "",
        "blob": b"",
        "nested": {"lr": -1.0, "ids": [0, 0], "inner": {"tag": ""}},
    }


def plain_state(seed: int, scale: int = 1) -> dict[str, Any]:
    """A replicated state dict (same on every rank), deterministic in ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(64 * scale, 32, generator=g),
        "b": torch.randn(32, generator=g).to(torch.float64),
        "ids": torch.randint(0, 1000, (17,), generator=g),
        "half": torch.randn(9, generator=g).to(torch.bfloat16),
        "extra": extra_values(seed),
    }


def blank_plain_state(scale: int = 1) -> dict[str, Any]:
    """A load target shaped like :func:`plain_state` with different values."""
    sd = plain_state(seed=99_999, scale=scale)
    sd["extra"] = blank_extra()
    return sd


def full_tensors(seed: int) -> dict[str, torch.Tensor]:
    """Full (unsharded) tensors with uneven first dimensions, deterministic in ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(7, 5, generator=g),
        "v": torch.randn(10, generator=g).to(torch.float64),
        "rep": torch.arange(6, dtype=torch.int32) * seed,
    }


def sharded_state(seed: int, world_size: int) -> dict[str, Any]:
    """``w`` and ``v`` sharded on dim 0 as DTensors over all ranks; ``rep`` a plain tensor."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world_size,))
    full = full_tensors(seed)
    return {
        "w": distribute_tensor(full["w"], mesh, [Shard(0)]),
        "v": distribute_tensor(full["v"], mesh, [Shard(0)]),
        "rep": full["rep"],
        "extra": extra_values(seed),
    }


def blank_sharded_state(world_size: int) -> dict[str, Any]:
    sd = sharded_state(seed=77_777, world_size=world_size)
    sd["extra"] = blank_extra()
    return sd


def unsharded_state(seed: int) -> dict[str, Any]:
    """The plain-tensor equivalent of :func:`sharded_state`."""
    return {**full_tensors(seed), "extra": extra_values(seed)}


def blank_unsharded_state() -> dict[str, Any]:
    return {**full_tensors(55_555), "extra": blank_extra()}


# --------------------------------------------------------------------------- helpers


class ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[tuple[str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append((record.levelname, record.getMessage()))


def capture_logs(cfg: CheckpointConfig, name: str = "tierckpt-test") -> ListHandler:
    """Route tierckpt's messages of this config to a list (returned handler's ``records``)."""
    log = logging.getLogger(name)
    log.setLevel(logging.DEBUG)
    log.propagate = False
    handler = ListHandler()
    log.addHandler(handler)
    cfg.logger = log
    return handler


def describe_error(exc: BaseException) -> list[dict[str, Any]]:
    """The errors inside ``exc`` (unwrapping DCP's CheckpointException), as plain data."""
    from torch.distributed.checkpoint.api import CheckpointException

    def one(e: BaseException, rank: int | None) -> dict[str, Any]:
        return {"rank": rank, "types": [c.__name__ for c in type(e).__mro__], "message": str(e)}

    if isinstance(exc, CheckpointException):
        out = []
        for rank, wrapped in exc.failures.items():
            inner = wrapped[0] if isinstance(wrapped, tuple) else wrapped
            out.append(one(inner, rank))
        return out
    return [one(exc, None)]


def load(cfg: CheckpointConfig, sd: dict[str, Any], step: int | None = None) -> dict[str, Any]:
    """``dcp.load`` through a fresh reader; the reader's view of what it did."""
    reader = TieredStorageReader(cfg, step=step)
    dcp.load(sd, storage_reader=reader)
    return {"step": reader.step, "bytes": dict(reader.bytes_read_by_tier)}


def try_load(cfg: CheckpointConfig, sd: dict[str, Any], step: int | None = None) -> Any:
    """Like :func:`load`, but a failure is returned as ``{"errors": describe_error(...)}``."""
    try:
        return load(cfg, sd, step)
    except BaseException as e:
        return {"errors": describe_error(e)}


def save(
    cfg: CheckpointConfig, sd: dict[str, Any], step: int, durable: bool = False
) -> TieredStorageWriter:
    """``dcp.save`` one step; waits for the durable commit when the step is durable."""
    w = TieredStorageWriter(cfg, step=step, save_to_durable=durable)
    dcp.save(sd, storage_writer=w)
    w.durable_done.result(timeout=60)
    return w


def try_save(cfg: CheckpointConfig, sd: dict[str, Any], step: int, durable: bool = False) -> Any:
    try:
        save(cfg, sd, step, durable)
    except BaseException as e:
        return describe_error(e)
    return None


def step_dirs(root: str, namespace: str) -> dict[int, list[str]]:
    """``step -> sorted file names`` of every step directory of a namespace in a tier root."""
    base = os.path.join(root, namespace)
    out: dict[int, list[str]] = {}
    if not os.path.isdir(base):
        return out
    for name in os.listdir(base):
        if name.startswith("step_") and name[5:].isdigit():
            out[int(name[5:])] = sorted(os.listdir(os.path.join(base, name)))
    return out


def committed_steps(root: str, namespace: str) -> list[int]:
    return sorted(s for s, files in step_dirs(root, namespace).items() if "COMMIT" in files)


def wait_for(predicate: Any, timeout: float = 10.0) -> bool:
    """Poll ``predicate`` until true or ``timeout``; its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return bool(value)
        time.sleep(0.05)


def durable_root(cfg: CheckpointConfig) -> str:
    assert cfg.durable_base_path is not None and cfg.durable_base_path.startswith("file://")
    return cfg.durable_base_path[len("file://") :]


def list_tree(path: str) -> list[tuple[str, int]]:
    """``(relative path, size)`` of every file under ``path``."""
    out = []
    for dirpath, _, files in os.walk(path):
        for f in files:
            full = os.path.join(dirpath, f)
            out.append((os.path.relpath(full, path), os.path.getsize(full)))
    return sorted(out)


def tree_size(path: str) -> int:
    """Bytes of the files under ``path``, each file (inode) counted once.

    Safe to sample while a save runs: a file renamed from one directory to another during
    the walk can be seen in both, and is still counted once.
    """
    sizes: dict[tuple[int, int], int] = {}
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                st = os.stat(os.path.join(dirpath, f))
            except FileNotFoundError:  # renamed or removed since the listing
                continue
            sizes[(st.st_dev, st.st_ino)] = st.st_size
    return sum(sizes.values())


# --------------------------------------------------------------------------- models


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(16, 30), torch.nn.ReLU(), torch.nn.Linear(30, 6), torch.nn.Tanh()
    )


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, 16, generator=g)
        model(x).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()


def _ddp_model_and_optim(seed: int, train_steps: int) -> tuple[Any, Any]:
    model = torch.nn.parallel.DistributedDataParallel(_model(seed))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    _train(model, opt, train_steps, seed + dist.get_rank())
    return model, opt


def _fsdp_model_and_optim(seed: int, train_steps: int) -> tuple[Any, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    model = _model(seed)
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    _train(model, opt, train_steps, seed + dist.get_rank())
    return model, opt


def _model_state(model: Any, opt: Any, seed: int) -> dict[str, Any]:
    msd, osd = get_state_dict(model, opt)
    return {"model": msd, "optim": osd, "extra": extra_values(seed)}


def _apply(model: Any, opt: Any, sd: dict[str, Any]) -> None:
    set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])


# --------------------------------------------------------------------------- round trips


def w_model_round_trip(rank: int, world_size: int, cfg: CheckpointConfig, kind: str) -> Any:
    """Save model + AdamW + extras at step 5 (sync ``dcp.save``), load into a fresh model.

    ``kind`` is "ddp" (replicated) or "fsdp2" (sharded DTensors). The fsdp2 variant takes
    its step from DCP's ``checkpoint_id``.
    """
    build = _ddp_model_and_optim if kind == "ddp" else _fsdp_model_and_optim
    handler = capture_logs(cfg)
    model, opt = build(seed=1, train_steps=2)
    sd = _model_state(model, opt, seed=5)
    saved = fingerprint(sd)
    if kind == "ddp":
        w = TieredStorageWriter(cfg, step=5, save_to_durable=True)
        dcp.save(sd, storage_writer=w)
    else:
        w = TieredStorageWriter(cfg, save_to_durable=True)
        dcp.save(sd, checkpoint_id="ckpt/step_5", storage_writer=w)
    writer_step = w.step
    w.durable_done.result(timeout=60)

    fresh_model, fresh_opt = build(seed=2, train_steps=1)
    target = _model_state(fresh_model, fresh_opt, seed=0)
    target["extra"] = blank_extra()
    differs_before = fingerprint(target) != saved
    info = load(cfg, target)
    _apply(fresh_model, fresh_opt, target)
    loaded = fingerprint(_model_state(fresh_model, fresh_opt, seed=0) | {"extra": target["extra"]})
    return {
        "writer_step": writer_step,
        "saved": saved,
        "loaded": loaded,
        "differs_before": differs_before,
        "load": info,
        "logs": handler.records,
        "kinds": sorted({type(v).__name__ for v in sd["model"].values()}),
    }


def w_async_round_trip(rank: int, world_size: int, cfg: CheckpointConfig, kind: str) -> Any:
    """``dcp.async_save`` (THREAD or PROCESS) of model + AdamW + extras, keep training, load."""
    from torch.distributed.checkpoint import _async_process_executor as ape

    model, opt = _ddp_model_and_optim(seed=3, train_steps=2)
    sd = _model_state(model, opt, seed=3)
    saved = fingerprint(sd)
    ctype = AsyncCheckpointerType.THREAD if kind == "thread" else AsyncCheckpointerType.PROCESS
    w = TieredStorageWriter(cfg, step=3)
    # As DCP advises: the background save gets its own gloo group, so its collectives never
    # interleave with the training loop's (DDP all-reduces below) on the default group.
    ckpt_group = dist.new_group(backend="gloo")
    res = dcp.async_save(
        sd, storage_writer=w, async_checkpointer_type=ctype, process_group=ckpt_group
    )
    if hasattr(res, "staging_completion"):
        res.staging_completion.result(timeout=60)
        upload = res.upload_completion
    else:
        upload = res
    # Training goes on once staging is done; the checkpoint must hold the staged values.
    _train(model, opt, 1, seed=123)
    upload.result(timeout=120)
    w.durable_done.result(timeout=60)
    checkpointer_stopped = None
    if kind == "process":
        proc = ape._CHECKPOINT_PROCESS
        assert proc is not None, "the PROCESS checkpointer did not start a subprocess"
        proc.__del__()  # sends TERMINATE and joins
        ape._CHECKPOINT_PROCESS = None
        checkpointer_stopped = not proc._save_process.is_alive()
    committed = committed_steps(cfg.memory_root or "", cfg.namespace)

    fresh_model, fresh_opt = _ddp_model_and_optim(seed=4, train_steps=1)
    target = _model_state(fresh_model, fresh_opt, seed=0)
    target["extra"] = blank_extra()
    info = load(cfg, target)
    _apply(fresh_model, fresh_opt, target)
    loaded = fingerprint(_model_state(fresh_model, fresh_opt, seed=0) | {"extra": target["extra"]})
    return {
        "saved": saved,
        "loaded": loaded,
        "load": info,
        "committed": committed,
        "checkpointer_stopped": checkpointer_stopped,
    }


# --------------------------------------------------------------------------- layout


def w_save_two_sharded_steps(rank: int, world_size: int, cfg: CheckpointConfig) -> Any:
    """Steps 1 and 2 (both durable) of a sharded state; their fingerprints."""
    out = {}
    for step in (1, 2):
        sd = sharded_state(seed=step, world_size=world_size)
        save(cfg, sd, step, durable=True)
        out[step] = fingerprint(sd)
    return out


def w_load_then_lose_all_commits(rank: int, world_size: int, cfg: CheckpointConfig) -> Any:
    """Load newest; then rank 0 removes every COMMIT left and a fresh load must fail."""
    sd = blank_sharded_state(world_size)
    info = load(cfg, sd)
    loaded = fingerprint(sd)
    dist.barrier()
    if rank == 0:
        for root in (cfg.memory_root or "", durable_root(cfg)):
            for step in step_dirs(root, cfg.namespace):
                path = os.path.join(root, cfg.namespace, f"step_{step}", "COMMIT")
                if os.path.exists(path):
                    os.remove(path)
    dist.barrier()
    return {"load": info, "loaded": loaded, "after": try_load(cfg, blank_sharded_state(world_size))}


# --------------------------------------------------------------------------- fallback


def w_save_plain(
    rank: int, world_size: int, cfg: CheckpointConfig, steps: list[int], durable: bool
) -> Any:
    """Save :func:`plain_state` (seed = step) for each step; their fingerprints."""
    out = {}
    for step in steps:
        sd = plain_state(seed=step)
        save(cfg, sd, step, durable=durable)
        out[step] = fingerprint(sd)
    return out


def w_load_plain_then_break_durable(
    rank: int, world_size: int, cfg: CheckpointConfig, durable_file: str, offset: int
) -> Any:
    """Load (memory copy corrupted by the test); then corrupt the durable copy too, reload."""
    handler = capture_logs(cfg)
    sd = blank_plain_state()
    info = load(cfg, sd)
    first = {"load": info, "loaded": fingerprint(sd), "logs": list(handler.records)}
    dist.barrier()
    if rank == 0:
        flip_byte(durable_file, offset)
    dist.barrier()
    target = blank_plain_state()
    before = fingerprint(target)
    second = try_load(cfg, target)
    return {"first": first, "second": second, "target_unchanged_or_failed": before}


def flip_byte(path: str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def w_load_plain_then_save(
    rank: int, world_size: int, cfg: CheckpointConfig, next_step: int
) -> Any:
    """Load the newest plain step, then save ``next_step`` (memory only)."""
    sd = blank_plain_state()
    info = load(cfg, sd)
    loaded = fingerprint(sd)
    expected = fingerprint(plain_state(seed=info["step"])) if info["step"] is not None else None
    save(cfg, plain_state(seed=next_step), next_step)
    dist.barrier()
    return {
        "load": info,
        "loaded": loaded,
        "expected": expected,
        "memory_steps": step_dirs(cfg.memory_root or "", cfg.namespace),
    }


# --------------------------------------------------------------------------- agreement


def w_save_sharded_steps(
    rank: int, world_size: int, cfg: CheckpointConfig, plan: list[tuple[int, bool]]
) -> Any:
    """Save sharded steps ``[(step, durable), ...]`` (seed = step); their fingerprints."""
    out = {}
    for step, durable in plan:
        sd = sharded_state(seed=step, world_size=world_size)
        save(cfg, sd, step, durable=durable)
        out[step] = fingerprint(sd)
    return out


def w_load_sharded(rank: int, world_size: int, cfg: CheckpointConfig) -> Any:
    sd = blank_sharded_state(world_size)
    info = load(cfg, sd)
    expected = fingerprint(sharded_state(seed=info["step"], world_size=world_size))
    return {"load": info, "loaded": fingerprint(sd), "expected": expected}


def w_nodes_agree(rank: int, world_size: int, cfg: CheckpointConfig) -> Any:
    """One memory root per rank ("one node per rank"): step 1 durable, step 2 memory only.

    Step 2's commit lives in the coordinator's memory only, so only rank 0 could restore it
    alone; the ranks must agree on step 1.
    """
    cfg.memory_root = os.path.join(cfg.memory_root or "", f"node{rank}")
    save(cfg, sharded_state(seed=1, world_size=world_size), 1, durable=True)
    save(cfg, sharded_state(seed=2, world_size=world_size), 2, durable=False)
    dist.barrier()
    sd = blank_sharded_state(world_size)
    info = load(cfg, sd)
    return {
        "load": info,
        "loaded": fingerprint(sd),
        "step1": fingerprint(sharded_state(seed=1, world_size=world_size)),
        "own_memory_commits": committed_steps(cfg.memory_root, cfg.namespace),
    }


# --------------------------------------------------------------------------- crash


class KillAfterDataWriter(TieredStorageWriter):
    """Fault injection: the real writer, killed with SIGKILL once its data is written."""

    def write_data(self, plan: Any, planner: Any) -> Any:
        fut = super().write_data(plan, planner)
        fut.wait()
        os.kill(os.getpid(), signal.SIGKILL)
        return fut


def w_save_then_die_mid_save(rank: int, world_size: int, cfg: CheckpointConfig) -> Any:
    save(cfg, plain_state(seed=1), 1, durable=True)
    dist.barrier()
    w = KillAfterDataWriter(cfg, step=2, save_to_durable=True)
    dcp.save(plain_state(seed=2), storage_writer=w)
    return "survived"  # never reached: every rank is killed inside dcp.save


def w_resave_same_step(rank: int, world_size: int, cfg: CheckpointConfig) -> Any:
    """Save step 1 twice with different values; load; the commit records before and after."""
    mem, dur = cfg.memory_root or "", durable_root(cfg)
    commit_path = os.path.join("{root}", cfg.namespace, "step_1", "COMMIT")
    save(cfg, plain_state(seed=10), 1, durable=True)
    dist.barrier()
    first = {r: _read_json(commit_path.format(root=r)) for r in (mem, dur)}
    dist.barrier()
    save(cfg, plain_state(seed=20), 1, durable=True)
    dist.barrier()
    second = {r: _read_json(commit_path.format(root=r)) for r in (mem, dur)}
    sd = blank_plain_state()
    info = load(cfg, sd)
    return {
        "load": info,
        "loaded": fingerprint(sd),
        "expected": fingerprint(plain_state(seed=20)),
        "first_values": fingerprint(plain_state(seed=10)),
        "first": first,
        "second": second,
        "files": {r: step_dirs(r, cfg.namespace).get(1, []) for r in (mem, dur)},
    }


def _read_json(path: str) -> Any:
    with open(path, "rb") as f:
        return json.loads(f.read())


# --------------------------------------------------------------------------- retention


def w_keep_last(rank: int, world_size: int, cfg: CheckpointConfig) -> Any:
    """Default keep-last (3) over steps 1..5, and memory_keep_last=2 over steps 1..4."""
    for step in range(1, 6):
        save(cfg, plain_state(seed=step), step)
    dist.barrier()
    mem = cfg.memory_root or ""
    wait_for(lambda: sorted(step_dirs(mem, cfg.namespace)) == [3, 4, 5], timeout=5)
    default = step_dirs(mem, cfg.namespace)
    sd = blank_plain_state()
    info = load(cfg, sd)
    two = CheckpointConfig(
        namespace="keep-two",
        world_size=world_size,
        memory_root=mem,
        durable_base_path=cfg.durable_base_path,
        memory_keep_last=2,
    )
    for step in range(1, 5):
        save(two, plain_state(seed=step), step)
    dist.barrier()
    wait_for(lambda: sorted(step_dirs(mem, "keep-two")) == [3, 4], timeout=5)
    return {
        "default": default,
        "load": info,
        "loaded": fingerprint(sd),
        "expected": fingerprint(plain_state(seed=5)),
        "keep_two": step_dirs(mem, "keep-two"),
    }


def w_budget_evicts_oldest(rank: int, world_size: int, cfg: CheckpointConfig) -> Any:
    """Measure one step's size, then save 4 steps under a budget of ~2.25 steps."""
    base = cfg.memory_root or ""
    probe = CheckpointConfig(
        namespace="probe",
        world_size=world_size,
        memory_root=os.path.join(base, "probe"),
        durable_base_path=cfg.durable_base_path,
    )
    save(probe, plain_state(seed=1, scale=16), 1)
    dist.barrier()
    one_step = tree_size(os.path.join(base, "probe", "probe", "step_1"))
    budget = 2 * one_step + one_step // 4
    bounded = CheckpointConfig(
        namespace="bounded",
        world_size=world_size,
        memory_root=os.path.join(base, "bounded"),
        durable_base_path=cfg.durable_base_path,
        memory_budget=budget,
    )
    history = []
    for step in range(1, 5):
        save(bounded, plain_state(seed=step, scale=16), step)
        dist.barrier()
        history.append(
            {
                "saved": step,
                "usage": tree_size(bounded.memory_root or ""),
                "committed": committed_steps(bounded.memory_root or "", "bounded"),
            }
        )
        dist.barrier()
    sd = blank_plain_state(scale=16)
    info = load(bounded, sd)
    return {
        "one_step": one_step,
        "budget": budget,
        "history": history,
        "steps": step_dirs(bounded.memory_root or "", "bounded"),
        "load": info,
        "loaded": fingerprint(sd),
        "expected": fingerprint(plain_state(seed=4, scale=16)),
    }


def w_save_too_big(rank: int, world_size: int, cfg: CheckpointConfig, big_scale: int) -> Any:
    """A small step 1 fits; a step 2 larger than the room fails typed; step 1 stays loadable.

    Works for both a too-small ``memory_budget`` and a too-small tmpfs (``memory_root``).
    """
    save(cfg, plain_state(seed=1), 1)
    dist.barrier()
    error = try_save(cfg, plain_state(seed=2, scale=big_scale), 2)
    dist.barrier()
    steps_after = step_dirs(cfg.memory_root or "", cfg.namespace)
    sd = blank_plain_state()
    info = try_load(cfg, sd)
    later = try_save(cfg, plain_state(seed=3), 3)
    dist.barrier()
    return {
        "error": error,
        "steps_after_failure": steps_after,
        "load": info,
        "loaded": fingerprint(sd),
        "expected": fingerprint(plain_state(seed=1)),
        "later_small_save_error": later,
        "steps_at_end": step_dirs(cfg.memory_root or "", cfg.namespace),
        "files_at_end": list_tree(cfg.memory_root or ""),
    }


# --------------------------------------------------------------------------- resharding


def w_reshard_save_sharded(rank: int, world_size: int, cfg: CheckpointConfig) -> Any:
    """Save sharded step 1 (durable); the full-tensor fingerprint."""
    sd = sharded_state(seed=1, world_size=world_size)
    save(cfg, sd, 1, durable=True)
    return full_fingerprint(sd)


def w_reshard_load_plain_then_save(
    rank: int, world_size: int, cfg: CheckpointConfig, other: CheckpointConfig
) -> Any:
    """Load the sharded checkpoint into plain tensors; then save plain tensors in ``other``."""
    sd = blank_unsharded_state()
    info = load(cfg, sd)
    loaded = fingerprint(sd)
    save(other, unsharded_state(seed=2), 1, durable=True)
    return {"load": info, "loaded": loaded}


def w_reshard_load_sharded(rank: int, world_size: int, cfg: CheckpointConfig) -> Any:
    """Load a plain (1-rank) checkpoint into sharded DTensors over ``world_size`` ranks."""
    sd = blank_sharded_state(world_size)
    info = load(cfg, sd)
    return {
        "load": info,
        "loaded_full": full_fingerprint(sd),
        "expected": fingerprint(unsharded_state(seed=2)),
        "local_shapes": {
            k: tuple(v.to_local().shape) for k, v in sd.items() if isinstance(v, DTensor)
        },
    }


def w_staged_dtensors_match_from_local(rank: int, world_size: int) -> Any:
    """``dtensor_over`` (staging's DTensor constructor) against ``DTensor.from_local``.

    Uneven shards, a replicated DTensor, a bf16 one and a local tensor of another dtype
    (which takes the public route). Returns, per key, whether the two agree on the spec
    (mesh, placements, global shape, stride, dtype), the local bytes and the grad flag.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate

    from tierckpt.dcp._stage import dtensor_over

    mesh = init_device_mesh("cpu", (world_size,))
    g = torch.Generator().manual_seed(5)
    sources = {
        "uneven": distribute_tensor(torch.randn(5, 3, generator=g), mesh, [Shard(0)]),
        "dim1_bf16": distribute_tensor(
            torch.randn(4, 6, generator=g).to(torch.bfloat16), mesh, [Shard(1)]
        ),
        "replicated": distribute_tensor(torch.randn(3, generator=g), mesh, [Replicate()]),
    }
    out: dict[str, Any] = {}
    for key, src in sources.items():
        for cast in (None, torch.float64):
            local = src._local_tensor.clone() if cast is None else src._local_tensor.to(cast)
            got = dtensor_over(src, local)
            want = DTensor.from_local(
                local,
                src.device_mesh,
                src.placements,
                run_check=False,
                shape=src.shape,
                stride=src.stride(),
            )
            out[f"{key}/{cast}"] = {
                "type": type(got).__name__,
                "spec": got._spec == want._spec,
                "dtype": got.dtype == local.dtype,
                "local": got._local_tensor.data_ptr() == local.data_ptr(),
                "grad": got.requires_grad is want.requires_grad is False,
                "full": torch.equal(got.full_tensor(), want.full_tensor()),
            }
    return out
