"""A warm spare worker: torch and tierckpt imported, waiting to become a replaced rank.

The launcher keeps one per node. Told (one JSON line on stdin: the environment and argv),
it becomes the worker and runs the script as ``__main__``; a replacement so starts in
milliseconds instead of paying for a Python and torch start-up after the failure.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
import time

import torch
import torch.distributed
import torch.distributed.checkpoint

import tierckpt
import tierckpt.recovery  # noqa: F401


def _warm() -> None:
    """Run once what a training script's start-up imports lazily (an optimizer's
    constructor imports torch's compiler stack, ~1 s)."""
    p = torch.nn.Parameter(torch.zeros(4))
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    torch.nn.functional.mse_loss(p * 2, torch.ones(4)).backward()
    opt.step()


def main() -> None:
    _warm()
    ready = time.time()
    line = sys.stdin.readline()
    if not line:
        return  # the launcher is done with this spare
    order = json.loads(line)
    os.environ.clear()
    os.environ.update(order["env"])
    os.environ["TIERCKPT_SPARE_READY_AT"] = repr(ready)
    sys.argv = order["argv"]
    sys.path.insert(0, os.path.dirname(os.path.abspath(order["argv"][0])))
    runpy.run_path(order["argv"][0], run_name="__main__")


if __name__ == "__main__":
    main()
