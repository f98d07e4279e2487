"""Multi-node jobs (issue 8): commits on every node, peer replicas, restores after node loss.

Nodes are simulated on this machine: each is its own memory root and node id, with
torchrun's GROUP_RANK / LOCAL_RANK / LOCAL_WORLD_SIZE (``workers_multinode.as_node``); a lost
node is one whose processes are dead and whose root is deleted. Ranks are real gloo
processes; peers talk over real loopback sockets with the per-job secret.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import workers_multinode as wm
from fixtures_dist import launch_ranks, run_ranks

NS = "mn"


@pytest.fixture
def roots_factory() -> Iterator[Callable[[int], list[str]]]:
    made: list[str] = []

    def make(n: int) -> list[str]:
        roots = [f"/dev/shm/tierckpt-test-{uuid.uuid4().hex}-node{i}" for i in range(n)]
        made.extend(roots)
        return roots

    try:
        yield make
    finally:
        for r in made:
            shutil.rmtree(r, ignore_errors=True)


def _nodes(roots: list[str], per_node: int, world_size: int, **config: Any) -> wm.Nodes:
    return wm.Nodes(roots, per_node, {"namespace": NS, "world_size": world_size, **config})


def _cli(argv: list[str]) -> tuple[int, str]:
    from tierckpt.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(argv)
    return code, buf.getvalue()


def _ls_json(root: str, durable: str) -> list[dict[str, Any]]:
    code, out = _cli(
        ["ls", "-n", NS, "--memory-root", root, "--durable", f"file://{durable}/durable", "--json"]
    )
    assert code == 0, out
    rows: list[dict[str, Any]] = json.loads(out)["steps"]
    return rows


def _flip(path: str) -> None:
    with open(path, "r+b") as f:
        byte = f.read(1)
        f.seek(0)
        f.write(bytes([byte[0] ^ 0xFF]))


def _names(root: str, step: int) -> list[str]:
    d = os.path.join(root, NS, f"step_{step}")
    return sorted(os.listdir(d)) if os.path.isdir(d) else []


def test_two_nodes_commit_everywhere_replicate_and_survive_the_loss_of_a_node(
    roots_factory: Callable[[int], list[str]], tmp_path: Any
) -> None:
    roots = roots_factory(2)
    nodes = _nodes(roots, 2, 4, durable_base_path=f"file://{tmp_path}/durable")
    saved = run_ranks(wm.w_save_steps, 4, nodes, [1, 2, 3], timeout=120)
    for res in saved:
        # Every node holds each commit when dcp.save returns, with no extra collective.
        assert all(all(v) and len(v) == 2 for v in res["commit_everywhere"].values()), res
        assert res["peer_done"] == {1: True, 2: True, 3: True}
    # Each node holds a verified, complete replica of the other node's parts.
    for node, other in ((0, (2, 3)), (1, (0, 1))):
        names = _names(roots[node], 3)
        assert sum(n.endswith(".replica") for n in names) == 2, names
        assert all(any(n.endswith(f"-r{r}.replica") for n in names) for r in other), names
        assert sum(n.endswith(".replicated") for n in names) == 2, names

    # `tierckpt ls` shows which parts each node holds; `verify` checks the replicas too.
    for node, own, other in ((0, [0, 1], [2, 3]), (1, [2, 3], [0, 1])):
        rows = _ls_json(roots[node], str(tmp_path))
        parts = next(r for r in rows if r["step"] == 3)["node_parts"]
        assert parts["own"] == own and sorted(map(int, parts["replicas"])) == other, parts
        assert all(v == [f"node{1 - node}"] for v in parts["replicated_to"].values()), parts
        code, out = _cli(["verify", "-n", NS, "--memory-root", roots[node], "--step", "3"])
        assert code == 0 and f"replicas r{other[0]},r{other[1]} from node{1 - node}" in out, out
    victim = next(n for n in _names(roots[0], 3) if n.endswith("-r2.data"))
    _flip(os.path.join(roots[0], NS, "step_3", victim))
    code, out = _cli(["verify", "-n", NS, "--memory-root", roots[0], "--step", "3"])
    assert code == 1 and "CHECKSUM MISMATCH" in out, out
    _flip(os.path.join(roots[0], NS, "step_3", victim))

    # An intact restart restores the newest save from local memory only.
    for res in run_ranks(wm.w_load, 4, nodes, 3):
        assert res["step"] == 3 and res["bit_exact"], res
        assert res["bytes"]["peer"] == 0 and res["bytes"]["durable"] == 0, res

    # (a) A replacement node: its tmpfs is empty; its part comes from the peer, bit-exact.
    wm.lose_node(nodes, 1)
    loaded = run_ranks(wm.w_load, 4, nodes, 3)
    for rank, res in enumerate(loaded):
        assert res["step"] == 3 and res["bit_exact"], (rank, res)
        assert res["bytes"]["durable"] == 0, (rank, res)
        if rank >= 2:
            assert res["bytes"]["peer"] > 0 and res["bytes"]["memory"] == 0, (rank, res)
    # ... and wrote what it fetched into its own memory tier: the next restore is local.
    assert "COMMIT" in _names(roots[1], 3)
    for res in run_ranks(wm.w_load, 4, nodes, 3):
        assert res["step"] == 3 and res["bit_exact"] and res["bytes"]["peer"] == 0, res

    # (b) No spare: 4 ranks on 2 nodes become 2 ranks on 1 node; DCP reshards from the
    # surviving node's own parts and replicas, nothing from durable.
    wm.lose_node(nodes, 1)
    one = _nodes(roots[:1], 2, 2)
    for res in run_ranks(wm.w_load, 2, one, 3):
        assert res["step"] == 3 and res["bit_exact"], res
        assert res["bytes"]["durable"] == 0 and res["bytes"]["peer"] == 0, res


def test_the_coordinators_node_lost_and_a_corrupt_replica_falls_back_to_durable(
    roots_factory: Callable[[int], list[str]], tmp_path: Any
) -> None:
    roots = roots_factory(2)
    nodes = _nodes(roots, 2, 4, durable_base_path=f"file://{tmp_path}/durable")
    run_ranks(wm.w_save_steps, 4, nodes, [1, 2], timeout=120)
    run_ranks(wm.w_drain_step, 4, nodes, 3)  # step 3 also drains to durable
    # Corrupt node 1's replica of rank 1's part (the coordinator's node is node 0).
    victim = next(n for n in _names(roots[1], 3) if n.endswith("-r1.data"))
    _flip(os.path.join(roots[1], NS, "step_3", victim))
    wm.lose_node(nodes, 0)
    loaded = run_ranks(wm.w_load, 4, nodes, 3)
    for rank, res in enumerate(loaded):
        assert res["step"] == 3 and res["bit_exact"], (rank, res)
    assert loaded[0]["bytes"]["peer"] > 0 and loaded[0]["bytes"]["durable"] == 0, loaded[0]
    # The corrupt replica is never loaded: rank 1's part came from durable instead.
    assert loaded[1]["bytes"]["durable"] > 0, loaded[1]


def test_a_node_killed_mid_replication_leaves_the_previous_fully_replicated_save(
    roots_factory: Callable[[int], list[str]],
) -> None:
    roots = roots_factory(2)
    nodes = _nodes(roots, 2, 4)
    outcomes = launch_ranks(wm.w_save_then_node_dies_mid_replication, 4, nodes, 1, timeout=90)
    assert [o.exitcode for o in outcomes[2:]] == [-signal.SIGKILL] * 2, outcomes
    assert [o.exitcode for o in outcomes[:2]] == [0, 0], outcomes
    # memory_keep_last=1, yet node 0 kept step 1: step 2 is not fully replicated.
    assert "COMMIT" in _names(roots[0], 1) and "COMMIT" in _names(roots[0], 2)
    wm.lose_node(nodes, 1)
    for rank, res in enumerate(run_ranks(wm.w_load, 4, nodes, 1)):
        assert res["step"] == 1 and res["bit_exact"], (rank, res)
        assert res["bytes"]["durable"] == 0, (rank, res)


def test_a_peer_unreachable_during_a_save_fails_peer_done_typed_and_the_next_save_replicates(
    roots_factory: Callable[[int], list[str]],
) -> None:
    roots = roots_factory(2)
    nodes = _nodes(roots, 1, 2)
    res = run_ranks(wm.w_peer_unreachable, 2, nodes)
    assert res[0]["save2"] == "ReplicationError", res
    assert "node1" in res[0]["save2_message"], res
    assert res[0]["save3"] is None and res[1]["save3"] is None, res
    assert res[0]["loaded"] == 3 and res[0]["bit_exact"], res


def test_three_nodes_place_one_replica_each_on_a_ring_and_restore_a_lost_one(
    roots_factory: Callable[[int], list[str]],
) -> None:
    roots = roots_factory(3)
    nodes = _nodes(roots, 1, 3)
    run_ranks(wm.w_save_steps, 3, nodes, [1, 2], timeout=120)
    for node in range(3):
        names = _names(roots[node], 2)
        source = (node - 1) % 3  # ring: node n holds node n-1's part
        assert [n for n in names if n.endswith(".replica")] == [
            n for n in names if n.endswith(f"-r{source}.replica")
        ], names
        assert sum(n.endswith(".replica") for n in names) == 1, names
    wm.lose_node(nodes, 1)
    for rank, res in enumerate(run_ranks(wm.w_load, 3, nodes, 2)):
        assert res["step"] == 2 and res["bit_exact"] and res["bytes"]["durable"] == 0, (rank, res)


def test_a_one_node_job_starts_no_peer_service(roots_factory: Callable[[int], list[str]]) -> None:
    roots = roots_factory(1)
    res = run_ranks(wm.w_one_node, 2, _nodes(roots, 2, 2))
    assert res == [{"services": 0, "peer_done": True}] * 2, res


@pytest.mark.parametrize(
    "bad",
    [{"node_id": "a/b"}, {"peer_replicas": -1}, {"peer_timeout_s": 0}, {"peer_duty_cycle": 0},
     {"peer_duty_cycle": 1.5}, {"local_world_size": 0}],
)  # fmt: skip
def test_peer_settings_are_validated_with_typed_errors(bad: dict[str, Any]) -> None:
    from tierckpt import CheckpointConfig, ConfigError

    with pytest.raises(ConfigError, match=next(iter(bad))):
        CheckpointConfig(namespace="x", world_size=4, **bad)


def test_node_identity_and_peer_defaults_come_from_torchruns_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tierckpt import CheckpointConfig

    monkeypatch.delenv("TIERCKPT_NODE_ID", raising=False)
    monkeypatch.setenv("GROUP_RANK", "3")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    cfg = CheckpointConfig(namespace="x", world_size=4)
    assert (cfg.node_id, cfg.local_world_size, cfg.multi_node, cfg.replicas) == ("3", 2, True, 1)
    monkeypatch.setenv("TIERCKPT_NODE_ID", "rack7-node2")
    assert CheckpointConfig(namespace="x", world_size=4, peer_replicas=0).replicas == 0
    assert CheckpointConfig(namespace="x", world_size=4).node_id == "rack7-node2"
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # one node: no peers by default
    assert CheckpointConfig(namespace="x", world_size=4).replicas == 0
