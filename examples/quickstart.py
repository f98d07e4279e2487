"""The README's quick start as a complete script: save every step, drain every 5th, reload.

    python examples/quickstart.py                    # one CPU process
    torchrun --nproc-per-node 2 examples/quickstart.py

Checkpoints go to the memory tier (``$TIERCKPT_MEMORY_ROOT`` or ``/dev/shm/tierckpt-<uid>``)
and every 5th step also to ``./checkpoints`` (``--durable`` to change it). Run
``tierckpt clear-memory -n quickstart`` afterwards to free the memory tier.
"""

from __future__ import annotations

import argparse
import os
import socket

import torch
import torch.distributed as dist

import tierckpt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--durable", default="checkpoints", help="directory or s3://bucket/prefix")
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args()
    if "RANK" not in os.environ:  # plain `python`: a one-process group on a free port
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = str(s.getsockname()[1])
        os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 4)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
    cfg = tierckpt.CheckpointConfig(
        namespace="quickstart",
        world_size=dist.get_world_size(),
        durable_base_path=args.durable,
    )

    def state() -> dict[str, object]:
        return {"model": model.state_dict(), "optim": optim.state_dict()}

    for step in range(1, args.steps + 1):
        loss = model(torch.randn(8, 16)).square().mean()
        optim.zero_grad()
        loss.backward()
        optim.step()
        tierckpt.save(state(), config=cfg, step=step, save_to_durable=(step % 5 == 0))
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    tierckpt.wait_for_drains(timeout=60)  # the durable copies are written

    torch.nn.init.zeros_(model.weight)  # lose the state, then restore the newest step
    target = state()
    step = tierckpt.load(target, config=cfg)
    model.load_state_dict(target["model"])  # type: ignore[arg-type]
    assert step == args.steps, step
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    if dist.get_rank() == 0:
        print(f"restored step {step} bit-exact")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
