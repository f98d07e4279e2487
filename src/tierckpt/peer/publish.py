"""The coordinator's push of a memory commit to every other node of the job.

One call per node (to its lowest rank's service), all in parallel, each bounded by
``peer_timeout_s``: a node that does not answer is logged and gets the commit with the
next save's plan instead; the save itself never fails or hangs on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from .._log import logger_for, step_message
from ..config import CheckpointConfig
from .node import INSTALL_COMMIT, PeerNode, encode_commit

__all__ = ["push_commit"]

MAX_PARALLEL = 16


def push_commit(
    config: CheckpointConfig,
    node: PeerNode,
    nodes: Sequence[str],
    addresses: Sequence[tuple[str, int] | None],
    record_json: bytes,
    metadata: bytes,
    *,
    step: int,
) -> list[str]:
    """Install the commit on every node other than this one; returns the nodes that failed."""
    first: dict[str, tuple[str, int] | None] = {}
    for node_id, address in zip(nodes, addresses, strict=True):
        if node_id != config.node_id and first.get(node_id) is None:
            first[node_id] = address
    if not first:
        return []
    payload = encode_commit(config.namespace, record_json, metadata)

    def push(item: tuple[str, tuple[str, int] | None]) -> str | None:
        node_id, address = item
        if address is None:
            return f"{node_id}: runs no peer service"
        try:
            with node.client(address) as client:
                client.call(INSTALL_COMMIT, payload)
        except Exception as e:
            return f"{node_id} ({address[0]}:{address[1]}): {type(e).__name__}: {e}"
        return None

    with ThreadPoolExecutor(
        min(MAX_PARALLEL, len(first)), thread_name_prefix="tierckpt-commit"
    ) as pool:
        failures = [f for f in pool.map(push, first.items()) if f is not None]
    if failures:
        logger_for(config).warning(
            step_message(
                0,
                step,
                "The memory commit did not reach "
                + "; ".join(failures)
                + ". Those nodes get it with the next save; a restore before then finds the "
                "step through the other nodes.",
            )
        )
    return [f.split(":", 1)[0] for f in failures]
