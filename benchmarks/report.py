"""Aggregating the ranks' measurements: medians, ratios, targets, table, JSON, chart.

Per repetition, a save or load takes as long as its slowest rank, so
``MiB/s = bytes of every rank / max over ranks of the wall time``; async seconds are the
max over ranks too; peak RSS is the max over ranks. The reported value of each metric is
the median over the timed repetitions; the raw per-rank records stay in the JSON.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
from typing import Any

__all__ = ["build", "chart", "header", "machine_info", "table", "write_json"]

MIB = 2**20
TIERCKPT = "tierckpt-memory"
CEILING = "memcpy"
DCP_TMPFS = "dcp-fs-tmpfs"
PREADV = "preadv-tmpfs"
CACHED = "tierckpt-memory-cached"
MANAGER = "tierckpt-manager"
TARGETS = (
    # (key, ratio, comparison, threshold, text)
    (
        "first_saves",
        "first_saves_worst_vs_dcp_fs_tmpfs",
        "<=",
        1.0,
        "worst of a fresh job's first saves <= DCP FileSystemWriter (tmpfs, median first save)",
    ),
    ("save_ceiling", "save_vs_memcpy", ">=", 0.8, "memory-tier save >= 0.8x memcpy"),
    (
        "crash_safe",
        "async_total_vs_bare_copy",
        "<=",
        1.5,
        "crash-safe (async_save call -> committed in memory) <= 1.5x one bare copy",
    ),
    ("load_preadv", "load_vs_preadv", ">=", 0.8, "memory-tier load >= 0.8x plain preadv"),
    ("load_ceiling", "load_vs_memcpy", ">=", 0.8, "memory-tier load >= 0.8x memcpy"),
    (
        "async_blocking",
        "async_blocked_vs_bare_copy",
        "<=",
        1.2,
        "async_save blocking <= 1.2x one bare copy",
    ),
    ("save_vs_dcp", "save_vs_dcp_fs_tmpfs", ">", 1.0, "save ahead of DCP FileSystemWriter (tmpfs)"),
    ("load_vs_dcp", "load_vs_dcp_fs_tmpfs", ">", 1.0, "load ahead of DCP FileSystemReader (tmpfs)"),
    (
        "async_vs_dcp",
        "async_blocked_vs_dcp_fs_tmpfs",
        "<",
        1.0,
        "async_save blocking below DCP's (tmpfs)",
    ),
)


# -- machine -------------------------------------------------------------------


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _git(*args: str) -> str | None:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(
            ["git", "-C", here, *args], capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def source_rev() -> str:
    """The commit of this checkout, with a mark when src/ has uncommitted changes."""
    dirty = _git("status", "--porcelain", "--", "src")
    return (_git("rev-parse", "--short", "HEAD") or "?") + ("+dirty src" if dirty else "")


def machine_info() -> dict[str, Any]:
    import psutil
    import torch

    import tierckpt

    cpu = None
    for line in (_read("/proc/cpuinfo") or "").splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    shm = os.statvfs("/dev/shm")
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "tmpfs_gib": round(shm.f_blocks * shm.f_frsize / 2**30, 1),
        "shmem_hugepages": _read("/sys/kernel/mm/transparent_hugepage/shmem_enabled"),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "tierckpt": getattr(tierckpt, "__version__", None),
        "git": source_rev(),
        "loadavg_start": os.getloadavg(),
    }


def header(meta: dict[str, Any]) -> str:
    m, c = meta["machine"], meta["config"]
    shape = c["shape"]
    return (
        f"machine: {m['cpu']}, {m['cores_usable']} cores, {m['ram_gib']} GiB RAM, "
        f"tmpfs {m['tmpfs_gib']} GiB; torch {m['torch']}; tierckpt {m['tierckpt']} ({m['git']})\n"
        f"model: {c['model']} x{c['scale']:.3g} = {shape['layers']} layers, hidden "
        f"{shape['hidden']}, intermediate {shape['intermediate']}, vocab {shape['vocab']}: "
        f"{c['params'] / 1e6:.0f}M params, state {c['state_bytes_planned'] / 2**30:.2f} GiB "
        f"(fp32 params + AdamW), {c['sharding']} over {c['nproc']} ranks, "
        f"{c['threads_per_rank']} torch thread(s)/rank; {c['reps']} reps (+{c['warmup']} warm-up)"
        + (f" x {c['rounds']} rounds" if c.get("rounds", 1) > 1 else "")
    )


# -- aggregation ---------------------------------------------------------------


def _aggregate(per_rank: list[dict[str, Any]], total_bytes: int) -> dict[str, Any]:
    """One repetition over all ranks."""
    out: dict[str, Any] = {}
    for op in ("save", "load"):
        s = max(r[op]["s"] for r in per_rank)
        out[f"{op}_s"] = s
        out[f"{op}_mibs"] = total_bytes / MIB / s
    if all("async" in r for r in per_rank):
        for k in ("return_s", "blocked_s", "total_s"):
            out[f"async_{k}"] = max(r["async"][k] for r in per_rank)
    ops = [r[op] for r in per_rank for op in ("save", "load", "async") if op in r]
    out["rss_peak_mib"] = max(o["rss_peak_mib"] for o in ops)
    out["anon_peak_mib"] = max(o["anon_peak_mib"] for o in ops)
    out["rss_peak_by_rank_mib"] = [
        max(r[op]["rss_peak_mib"] for op in ("save", "load", "async") if op in r) for r in per_rank
    ]
    infos = [r["load_info"]["bytes_read_by_tier"] for r in per_rank if "load_info" in r]
    if infos:
        out["load_mib_by_tier"] = {
            k: sum(i.get(k, 0) for i in infos) / MIB for k in sorted({k for i in infos for k in i})
        }
    if per_rank[0].get("tmpfs_mib") is not None:
        out["tmpfs_mib"] = per_rank[0]["tmpfs_mib"]
    return out


def _median(reps: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if not reps:
        return out
    for k, v in reps[0].items():
        if isinstance(v, int | float):
            vals = [r[k] for r in reps if k in r]
            out[k] = statistics.median(vals)
            out[f"{k}_min"], out[f"{k}_max"] = min(vals), max(vals)
    return out


def build(meta: dict[str, Any], records: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """The result document from each system's per-rank records."""
    result: dict[str, Any] = {**meta, "systems": {}, "ratios": {}, "targets": {}}
    sizes = [r["nbytes"] for ranks in records.values() for r in ranks if "nbytes" in r]
    per_rank = next(
        ([r["nbytes"] for r in ranks] for ranks in records.values() if "nbytes" in ranks[0]), []
    )
    total = int(sum(per_rank))
    result["bytes"] = {"total": total, "per_rank": per_rank}
    if len({*sizes}) > len(per_rank):
        result["bytes"]["warning"] = "systems saw different state sizes"
    for name, ranks in records.items():
        errors = [f"rank {i}: {r['error']}" for i, r in enumerate(ranks) if r.get("error")]
        verify = [f"rank {i}: {r['verify']}" for i, r in enumerate(ranks) if r.get("verify")]
        n = min(len(r.get("reps", [])) for r in ranks)
        reps = [_aggregate([r["reps"][i] for r in ranks], total) for i in range(n)]
        nw = min(len(r.get("warmup", [])) for r in ranks)
        warm = [_aggregate([r["warmup"][i] for r in ranks], total) for i in range(nw)]
        first = _first_saves(ranks)
        median = _median(reps)
        if ranks and ranks[0].get("first_tmpfs_mib") is not None and total:
            median["first_tmpfs_mib"] = ranks[0]["first_tmpfs_mib"]
        if median.get("tmpfs_mib") is not None and total:
            median["tmpfs_per_state"] = median["tmpfs_mib"] * MIB / total
        result["systems"][name] = {
            "about": meta["config"]["about"].get(name),
            "median": median,
            "first_saves_s": first,
            "reps": reps,
            "warmup": warm,
            "ru_maxrss_mib": [r.get("ru_maxrss_mib") for r in ranks],
            "error": "\n".join(errors) or None,
            "verify_failed": "; ".join(verify) or None,
            "raw": ranks,
        }
    result["ratios"] = _ratios(result["systems"])
    for key, ratio, cmp, threshold, text in TARGETS:
        value = result["ratios"].get(ratio)
        met = None
        if value is not None:
            met = {
                ">=": value >= threshold,
                "<=": value <= threshold,
                ">": value > threshold,
                "<": value < threshold,
            }[cmp]
        result["targets"][key] = {"text": text, "ratio": ratio, "value": value, "met": met}
    return result


