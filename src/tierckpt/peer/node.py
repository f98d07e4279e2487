"""This process's peer endpoint: one authenticated service over its node's memory root.

Started on first use by a writer or reader of a multi-node job (never in a one-node job).
It serves committed files of the namespaces this process registered, receives replicas
(counted against the receiving node's ``memory_budget``) and installs the commits the
coordinator pushes, so every node holds the commit when ``dcp.save`` returns.
"""

from __future__ import annotations

import json
import struct
import threading

from .. import layout
from .._log import logger_for
from ..catalog import StepCatalog
from ..config import CheckpointConfig
from ..errors import PeerError
from ..priority import background_priority
from ..retention import make_room
from ..staging import StagingPool
from ..tiers.memory import MemoryTier
from .address import bind_host
from .secret import job_secret
from .transport import PeerClient, PeerService

__all__ = ["PeerNode", "decode_commit", "encode_commit", "peer_node"]

INSTALL_COMMIT = "install_commit"
_HEADER = struct.Struct("!II")


def encode_commit(namespace: str, record_json: bytes, metadata: bytes) -> bytes:
    """The payload of an ``install_commit`` call: namespace, commit record, DCP metadata."""
    ns = namespace.encode()
    return _HEADER.pack(len(ns), len(record_json)) + ns + record_json + metadata


def decode_commit(payload: bytes) -> tuple[str, bytes, bytes]:
    """The inverse of :func:`encode_commit` (a :class:`PeerError` for a malformed payload)."""
    if len(payload) < _HEADER.size:
        raise PeerError("install_commit: payload too short.")
    ns_len, rec_len = _HEADER.unpack_from(payload)
    body = payload[_HEADER.size :]
    if ns_len + rec_len > len(body):
        raise PeerError("install_commit: payload truncated.")
    ns = body[:ns_len].decode()
    return ns, body[ns_len : ns_len + rec_len], body[ns_len + rec_len :]


class PeerNode:
    """The service of this process over ``root`` and the namespaces it answers for."""

    def __init__(self, root: str, secret: bytes, host: str, timeout_s: float) -> None:
        self.root = root
        self.secret = secret
        self.timeout_s = timeout_s
        self.memory = MemoryTier(root)
        self.configs: dict[str, CheckpointConfig] = {}
        self._lock = threading.Lock()
        self.service = PeerService(
            root,
            secret,
            host,
            allow=self._allow,
            reserve=self._reserve,
            recycled=self._recycled,
            timeout_s=timeout_s,
        )
        self.service.register(INSTALL_COMMIT, self._install_commit)

    @property
    def address(self) -> tuple[str, int]:
        return self.service.address

    def register(self, config: CheckpointConfig) -> None:
        """Answer for ``config``'s namespace (its budget applies to replicas received)."""
        with self._lock:
            self.configs[config.namespace] = config

    def client(self, address: tuple[str, int]) -> PeerClient:
        return PeerClient(address, self.secret, timeout_s=self.timeout_s)

    # -- service hooks --

    def _split(self, key: str) -> tuple[CheckpointConfig, int | None, str] | None:
        parts = key.split("/")
        if not parts or parts[0] not in self.configs:
            return None
        config = self.configs[parts[0]]
        if len(parts) == 1:
            return config, None, ""
        step = layout.parse_step_dir(parts[1])
        if step is None or len(parts) > 3:
            return None
        return config, step, parts[2] if len(parts) == 3 else ""

    def _allow(self, key: str) -> bool:
        """Only files tierckpt writes in step directories of registered namespaces
        (and those directories, for listings); never temporaries, leases or pools."""
        found = self._split(key.rstrip("/"))
        if found is None:
            return False
        _, step, name = found
        if step is None:
            return name == ""
        return name == "" or (layout.is_ours(name) and ".tmp-" not in name)

    def _reserve(self, key: str, nbytes: int) -> None:
        """Room for a replica in this node's memory tier, within the namespace's budget."""
        found = self._split(key)
        if found is None:
            raise PeerError(f"Refusing {key!r}: not a step file of a namespace served here.")
        background_priority()  # receiving replicas uses the cores training leaves idle
        config = found[0]
        self.memory.check_trusted(config.namespace)
        budget = config.memory_budget_bytes
        if budget is not None:
            catalog = StepCatalog(self.memory, config.namespace, logger_for(config))
            make_room(catalog, nbytes, budget, catalog.log)

    def _recycled(self, key: str, nbytes: int, dest: str) -> bool:
        """Receive a replica's data file into a pooled (resident) buffer of this node when
        one fits: ``dest`` is the transfer's temporary. (Its room was reserved anyway, so a
        tight budget may evict a little early; never late.)"""
        found = self._split(key)
        if found is None or not found[2].endswith(".data"):
            return False
        return StagingPool(self.memory, found[0].namespace).claim_into(nbytes, dest)

    def _install_commit(self, payload: bytes) -> bytes:
        from ..saving import install_commit

        namespace, record_json, metadata = decode_commit(payload)
        config = self.configs.get(namespace)
        if config is None:
            raise PeerError(f"install_commit: namespace {namespace!r} is not served here.")
        self.memory.check_trusted(namespace)
        catalog = StepCatalog(self.memory, namespace, logger_for(config))
        installed = install_commit(catalog, record_json, metadata)
        return json.dumps({"installed": installed}).encode()


_NODES: dict[str, PeerNode] = {}
_NODES_LOCK = threading.Lock()


def peer_node(config: CheckpointConfig) -> PeerNode | None:
    """This process's peer endpoint for ``config``'s memory root, started on first use;
    None in a one-node job (no service is started there)."""
    if not config.multi_node:
        return None
    root = config.memory_root or ""
    with _NODES_LOCK:
        node = _NODES.get(root)
        if node is None:
            MemoryTier(root).ensure_root()  # a replacement node's tmpfs starts empty
            host = config.peer_host or bind_host()
            node = PeerNode(root, job_secret(), host, config.peer_timeout_s)
            _NODES[root] = node
            logger_for(config).debug(
                "Peer service of node %s listening on %s:%d", config.node_id, *node.address
            )
    node.register(config)
    return node
