"""CheckpointConfig validation, the error hierarchy, and how a writer finds its step."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed.checkpoint as dcp

import tierckpt
from distworkers import describe_error
from tierckpt import (
    CheckpointConfig,
    CheckpointNotFoundError,
    ConfigError,
    IntegrityError,
    InvalidStepError,
    MemoryBudgetError,
    TierckptError,
    TieredStorageWriter,
    TierFullError,
)


def make(**kw):
    kw.setdefault("namespace", "run-1")
    kw.setdefault("world_size", 2)
    kw.setdefault("memory_root", "/dev/shm/tierckpt-test-config-unused")
    return CheckpointConfig(**kw)


# --------------------------------------------------------------------------- errors


def test_every_error_is_rooted_at_tierckpt_error_and_exception():
    for cls in (ConfigError, InvalidStepError, CheckpointNotFoundError, IntegrityError):
        assert issubclass(cls, TierckptError)
    assert issubclass(TierckptError, Exception)
    assert issubclass(ConfigError, ValueError)
    assert issubclass(InvalidStepError, ConfigError)
    assert issubclass(CheckpointNotFoundError, FileNotFoundError)
    assert issubclass(MemoryBudgetError, TierFullError)
    assert issubclass(TierFullError, TierckptError)


def test_public_names_are_importable_from_the_package():
    for name in ("CheckpointConfig", "TieredStorageWriter", "TieredStorageReader"):
        assert name in tierckpt.__all__
        assert hasattr(tierckpt, name)


# --------------------------------------------------------------------------- namespace / world size


@pytest.mark.parametrize("namespace", ["", "a/b", "a b", "../up", "run.1", "run:1"])
def test_namespace_that_is_empty_or_has_other_characters_is_rejected(namespace):
    with pytest.raises(ConfigError) as info:
        make(namespace=namespace)
    assert "namespace" in str(info.value).lower()


def test_namespace_of_letters_digits_hyphens_and_underscores_is_accepted():
    assert make(namespace="Run-7_b").namespace == "Run-7_b"


@pytest.mark.parametrize("world_size", [0, -1])
def test_world_size_must_be_positive(world_size):
    with pytest.raises(ConfigError, match="world_size"):
        make(world_size=world_size)


# --------------------------------------------------------------------------- durable url


def test_unknown_durable_scheme_is_rejected_naming_the_accepted_schemes():
    with pytest.raises(ConfigError) as info:
        make(durable_base_path="gs://bucket/prefix")
    msg = str(info.value)
    assert "gs://" in msg
    assert "file://" in msg
    assert "s3://" in msg


def test_file_url_is_kept_absolute_and_s3_url_is_accepted(tmp_path):
    assert make(durable_base_path=f"file://{tmp_path}").durable_base_path == f"file://{tmp_path}"
    assert make(durable_base_path="s3://bucket/pre").durable_base_path == "s3://bucket/pre"


def test_durable_default_is_checkpoints_under_the_working_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert make().durable_base_path == f"file://{tmp_path}/checkpoints"


def test_seed_aliases_s3_tier_base_path_and_save_to_s3_are_accepted():
    cfg = make(s3_tier_base_path="s3://bucket/ckpt", save_to_s3=True)
    assert cfg.durable_base_path == "s3://bucket/ckpt"
    assert cfg.save_to_durable is True
    assert make(save_to_s3=False).save_to_durable is False


# --------------------------------------------------------------------------- memory root / budget


def test_memory_root_defaults_to_dev_shm_tierckpt_of_this_user(monkeypatch):
    monkeypatch.delenv("TIERCKPT_MEMORY_ROOT", raising=False)
    cfg = CheckpointConfig(namespace="run-1", world_size=1)
    assert cfg.memory_root == f"/dev/shm/tierckpt-{os.geteuid()}"


def test_tierckpt_memory_root_env_overrides_the_default(monkeypatch, tmp_path):
    monkeypatch.setenv("TIERCKPT_MEMORY_ROOT", str(tmp_path / "mem"))
    cfg = CheckpointConfig(namespace="run-1", world_size=1)
    assert cfg.memory_root == str(tmp_path / "mem")


@pytest.mark.parametrize("budget", ["10%", "19%", "101%", "abc", 0, -5])
def test_memory_budget_outside_20_to_100_percent_or_not_a_size_is_rejected(budget):
    with pytest.raises(ConfigError, match="memory_budget"):
        make(memory_budget=budget)


def test_memory_budget_as_share_of_host_ram_is_accepted():
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    cfg = make(memory_budget="40%")
    assert cfg.memory_budget_bytes == pytest.approx(0.4 * ram, rel=1e-6)
    assert make(memory_budget="20%").memory_budget_bytes == pytest.approx(0.2 * ram, rel=1e-6)
    assert make(memory_budget="100%").memory_budget_bytes == pytest.approx(ram, rel=1e-6)


def test_memory_budget_in_bytes_is_accepted():
    assert make(memory_budget=123_456).memory_budget_bytes == 123_456


# --------------------------------------------------------------------------- writer step


@pytest.fixture
def cfg(config_factory):
    return config_factory(world_size=1)


def test_writer_takes_its_step_from_step(cfg):
    assert TieredStorageWriter(cfg, step=5).step == 5


@pytest.mark.parametrize(
    ("path", "step"), [("step_7/x", 7), ("/ckpt/step_12", 12), ("a/step_0/b", 0)]
)
def test_writer_takes_its_step_from_step_n_in_path(cfg, path, step):
    assert TieredStorageWriter(cfg, path=path).step == step


@pytest.mark.parametrize("step", [-1, 1.5, "5", True])
def test_writer_rejects_a_step_that_is_not_a_non_negative_int(cfg, step):
    with pytest.raises(InvalidStepError, match="Invalid step value"):
        TieredStorageWriter(cfg, step=step)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_dcp_save_takes_the_step_from_checkpoint_id(cfg):
    w = TieredStorageWriter(cfg)
    dcp.save({"x": torch.arange(4)}, checkpoint_id="runs/step_9", storage_writer=w)
    assert w.step == 9
    assert os.path.exists(os.path.join(cfg.memory_root, "run-1", "step_9", "COMMIT"))


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
@pytest.mark.parametrize("checkpoint_id", [None, "runs/latest", "step_x"])
def test_dcp_save_without_any_step_fails_with_invalid_step_value(cfg, checkpoint_id):
    # DCP wraps errors raised inside dcp.save in its CheckpointException (a BaseException).
    with pytest.raises(BaseException) as info:
        w = TieredStorageWriter(cfg, path="no-step-here")
        dcp.save({"x": torch.arange(4)}, checkpoint_id=checkpoint_id, storage_writer=w)
    errors = describe_error(info.value)
    assert any("InvalidStepError" in e["types"] for e in errors), errors
    assert all("Invalid step value" in e["message"] for e in errors), errors
    assert not os.path.exists(os.path.join(cfg.memory_root, "run-1"))