def _first_saves(ranks: list[dict[str, Any]]) -> list[float]:
    """Seconds of each of a fresh job's first saves (slowest rank), in order."""
    n = min((len(r.get("first", [])) for r in ranks), default=0)
    return [max(r["first"][i]["s"] for r in ranks) for i in range(n)]


def _ratios(systems: dict[str, Any]) -> dict[str, float]:
    def med(name: str, key: str) -> float | None:
        s = systems.get(name)
        v = s["median"].get(key) if s and not s["error"] else None
        return float(v) if v else None

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    def first(name: str, pick: Any) -> float | None:
        s = systems.get(name)
        v = s.get("first_saves_s") if s and not s["error"] else None
        return float(pick(v)) if v else None

    t, c, d = TIERCKPT, CEILING, DCP_TMPFS
    out = {
        "first_saves_worst_vs_dcp_fs_tmpfs": ratio(first(t, max), first(d, statistics.median)),
        "first_saves_worst_vs_dcp_fs_tmpfs_worst": ratio(first(t, max), first(d, max)),
        "async_total_vs_bare_copy": ratio(med(t, "async_total_s"), med(c, "save_s")),
        "cached_save_vs_memcpy": ratio(med(CACHED, "save_mibs"), med(c, "save_mibs")),
        "cached_async_total_vs_bare_copy": ratio(med(CACHED, "async_total_s"), med(c, "save_s")),
        "cached_async_blocked_vs_bare_copy": ratio(
            med(CACHED, "async_blocked_s"), med(c, "save_s")
        ),
        "manager_save_vs_memcpy": ratio(med(MANAGER, "save_mibs"), med(c, "save_mibs")),
        "manager_async_total_vs_bare_copy": ratio(med(MANAGER, "async_total_s"), med(c, "save_s")),
        "load_vs_preadv": ratio(med(t, "load_mibs"), med(PREADV, "load_mibs")),
        "preadv_load_vs_memcpy": ratio(med(PREADV, "load_mibs"), med(c, "load_mibs")),
        "save_vs_memcpy": ratio(med(t, "save_mibs"), med(c, "save_mibs")),
        "load_vs_memcpy": ratio(med(t, "load_mibs"), med(c, "load_mibs")),
        "async_blocked_vs_bare_copy": ratio(med(t, "async_blocked_s"), med(c, "save_s")),
        "save_vs_dcp_fs_tmpfs": ratio(med(t, "save_mibs"), med(d, "save_mibs")),
        "load_vs_dcp_fs_tmpfs": ratio(med(t, "load_mibs"), med(d, "load_mibs")),
        "async_blocked_vs_dcp_fs_tmpfs": ratio(
            med(t, "async_blocked_s"), med(d, "async_blocked_s")
        ),
        "async_total_vs_dcp_fs_tmpfs": ratio(med(t, "async_total_s"), med(d, "async_total_s")),
    }
    return {k: v for k, v in out.items() if v is not None}


