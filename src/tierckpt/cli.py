"""The ``tierckpt`` command: inspect, verify and repair checkpoints; run the benchmarks."""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from collections.abc import Sequence

from . import __version__, layout
from .catalog import StepCatalog
from .cleanup import step_names
from .config import CheckpointConfig
from .destination import job_config
from .errors import IntegrityError, TierckptError
from .history import newest_key
from .manifest import checksum
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


def cmd_ls(args: argparse.Namespace) -> int:
    """List every step of a namespace in each tier, oldest save first (newest last)."""
    cfg = _config(args)
    log = logging.getLogger("tierckpt")
    print(f"namespace {cfg.namespace}")
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
    for tier in _tiers(cfg):
        cat = StepCatalog(tier, cfg.namespace, log)
        record, problem = cat.read_commit(args.step)
        names = step_names(cat, args.step)
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
        status = f"missing {missing}" if missing else "all files present"
        print(f"{tier.name:8} step {args.step}: attempt {record.attempt}, {status}")
        bad += len(missing)
    print("OK" if not bad else f"{bad} problem(s) found")
    return 0 if not bad else 1


def cmd_resume(args: argparse.Namespace) -> int:
    """Finish durable uploads that a crash interrupted, and wait for them."""
    steps = resume_pending(_config(args)).result()
    print(f"resumed steps: {steps}" if steps else "nothing to resume")
    return 0


def cmd_clear_memory(args: argparse.Namespace) -> int:
    """Free this namespace's memory tier (steps, staging buffers and the buffer pool)."""
    cfg = _config(args)
    tier = open_memory_tier(cfg)
    tier.delete_prefix(cfg.namespace)
    print(f"removed {tier.root}/{cfg.namespace}")
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
    p = argparse.ArgumentParser(prog="tierckpt", description=__doc__)
    p.add_argument("--version", action="version", version=f"tierckpt {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def with_location(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument("--namespace", "-n", required=True, help="the job's namespace")
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

    with_location(sub.add_parser("ls", help=cmd_ls.__doc__))
    v = with_location(sub.add_parser("verify", help=cmd_verify.__doc__))
    v.add_argument("--step", type=int, required=True)
    with_location(sub.add_parser("resume", help=cmd_resume.__doc__))
    with_location(sub.add_parser("clear-memory", help=cmd_clear_memory.__doc__))
    sub.add_parser("bench", help=cmd_bench.__doc__, add_help=False)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tierckpt`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    if argv[:1] == ["bench"]:
        return cmd_bench(argparse.Namespace(), argv[1:])
    args = _parser().parse_args(argv)
    commands = {
        "ls": cmd_ls,
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
