"""Every path and key name tierckpt writes. No other module builds a name by hand.

A step lives under ``<namespace>/step_<N>/`` in every tier:

    <attempt>-r<rank>.data           data blobs of one rank (one save attempt)
    <attempt>-r<rank>.manifest.json  that rank's manifest: files, sizes, checksums
    <attempt>-r<rank>.drained        memory tier only: that rank's part is in the durable tier
    <attempt>-r<rank>.unpinned       memory tier only: that rank's failed drain was given up
    <attempt>-r<rank>.failed         durable tier only: that rank's upload failed (it retries)
    <attempt>-r<rank>.replica        memory tier only: this node holds a verified replica of that
                                     rank's part (another node's), written after its data and manifest
    <attempt>-r<rank>.replicated     memory tier only: that rank's part is replicated to other nodes
    <attempt>.metadata               DCP metadata (written by the coordinator)
    <attempt>.unloadable-r<rank>     memory tier only: that rank found no valid copy of a blob
    COMMIT                           the commit record, written last

Each namespace of the memory tier also holds ``<namespace>/.durable.json``: where the job
drains (URL, S3 endpoint and region; never credentials), for ``tierckpt resume`` / ``ls`` /
``verify`` and ``resume_pending`` (:mod:`tierckpt.destination`).

Only names :func:`is_ours` recognises are ever deleted by tierckpt.
"""

from __future__ import annotations

import re
import secrets

from .errors import InvalidStepError

__all__ = [
    "COMMIT_NAME",
    "DESTINATION_NAME",
    "attempt_of",
    "data_name",
    "destination_key",
    "drained_name",
    "failed_name",
    "is_ours",
    "is_unloadable_mark",
    "manifest_name",
    "metadata_name",
    "new_attempt_id",
    "no_step_error",
    "parse_manifest_name",
    "parse_replica_name",
    "parse_step",
    "parse_step_dir",
    "part_prefix",
    "replica_name",
    "replicated_name",
    "step_dir",
    "step_from_path",
    "step_key",
    "unpinned_name",
    "unloadable_name",
]

COMMIT_NAME = "COMMIT"
DESTINATION_NAME = ".durable.json"
"""Per namespace, memory tier: the job's durable destination (see :mod:`tierckpt.destination`)."""
_STEP_DIR = re.compile(r"^step_(\d+)$")
_STEP_IN_PATH = re.compile(r"(?:^|[/\\])step_(\d+)(?:$|[/\\])")
_ATTEMPT = re.compile(r"^[0-9a-f]{12}$")
_OURS = re.compile(
    r"^(?:COMMIT|[0-9a-f]{12}(?:-r\d+\.(?:data|manifest\.json|drained|unpinned|failed|replica|replicated)"
    r"|\.metadata|\.unloadable-r\d+))(?:\.tmp-\d+(?:-[0-9a-f]+)?)?$"
)


def new_attempt_id() -> str:
    """A fresh id for one save attempt; names of different attempts never collide."""
    return secrets.token_hex(6)


def step_dir(namespace: str, step: int) -> str:
    """The key prefix of one step, relative to a tier root."""
    return f"{namespace}/step_{step}"


def step_key(namespace: str, step: int, name: str) -> str:
    """The key of one file of a step."""
    return f"{step_dir(namespace, step)}/{name}"


def destination_key(namespace: str) -> str:
    """The key, in the memory tier, of the namespace's recorded durable destination."""
    return f"{namespace}/{DESTINATION_NAME}"


def data_name(attempt: str, rank: int) -> str:
    return f"{attempt}-r{rank}.data"


def manifest_name(attempt: str, rank: int) -> str:
    return f"{attempt}-r{rank}.manifest.json"


def drained_name(attempt: str, rank: int) -> str:
    return f"{attempt}-r{rank}.drained"


def part_prefix(attempt: str, rank: int) -> str:
    """What the names of one rank's files of one attempt begin with (data, manifest, markers)."""
    return f"{attempt}-r{rank}."


def unpinned_name(attempt: str, rank: int) -> str:
    """Memory tier: this part's failed drain was given up; retention may evict the step."""
    return f"{attempt}-r{rank}.unpinned"


def failed_name(attempt: str, rank: int) -> str:
    """Durable tier: this part's upload failed; the coordinator stops waiting for it."""
    return f"{attempt}-r{rank}.failed"


def replica_name(attempt: str, rank: int) -> str:
    """Memory tier, on a peer: a verified replica of this part is complete here (written last)."""
    return f"{attempt}-r{rank}.replica"


def replicated_name(attempt: str, rank: int) -> str:
    """Memory tier, on the part's own node: the part is replicated (to the nodes it names)."""
    return f"{attempt}-r{rank}.replicated"


_REPLICA = re.compile(r"^([0-9a-f]{12})-r(\d+)\.replica$")


def parse_replica_name(name: str) -> tuple[str, int] | None:
    """``(attempt, rank)`` of a :func:`replica_name` marker, or None for any other name."""
    m = _REPLICA.match(name)
    return (m.group(1), int(m.group(2))) if m else None


_MANIFEST = re.compile(r"^([0-9a-f]{12})-r(\d+)\.manifest\.json$")


def parse_manifest_name(name: str) -> tuple[str, int] | None:
    """``(attempt, rank)`` of a rank manifest's name, or None for any other name."""
    m = _MANIFEST.match(name)
    return (m.group(1), int(m.group(2))) if m else None


def metadata_name(attempt: str) -> str:
    return f"{attempt}.metadata"


def unloadable_name(attempt: str, rank: int) -> str:
    """Marker: ``rank`` found a blob of this attempt with no valid copy in any tier."""
    return f"{attempt}.unloadable-r{rank}"


def is_unloadable_mark(name: str, attempt: str) -> bool:
    """True for an :func:`unloadable_name` marker of ``attempt`` (any rank)."""
    return re.match(rf"^{re.escape(attempt)}\.unloadable-r\d+$", name) is not None


def is_ours(name: str) -> bool:
    """True for the name of a file tierckpt writes in a step directory (or its temporary)."""
    return _OURS.match(name) is not None


def attempt_of(name: str) -> str | None:
    """The attempt id a file name belongs to, or None for names of no attempt."""
    head = name.split("-", 1)[0].split(".", 1)[0]
    return head if _ATTEMPT.match(head) else None


def parse_step_dir(name: str) -> int | None:
    """The step of a ``step_<N>`` directory name, or None for anything else."""
    m = _STEP_DIR.match(name)
    return int(m.group(1)) if m else None


def parse_step(value: object) -> int:
    """Validate a step id given by a user: a non-negative int."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidStepError(
            f"Invalid step value {value!r}: pass step=<non-negative int>, "
            "or a path / checkpoint_id containing 'step_<N>' (e.g. 'step_100/checkpoint')."
        )
    if value < 0:
        raise InvalidStepError(f"Invalid step value {value}: steps must be >= 0.")
    return value


def no_step_error(path: object) -> InvalidStepError:
    """The seed's "Invalid step value" error for a save that names no step."""
    return InvalidStepError(
        f"Invalid step value: no step given (path={path!r}). Pass step=<int>, or a "
        "path / checkpoint_id containing 'step_<N>' (e.g. 'step_100/checkpoint')."
    )


def step_from_path(path: object) -> int | None:
    """The N of the first ``step_<N>`` path component, or None when there is none."""
    if path is None:
        return None
    m = _STEP_IN_PATH.search(str(path))
    return int(m.group(1)) if m else None