# -- output --------------------------------------------------------------------


def _spread(m: dict[str, Any], key: str) -> str:
    v, lo, hi = m.get(key), m.get(f"{key}_min"), m.get(f"{key}_max")
    if v is None:
        return "-"
    text = f"{v:,.0f}" if v >= 100 else f"{v:.3g}"
    if lo is not None and hi is not None and v and hi > lo:
        text += f" ±{(hi - lo) / 2 / v * 100:.0f}%"
    return text


def table(result: dict[str, Any]) -> str:
    cols = (
        ("system", None),
        ("1st save s", "first_save_s"),
        ("save s", "save_s"),
        ("save MiB/s", "save_mibs"),
        ("load s", "load_s"),
        ("load MiB/s", "load_mibs"),
        ("async block s", "async_blocked_s"),
        ("async total s", "async_total_s"),
        ("peak RSS/rank MiB", "rss_peak_mib"),
        ("tmpfs MiB", "tmpfs_mib"),
        ("tmpfs/state", "tmpfs_per_state"),
    )
    rows = [[c for c, _ in cols]]
    overhead = set(result["config"].get("overhead_only", []))
    for name, s in result["systems"].items():
        if s["error"]:
            rows.append([name, "FAILED", *[""] * (len(cols) - 2)])
            continue
        row = [name + (" (LOAD MISMATCH)" if s["verify_failed"] else "")]
        for _, key in cols[1:]:
            if key in ("save_mibs", "load_mibs") and name in overhead:
                row.append("-")
            elif key == "first_save_s":
                v = s["warmup"][0]["save_s"] if s["warmup"] else None
                row.append(f"{v:.3g}" if v is not None else "-")
            elif key == "tmpfs_per_state":
                v = s["median"].get(key)
                row.append(f"{v:.2f}" if v is not None else "-")
            elif key in ("rss_peak_mib", "tmpfs_mib"):
                v = s["median"].get(key)
                row.append(f"{v:,.0f}" if v is not None else "-")
            else:
                row.append(_spread(s["median"], key))
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
    lines = []
    for j, r in enumerate(rows):
        cells = [r[0].ljust(widths[0])] + [r[i].rjust(widths[i]) for i in range(1, len(cols))]
        lines.append("| " + " | ".join(cells) + " |")
        if j == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    b = result.get("bytes", {})
    out = [""]
    if b:
        out.append(
            f"state: {b['total'] / MIB:,.0f} MiB over {len(b['per_rank'])} ranks; medians of "
            f"{result['config']['reps'] * result['config'].get('rounds', 1)} reps, each system "
            f"after {result['config']['warmup']} warm-up reps "
            "(±: half the min-max range; 1st save: the very first save of the run)"
        )
    out += lines
    out += _first_table(result)
    if result["targets"]:
        out.append("")
        out.append("targets (tierckpt-memory):")
        for t in result["targets"].values():
            mark = {True: "met", False: "MISSED", None: "n/a"}[t["met"]]
            v = f"{t['value']:.2f}x" if t["value"] is not None else "-"
            out.append(f"  {mark:6} {t['text']}: {t['ratio']} = {v}")
        for key in (
            "async_total_vs_dcp_fs_tmpfs",
            "first_saves_worst_vs_dcp_fs_tmpfs_worst",
            "preadv_load_vs_memcpy",
            "cached_save_vs_memcpy",
            "cached_async_total_vs_bare_copy",
            "cached_async_blocked_vs_bare_copy",
            "manager_save_vs_memcpy",
            "manager_async_total_vs_bare_copy",
        ):
            extra = result["ratios"].get(key)
            if extra is not None:
                out.append(f"         {key} = {extra:.2f}x")
        for noop_name in ("dcp-noop", "dcp-noop-cached"):
            noop = result["systems"].get(noop_name, {}).get("median", {})
            if noop.get("save_s") is not None:
                out.append(
                    f"         {noop_name} (DCP's own share): save {noop['save_s']:.3f} s, "
                    f"load {noop.get('load_s', 0):.3f} s"
                )
    for name, s in result["systems"].items():
        tiers = s["reps"][-1].get("load_mib_by_tier") if s["reps"] else None
        if tiers:
            read = ", ".join(f"{k} {v:,.0f} MiB" for k, v in tiers.items())
            out.append(f"{name}: a load read {read}")
    for name, s in result["systems"].items():
        if s["error"]:
            out.append(f"\n{name} failed:\n{s['error']}")
        if s["verify_failed"]:
            out.append(f"\n{name}: {s['verify_failed']}")
    return "\n".join(out)


