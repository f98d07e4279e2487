"""Processes of the multi-node tests (issue 8): ranks grouped into simulated nodes.

A simulated node is its own memory root and node id, with torchrun's GROUP_RANK,
LOCAL_RANK and LOCAL_WORLD_SIZE set as torchrun would; ``as_node`` sets them before the
rank builds its config.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp

import distworkers as w
from tierckpt import CheckpointConfig, TieredStorageReader, TieredStorageWriter


@dataclasses.dataclass(frozen=True)
class Nodes:
    """How the job is laid out: ``roots[n]`` is node ``n``'s memory root."""

    roots: list[str]
    per_node: int
    config: dict[str, Any]

    def node_of(self, rank: int) -> int:
        return rank // self.per_node


def as_node(rank: int, nodes: Nodes, **overrides: Any) -> CheckpointConfig:
    """Become rank ``rank`` of its simulated node; the config built from its environment."""
    node = nodes.node_of(rank)
    os.environ.update(
        {
            "TIERCKPT_MEMORY_ROOT": nodes.roots[node],
            "TIERCKPT_NODE_ID": f"node{node}",
            "GROUP_RANK": str(node),
            "LOCAL_RANK": str(rank % nodes.per_node),
            "LOCAL_WORLD_SIZE": str(nodes.per_node),
        }
    )
    return CheckpointConfig(**{**nodes.config, **overrides})


def _commit_everywhere(cfg: CheckpointConfig, nodes: Nodes, step: int) -> list[bool]:
    return [
        os.path.exists(os.path.join(root, cfg.namespace, f"step_{step}", "COMMIT"))
        for root in nodes.roots
        if os.path.isdir(root)
    ]


def w_save_steps(
    rank: int, world_size: int, nodes: Nodes, steps: list[int], asynchronous: bool = False
) -> dict[str, Any]:
    """Save sharded state at each step; report, after each save returns, whether every
    node holds its commit, and whether this rank's part was replicated."""
    cfg = as_node(rank, nodes)
    out: dict[str, Any] = {"commit_everywhere": {}, "peer_done": {}, "node": cfg.node_id}
    for step in steps:
        writer = TieredStorageWriter(cfg, step=step)
        sd = w.sharded_state(step, world_size)
        if asynchronous:
            dcp.async_save(sd, storage_writer=writer).result(timeout=60)
        else:
            dcp.save(sd, storage_writer=writer)
        out["commit_everywhere"][step] = _commit_everywhere(cfg, nodes, step)
        writer.peer_done.result(timeout=60)
        out["peer_done"][step] = True
    dist.barrier()
    return out


def w_load(rank: int, world_size: int, nodes: Nodes, expect_step: int) -> dict[str, Any]:
    """Load the newest save into sharded state; report step, bytes per tier, exactness."""
    cfg = as_node(rank, nodes)
    sd = w.blank_sharded_state(world_size)
    reader = TieredStorageReader(cfg)
    dcp.load(sd, storage_reader=reader)
    same = w.full_fingerprint(sd) == w.full_fingerprint(w.sharded_state(expect_step, world_size))
    dist.barrier()
    return {"step": reader.step, "bytes": dict(reader.bytes_read_by_tier), "bit_exact": same}


def w_save_then_node_dies_mid_replication(
    rank: int, world_size: int, nodes: Nodes, dying_node: int
) -> None:
    """Step 1 saves and replicates everywhere; during step 2's replication every rank of
    ``dying_node`` is killed once its data file reached the peer (before the manifest)."""
    cfg = as_node(rank, nodes, memory_keep_last=1)
    writer = TieredStorageWriter(cfg, step=1)
    dcp.save(w.sharded_state(1, world_size), storage_writer=writer)
    writer.peer_done.result(timeout=60)
    dist.barrier()
    if nodes.node_of(rank) == dying_node:
        os.environ["TIERCKPT_CRASH_AT"] = "peer.after_data"
    writer = TieredStorageWriter(cfg, step=2)
    dcp.save(w.sharded_state(2, world_size), storage_writer=writer)
    if nodes.node_of(rank) == dying_node:
        time.sleep(30)  # killed by the crash point once its data reached the peer
        return
    # Stay up (serving the dying node's replicas) until both dying ranks' data arrived here.
    step_dir = os.path.join(nodes.roots[rank // nodes.per_node], cfg.namespace, "step_2")
    dying = [r for r in range(world_size) if nodes.node_of(r) == dying_node]

    def arrived() -> bool:
        names = os.listdir(step_dir) if os.path.isdir(step_dir) else []
        return all(any(n.endswith(f"-r{r}.data") for n in names) for r in dying)

    w.wait_for(arrived, timeout=30)
    time.sleep(2)  # the senders are killed right after their data's ack


def lose_node(nodes: Nodes, node: int) -> None:
    """A lost node: its tmpfs is gone (its processes are already dead)."""
    shutil.rmtree(nodes.roots[node], ignore_errors=True)


def w_drain_step(rank: int, world_size: int, nodes: Nodes, step: int) -> None:
    """Save ``step`` to memory (replicated) and to the durable tier; wait for both."""
    cfg = as_node(rank, nodes)
    writer = TieredStorageWriter(cfg, step=step, save_to_durable=True)
    dcp.save(w.sharded_state(step, world_size), storage_writer=writer)
    writer.peer_done.result(timeout=60)
    writer.durable_done.result(timeout=60)
    dist.barrier()


def w_peer_unreachable(rank: int, world_size: int, nodes: Nodes) -> dict[str, Any]:
    """Node 1's service goes away (its advertised address is dead) for step 2, and comes
    back for step 3; every save succeeds, step 2's replication fails typed."""
    from tierckpt.peer import node as peer_nodes

    cfg = as_node(rank, nodes, peer_timeout_s=2.0)
    out: dict[str, Any] = {}
    for step in (1, 2, 3):
        if step == 2 and rank == 1:
            peer_nodes._NODES[cfg.memory_root or ""].service.close()
        if step == 3 and rank == 1:
            del peer_nodes._NODES[cfg.memory_root or ""]
        dist.barrier()
        writer = TieredStorageWriter(cfg, step=step)
        dcp.save(w.sharded_state(step, world_size), storage_writer=writer)
        error = writer.peer_done.exception(timeout=60)
        out[f"save{step}"] = type(error).__name__ if error else None
        out[f"save{step}_message"] = str(error) if error else ""
        dist.barrier()
    sd = w.blank_sharded_state(world_size)
    reader = TieredStorageReader(cfg)
    dcp.load(sd, storage_reader=reader)
    out["loaded"] = reader.step
    out["bit_exact"] = w.full_fingerprint(sd) == w.full_fingerprint(w.sharded_state(3, world_size))
    dist.barrier()
    return out


def w_one_node(rank: int, world_size: int, nodes: Nodes) -> dict[str, Any]:
    """A one-node job: saves and loads work and no peer service runs."""
    from tierckpt.peer import node as peer_nodes

    cfg = as_node(rank, nodes)
    writer = TieredStorageWriter(cfg, step=1)
    dcp.save(w.sharded_state(1, world_size), storage_writer=writer)
    done = writer.peer_done.done() and writer.peer_done.exception() is None
    dcp.load(w.blank_sharded_state(world_size), storage_reader=TieredStorageReader(cfg))
    return {"services": len(peer_nodes._NODES), "peer_done": done}
