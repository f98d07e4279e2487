"""The ``tierckpt`` command: inspect, verify and repair checkpoints; run the benchmarks."""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Sequence

from . import __version__, layout, nodemem
from ._listing import format_table, item_rows, step_rows
from .catalog import StepCatalog
from .cleanup import step_names
from .config import DEFAULT_MEMORY_ROOT, MEMORY_ROOT_ENV, CheckpointConfig, parse_duration
from .destination import job_config
from .durable_gc import apply_gc, plan_gc
from .errors import IntegrityError, TierckptError
from .history import newest_key
from .manifest import checksum
from .peer.inventory import node_parts
from .policies import AnyOf, KeepEveryM, KeepLastK
from .resume import resume_pending
from .retention import abandoned_steps, drain_pending
from .tiers.base import Tier
from .tiers.durable import open_durable_tier
from .tiers.memory import MemoryTier, open_memory_tier

__all__ = ["main"]


def _config(args: argparse.Namespace) -> CheckpointConfig:
    """The job's config: without ``--durable`` its recorded destination (a conflicting
    ``--durable`` is a :class:`ConfigError` naming both)."""
    cfg = CheckpointConfig(
        namespace=args.namespace,
        world_size=1,
        memory_root=args.memory_root,
        durable_base_path=args.durable,
    )
    return job_config(cfg, explicit=args.durable is not None)


def _tiers(cfg: CheckpointConfig) -> list[Tier]:
    """Both tiers, opened read-only: nothing is created, an untrusted memory root refused."""
    return [open_memory_tier(cfg), open_durable_tier(cfg, create=False)]


def _foreign_note(names: list[str]) -> str:
    foreign = [n for n in names if not layout.is_ours(n)]
    return (
        f"; {len(foreign)} foreign file(s) left in place: {', '.join(foreign[:5])}"
        if foreign
        else ""
    )


def _memory_root(args: argparse.Namespace) -> MemoryTier:
    """The memory tier of ``--memory-root`` (or its default), checked as trusted."""
    root = args.memory_root or os.environ.get(MEMORY_ROOT_ENV) or DEFAULT_MEMORY_ROOT
    tier = MemoryTier(os.path.abspath(os.path.expanduser(root)))
    tier.check_trusted()
    return tier


