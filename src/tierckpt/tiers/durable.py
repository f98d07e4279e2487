"""Opening the durable tier named by a config's URL."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import Tier
from .directory import DirectoryTier

if TYPE_CHECKING:
    from ..config import CheckpointConfig

__all__ = ["open_durable_tier"]


def open_durable_tier(config: CheckpointConfig, *, check: bool = True, create: bool = True) -> Tier:
    """The durable tier of ``config``; with ``check``, fail now if it is unreachable.

    ``create=False`` (readers, read-only commands) creates nothing: a missing ``file://``
    directory is an empty tier.
    """
    from ..config import log_default_durable

    log_default_durable(config)
    url = config.durable_base_path or ""
    if url.startswith("s3://"):
        from .s3 import S3Tier

        s3 = S3Tier.from_config(config)
        if check:
            s3.check_available()
        return s3
    tier = DirectoryTier(url[len("file://") :], name="durable")
    if check:
        tier.check_available(create=create)
    return tier
