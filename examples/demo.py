"""`make demo`: kill -9 a training rank mid-run and resume from the memory tier.

Runs ``examples/train.py`` under ``torchrun --nproc-per-node 2 --max-restarts 1``: a small
MLP sharded with FSDP2 trains on CPU for 40 steps; its ``tierckpt.CheckpointManager``
async-saves every step to the memory tier (a private tmpfs root under /dev/shm) and every
10th step to the durable tier (the embedded default, ``./checkpoints/<namespace>``). On the first attempt rank 1 SIGKILLs itself at
step 23; torchrun restarts both workers, which restore the newest step every rank can load
and finish. The demo then runs the same training without crash or checkpoints and requires
both runs to end bit-exact. Exits non-zero if anything went wrong.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tierckpt import layout

HERE = Path(__file__).resolve().parent
MARK = "demo|"
STEPS, CRASH_AT, DURABLE_EVERY, NPROC = 40, 23, 10, 2


class DemoError(Exception):
    """Something the demo checks did not hold."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def torchrun(train_args: list[str], *, verbose: bool, timeout: float, show: bool) -> list[str]:
    """Run train.py under torchrun; print its ``demo|`` lines (all lines with ``verbose``);
    its whole output."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={NPROC}",
        "--nnodes=1",
        "--max-restarts=1",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{free_port()}",
        f"--rdzv-id=tierckpt-demo-{os.getpid()}",
        "--local-addr=127.0.0.1",
        str(HERE / "train.py"),
        *train_args,
    ]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    # torchrun shares its rendezvous TCPStore with the workers by default, and restarted
    # workers then read the previous attempt's gloo addresses and fail to connect
    # (pytorch/pytorch#135712, still so in 2.13). A store per attempt avoids it.
    env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    lines: list[str] = []
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,  # its own process group: on timeout we kill it and its workers
    )
    deadline = time.monotonic() + timeout

    def on_timeout(signum: int, frame: object) -> None:
        raise TimeoutError

    old = signal.signal(signal.SIGALRM, on_timeout)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if verbose:
                print(line, end="", flush=True)
            elif show and line.startswith(MARK):
                print("  " + line[len(MARK) :], end="", flush=True)
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except (TimeoutError, subprocess.TimeoutExpired):
        kill_group(proc)
        dump(lines, verbose)
        raise DemoError(f"torchrun did not finish within {timeout:.0f} s") from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        kill_group(proc)  # Ctrl-C, errors, or workers left behind: none outlive the demo
    if proc.returncode != 0:
        dump(lines, verbose)
        raise DemoError(f"torchrun exited with status {proc.returncode}")
    return lines


def kill_group(proc: subprocess.Popen[str]) -> None:
    """Stop torchrun if it still runs: SIGTERM (it stops its workers), SIGKILL after 10 s."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def dump(lines: list[str], verbose: bool) -> None:
    """On failure, show torchrun's full output (unless it was already shown)."""
    if not verbose:
        print("---- torchrun output ----", file=sys.stderr)
        sys.stderr.writelines(lines[-200:])
        print("---- end of torchrun output ----", file=sys.stderr)


def results(work_dir: Path) -> list[dict]:
    out = []
    for rank in range(NPROC):
        path = work_dir / f"result-r{rank}.json"
        if not path.exists():
            raise DemoError(f"rank {rank} wrote no result ({path})")
        out.append(json.loads(path.read_text()))
    return out


def committed_steps(root: Path) -> list[int]:
    """Steps with a commit record under ``root`` (``<root>/step_<N>/COMMIT``)."""
    found = []
    for d in root.glob("step_*"):
        step = layout.parse_step_dir(d.name)
        if step is not None and (d / layout.COMMIT_NAME).exists():
            found.append(step)
    return sorted(found)