def cmd_ls_all(args: argparse.Namespace) -> int:
    """One line per namespace on this node: size, newest save, age, whether a live job owns it."""
    tier = _memory_root(args)
    now = time.time()
    print(f"memory root {tier.root}")
    names = nodemem.namespaces(tier.root)
    if not names:
        print("    (no namespaces)")
        return 0
    rows = [("NAMESPACE", "SIZE", "NEWEST SAVE", "AGE", "TTL", "OWNER")]
    for name in names:
        try:
            info = nodemem.namespace_info(tier.root, name)
        except OSError as e:
            rows.append((name, "?", f"unreadable: {e}", "", "", ""))
            continue
        newest = "-"
        if info.newest_step is not None:
            newest = f"step {info.newest_step} gen {info.newest_generation}"
            if info.newest_save_time is not None:
                newest += " " + time.strftime(
                    "%Y-%m-%d %H:%M:%S", time.localtime(info.newest_save_time)
                )
        rows.append(
            (
                name,
                nodemem.human_bytes(info.bytes),
                newest,
                nodemem.human_age(now - info.last_activity),
                "-" if info.ttl is None else nodemem.human_age(info.ttl),
                info.describe_owner(),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + "  " + row[-1])
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    """List the steps of a namespace: a table (step, save time, size, tiers, drain and
    replication state, age), oldest save first, then each tier's files; --json for tools;
    with --all, every namespace of the node's memory tier."""
    if args.all:
        return cmd_ls_all(args)
    cfg = _config(args)
    log = logging.getLogger("tierckpt")
    tiers = _tiers(cfg)
    rows = step_rows(cfg.namespace, tiers, log)
    if args.json:
        where = {t.name: t.url for t in tiers}
        print(json.dumps({"namespace": cfg.namespace, "tiers": where, "steps": rows}, indent=1))
        return 0
    print(f"namespace {cfg.namespace}")
    for line in format_table(rows) if rows else ["    (no steps)"]:
        print(line)
    print()
    for tier in _tiers(cfg):
        cat = StepCatalog(tier, cfg.namespace, log)
        print(f"{tier.name:8} {tier.url}")
        steps = cat.steps()
        if not steps:
            print("    (no steps)")
        commits = {step: cat.read_commit(step) for step in steps}
        committed = {s: r for s, (r, _) in commits.items() if r is not None}
        gone = abandoned_steps(committed)
        order = sorted(committed, key=lambda s: newest_key(s, committed[s].generation))
        order += [s for s in steps if s not in committed]
        for step in order:
            record, problem = commits[step]
            names = step_names(cat, step)
            files = cat.files(step)
            size = sum(files.values())
            if problem is not None:
                state = f"unreadable commit (left in place): {problem}"
            elif record is None and not any(layout.is_ours(n) for n in names):
                state = "foreign (not written by tierckpt; left in place)"
            elif record is None:
                state = "uncommitted (invisible; removed by retention once abandoned)"
            else:
                state = (
                    f"committed attempt {record.attempt}, generation {record.generation}, "
                    f"{len(record.ranks)} ranks"
                )
                if step in gone:
                    state += ", abandoned by a later rewind (never loaded)"
                if record.durable and isinstance(tier, MemoryTier):
                    state += (
                        ", durable drain pending" if drain_pending(record, files) else ", drained"
                    )
            if problem is None and (record is not None or any(layout.is_ours(n) for n in names)):
                state += _foreign_note(names)
            print(f"    step {step:>8}  {size / 2**20:10.1f} MiB  {state}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Check every blob checksum of one step in each tier; exit 1 if a tier holds bad bytes."""
    cfg = _config(args)
    log = logging.getLogger("tierckpt")
    bad = 0
    seen = False
    tiers = _tiers(cfg)
    for tier in tiers:
        cat = StepCatalog(tier, cfg.namespace, log)
        record, problem = cat.read_commit(args.step)
        names = step_names(cat, args.step)
        seen = seen or bool(names) or record is not None or problem is not None
        foreign = [n for n in names if not layout.is_ours(n)]
        if foreign:
            print(
                f"{tier.name:8} step {args.step}: {len(foreign)} foreign file(s), not written by "
                f"tierckpt (left in place): {', '.join(foreign)}"
            )
        if problem is not None:
            bad += 1
            print(f"{tier.name:8} step {args.step}: unreadable commit (left in place): {problem}")
            continue
        if record is None:
            print(f"{tier.name:8} step {args.step}: not committed here")
            continue
        missing = cat.missing_files(record)
        for part in record.ranks:
            if part.manifest in missing:
                continue
            try:
                manifest = cat.read_manifest(record, part)
            except IntegrityError as e:
                bad += 1
                print(f"{tier.name:8} step {args.step}: MANIFEST NOT TRUSTED: {e}")
                continue
            for name, entry in manifest.files.items():
                if name in missing:
                    continue
                for offset, length, digest in entry["blobs"]:
                    data = tier.read(cat.key(args.step, name), offset, length)
                    if checksum(data) != digest:
                        bad += 1
                        print(
                            f"{tier.name:8} step {args.step}: CHECKSUM MISMATCH {name} [{offset}:+{length}]"
                        )
        elsewhere: list[str] = []
        if isinstance(tier, MemoryTier) and len(set(record.nodes)) > 1:
            # A multi-node save: this node holds its own parts and the replicas placed here;
            # the other parts live on other nodes (verify there). Replicas are checked above.
            parts = node_parts(tier, cfg.namespace, record)
            mine = {r for r, n in enumerate(record.nodes) if n == cfg.node_id}
            held = set(parts.own) | set(parts.replicas) | mine
            for part in record.ranks:
                if part.rank not in held:
                    elsewhere += [n for n in [part.manifest, *part.files] if n in missing]
            missing = [n for n in missing if n not in elsewhere]
            print(f"{tier.name:8} step {args.step}: this node holds {parts.describe()}")
        status = f"missing {missing}" if missing else "all files present"
        if elsewhere:
            status += f" ({len(elsewhere)} file(s) of other nodes' parts are on those nodes)"
        print(f"{tier.name:8} step {args.step}: attempt {record.attempt}, {status}")
        bad += len(missing)
    if not seen:
        print(
            f"step {args.step} of namespace {cfg.namespace} exists in no tier "
            f"({', '.join(t.url for t in tiers)}): nothing to verify"
        )
        return 1
    print("OK" if not bad else f"{bad} problem(s) found")
    return 0 if not bad else 1


def cmd_inspect(args: argparse.Namespace) -> int:
    """List the items of one step (name, kind, dtype, shape, size), from its verified
    metadata in the nearest tier; --json for tools."""
    cfg = _config(args)
    rows = item_rows(cfg.namespace, args.step, _tiers(cfg), logging.getLogger("tierckpt"))
    if args.json:
        print(json.dumps({"namespace": cfg.namespace, "step": args.step, "items": rows}, indent=1))
        return 0
    table = [("ITEM", "KIND", "DTYPE", "SHAPE", "SIZE")]
    for r in rows:
        shape = "-" if r["shape"] is None else "(" + ", ".join(map(str, r["shape"])) + ")"
        table.append((r["name"], r["kind"], r["dtype"], shape, nodemem.human_bytes(r["bytes"])))
    widths = [max(len(t[i]) for t in table) for i in range(4)]
    for t in table:
        print("  ".join(c.ljust(w) for c, w in zip(t, widths, strict=False)) + "  " + t[-1])
    total = sum(r["bytes"] for r in rows)
    print(f"{len(rows)} items, {nodemem.human_bytes(total)}")
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    """Apply durable retention now: keep the --keep-last newest saves (and every
    --keep-every-th step); a dry run unless --apply."""
    parts: list[object] = []
    if args.keep_last is not None:
        parts.append(KeepLastK(args.keep_last))
    if args.keep_every is not None:
        parts.append(KeepEveryM(args.keep_every))
    if not parts:
        print("error: give --keep-last K (and optionally --keep-every M)", file=sys.stderr)
        return 2
    policy = parts[0] if len(parts) == 1 else AnyOf(*parts)
    cfg = _config(args)
    log = logging.getLogger("tierckpt")
    durable = open_durable_tier(cfg, create=False)
    plan = plan_gc(cfg, durable, policy, log)  # type: ignore[arg-type]
    print(f"durable {durable.url}, namespace {cfg.namespace}, policy {policy!r}")
    print(f"keep:   {plan.keep or 'nothing'}")
    for step in plan.delete:
        why = " (abandoned by a rewind)" if step in plan.abandoned else ""
        verb = "delete" if args.apply else "would delete"
        print(f"{verb} step {step} ({nodemem.human_bytes(plan.sizes.get(step, 0))}){why}")
    for step in plan.unreadable:
        print(f"left in place: step {step} (unreadable commit)")
    if not plan.delete:
        print("nothing to delete")
    elif args.apply:
        deleted = apply_gc(cfg, durable, plan, log)
        print(f"deleted steps {deleted}")
    else:
        print("dry run: nothing deleted; add --apply to delete")
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    """Finish durable uploads that a crash interrupted, and wait for them."""
    steps = resume_pending(_config(args)).result()
    print(f"resumed steps: {steps}" if steps else "nothing to resume")
    return 0


def _refuse_live(root: str, namespace: str) -> int:
    info = nodemem.namespace_info(root, namespace)
    print(
        f"error: namespace {namespace} in {root} is {info.describe_owner()}: a running job "
        "owns its memory; stop the job first (nothing was removed).",
        file=sys.stderr,
    )
    return 1


def cmd_clear_memory(args: argparse.Namespace) -> int:
    """Free a namespace's memory tier (steps, staging buffers and the buffer pool), never one
    a live process owns; with --older-than, every namespace (or -n's) idle that long."""
    if args.older_than is not None:
        return _clear_older_than(args, parse_duration(args.older_than, "--older-than"))
    cfg = _config(args)
    tier = open_memory_tier(cfg)
    with nodemem.release_lock_if_present(tier.root):
        if nodemem.live_leases(tier.path(cfg.namespace)):
            return _refuse_live(tier.root, cfg.namespace)
        tier.delete_prefix(cfg.namespace)
    print(f"removed {tier.root}/{cfg.namespace}")
    return 0


def _clear_older_than(args: argparse.Namespace, older_than: float) -> int:
    tier = _memory_root(args)
    if args.namespace is not None:
        tier.check_trusted(_config(args).namespace)
        names = [args.namespace] if os.path.isdir(tier.path(args.namespace)) else []
    else:
        names = nodemem.namespaces(tier.root)
    removed = 0
    for name in names:
        if nodemem.release_namespace(tier.root, name, older_than=older_than):
            removed += 1
            print(f"removed {tier.root}/{name}")
            continue
        if not os.path.isdir(tier.path(name)):
            continue
        info = nodemem.namespace_info(tier.root, name)
        if info.live and args.namespace is not None:
            return _refuse_live(tier.root, name)
        why = (
            info.describe_owner()
            if info.live
            else f"active {nodemem.human_age(time.time() - info.last_activity)} ago"
        )
        print(f"kept {name}: {why}")
    if not names:
        print(
            f"no namespace {args.namespace} in {tier.root}"
            if args.namespace
            else f"no namespaces in {tier.root}"
        )
    elif not removed:
        print("nothing removed")
    return 0


def cmd_bench(args: argparse.Namespace, rest: Sequence[str]) -> int:
    """Run the benchmark suite of a source checkout (``benchmarks/run.py``)."""
    root = os.getcwd()
    if not os.path.isfile(os.path.join(root, "benchmarks", "run.py")):
        print(
            "tierckpt bench runs from a tierckpt source checkout (benchmarks/run.py).",
            file=sys.stderr,
        )
        return 2
    return subprocess.call([sys.executable, "-m", "benchmarks.run", *rest], cwd=root)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tierckpt",
        description=__doc__,
        epilog="example: tierckpt ls -n run-7    (tierckpt COMMAND --help for each command)",
    )
    p.add_argument("--version", action="version", version=f"tierckpt {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def with_location(
        sp: argparse.ArgumentParser, required: bool = True
    ) -> argparse.ArgumentParser:
        sp.add_argument("--namespace", "-n", required=required, help="the job's namespace")
        sp.add_argument(
            "--memory-root",
            default=None,
            help="default $TIERCKPT_MEMORY_ROOT or /dev/shm/tierckpt-<uid>",
        )
        sp.add_argument(
            "--durable",
            default=None,
            help="file:///dir or s3://bucket/prefix (default: where the job's writers said it "
            "drains, recorded in the memory tier; else ./checkpoints)",
        )
        return sp

    def command(name: str, fn: object, *examples: str) -> argparse.ArgumentParser:
        doc = inspect.cleandoc(fn.__doc__ or "")
        return sub.add_parser(
            name,
            help=doc.split(";")[0].split("\n\n")[0],
            description=doc,
            epilog="examples:\n" + "\n".join(f"  {e}" for e in examples),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    ls = with_location(
        command(
            "ls",
            cmd_ls,
            "tierckpt ls -n run-7",
            "tierckpt ls -n run-7 --json | jq '.steps[-1].step'",
            "tierckpt ls --all",
        ),
        required=False,
    )
    ls.add_argument("--all", action="store_true", help="every namespace on this node (no -n)")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ins = with_location(
        command(
            "inspect",
            cmd_inspect,
            "tierckpt inspect -n run-7 500",
            "tierckpt inspect -n run-7 500 --json",
        )
    )
    ins.add_argument("step", type=int, help="the step to inspect")
    ins.add_argument("--json", action="store_true", help="machine-readable output")
    gc = with_location(
        command(
            "gc",
            cmd_gc,
            "tierckpt gc -n run-7 --keep-last 3                  # dry run: what would go",
            "tierckpt gc -n run-7 --keep-last 3 --keep-every 1000 --apply",
        )
    )
    gc.add_argument(
        "--keep-last", type=int, default=None, metavar="K", help="keep the K newest saves"
    )
    gc.add_argument(
        "--keep-every", type=int, default=None, metavar="M", help="also keep every M-th step"
    )
    gc.add_argument("--apply", action="store_true", help="delete (default: dry run)")
    v = with_location(command("verify", cmd_verify, "tierckpt verify -n run-7 --step 500"))
    v.add_argument("--step", type=int, required=True)
    with_location(command("resume", cmd_resume, "tierckpt resume -n run-7"))
    c = with_location(
        command(
            "clear-memory",
            cmd_clear_memory,
            "tierckpt clear-memory -n run-7",
            "tierckpt clear-memory --older-than 2h",
        ),
        False,
    )
    c.add_argument(
        "--older-than",
        default=None,
        metavar="DURATION",
        help="remove namespaces (or -n's) idle this long and owned by no live job: 30m, 2h, 7d",
    )
    sub.add_parser(
        "bench",
        help=cmd_bench.__doc__,
        add_help=False,
        epilog="examples:\n  tierckpt bench --quick",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tierckpt`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    if argv[:1] == ["bench"]:
        return cmd_bench(argparse.Namespace(), argv[1:])
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "ls" and not args.all and args.namespace is None:
        parser.error("ls needs -n NAMESPACE, or --all for every namespace on this node")
    if args.command == "clear-memory" and args.older_than is None and args.namespace is None:
        parser.error("clear-memory needs -n NAMESPACE, or --older-than DURATION")
    commands = {
        "ls": cmd_ls,
        "inspect": cmd_inspect,
        "gc": cmd_gc,
        "verify": cmd_verify,
        "resume": cmd_resume,
        "clear-memory": cmd_clear_memory,
    }
    try:
        return commands[args.command](args)
    except TierckptError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
