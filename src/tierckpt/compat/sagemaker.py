"""The SageMaker tiered-checkpointing client API (seed 000), backed by tierckpt.

Switch by changing imports::

    # from amzn_sagemaker_checkpointing.config.sagemaker_checkpoint_config import SageMakerCheckpointConfig
    # from amzn_sagemaker_checkpointing.checkpointing.filesystem.filesystem import (
    #     SageMakerTieredStorageWriter, SageMakerTieredStorageReader)
    from tierckpt.compat.sagemaker import (
        SageMakerCheckpointConfig, SageMakerTieredStorageReader, SageMakerTieredStorageWriter)

Differences that only widen what works: without ``s3_tier_base_path`` the durable tier is
the local ``./checkpoints`` directory, and S3 uploads run in the background instead of
inside the save future.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from .. import layout
from ..config import CheckpointConfig
from ..dcp.reader import TieredStorageReader
from ..dcp.writer import TieredStorageWriter
from ..errors import ConfigError

__all__ = [
    "SageMakerCheckpointConfig",
    "SageMakerTieredStorageReader",
    "SageMakerTieredStorageWriter",
]


class SageMakerCheckpointConfig(CheckpointConfig):
    """``SageMakerCheckpointConfig(namespace, world_size, s3_tier_base_path=None, save_to_s3=False, logger=None)``.

    ``save_to_s3`` stays mutable, as in the seed: set it before building each writer.
    Any :class:`tierckpt.CheckpointConfig` option may be passed as a keyword too.
    """

    def __init__(
        self,
        namespace: str,
        world_size: int,
        s3_tier_base_path: str | None = None,
        save_to_s3: bool = False,
        logger: logging.Logger | None = None,
        **options: Any,
    ) -> None:
        if s3_tier_base_path is not None and not str(s3_tier_base_path).startswith("s3://"):
            raise ConfigError(
                f"Invalid S3 tier base path {s3_tier_base_path!r}: it must start with s3://, "
                "e.g. s3://my-bucket/checkpoints."
            )
        super().__init__(
            namespace=namespace,
            world_size=world_size,
            logger=logger,
            s3_tier_base_path=s3_tier_base_path,
            save_to_s3=save_to_s3,
            **options,
        )

    @property
    def save_to_s3(self) -> bool:
        """Whether the next writer built from this config also saves to S3."""
        return self.save_to_durable

    @save_to_s3.setter
    def save_to_s3(self, value: bool) -> None:
        self.save_to_durable = bool(value)

    @property
    def s3_tier_base_path(self) -> str | None:
        """The ``s3://`` durable location, or None when the durable tier is local."""
        url = self.durable_base_path or ""
        return url if url.startswith("s3://") else None


class SageMakerTieredStorageWriter(TieredStorageWriter):
    """``SageMakerTieredStorageWriter(checkpoint_config, path=None, step=None)``.

    The step comes from ``step``, else from ``step_<N>`` in ``path``; with neither, the
    seed's "Invalid step value" (:class:`InvalidStepError`) is raised here, as the seed does.
    ``checkpoint_config.save_to_s3`` is read when the writer is built.
    """

    def __init__(
        self,
        checkpoint_config: CheckpointConfig,
        path: str | os.PathLike[str] | None = None,
        step: int | None = None,
        **kwargs: Any,
    ) -> None:
        if step is None and layout.step_from_path(path) is None:
            raise layout.no_step_error(path)
        super().__init__(checkpoint_config, step=step, path=path, **kwargs)


class SageMakerTieredStorageReader(TieredStorageReader):
    """``SageMakerTieredStorageReader(checkpoint_config, step=None)`` (``config=`` also accepted)."""

    def __init__(
        self,
        checkpoint_config: CheckpointConfig | None = None,
        step: int | None = None,
        *,
        config: CheckpointConfig | None = None,
        **kwargs: Any,
    ) -> None:
        cfg = checkpoint_config if checkpoint_config is not None else config
        if cfg is None:
            raise ConfigError(
                "SageMakerTieredStorageReader needs checkpoint_config=<SageMakerCheckpointConfig>."
            )
        # As in the seed, nothing is looked up until dcp.load: its Quick Start builds the
        # reader outside the try block that handles a missing checkpoint.
        kwargs.setdefault("resolve_now", False)
        super().__init__(cfg, step=step, **kwargs)
