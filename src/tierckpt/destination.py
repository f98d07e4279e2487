"""Where a job drains, recorded in its memory tier so later tools use the job's own destination.

Writers record ``<namespace>/.durable.json`` in the memory tier: the durable URL and, for
``s3://``, the endpoint and region needed to reach it (never credentials). ``tierckpt resume``
/ ``ls`` / ``verify`` and :func:`tierckpt.resume_pending` read it, so a resume without
``--durable`` finishes the drain where the job meant it to go, not in ``./checkpoints``; a
durable location given explicitly that differs from the recorded one is a
:class:`~tierckpt.errors.ConfigError` naming both, never a silent redirect.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

from . import layout
from .config import CheckpointConfig, resolve_durable_url
from .errors import ConfigError, IntegrityError
from .tiers.base import KeyNotFoundError
from .tiers.memory import MemoryTier

__all__ = ["Destination", "job_config", "record_destination", "recorded_destination"]


@dataclass(frozen=True)
class Destination:
    """A durable location and the non-secret options needed to reach it."""

    url: str
    s3_endpoint_url: str | None = None
    s3_region: str | None = None

    def to_json(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), sort_keys=True).encode()


def _env(*names: str) -> str | None:
    return next((os.environ[n] for n in names if os.environ.get(n)), None)


def destination_of(config: CheckpointConfig) -> Destination:
    """Where ``config`` drains; for S3 the endpoint and region it actually uses (env included)."""
    url = config.durable_base_path or resolve_durable_url(None)
    if not url.startswith("s3://"):
        return Destination(url)
    return Destination(
        url,
        config.s3_endpoint_url or _env("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"),
        config.s3_region or _env("AWS_REGION", "AWS_DEFAULT_REGION"),
    )


def recorded_destination(memory: MemoryTier, namespace: str) -> Destination | None:
    """The destination the namespace's writers recorded here; None when there is none.

    Raises :class:`IntegrityError` for a record that is not one tierckpt writes.
    """
    key = layout.destination_key(namespace)
    try:
        raw = bytes(memory.read(key))
    except (KeyNotFoundError, FileNotFoundError):
        return None
    where = f"{memory.url}/{key}"
    try:
        data = json.loads(raw)
        url = data["url"]
        extra = {k: data.get(k) for k in ("s3_endpoint_url", "s3_region")}
        if not isinstance(url, str) or not all(
            v is None or isinstance(v, str) for v in extra.values()
        ):
            raise TypeError("wrong field types")
        return Destination(resolve_durable_url(url), **extra)
    except (ValueError, KeyError, TypeError) as e:
        raise IntegrityError(
            f"{where} does not hold a durable destination tierckpt wrote ({e}); remove it, or "
            "give the durable location explicitly (--durable / durable_base_path)."
        ) from e


def record_destination(memory: MemoryTier, config: CheckpointConfig) -> None:
    """Record where ``config`` drains (rewritten only when it changed)."""
    dest = destination_of(config)
    try:
        if recorded_destination(memory, config.namespace) == dest:
            return
    except IntegrityError:
        pass  # replaced by a valid record below
    memory.write(layout.destination_key(config.namespace), [dest.to_json()])


def job_config(
    config: CheckpointConfig, *, explicit: bool | None = None, refuse: bool = True
) -> CheckpointConfig:
    """``config`` reaching the job's recorded durable destination.

    ``explicit``: whether ``config.durable_base_path`` was given by the user (None: given
    unless it is the default ``./checkpoints``). An explicit location that differs from
    the recorded one raises :class:`ConfigError` naming both (with ``refuse=False`` the
    explicit one is kept: code that names a destination chose it). Without a record,
    ``config``.
    """
    current = config.durable_base_path or resolve_durable_url(None)
    if explicit is None:
        explicit = current != resolve_durable_url(None)
    memory = MemoryTier(config.memory_root or "")
    try:
        rec = recorded_destination(memory, config.namespace)
    except IntegrityError:
        if explicit:
            return config
        raise
    if rec is None:
        return config
    if rec.url != current and explicit:
        if not refuse:
            return config
        raise ConfigError(
            f"Namespace {config.namespace!r} drains to {rec.url} (recorded by its writers in "
            f"{memory.path(layout.destination_key(config.namespace))}), but the durable "
            f"location given is {current}. Omit --durable (durable_base_path) to use the "
            f"job's own destination, or give {rec.url}."
        )
    if not rec.url.startswith("s3://"):
        return (
            config if rec.url == current else dataclasses.replace(config, durable_base_path=rec.url)
        )
    return dataclasses.replace(
        config,
        durable_base_path=rec.url,
        s3_endpoint_url=config.s3_endpoint_url or rec.s3_endpoint_url,
        s3_region=config.s3_region or rec.s3_region,
    )
