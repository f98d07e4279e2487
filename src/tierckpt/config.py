"""User-facing configuration, validated at construction."""

from __future__ import annotations

import logging
import os
import re
import socket
from dataclasses import InitVar, dataclass, field
from urllib.parse import urlparse

from .constants import EXIT_WAIT_S
from .errors import ConfigError

__all__ = [
    "DEFAULT_MEMORY_ROOT",
    "CheckpointConfig",
    "parse_duration",
    "parse_memory_budget",
    "require_config",
    "resolve_durable_url",
]

DEFAULT_MEMORY_ROOT = f"/dev/shm/tierckpt-{os.geteuid()}"
"""Per user: another user cannot pre-create (and so own) this user's memory root."""
MEMORY_ROOT_ENV = "TIERCKPT_MEMORY_ROOT"
NODE_ID_ENV = "TIERCKPT_NODE_ID"
_NODE_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
DEFAULT_DURABLE_DIR = "checkpoints"
DURABLE_SCHEMES = ("file://", "s3://")
_NAMESPACE = re.compile(r"[A-Za-z0-9_-]+")  # fullmatch: "$" would accept a final "\n"
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def host_ram_bytes() -> int:
    """Total physical memory of this host."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def parse_memory_budget(value: int | str | None) -> int | None:
    """Bytes from an int, a size such as ``"8GiB"``, or a share of host RAM such as ``"40%"``."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ConfigError(f"memory_budget={value!r}: give bytes (int), '8GiB', or '40%'.")
    if isinstance(value, int):
        if value <= 0:
            raise ConfigError(f"memory_budget={value}: must be a positive number of bytes.")
        return value
    if isinstance(value, str):
        text = value.strip()
        if text.endswith("%"):
            try:
                pct = float(text[:-1])
            except ValueError:
                pct = -1.0
            if not 20 <= pct <= 100:
                raise ConfigError(
                    f"memory_budget={value!r}: a share of host RAM must be between 20% and 100%."
                )
            return int(host_ram_bytes() * pct / 100)
        m = _SIZE.match(text)
        if m:
            n = int(float(m.group(1)) * _UNITS[(m.group(2) or "B").lower()])
            if n > 0:
                return n
    raise ConfigError(
        f"memory_budget={value!r}: give bytes (int), a size like '8GiB' / '500MB', "
        "or a share of host RAM between '20%' and '100%'."
    )


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$", re.IGNORECASE)
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(value: float | str, what: str = "duration") -> float:
    """Seconds from a number or a string such as ``"90s"``, ``"30m"``, ``"2h"``, ``"7d"``."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        if value >= 0:
            return float(value)
    elif isinstance(value, str):
        m = _DURATION.match(value)
        if m:
            return float(m.group(1)) * _DURATION_UNITS[m.group(2).lower()]
    raise ConfigError(
        f"{what}={value!r}: give seconds >= 0 or a duration like '90s', '30m', '2h', '7d'."
    )


def resolve_durable_url(value: str | None) -> str:
    """Normalise the durable location to an absolute ``file://`` URL or an ``s3://`` URL."""
    if value is None or value == "":
        return "file://" + os.path.abspath(DEFAULT_DURABLE_DIR)
    if not isinstance(value, str):
        raise ConfigError(f"durable_base_path={value!r}: expected a string URL.")
    if value.startswith("file://"):
        path = value[len("file://") :]
        if not path:
            raise ConfigError(
                "durable_base_path='file://': give a directory, e.g. file:///mnt/ckpt"
            )
        return "file://" + os.path.abspath(os.path.expanduser(path))
    if value.startswith("s3://"):
        parsed = urlparse(value)
        if not parsed.netloc:
            raise ConfigError(
                f"Invalid S3 tier base path {value!r}: expected s3://<bucket>/<prefix>, "
                "e.g. s3://my-bucket/checkpoints."
            )
        return value.rstrip("/")
    if "://" not in value:
        # A bare path is a local directory.
        return "file://" + os.path.abspath(os.path.expanduser(value))
    raise ConfigError(
        f"durable_base_path={value!r}: unsupported scheme; accepted: {', '.join(DURABLE_SCHEMES)} "
        "(or a plain local directory path)."
    )


