"""Shared fixtures: the bundled sample shards and tiny-preset configs. CPU only, offline."""

from __future__ import annotations

import os
import socket

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def sample_shards() -> dict:
    from rsmoe.data.sample import build_sample_shards

    out = os.path.join(REPO, "data", "shards", "sample")
    build_sample_shards(out)
    return {"train": os.path.join(out, "train-*.tar"), "val": os.path.join(out, "val-*.tar")}


@pytest.fixture
def tiny_overrides(sample_shards, tmp_path) -> list[str]:
    """Dotted overrides that point the tiny preset at the sample shards and a temp run dir."""
    return [
        f"data.train_shards={sample_shards['train']}",
        f"data.val_shards={sample_shards['val']}",
        f"run_dir={tmp_path / 'stage1'}",
        f"deepspeed_config={os.path.join(REPO, 'ds_configs', 'zero2.json')}",
    ]


@pytest.fixture
def dist_env(monkeypatch):
    """A fresh single-process world on a free port for in-process training runs."""
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    yield
    from rsmoe.distributed.env import shutdown_distributed

    shutdown_distributed()
