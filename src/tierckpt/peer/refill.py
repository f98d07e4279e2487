"""After a restore from peers: copy this rank's own part back into its node's memory tier.

A replacement node starts with an empty tmpfs; once it loaded its part from a peer, it
writes that part (data verified per blob, then the manifest, then the commit) into its own
memory tier, so that the next failure finds it local.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import secrets
import time

from .. import layout
from .._log import rate, step_message
from ..catalog import StepCatalog, verified
from ..config import CheckpointConfig
from ..errors import IntegrityError
from ..manifest import CommitRecord, RankEntry, RankManifest, checksum
from ..retention import make_room
from ..tiers.directory import in_made_dir
from ..tiers.memory import MemoryTier
from .tier import PeerTier
from .transport import PeerClient

__all__ = ["refill_parts"]


def refill_parts(
    config: CheckpointConfig,
    memory: MemoryTier,
    record: CommitRecord,
    rank: int,
    data_files: list[str],
    peers: list[PeerTier],
    log: logging.Logger,
) -> int:
    """Copy into ``memory`` every part of ``record`` whose data file (one of ``data_files``,
    those this rank read) it lacks and a peer holds: this rank's own part, and the parts
    of others it needed (as replicas). Returns how many; failures are logged, not raised."""
    count = 0
    wanted = set(data_files)
    for entry in record.ranks:
        if entry.rank == rank or wanted & set(entry.files):
            count += _refill_one(config, memory, record, entry, rank, peers, log)
    return count


def _refill_one(
    config: CheckpointConfig,
    memory: MemoryTier,
    record: CommitRecord,
    entry: RankEntry,
    rank: int,
    peers: list[PeerTier],
    log: logging.Logger,
) -> bool:
    ns, step = config.namespace, record.step
    have = memory.list(layout.step_dir(ns, step))
    needed = [entry.manifest, *entry.files]
    if all(n in have for n in needed):
        return False
    holder = next(
        (p for p in peers if all(p.holds(layout.step_key(ns, step, n)) for n in needed)), None
    )
    if holder is None:
        return False
    t0 = time.perf_counter()
    own = entry.rank == rank
    try:
        nbytes = _copy(config, memory, record, entry, holder, own)
    except Exception as e:
        log.warning(
            step_message(
                rank,
                step,
                f"Could not copy rank {entry.rank}'s part into the memory tier from {holder.url} "
                f"({type(e).__name__}: {e}); the next restore reads it from peers again.",
            )
        )
        return False
    log.info(
        step_message(
            rank,
            step,
            f"Copied rank {entry.rank}'s part from node {holder.node_id} into this node's memory tier "
            f"({rate(nbytes, time.perf_counter() - t0)})",
        )
    )
    return True


def _copy(
    config: CheckpointConfig,
    memory: MemoryTier,
    record: CommitRecord,
    entry: RankEntry,
    holder: PeerTier,
    own: bool,
) -> int:
    ns, step = config.namespace, record.step
    manifest_name, manifest_checksum = entry.manifest, entry.manifest_checksum
    catalog = StepCatalog(memory, ns, logging.getLogger("tierckpt"))
    memory.ensure_root(ns)
    raw = holder.read(layout.step_key(ns, step, manifest_name))
    where = f"{holder.url}/{manifest_name}"
    manifest = RankManifest.from_json(verified(raw, manifest_checksum, where), where=where)
    total = sum(int(info["size"]) for info in manifest.files.values())
    if config.memory_budget_bytes is not None:
        make_room(catalog, total, config.memory_budget_bytes, catalog.log)
    with holder.client() as client:
        for fname, info in manifest.files.items():
            _copy_file(memory, client, layout.step_key(ns, step, fname), info)
    memory.write(layout.step_key(ns, step, manifest_name), [bytes(raw)])
    if catalog.commit(step) is None:
        md_key = layout.step_key(ns, step, record.metadata)
        metadata = verified(holder.read(md_key), record.metadata_checksum, f"{holder.url}/{md_key}")
        catalog.commit_step(record, bytes(metadata), after_metadata="refill.after_metadata")
    if own:  # the peer still holds its replica
        name = layout.replicated_name(manifest.attempt, manifest.rank)
        body: dict[str, object] = {"nodes": [holder.node_id], "time": time.time()}
    else:  # held here as a replica of another node's part
        name = layout.replica_name(manifest.attempt, manifest.rank)
        source = record.nodes[entry.rank] if entry.rank < len(record.nodes) else holder.node_id
        body = {"rank": entry.rank, "attempt": entry.attempt, "step": step, "from_node": source}
    memory.write(layout.step_key(ns, step, name), [json.dumps(body).encode()])
    return total


def _copy_file(memory: MemoryTier, client: PeerClient, key: str, info: dict[str, object]) -> None:
    """One data file, received into a temporary, verified per blob, renamed into place."""
    size = int(info["size"])  # type: ignore[call-overload]
    target = memory.path(key)
    tmp = f"{target}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    fd = in_made_dir(tmp, lambda: os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
    try:
        os.ftruncate(fd, size)
        if size:
            with mmap.mmap(fd, size) as mm:
                view = memoryview(mm)
                try:
                    client.read_into(key, 0, view)
                    for offset, length, digest in info["blobs"]:  # type: ignore[attr-defined]
                        if checksum(view[offset : offset + length]) != digest:
                            raise IntegrityError(f"{key} [{offset}:+{length}] fails its checksum")
                finally:
                    view.release()
        os.rename(tmp, target)
    except BaseException:
        os.unlink(tmp)
        raise
    finally:
        os.close(fd)