def check(crashed: list[dict], reference: list[dict], durable_dir: Path, memory_dir: Path) -> None:
    for r in crashed:
        if r["attempt"] != 2:
            raise DemoError(f"rank {r['rank']} finished in attempt {r['attempt']}, expected 2")
        if not r["restored"]:
            raise DemoError(f"rank {r['rank']} did not restore a checkpoint after the crash")
        step, by_tier = r["restored"]["step"], r["restored"]["bytes_by_tier"]
        if step != CRASH_AT - 1:
            raise DemoError(f"rank {r['rank']} resumed from step {step}, expected {CRASH_AT - 1}")
        if set(by_tier) != {"memory"}:
            raise DemoError(f"rank {r['rank']} read {by_tier}; expected the memory tier only")
    # FSDP2: each rank digests its own shards; rank r of both runs must agree bit for bit.
    by_rank = {r["rank"]: r["digest"] for r in reference}
    if any(r["digest"] != by_rank.get(r["rank"]) for r in crashed):
        raise DemoError(
            "final model + optimizer state differs: "
            + ", ".join(f"crashed r{r['rank']}={r['digest'][:12]}" for r in crashed)
            + ", "
            + ", ".join(f"reference r{r['rank']}={r['digest'][:12]}" for r in reference)
        )
    want = list(range(DURABLE_EVERY, STEPS + 1, DURABLE_EVERY))
    durable = committed_steps(durable_dir)
    if durable != want:
        raise DemoError(f"durable tier holds committed steps {durable}, expected {want}")
    memory = committed_steps(memory_dir)
    if not memory or memory[-1] != STEPS:
        raise DemoError(f"memory tier holds committed steps {memory}, expected {STEPS} newest")
    print(
        "OK: resumed run and uninterrupted reference end bit-exact on every rank (sha256 "
        + ", ".join(f"r{r}={d[:12]}…" for r, d in sorted(by_rank.items()))
        + ")"
    )
    print(f"    tiers at exit: memory holds steps {memory}, durable holds steps {durable}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--verbose", action="store_true", help="show every line, with tierckpt INFO logs"
    )
    args = p.parse_args()
    t0 = time.perf_counter()
    namespace = time.strftime("demo-%Y%m%d-%H%M%S-") + str(os.getpid())
    memory_root = Path(f"/dev/shm/tierckpt-demo-{os.getpid()}")
    durable_root = Path("checkpoints").resolve()
    work_dir = Path(tempfile.mkdtemp(prefix="tierckpt-demo-"))
    common = ["--work-dir", str(work_dir), "--steps", str(STEPS)]
    common += ["--verbose"] if args.verbose else []
    print(
        f"tierckpt demo: {NPROC} ranks (torchrun, FSDP2 on gloo, CPU), {STEPS} steps, a "
        "CheckpointManager saving "
        f"every step to memory (async), every {DURABLE_EVERY}th also to durable;\n"
        f"rank 1 is SIGKILLed at step {CRASH_AT} of the first attempt.\n"
        f"  memory tier : {memory_root}\n"
        f"  durable tier: {durable_root / namespace}"
    )
    crashed_run: list[str] = []
    try:
        crashed_run = torchrun(
            [
                *common,
                "--namespace",
                namespace,
                "--memory-root",
                str(memory_root),
                "--durable-every",
                str(DURABLE_EVERY),
                "--crash-at",
                str(CRASH_AT),
            ],
            verbose=args.verbose,
            timeout=75,
            show=True,
        )
        crashed = results(work_dir)
        for f in work_dir.glob("result-*.json"):
            f.unlink()
        print("reference run: same training, no crash, no checkpoints …")
        torchrun(
            [*common, "--namespace", "reference", "--no-checkpoint"],
            verbose=args.verbose,
            timeout=45,
            show=False,
        )
        try:
            check(crashed, results(work_dir), durable_root / namespace, memory_root / namespace)
        except DemoError:
            dump(crashed_run, args.verbose)  # what the crashed run's workers said
            raise
    except DemoError as e:
        print(f"DEMO FAILED: {e}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(memory_root, ignore_errors=True)
        shutil.rmtree(work_dir, ignore_errors=True)
    print(
        f"demo passed in {time.perf_counter() - t0:.1f} s; durable copies kept in "
        f"{os.path.relpath(durable_root / namespace)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
