"""Process-wide checkpoint metrics: a plain dict snapshot, or a Prometheus registry.

tierckpt records, per namespace: saves, loads, durable drains and replications (count,
seconds, bytes, failures), bytes per tier, and at collection time the drain backlog
(:func:`~tierckpt.pending_drains`) and the memory tier's usage against its budget for
every config handed to :func:`track` (a :class:`~tierckpt.CheckpointManager` tracks its
own). Saves are counted by the coordinator (rank 0); loads and drains by each rank.

    snap = tierckpt.metrics.snapshot()                 # no dependency
    reg = tierckpt.metrics.prometheus_registry()       # pip install "tierckpt[metrics]"
    prometheus_client.start_http_server(9400, registry=reg)
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import CheckpointConfig

__all__ = [
    "observe_drain",
    "observe_failure",
    "observe_load",
    "observe_replication",
    "observe_save",
    "prometheus_registry",
    "prometheus_text",
    "reset",
    "snapshot",
    "track",
]

OPS = ("save", "load", "drain", "replication")


@dataclass
class _Op:
    count: int = 0
    failures: int = 0
    seconds_sum: float = 0.0
    seconds_last: float = 0.0
    bytes_sum: int = 0


@dataclass
class _Namespace:
    ops: dict[str, _Op] = field(default_factory=lambda: {op: _Op() for op in OPS})
    bytes_written: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    bytes_read: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    last_load: dict[str, Any] = field(default_factory=dict)


_lock = threading.Lock()
_data: dict[str, _Namespace] = defaultdict(_Namespace)
_tracked: dict[str, CheckpointConfig] = {}


def _observe(namespace: str, op: str, seconds: float, nbytes: int, ok: bool) -> _Namespace:
    ns = _data[namespace]
    o = ns.ops[op]
    o.count += 1
    o.failures += not ok
    if ok:
        o.seconds_sum += seconds
        o.seconds_last = seconds
        o.bytes_sum += nbytes
    return ns


def observe_save(namespace: str, seconds: float, nbytes: int) -> None:
    """A save committed in the memory tier (called by the coordinator's writer)."""
    with _lock:
        _observe(namespace, "save", seconds, nbytes, True).bytes_written["memory"] += nbytes


def observe_load(namespace: str, step: int, seconds: float, bytes_by_tier: dict[str, int]) -> None:
    """One rank's reads of a load (called by the reader)."""
    with _lock:
        ns = _observe(namespace, "load", seconds, sum(bytes_by_tier.values()), True)
        for tier, n in bytes_by_tier.items():
            ns.bytes_read[tier] += n
        ns.last_load = {"step": step, "seconds": seconds, "bytes_by_tier": dict(bytes_by_tier)}


def observe_drain(namespace: str, seconds: float, nbytes: int, ok: bool) -> None:
    """A durable drain (upload and commit) finished or failed."""
    with _lock:
        ns = _observe(namespace, "drain", seconds, nbytes, ok)
        if ok:
            ns.bytes_written["durable"] += nbytes


def observe_replication(namespace: str, seconds: float, nbytes: int, ok: bool) -> None:
    """A copy to peer memory finished or failed (the peer tier calls it)."""
    with _lock:
        ns = _observe(namespace, "replication", seconds, nbytes, ok)
        if ok:
            ns.bytes_written["peer"] += nbytes


def observe_failure(namespace: str, op: str) -> None:
    """A failed ``op`` (``save`` / ``load``) seen by the manager."""
    with _lock:
        _data[namespace].ops[op].failures += 1


def last_load(namespace: str) -> dict[str, Any]:
    """``{"step", "seconds", "bytes_by_tier"}`` of this process's newest load, or {}."""
    with _lock:
        return dict(_data[namespace].last_load) if namespace in _data else {}


def track(config: CheckpointConfig) -> None:
    """Report the drain backlog and memory usage of ``config``'s namespace too."""
    with _lock:
        _tracked[config.namespace] = config


def reset() -> None:
    """Forget everything recorded (tests)."""
    with _lock:
        _data.clear()
        _tracked.clear()


def _gauges(config: CheckpointConfig) -> dict[str, Any]:
    from . import nodemem
    from .resume import pending_drains

    out: dict[str, Any] = {"memory_budget_bytes": config.memory_budget_bytes}
    try:
        pending = pending_drains(config)
        out["drain_backlog_parts"] = len(pending)
        out["drain_backlog_bytes"] = sum(p.nbytes for p in pending)
    except Exception:
        out["drain_backlog_parts"] = out["drain_backlog_bytes"] = None
    try:
        root = config.memory_root or ""
        out["memory_namespace_bytes"] = nodemem.namespace_info(root, config.namespace).bytes
        out["memory_node_bytes"] = sum(
            nodemem.namespace_info(root, n).bytes for n in nodemem.namespaces(root)
        )
    except Exception:
        out["memory_namespace_bytes"] = out["memory_node_bytes"] = None
    return out


def snapshot() -> dict[str, Any]:
    """``{namespace: {"save": {...}, "load": ..., "drain": ..., "replication": ...,
    "bytes_written": {tier: n}, "bytes_read": {tier: n}, "gauges": {...}}}``."""
    with _lock:
        names = set(_data) | set(_tracked)
        out: dict[str, Any] = {}
        for name in sorted(names):
            ns = _data[name]
            out[name] = {op: vars(o).copy() for op, o in ns.ops.items()}
            out[name]["bytes_written"] = dict(ns.bytes_written)
            out[name]["bytes_read"] = dict(ns.bytes_read)
        tracked = dict(_tracked)
    for name, cfg in tracked.items():
        out[name]["gauges"] = _gauges(cfg)
    out["_time"] = time.time()
    return out


class _Collector:
    """A prometheus_client collector over :func:`snapshot` (read at each scrape)."""

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        snap = snapshot()
        snap.pop("_time", None)
        ops: dict[str, Any] = {
            "count": CounterMetricFamily(
                "tierckpt_operations", "Operations finished", labels=["namespace", "op"]
            ),
            "failures": CounterMetricFamily(
                "tierckpt_failures", "Operations that failed", labels=["namespace", "op"]
            ),
            "seconds_sum": CounterMetricFamily(
                "tierckpt_seconds",
                "Seconds spent in successful operations",
                labels=["namespace", "op"],
            ),
            "seconds_last": GaugeMetricFamily(
                "tierckpt_last_seconds",
                "Latency of the newest operation",
                labels=["namespace", "op"],
            ),
        }
        written = CounterMetricFamily(
            "tierckpt_written_bytes", "Bytes written per tier", labels=["namespace", "tier"]
        )
        read = CounterMetricFamily(
            "tierckpt_read_bytes", "Bytes read per tier", labels=["namespace", "tier"]
        )
        gauges = GaugeMetricFamily(
            "tierckpt_gauge", "Drain backlog and memory tier usage", labels=["namespace", "what"]
        )
        for name, ns in snap.items():
            for op in OPS:
                for key, fam in ops.items():
                    fam.add_metric([name, op], ns[op][key])
            for tier, n in ns["bytes_written"].items():
                written.add_metric([name, tier], n)
            for tier, n in ns["bytes_read"].items():
                read.add_metric([name, tier], n)
            for what, v in ns.get("gauges", {}).items():
                if v is not None:
                    gauges.add_metric([name, what], v)
        yield from ops.values()
        yield from (written, read, gauges)


def prometheus_registry() -> Any:
    """A ``prometheus_client.CollectorRegistry`` holding tierckpt's metrics, read at scrape."""
    try:
        from prometheus_client import CollectorRegistry
    except ImportError as e:
        raise ImportError(
            'tierckpt.metrics.prometheus_registry needs prometheus_client: pip install "tierckpt[metrics]"'
        ) from e
    registry = CollectorRegistry(auto_describe=True)
    registry.register(_Collector())
    return registry


def prometheus_text() -> str:
    """The Prometheus text exposition of :func:`prometheus_registry`."""
    from prometheus_client import generate_latest

    return generate_latest(prometheus_registry()).decode()
