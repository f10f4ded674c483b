"""Resume on another number of ranks: 2 -> 1 (ZeRO-2 and ZeRO-3) and 1 -> 2 (ZeRO-3).

One 2-rank launch (tests/helpers/reshape_worker.py) writes, per ZeRO stage, an uninterrupted 6-step run, the
same run stopped at step 3, and the state DeepSpeed's ordinary same-size load restores from it. Here,
on one rank, the reshaped load must restore exactly that state (weights, both Adam moments, step, LR),
and the resumed run must finish with losses close to the uninterrupted 2-rank run's (they differ only
through which samples each rank draws). ~85 s on 2 cores: one launch does all 2-rank work.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rsmoe.config import load_config
from rsmoe.distributed.env import shutdown_distributed
from tests.helpers import REPO, free_port
from tests.helpers.reshape_worker import common, load_and_dump


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss/total"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def _in_process(fn, *a):
    os.environ["MASTER_PORT"] = str(free_port())
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        os.environ.pop(k, None)
    try:
        return fn(*a)
    finally:
        shutdown_distributed()


def _assert_same_state(got: dict, want: dict, what: str) -> None:
    assert got["params"].keys() == want["params"].keys(), what
    for name, tensors in want["params"].items():
        for kind, t in tensors.items():
            assert torch.equal(got["params"][name][kind], t), f"{what}: {name} {kind} differs after reshaping"
    assert got["steps"] == want["steps"] == [3], (what, got["steps"], want["steps"])
    assert got["lr"] == want["lr"] and got["sched_epoch"] == want["sched_epoch"], what


@pytest.fixture(scope="module")
def two_rank(tmp_path_factory, sample_shards) -> dict:
    from rsmoe.training.loop import train

    root = tmp_path_factory.mktemp("reshape")
    # The 1 -> 2 direction: a 1-rank ZeRO-3 run stopped at step 3, and its state as a same-size load sees it.
    c3 = common(sample_shards["train"], sample_shards["val"], 3)
    one = root / "one_rank"
    _in_process(train, load_config("tiny", c3 + [f"run_dir={one}", "train.stop_after_steps=3"]))
    one_ref = _in_process(load_and_dump, load_config("tiny", c3 + [f"run_dir={one}"]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": REPO}
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           os.path.join(REPO, "tests", "helpers", "reshape_worker.py"), str(root), sample_shards["train"], sample_shards["val"], str(one)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {"root": root, "one": one, "one_ref": one_ref, "log": proc.stderr}


@pytest.mark.parametrize("zero", [2, 3])
def test_two_ranks_resume_on_one(two_rank, sample_shards, zero, caplog):
    from rsmoe.training.loop import train

    root = two_rank["root"]
    parted, full = root / f"z{zero}_parted", root / f"z{zero}_full"
    c = common(sample_shards["train"], sample_shards["val"], zero)
    want = torch.load(root / f"z{zero}_dump.pt", weights_only=False)
    with caplog.at_level(logging.WARNING):
        got = _in_process(load_and_dump, load_config("tiny", c + [f"run_dir={parted}"]))
    assert "reshaping through a universal checkpoint" in caplog.text
    _assert_same_state(got, want, f"ZeRO-{zero} 2->1")
    # Global counters carry over; the data position is the same step of this rank's own stream.
    assert got["train_state"]["step"] == 3 and got["train_state"]["samples"] == want["train_state"]["samples"]
    assert got["train_state"]["data"] == {"epoch": 0, "batches_consumed": 3}

    # ZeRO-3 also keeps the global batch (2 ranks x 2 -> 1 rank x 2 micro-batches): the data position scales.
    extra = ["train.grad_accum=2"] if zero == 3 else []
    out = _in_process(train, load_config("tiny", c + [f"run_dir={parted}"] + extra))
    assert out["step"] == 6 and (parted / "final" / "stage1_adapter" / "adapter_model.safetensors").exists()
    a, b = _losses(full), _losses(parted)
    assert all(a[s] == b[s] for s in (1, 2, 3))  # the first half is the 2-rank run itself
    for s in (4, 5, 6):
        print(f"ZeRO-{zero} step {s}: 2 ranks {a[s]:.4f}, resumed on 1 rank {b[s]:.4f}")
        assert abs(a[s] - b[s]) <= 0.1 * a[s], (s, a[s], b[s])  # different samples, same model: close, not equal


def test_one_rank_resumes_on_two(two_rank):
    """1 -> 2 (ZeRO-3): each of the 2 ranks restores exactly the 1-rank run's state, and the run finishes."""
    got = torch.load(two_rank["root"] / "up_dump.pt", weights_only=False)
    _assert_same_state(got, two_rank["one_ref"], "ZeRO-3 1->2")
    assert "reshaping through a universal checkpoint" in two_rank["log"]
    assert max(_losses(two_rank["one"])) == 6 and (two_rank["one"] / "final" / "visual.safetensors").exists()


def test_resume_with_another_zero_stage_is_a_clear_error(two_rank, sample_shards):
    c3 = common(sample_shards["train"], sample_shards["val"], 3)
    with pytest.raises(RuntimeError, match="was written with ZeRO-2 but this run uses ZeRO-3"):
        _in_process(load_and_dump, load_config("tiny", c3 + [f"run_dir={two_rank['root'] / 'z2_parted'}"]))
