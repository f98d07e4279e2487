"""The per-job secret that authenticates every peer connection."""

from __future__ import annotations

import os
import secrets
import string
import threading
from typing import Any

from ..errors import PeerError

__all__ = ["ENV_SECRET", "STORE_KEY", "job_secret"]

ENV_SECRET = "TIERCKPT_PEER_SECRET"
"""Environment variable with the job's secret (hex, or any other text taken as UTF-8)."""
STORE_KEY = "tierckpt/peer-secret"
"""Rendezvous-store key under which the ranks agree on a random secret."""

_lock = threading.Lock()
_cache: dict[int, tuple[Any, bytes]] = {}
"""id(store) -> (store, secret); the store is kept so that its id is never reused."""


def job_secret(store: Any | None = None) -> bytes:
    """The job's peer secret, the same on every rank.

    ``$TIERCKPT_PEER_SECRET`` when set (hex digits are decoded, other text is taken as UTF-8
    bytes); else a random 32-byte secret agreed through the rendezvous ``store`` (default:
    torch.distributed's default store) with ``compare_set``, so every rank gets the one the
    first rank set. Cached per store. Raises :class:`~tierckpt.errors.PeerError` when there
    is neither the variable nor a store.
    """
    env = os.environ.get(ENV_SECRET)
    if env:
        return _decode(env)
    if store is None:
        store = _default_store()
    with _lock:
        hit = _cache.get(id(store))
        if hit is not None and hit[0] is store:
            return hit[1]
        mine = secrets.token_hex(32)
        try:
            agreed = store.compare_set(STORE_KEY, "", mine)
        except Exception as e:  # a store that is gone or has no compare_set
            raise PeerError(
                f"Could not agree on the peer secret through the rendezvous store ({e}); set "
                f"{ENV_SECRET} to the same value on every rank."
            ) from e
        text = agreed.decode() if isinstance(agreed, bytes) else str(agreed)
        secret = bytes.fromhex(text)
        _cache[id(store)] = (store, secret)
        return secret


def _decode(value: str) -> bytes:
    if len(value) % 2 == 0 and all(c in string.hexdigits for c in value):
        return bytes.fromhex(value)
    return value.encode()


def _default_store() -> Any:
    try:
        from torch.distributed import distributed_c10d as c10d

        return c10d._get_default_store()
    except Exception as e:  # no process group: _get_default_store raises ValueError
        raise PeerError(
            "No peer secret: torch.distributed is not initialised (no rendezvous store to agree "
            f"on one) and {ENV_SECRET} is not set. Call init_process_group first, or set "
            f"{ENV_SECRET} to the same value on every rank."
        ) from e
