"""Run by tests/test_lightning.py: a 2-process DDP Lightning job saving through tierckpt.

Lightning's DDP launcher re-runs this script for rank 1. Phase A trains one epoch (6 steps)
and checkpoints at its end (Lightning resumes mid-epoch checkpoints inexactly by design); phase B resumes from the step-6 pointer and trains to step 12;
phase C trains 12 steps from scratch. Rank 0 prints RESULT lines.
"""

from __future__ import annotations

import json
import sys
import warnings

import lightning as L
import torch

import tierckpt
from tierckpt.integrations.lightning import TierckptCheckpointIO

warnings.filterwarnings("ignore")


class Net(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1)
        )

    def training_step(self, batch: list[torch.Tensor], _: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> object:
        opt = torch.optim.AdamW(self.parameters(), lr=1e-2)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
        return [opt], [{"scheduler": sched, "interval": "step"}]


def data() -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(1)
    ds = torch.utils.data.TensorDataset(
        torch.randn(48, 8, generator=g), torch.randn(48, 1, generator=g)
    )
    return torch.utils.data.DataLoader(ds, batch_size=4)  # 6 batches per rank and epoch


def flat(net: Net) -> dict[str, object]:
    """Parameters, optimizer and scheduler state of a trained module, comparable with ==."""
    opt = net.trainer.optimizers[0]
    sched = net.trainer.lr_scheduler_configs[0].scheduler
    out: dict[str, object] = {f"p.{n}": p.detach().clone() for n, p in net.named_parameters()}
    for pid, st in opt.state_dict()["state"].items():
        out |= {f"o.{pid}.{k}": v.clone() for k, v in st.items()}
    out["sched"] = sched.state_dict()["last_epoch"]
    out["step"] = net.trainer.global_step
    return out


class Capture(L.Callback):
    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.start = flat(module)  # type: ignore[arg-type]


def same(a: dict[str, object], b: dict[str, object]) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(v, b[k]) if isinstance(v, torch.Tensor) else v == b[k]  # type: ignore[arg-type]
        for k, v in a.items()
    )


def trainer(
    io: TierckptCheckpointIO | None, steps: int, ckpt_dir: str | None, *extra: L.Callback
) -> L.Trainer:
    callbacks: list[L.Callback] = list(extra)
    if ckpt_dir:
        callbacks.append(
            L.pytorch.callbacks.ModelCheckpoint(
                dirpath=ckpt_dir, save_top_k=-1, save_last=True, save_on_train_epoch_end=True
            )
        )
    return L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=steps,
        plugins=[io] if io is not None else [],
        callbacks=callbacks,
        enable_checkpointing=bool(ckpt_dir),
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def main() -> None:
    namespace, memory_root, durable, ckpt_dir = sys.argv[1:5]
    cfg = tierckpt.CheckpointConfig(
        namespace=namespace, world_size=2, memory_root=memory_root, durable_base_path=durable
    )
    io = TierckptCheckpointIO(cfg, durable_every_steps=6) if len(sys.argv) < 6 else None
    a = trainer(io, 6, ckpt_dir)
    first = Net()
    a.fit(first, data())
    end_of_a = flat(first)
    capture = Capture()
    b = trainer(io, 12, None, capture)
    b.fit(Net(), data(), ckpt_path=f"{ckpt_dir}/epoch=0-step=6.ckpt")
    ok = same(end_of_a, capture.start) and end_of_a["step"] == 6
    oks = [None] * b.world_size
    torch.distributed.all_gather_object(oks, ok)
    if b.global_rank == 0:
        print("RESULT " + json.dumps({"bit_exact": oks, "global_step": b.global_step}), flush=True)


if __name__ == "__main__":
    main()
