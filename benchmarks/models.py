"""Llama-shaped models, scaled to fit this machine, sharded with FSDP2 on CPU gloo.

The 7b shape is seed 002's ``llama_model_config`` ("L7b": hidden 4096, intermediate 11008,
32 layers, 32 heads, vocab 50432). ``--scale s`` multiplies the number of layers and every
width (hidden, intermediate, vocab) by ``s``, so a scaled model keeps the mix of tensor
sizes of the real one; by default ``s`` is chosen so that model + AdamW state (fp32 params,
exp_avg, exp_avg_sq) is about ``--state-gib`` in total over all ranks.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

__all__ = ["SHAPES", "LlamaShape", "build_model", "pick_scale", "sharded_training_state"]

FP32 = 4


@dataclass(frozen=True)
class LlamaShape:
    """Dimensions of a Llama-style decoder."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def scaled(self, s: float) -> LlamaShape:
        """Layers and widths times ``s``; widths stay multiples of the head count and 8."""
        if s == 1.0:
            return self
        step = self.heads * 8 // _gcd(self.heads, 8)
        hidden = max(step, round(self.hidden * s / step) * step)
        return dataclasses.replace(
            self,
            name=f"{self.name}@{s:.3g}",
            hidden=hidden,
            intermediate=max(8, round(self.intermediate * s / 8) * 8),
            layers=max(1, round(self.layers * s)),
            vocab=max(64, round(self.vocab * s / 8) * 8),
        )

    def param_count(self) -> int:
        h, i, kv = self.hidden, self.intermediate, self.kv_heads * self.head_dim
        per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
        return 2 * self.vocab * h + h + self.layers * per_layer

    def tensor_count(self) -> int:
        return 3 + 9 * self.layers

    def state_bytes(self) -> int:
        """Params + AdamW exp_avg + exp_avg_sq (fp32), plus one step scalar per tensor."""
        return 3 * FP32 * self.param_count() + FP32 * self.tensor_count()


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


SHAPES = {
    # ~7M params: smoke runs.
    "tiny": LlamaShape("tiny", 256, 688, 4, 4, 4, 8192),
    # ~160M params: GPT-2-medium-like widths, the seed's vocab.
    "small": LlamaShape("small", 768, 2048, 12, 12, 12, 50432),
    # Llama-3.2-1B-like widths (GQA, 8 kv heads), the seed's vocab.
    "1b": LlamaShape("1b", 2048, 8192, 16, 32, 8, 50432),
    # Seed 002's L7b.
    "7b": LlamaShape("7b", 4096, 11008, 32, 32, 32, 50432),
}


def pick_scale(shape: LlamaShape, target_bytes: int) -> float:
    """The largest scale <= 1 whose state fits in ``target_bytes`` (bisection)."""
    if shape.state_bytes() <= target_bytes:
        return 1.0
    lo, hi = 1e-4, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if shape.scaled(mid).state_bytes() <= target_bytes:
            lo = mid
        else:
            hi = mid
    return lo


class _Attention(nn.Module):
    def __init__(self, s: LlamaShape) -> None:
        super().__init__()
        kv = s.kv_heads * s.head_dim
        self.heads, self.kv_heads, self.head_dim = s.heads, s.kv_heads, s.head_dim
        self.q_proj = nn.Linear(s.hidden, s.hidden, bias=False)
        self.k_proj = nn.Linear(s.hidden, kv, bias=False)
        self.v_proj = nn.Linear(s.hidden, kv, bias=False)
        self.o_proj = nn.Linear(s.hidden, s.hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        if self.kv_heads != self.heads:
            rep = self.heads // self.kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class _Block(nn.Module):
    def __init__(self, s: LlamaShape) -> None:
        super().__init__()
        self.input_layernorm = nn.RMSNorm(s.hidden)
        self.self_attn = _Attention(s)
        self.post_attention_layernorm = nn.RMSNorm(s.hidden)
        self.gate_proj = nn.Linear(s.hidden, s.intermediate, bias=False)
        self.up_proj = nn.Linear(s.hidden, s.intermediate, bias=False)
        self.down_proj = nn.Linear(s.intermediate, s.hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x))
        h = self.post_attention_layernorm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class LlamaLike(nn.Module):
    """Decoder with Llama's parameter tensors (no rotary embedding: it has no parameters)."""

    def __init__(self, s: LlamaShape) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(s.vocab, s.hidden)
        self.layers = nn.ModuleList(_Block(s) for _ in range(s.layers))
        self.norm = nn.RMSNorm(s.hidden)
        self.lm_head = nn.Linear(s.hidden, s.vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


def build_model(shape: LlamaShape, sharding: str) -> nn.Module:
    """The model on CPU, sharded over every rank: ``fsdp2`` (fully_shard) or ``dtensor``.

    Built on the meta device first, so no rank ever holds the whole model.
    """
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    with torch.device("meta"):
        model = LlamaLike(shape)
    if sharding == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    elif sharding == "dtensor":
        from torch.distributed.tensor import Shard, distribute_tensor

        for mod in model.modules():
            for name, p in list(mod.named_parameters(recurse=False)):
                dt = distribute_tensor(p.data, mesh, [Shard(0)])
                mod.register_parameter(name, nn.Parameter(dt))
    else:
        raise ValueError(f"sharding={sharding!r}: choose fsdp2 or dtensor")
    model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(1234 + dist.get_rank())
    with torch.no_grad():
        for p in model.parameters():
            _local(p).uniform_(-0.02, 0.02, generator=gen)
    return model


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def sharded_training_state(
    shape: LlamaShape, sharding: str
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A sharded model and an AdamW whose state exists and holds non-zero values.

    One optimizer step with zero gradients creates exp_avg / exp_avg_sq; they are then
    filled with random values so no page is the shared zero page.
    """
    model = build_model(shape, sharding)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    gen = torch.Generator().manual_seed(99 + dist.get_rank())
    with torch.no_grad():
        for state in opt.state.values():
            for key in ("exp_avg", "exp_avg_sq"):
                _local(state[key]).uniform_(0.0, 1e-3, generator=gen)
    return model, opt
