"""Copying a state dict once into a staging buffer (DCP's ``AsyncStager`` seam)."""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed._state_dict_utils import _iterate_state_dict
from torch.distributed.tensor import DTensor

from ..staging import StagingBuffer, align, tensor_bytes

__all__ = ["stage_into", "staged_size"]


def _local_tensors(state_dict: dict[str, Any]) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []

    def on_tensor(obj: torch.Tensor, *_: Any) -> torch.Tensor:
        found.append(obj)
        return obj

    def on_dtensor(obj: DTensor, *_: Any) -> DTensor:
        found.append(obj._local_tensor)
        return obj

    def on_sharded(obj: Any, *_: Any) -> Any:
        found.extend(s.tensor for s in obj.local_shards())
        return obj

    _iterate_state_dict(state_dict, on_sharded, on_dtensor, on_tensor, type_check=False)
    return found


def staged_size(state_dict: dict[str, Any]) -> int:
    """Bytes a staging buffer needs for every local tensor of ``state_dict``."""
    return sum(align(tensor_bytes(t)) for t in _local_tensors(state_dict))


def stage_into(state_dict: dict[str, Any], buffer: StagingBuffer) -> dict[str, Any]:
    """A copy of ``state_dict`` whose tensors live in ``buffer`` (one copy each).

    Non-tensor values are kept by reference, as DCP's default stager does.
    """

    def on_tensor(obj: torch.Tensor, *_: Any) -> torch.Tensor:
        return buffer.place(obj.detach())

    def on_dtensor(obj: DTensor, *_: Any) -> DTensor:
        local = buffer.place(obj._local_tensor.detach())
        return DTensor.from_local(
            local,
            obj.device_mesh,
            obj.placements,
            run_check=False,
            shape=obj.shape,
            stride=obj.stride(),
        )

    def on_sharded(obj: Any, *_: Any) -> Any:
        import copy

        ret = copy.copy(obj)
        shards = []
        for shard in obj.local_shards():
            new = copy.copy(shard)
            new.tensor = buffer.place(shard.tensor.detach())
            shards.append(new)
        ret._local_shards = shards
        return ret

    if not any(t.is_cuda for t in _local_tensors(state_dict)):
        return _iterate_state_dict(state_dict, on_sharded, on_dtensor, on_tensor, type_check=False)
    # GPU tensors: pinned buffer, copies queued on a side stream, one sync at the end.
    buffer.pin()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        out = _iterate_state_dict(state_dict, on_sharded, on_dtensor, on_tensor, type_check=False)
    stream.synchronize()
    return out
