"""The ``tierckpt`` command: inspect, verify and repair checkpoints; run the benchmarks."""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from collections.abc import Sequence

from . import __version__
from .catalog import StepCatalog
from .config import CheckpointConfig
from .errors import IntegrityError, TierckptError
from .manifest import checksum
from .resume import resume_pending
from .retention import drain_pending
from .tiers.base import Tier
from .tiers.durable import open_durable_tier
from .tiers.memory import MemoryTier, open_memory_tier

__all__ = ["main"]


def _config(args: argparse.Namespace) -> CheckpointConfig:
    return CheckpointConfig(
        namespace=args.namespace,
        world_size=1,
        memory_root=args.memory_root,
        durable_base_path=args.durable,
    )


def _tiers(cfg: CheckpointConfig) -> list[Tier]:
    """Both tiers, opened read-only: nothing is created, an untrusted memory root refused."""
    return [open_memory_tier(cfg), open_durable_tier(cfg, create=False)]


def cmd_ls(args: argparse.Namespace) -> int:
    """List every step of a namespace in each tier."""
    cfg = _config(args)
    log = logging.getLogger("tierckpt")
    print(f"namespace {cfg.namespace}")
    for tier in _tiers(cfg):
        cat = StepCatalog(tier, cfg.namespace, log)
        print(f"{tier.name:8} {tier.url}")
        steps = cat.steps()
        if not steps:
            print("    (no steps)")
        for step in steps:
            record = cat.commit(step)
            files = cat.files(step)
            size = sum(files.values())
            if record is None:
                state = "uncommitted (invisible; removed by retention)"
            else:
                state = f"committed attempt {record.attempt}, {len(record.ranks)} ranks"
                if record.durable and isinstance(tier, MemoryTier):
                    state += (
                        ", durable drain pending" if drain_pending(record, files) else ", drained"
                    )
            print(f"    step {step:>8}  {size / 2**20:10.1f} MiB  {state}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Check every blob checksum of one step in each tier; exit 1 if a tier holds bad bytes."""
    cfg = _config(args)
    log = logging.getLogger("tierckpt")
    bad = 0
    for tier in _tiers(cfg):
        cat = StepCatalog(tier, cfg.namespace, log)
        record = cat.commit(args.step)
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
            help="file:///dir or s3://bucket/prefix (default ./checkpoints)",
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
