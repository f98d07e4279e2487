"""Checksums, per-rank manifests and the commit record (the JSON files of a step)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import xxhash

from .errors import IntegrityError
from .tiers.base import Buffer

__all__ = [
    "FORMAT_VERSION",
    "BlobInfo",
    "CommitRecord",
    "RankEntry",
    "RankManifest",
    "checksum",
    "rank_manifest",
]

FORMAT_VERSION = 2
"""Version 2 added generations and the checksums of the metadata and every manifest."""


def checksum(data: Buffer) -> str:
    """xxh3-128 of ``data`` as 32 hex digits."""
    return xxhash.xxh3_128_hexdigest(data)


@dataclass(frozen=True)
class BlobInfo:
    """Where one DCP item's bytes live: DCP keeps this in ``Metadata.storage_data``."""

    relative_path: str
    offset: int
    length: int
    checksum: str
    dtype: str | None = None  # "float32" for raw tensor blobs, None for bytes items
    shape: tuple[int, ...] | None = None
    file_size: int = -1  # size of the whole data file, so the commit can list it


@dataclass
class RankManifest:
    """What one rank wrote for one save attempt."""

    rank: int
    attempt: str
    step: int
    durable: bool
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    """file name -> {"size": int, "blobs": [[offset, length, checksum], ...]}"""
    format: int = FORMAT_VERSION

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: Buffer, *, where: str) -> RankManifest:
        obj = _load_json(data, where)
        try:
            return cls(**obj)
        except TypeError as e:
            raise IntegrityError(f"{where} is not a tierckpt rank manifest ({e}).") from e


def rank_manifest(
    rank: int,
    attempt: str,
    step: int,
    durable: bool,
    data_file: str | None,
    size: int,
    blobs: Iterable[tuple[int, int, str]],
) -> RankManifest:
    """The manifest of one rank's part, the same whoever builds it.

    The rank writes it; the coordinator rebuilds it from the ranks' write results to record
    its checksum in the commit. Blobs are ``(offset, length, checksum)``, kept sorted, and a
    rank that wrote no items (``data_file`` None) has no files.
    """
    manifest = RankManifest(rank=rank, attempt=attempt, step=step, durable=durable)
    if data_file is not None:
        ordered = sorted((int(o), int(n), str(c)) for o, n, c in blobs)
        manifest.files[data_file] = {"size": size, "blobs": [list(b) for b in ordered]}
    return manifest


@dataclass
class RankEntry:
    """One rank's part of a committed step."""

    rank: int
    attempt: str
    manifest: str
    files: dict[str, int]
    """data file name -> size in bytes"""
    manifest_checksum: str = ""
    """xxh3-128 of the rank manifest's bytes."""


@dataclass
class CommitRecord:
    """The commit marker of a step: the one file that makes it visible, written last."""

    namespace: str
    step: int
    attempt: str
    world_size: int
    metadata: str
    ranks: list[RankEntry]
    durable: bool
    generation: int = 0
    """Monotonic per namespace: a later save has a higher generation ("newest" = newest save)."""
    metadata_checksum: str = ""
    """xxh3-128 of the DCP metadata bytes; nothing is unpickled before it matches."""
    created: float = field(default_factory=time.time)
    format: int = FORMAT_VERSION
    nodes: list[str] = field(default_factory=list)
    """Node id of each rank when the step was saved (empty: unknown, one node)."""
    peer_replicas: int = 0
    """Replicas of each node's part the save makes in other nodes' memory tiers."""
    addresses: list[list[Any] | None] = field(default_factory=list)
    """Each rank's peer service (host, port) at save time: where its replicas are sent."""

    def files(self) -> dict[str, int]:
        """Every file the step needs (data files and manifests; sizes of data files, -1 else)."""
        out: dict[str, int] = {self.metadata: -1}
        for r in self.ranks:
            out[r.manifest] = -1
            out.update(r.files)
        return out

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: Buffer, *, where: str) -> CommitRecord:
        obj = _load_json(data, where)
        if obj.get("format") != FORMAT_VERSION:
            raise IntegrityError(
                f"{where} has commit format {obj.get('format')!r}; this tierckpt reads "
                f"format {FORMAT_VERSION}. Use a matching tierckpt version or a fresh namespace."
            )
        try:
            obj["ranks"] = [RankEntry(**r) for r in obj["ranks"]]
            return cls(**obj)
        except (TypeError, KeyError) as e:
            raise IntegrityError(f"{where} is not a tierckpt commit record ({e}).") from e


def _load_json(data: Buffer, where: str) -> dict[str, Any]:
    try:
        obj = json.loads(bytes(data))
    except (ValueError, UnicodeDecodeError) as e:
        raise IntegrityError(
            f"{where} is corrupt or not a tierckpt file (not JSON): remove it or use another "
            "namespace."
        ) from e
    if not isinstance(obj, dict):
        raise IntegrityError(f"{where} is not a tierckpt file (JSON but not an object).")
    return obj
