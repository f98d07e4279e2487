"""Steps of one namespace in one tier: which are committed, what they hold, can they be read."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from . import layout
from ._faults import crash_point
from ._log import warn_once
from .errors import IntegrityError
from .manifest import CommitRecord, RankEntry, RankManifest, checksum
from .tiers.base import Buffer, KeyNotFoundError, Tier

__all__ = ["StepCatalog", "StepSource", "verified"]


@dataclass(frozen=True)
class StepSource:
    """A committed step as one tier records it."""

    tier: Tier
    record: CommitRecord


class StepCatalog:
    """Read-side view of ``<namespace>/step_<N>/`` directories in a tier."""

    def __init__(self, tier: Tier, namespace: str, log: logging.Logger) -> None:
        self.tier = tier
        self.namespace = namespace
        self.log = log

    def key(self, step: int, name: str) -> str:
        return layout.step_key(self.namespace, step, name)

    def steps(self) -> list[int]:
        """Every step directory present (committed or not), ascending."""
        found = (layout.parse_step_dir(d) for d in self.tier.list_dirs(self.namespace))
        return sorted(s for s in found if s is not None)

    def files(self, step: int) -> dict[str, int]:
        """Names and sizes of the files of one step."""
        return self.tier.list(layout.step_dir(self.namespace, step))

    def commit(self, step: int) -> CommitRecord | None:
        """The step's commit record; None when uncommitted, corrupt or foreign (logged once)."""
        record, problem = self.read_commit(step)
        if problem is not None:
            warn_once(
                self.log,
                ("ignored-commit", self.tier.url, self.namespace, str(step)),
                f"Ignoring step {step} in the {self.tier.name} tier: {problem}",
            )
        return record

    def read_commit(self, step: int) -> tuple[CommitRecord | None, str | None]:
        """``(record, None)``, ``(None, None)`` when there is no COMMIT, or ``(None, why)``
        when there is one this tierckpt cannot use (corrupt, newer format, foreign)."""
        where = f"{self.tier.url}/{self.key(step, layout.COMMIT_NAME)}"
        try:
            data = self.tier.read(self.key(step, layout.COMMIT_NAME))
        except KeyNotFoundError:
            return None, None
        try:
            record = CommitRecord.from_json(data, where=where)
        except IntegrityError as e:
            return None, str(e)
        if record.step != step or record.namespace != self.namespace:
            return None, (
                f"{where} records namespace {record.namespace!r} step {record.step} "
                "(a foreign or moved file)."
            )
        return record, None

    def committed(self) -> dict[int, CommitRecord]:
        """Committed steps and their records."""
        out: dict[int, CommitRecord] = {}
        for step in self.steps():
            record = self.commit(step)
            if record is not None:
                out[step] = record
        return out

    def write_commit(self, record: CommitRecord) -> None:
        """Write the commit record alone (its metadata is already in this tier)."""
        self.tier.write(self.key(record.step, layout.COMMIT_NAME), [record.to_json()])

    def commit_step(
        self, record: CommitRecord, metadata: bytes | str, *, after_metadata: str
    ) -> None:
        """The commit rule, in every tier: the DCP metadata, then the commit record, last.

        ``metadata`` is its bytes, or the path of a local file holding them. Every file the
        record needs is already in this tier (or in another tier the reader also sees);
        ``after_metadata`` names the crash point between the two writes.
        """
        key = self.key(record.step, record.metadata)
        if isinstance(metadata, str):
            self.tier.put_file(key, metadata)
        else:
            self.tier.write(key, [metadata])
        crash_point(after_metadata)
        self.write_commit(record)

    def missing_files(
        self, record: CommitRecord, listing: dict[str, int] | None = None
    ) -> list[str]:
        """Files the record needs that this tier lacks (or holds at the wrong size)."""
        have = self.files(record.step) if listing is None else listing
        return [
            name
            for name, size in record.files().items()
            if name not in have or (size >= 0 and have[name] != size)
        ]

    def read_metadata(self, record: CommitRecord) -> Buffer:
        """The step's DCP metadata bytes, verified against the commit (:func:`verified`)."""
        key = self.key(record.step, record.metadata)
        return verified(self.tier.read(key), record.metadata_checksum, f"{self.tier.url}/{key}")

    def read_manifest(self, record: CommitRecord, entry: RankEntry) -> RankManifest:
        """One rank's manifest, verified against the commit before it is parsed."""
        key = self.key(record.step, entry.manifest)
        where = f"{self.tier.url}/{key}"
        data = verified(self.tier.read(key), entry.manifest_checksum, where)
        manifest = RankManifest.from_json(data, where=where)
        if (manifest.rank, manifest.attempt, manifest.step) != (
            entry.rank,
            entry.attempt,
            record.step,
        ):
            raise IntegrityError(f"{where} belongs to another rank, attempt or step.")
        return manifest


def verified(data: Buffer, expected: str, where: str) -> Buffer:
    """``data`` if its xxh3-128 is ``expected`` (from a commit record); else IntegrityError.

    A commit that records no checksum (written before tierckpt recorded them) vouches for
    nothing: its files are not trusted, and so never parsed or unpickled.
    """
    if not expected:
        raise IntegrityError(
            f"{where}: its commit records no checksum for it, so it is not trusted (nothing is "
            "unpickled unverified). Re-save the step with this tierckpt or load another step."
        )
    if checksum(data) != expected:
        raise IntegrityError(
            f"{where} does not match the checksum its commit records: it was changed or damaged "
            "after the commit. It is not used; load the step from another tier or another step."
        )
    return data