def _first_table(result: dict[str, Any]) -> list[str]:
    """A fresh job's first saves, one column each, and the worst."""
    rows = [(n, s["first_saves_s"]) for n, s in result["systems"].items() if s.get("first_saves_s")]
    if not rows:
        return []
    n = max(len(v) for _, v in rows)
    head = ["system", *[f"#{i + 1}" for i in range(n)], "worst", "median"]
    body = [
        [name, *[f"{x:.3g}" for x in v], f"{max(v):.3g}", f"{statistics.median(v):.3g}"]
        for name, v in rows
    ]
    widths = [max(len(r[i]) if i < len(r) else 0 for r in [head, *body]) for i in range(len(head))]
    lines = ["", "a fresh job's first saves, s (slowest rank; back to back, sync dcp.save):"]
    for j, r in enumerate([head, *body]):
        cells = [r[0].ljust(widths[0])] + [c.rjust(widths[i + 1]) for i, c in enumerate(r[1:])]
        lines.append("| " + " | ".join(cells) + " |")
        if j == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return lines


def write_json(result: dict[str, Any], path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1, default=str)
        f.write("\n")
    os.replace(tmp, path)


def chart(result: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = {n: s for n, s in result["systems"].items() if not s["error"]}
    if not systems:
        return
    names = list(systems)
    overhead = set(result["config"].get("overhead_only", []))
    fig, axes = plt.subplots(1, 3, figsize=(16, 0.5 * len(names) + 2.5))

    def color(n: str) -> str:
        if n.startswith("memcpy") or n in overhead:
            return "#888888"
        return "#1f77b4" if n.startswith("tierckpt") else "#ff7f0e"

    def bars(ax: Any, key: str, title: str) -> None:
        shown = [n for n in names if n not in overhead]
        vals, errs = [], [[], []]
        for n in shown:
            m = systems[n]["median"]
            v = m.get(key) or 0.0
            vals.append(v)
            errs[0].append(max(0.0, v - m.get(f"{key}_min", v)))
            errs[1].append(max(0.0, m.get(f"{key}_max", v) - v))
        ax.barh(shown, vals, xerr=errs, color=[color(n) for n in shown], capsize=3)
        ax.invert_yaxis()
        ax.set_title(title)
        for i, v in enumerate(vals):
            if v:
                text = f" {v:,.0f}" if v >= 100 else f" {v:.2f}"
                ax.text(v + errs[1][i], i, text, va="center", fontsize=8)

    bars(axes[0], "save_mibs", "save MiB/s (higher is better)")
    bars(axes[1], "load_mibs", "load MiB/s (higher is better)")
    ax = axes[2]
    async_names = [n for n in names if "async_blocked_s" in systems[n]["median"]]
    y = range(len(async_names))
    total = [systems[n]["median"]["async_total_s"] for n in async_names]
    blocked = [systems[n]["median"]["async_blocked_s"] for n in async_names]
    ax.barh(y, total, color="#cccccc", label="total (until persisted)")
    ax.barh(y, blocked, color="#d62728", height=0.5, label="blocking (training waits)")
    bare = systems.get(CEILING, {}).get("median", {}).get("save_s")
    if bare:
        ax.axvline(bare, color="black", linestyle="--", linewidth=1, label="one bare copy")
    ax.set_yticks(list(y), async_names)
    ax.invert_yaxis()
    ax.set_title("async_save seconds (lower is better)")
    ax.legend(fontsize=8, loc="lower right")
    c = result["config"]
    b = result.get("bytes", {}).get("total", 0)
    fig.suptitle(
        f"{c['model']} x{c['scale']:.3g}, {b / 2**30:.2f} GiB state, {c['nproc']} ranks, "
        f"medians of {c['reps'] * c.get('rounds', 1)} (bars: min-max) - {result['machine']['cpu']}, "
        f"{result['machine']['cores_usable']} cores"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
