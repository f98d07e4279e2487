"""Page-locking host memory for asynchronous GPU-to-host copies (CUDA only).

A staging buffer is a mapping of a tmpfs file; registering it with ``cudaHostRegister``
lets the copy engine write into it directly, asynchronously, at full link speed. The
registration is made once per mapping (the mapping cache keeps it across saves) and undone
before the mapping is unmapped. Where registration fails (a host or runtime that refuses
to lock file pages), copies still work, synchronously through the driver's own bounce
buffers, and one WARNING says so.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time

import torch

__all__ = ["register", "unregister"]

_log = logging.getLogger("tierckpt")
_warned = threading.Event()
_PORTABLE = 1
"""cudaHostRegisterPortable: pinned for every CUDA context, whichever thread locked it."""


def register(base: int, nbytes: int) -> bool:
    """Page-lock ``nbytes`` at address ``base``; True when done (False: copies stay
    synchronous). The first failure is logged as a WARNING with CUDA's error."""
    t0 = time.perf_counter()
    code = int(torch.cuda.cudart().cudaHostRegister(base, nbytes, _PORTABLE))
    if code == 0:
        _log.debug(
            "tierckpt: page-locked a %d-byte staging mapping for GPU copies in %.3f s",
            nbytes,
            time.perf_counter() - t0,
        )
        return True
    _clear_last_error()
    if not _warned.is_set():
        _warned.set()
        _log.warning(
            "tierckpt: cudaHostRegister of a memory-tier staging buffer failed (CUDA error %d: "
            "%s); GPU tensors are copied synchronously through pageable memory, which is "
            "slower. Check the locked-memory limit (ulimit -l) and that the memory root is a "
            "tmpfs.",
            code,
            _error_string(code),
        )
    return False


def unregister(base: int) -> None:
    """Undo :func:`register` (before the memory is unmapped)."""
    if int(torch.cuda.cudart().cudaHostUnregister(base)) != 0:
        _clear_last_error()


def _error_string(code: int) -> str:
    try:
        return str(torch.cuda.cudart().cudaGetErrorString(code))
    except Exception:  # the binding takes the runtime's enum on some versions
        return "see cudaError_t"


def _clear_last_error() -> None:
    """Reset the CUDA runtime's last error, so a later kernel launch check in PyTorch does
    not report this handled failure as its own (best effort: the runtime PyTorch loaded)."""
    for name in _loaded_cudart():
        try:
            ctypes.CDLL(name).cudaGetLastError()
        except (OSError, AttributeError):
            continue
        return


def _loaded_cudart() -> list[str]:
    """Paths of the CUDA runtime libraries this process has loaded."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libcudart" in line}
    except OSError:
        return []
    return sorted(p for p in paths if p.startswith("/"))