@dataclass
class CheckpointConfig:
    """Where and how a training job keeps its checkpoints.

    The seed library's names are accepted too: ``s3_tier_base_path`` for
    ``durable_base_path`` and ``save_to_s3`` for ``save_to_durable``.
    """

    namespace: str
    """Unique id of the training job: letters, digits, '-' and '_'."""
    world_size: int
    """Number of distributed processes."""
    durable_base_path: str | None = None
    """``file:///dir`` or ``s3://bucket/prefix``; default ``./checkpoints``."""
    memory_root: str | None = None
    """Node-local tmpfs directory; default ``$TIERCKPT_MEMORY_ROOT`` or ``/dev/shm/tierckpt-<uid>``.

    It must be this user's own directory, not a symlink, not writable by group or others
    (a missing one is created with mode 0700); anything else raises :class:`~tierckpt.errors.UnsafeMemoryRootError`."""
    save_to_durable: bool = False
    """Default for writers: also drain each saved step to the durable tier."""
    memory_budget: int | str | None = None
    """Bound on the memory tier of this node: bytes, ``'8GiB'``, or ``'40%'`` of host RAM.

    It counts every byte under ``memory_root``: all namespaces on this node, other jobs'
    leftovers included, since they share the same RAM. A save evicts only its own
    namespace's steps, and releases other namespaces only when their ``memory_ttl`` passed
    and no live process owns them; free the rest with ``tierckpt clear-memory``."""
    logger: logging.Logger | None = None
    """Logger for tierckpt's messages; default the ``tierckpt`` logger."""
    memory_keep_last: int = 3
    """Committed steps kept in the memory tier (the newest ones)."""
    log_file: str | None = None
    """Also append this namespace's log lines to this file."""
    durable_commit_timeout_s: float = 3600.0
    """How long a durable drain waits for every rank's part before it gives up."""
    s3_endpoint_url: str | None = None
    """S3-compatible endpoint (default: ``AWS_ENDPOINT_URL`` or AWS)."""
    s3_region: str | None = None
    """S3 region (default: the standard AWS chain)."""
    s3_part_size: int = 32 * 2**20
    """Multipart upload part size in bytes."""
    s3_max_concurrency: int = 8
    """Parallel requests per upload or download."""
    s3_max_retries: int = 8
    """Retries of a failed S3 request (throttling, 5xx, resets, timeouts)."""
    s3_timeout_s: float = 60.0
    """Timeout of one S3 request."""
    durable_stream: bool = False
    """Upload a rank's data to the durable tier part by part while it is still being staged,
    instead of after it is written. It makes the upload overlap the save's copies, so it pays
    where the node has cores to spare and the store is remote; off by default because on a
    host without spare cores the upload slows the copies that block training
    (benchmarks/s3/README.md, "Uploading while staging")."""
    memory_prefault: bool = True
    """Allocate a spare staging buffer in the background while the pool fills (the first saves)."""
    pause_gc: bool = True
    """Pause Python's cyclic garbage collector from the start of each save or load through
    this rank's last call into tierckpt (reference counting still frees memory). DCP's many
    small objects otherwise trigger full collections that stall one rank, and every rank with
    it, by 0.1 s or more in some saves and loads (benchmarks/README.md, "Garbage collection").
    A background ``async_save`` pauses it for the whole background save."""
    durable_keep_last: int | None = None
    """Durable steps kept (the newest); None keeps all."""
    durable_keep_every: int | None = None
    """Also keep every durable step that is a multiple of this."""
    durable_retry_initial_s: float = 2.0
    """Delay before a failed durable drain is retried; it doubles after each failed retry."""
    durable_retry_max_s: float = 300.0
    """Longest delay between two retries of a failed durable drain (retried while the
    process lives, and resumed by the next run)."""
    durable_max_pending_steps: int = 2
    """Durable steps whose drain failed that stay pinned in this node's memory tier; past it
    the oldest is unpinned (logged as an ERROR): memory retention may then evict it and it
    never reaches the durable tier. The newest save is never the one unpinned."""
    durable_exit_wait_s: float = EXIT_WAIT_S
    """At interpreter exit, how long to wait for durable drains still running; what is
    abandoned is logged and resumed by the next run (``resume_pending``)."""
    collective_timeout_s: float = 300.0
    """How long tierckpt's own collective steps (the ranks' agreement on the step to load, a
    save waiting for the previous one of this namespace) wait for every rank before raising
    :class:`~tierckpt.errors.CollectiveTimeoutError` naming the ranks that did not arrive."""
    s3_tier_base_path: InitVar[str | None] = None
    save_to_s3: InitVar[bool | None] = None
    memory_budget_bytes: int | None = field(init=False, default=None)
    durable_defaulted: bool = field(init=False, default=False)
    """True when no durable location was given (``./checkpoints`` was resolved instead)."""
    memory_ttl: float | str | None = None
    """Seconds (or ``'30m'``, ``'2h'``, ``'7d'``) after which this namespace's node memory is
    released once the job is finished: no live process owns it and nothing in it changed for
    that long. Stored with the namespace on the node, and applied by any later tierckpt writer
    or reader of the same memory root (and by a save that would exceed ``memory_budget``).
    None (the default) keeps it until ``tierckpt clear-memory``."""
    memory_ttl_s: float | None = field(init=False, default=None)
    node_id: str | None = None
    """This process's node: default ``$TIERCKPT_NODE_ID``, else torchrun's ``GROUP_RANK``,
    else the hostname. Ranks with the same node id share one memory tier."""
    local_world_size: int | None = None
    """Processes on this node: default torchrun's ``$LOCAL_WORLD_SIZE``, else ``world_size``
    (one node). A job spans several nodes when it is below ``world_size``."""
    peer_replicas: int | None = None
    """Copies of each node's part kept in the memory tier of other nodes: default 1 when the
    job spans more than one node, else 0; 0 turns the peer tier off."""
    peer_timeout_s: float = 30.0
    """Timeout of one peer transfer or call: a dead peer never hangs a save or a load."""
    peer_duty_cycle: float = 0.25
    """Largest share of time a rank spends replicating: after a replication of T seconds
    the next one starts no sooner than T * (1 / duty - 1) later, and saves made meanwhile
    coalesce into the newest. Bounds what replication takes from training's CPU."""
    peer_host: str | None = None
    """Address the peer service binds to: default ``$TIERCKPT_PEER_HOST``, else this host's
    address on the route to ``MASTER_ADDR`` (127.0.0.1 for a loopback master)."""

    def __post_init__(self, s3_tier_base_path: str | None, save_to_s3: bool | None) -> None:
        if s3_tier_base_path is not None:
            if self.durable_base_path is not None and self.durable_base_path != s3_tier_base_path:
                raise ConfigError(
                    "Give either durable_base_path or its alias s3_tier_base_path, not both."
                )
            if not str(s3_tier_base_path).startswith("s3://"):
                raise ConfigError(
                    f"Invalid S3 tier base path {s3_tier_base_path!r}: it must start with s3://, "
                    "e.g. s3://my-bucket/checkpoints."
                )
            self.durable_base_path = s3_tier_base_path
        if save_to_s3 is not None:
            self.save_to_durable = bool(save_to_s3)
        if not isinstance(self.namespace, str) or not self.namespace:
            raise ConfigError("Namespace cannot be empty: set namespace to a unique job id.")
        if not _NAMESPACE.fullmatch(self.namespace):
            raise ConfigError(
                f"Invalid namespace {self.namespace!r}: allowed characters are letters, digits, "
                "hyphens and underscores."
            )
        if isinstance(self.world_size, bool) or not isinstance(self.world_size, int):
            raise ConfigError(f"world_size={self.world_size!r}: must be a positive int.")
        if self.world_size <= 0:
            raise ConfigError(f"world_size={self.world_size}: must be > 0.")
        self.durable_defaulted = self.durable_base_path in (None, "")
        self.durable_base_path = resolve_durable_url(self.durable_base_path)
        root = self.memory_root or os.environ.get(MEMORY_ROOT_ENV) or DEFAULT_MEMORY_ROOT
        self.memory_root = os.path.abspath(os.path.expanduser(root))
        self.memory_budget_bytes = parse_memory_budget(self.memory_budget)
        if isinstance(self.memory_keep_last, bool) or not isinstance(self.memory_keep_last, int):
            raise ConfigError("memory_keep_last must be an int >= 1.")
        if self.memory_keep_last < 1:
            raise ConfigError(f"memory_keep_last={self.memory_keep_last}: must be >= 1.")
        for name in ("durable_keep_last", "durable_keep_every"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ConfigError(f"{name}={v!r}: must be None or an int >= 1.")
        if self.s3_part_size < 5 * 2**20:
            raise ConfigError(f"s3_part_size={self.s3_part_size}: S3 parts must be >= 5 MiB.")
        if self.s3_max_concurrency < 1 or self.s3_max_retries < 0 or self.s3_timeout_s <= 0:
            raise ConfigError(
                "s3_max_concurrency must be >= 1, s3_max_retries >= 0, s3_timeout_s > 0."
            )
        if self.durable_commit_timeout_s <= 0:
            raise ConfigError("durable_commit_timeout_s must be > 0.")
        for name in ("durable_retry_initial_s", "durable_retry_max_s", "durable_exit_wait_s"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not v >= 0:
                raise ConfigError(f"{name}={v!r}: must be a number of seconds >= 0.")
        if self.durable_retry_max_s < self.durable_retry_initial_s:
            raise ConfigError(
                f"durable_retry_max_s={self.durable_retry_max_s} is below "
                f"durable_retry_initial_s={self.durable_retry_initial_s}: raise the maximum."
            )
        v = self.durable_max_pending_steps
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"durable_max_pending_steps={v!r}: must be an int >= 1.")
        if self.memory_ttl is not None:
            self.memory_ttl_s = parse_duration(self.memory_ttl, "memory_ttl")
        v = self.collective_timeout_s
        if isinstance(v, bool) or not isinstance(v, int | float) or not v > 0:
            raise ConfigError(f"collective_timeout_s={v!r}: must be a number of seconds > 0.")
        self._resolve_nodes()

    def _resolve_nodes(self) -> None:
        """Node id, processes per node and peer replicas, from the fields or torchrun's env."""
        node = self.node_id
        if node is None:
            node = os.environ.get(NODE_ID_ENV) or os.environ.get("GROUP_RANK")
            node = node if node else socket.gethostname()
        if not isinstance(node, str) or not _NODE_ID.fullmatch(node):
            raise ConfigError(
                f"node_id={node!r}: give a name of letters, digits, '.', '-' and '_' "
                f"(set CheckpointConfig(node_id=...) or ${NODE_ID_ENV})."
            )
        self.node_id = node
        local = self.local_world_size
        if local is None:
            env = os.environ.get("LOCAL_WORLD_SIZE")
            try:
                local = int(env) if env else self.world_size
            except ValueError:
                raise ConfigError(
                    f"LOCAL_WORLD_SIZE={env!r} in the environment: must be an int."
                ) from None
        if isinstance(local, bool) or not isinstance(local, int) or local < 1:
            raise ConfigError(f"local_world_size={local!r}: must be an int >= 1.")
        self.local_world_size = min(local, self.world_size)
        v = self.peer_replicas
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            raise ConfigError(f"peer_replicas={v!r}: must be None (automatic) or an int >= 0.")
        d = self.peer_duty_cycle
        if isinstance(d, bool) or not isinstance(d, int | float) or not 0 < d <= 1:
            raise ConfigError(f"peer_duty_cycle={d!r}: must be a share of time in (0, 1].")
        t = self.peer_timeout_s
        if isinstance(t, bool) or not isinstance(t, int | float) or not t > 0:
            raise ConfigError(f"peer_timeout_s={t!r}: must be a number of seconds > 0.")
        if not isinstance(self.durable_stream, bool):
            raise ConfigError(f"durable_stream={self.durable_stream!r}: must be True or False.")

    @property
    def multi_node(self) -> bool:
        """Whether the job spans more than one node (``local_world_size < world_size``)."""
        return (self.local_world_size or self.world_size) < self.world_size

    @property
    def replicas(self) -> int:
        """Peer replicas asked for: ``peer_replicas``, or 1 for a multi-node job, else 0."""
        if self.peer_replicas is not None:
            return self.peer_replicas
        return 1 if self.multi_node else 0

    @property
    def log(self) -> logging.Logger:
        """The logger tierckpt writes to."""
        return self.logger or logging.getLogger("tierckpt")


def log_default_durable(config: CheckpointConfig) -> None:
    """Say once per process (per location) where the default durable tier is, when used."""
    if not config.durable_defaulted:
        return
    log, url = config.log, config.durable_base_path or ""
    from ._runtime import RUNTIME

    key = ("default-durable", url)
    with RUNTIME.logs.lock:
        if key in RUNTIME.logs.warned:
            return
        RUNTIME.logs.warned.add(key)
    log.info(
        "No durable_base_path given: the durable tier is %s (./%s of the working directory "
        "when the config was built).",
        url,
        DEFAULT_DURABLE_DIR,
    )


def require_config(config: object) -> CheckpointConfig:
    """``config`` if it is a :class:`CheckpointConfig`, else a :class:`ConfigError`."""
    if not isinstance(config, CheckpointConfig):
        raise ConfigError(
            f"config must be a tierckpt.CheckpointConfig, got {type(config).__name__}."
        )
    return config
