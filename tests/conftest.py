"""Shared fixtures: the bundled sample shards, tiny-preset configs, a tiny trained run. CPU only,
offline; everything is written under pytest's temporary directories. Tests under tests/integration/
(real launchers, several ranks, kills, SLURM fakes) get the `integration` marker, so
`pytest -m "not integration"` is the fast loop; tests/gpu/ is the CUDA tier (marked `gpu`, skipped
without a GPU)."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
if os.environ.get("RSMOE_TEST_GPU") != "1":
    # Every test but the CUDA tier (tests/gpu, run with RSMOE_TEST_GPU=1 by bench/gpu_check.sh) runs on
    # the CPU, also on a machine with GPUs: their assertions are fp32 and gloo.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import pytest  # noqa: E402

from tests.helpers import REPO, free_port, train_tiny_runs  # noqa: E402

INTEGRATION = Path(__file__).parent / "integration"


def pytest_collection_modifyitems(config, items):
    for item in items:
        if INTEGRATION in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def sample_shards(tmp_path_factory) -> dict:
    from rsmoe.data.sample import build_sample_shards

    out = tmp_path_factory.mktemp("sample_shards")
    build_sample_shards(out)
    return {"train": str(out / "train-*.tar"), "val": str(out / "val-*.tar"), "test": str(out / "test-*.tar"),
            "dir": str(out)}


@pytest.fixture
def tiny_overrides(sample_shards, tmp_path) -> list[str]:
    """Dotted overrides that point the tiny preset at the sample shards and a temp run dir."""
    return [
        f"data.train_shards={sample_shards['train']}",
        f"data.val_shards={sample_shards['val']}",
        f"run_dir={tmp_path / 'stage1'}",
        f"deepspeed_config={os.path.join(REPO, 'ds_configs', 'zero2.json')}",
    ]


@pytest.fixture(scope="session")
def tiny_runs(sample_shards, tmp_path_factory) -> dict[str, Path]:
    """A tiny Stage I + Stage II run, trained once per session: {"stage1": run dir, "stage2": run dir}."""
    return train_tiny_runs(tmp_path_factory.mktemp("tiny_runs"), sample_shards)


@pytest.fixture
def dist_env(monkeypatch):
    """A fresh single-process world on a free port for in-process training runs."""
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    yield
    from rsmoe.distributed.env import shutdown_distributed

    shutdown_distributed()
