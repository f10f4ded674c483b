"""Non-finite loss: the step is skipped on every rank with parameters, moments and schedule untouched;
`train.nan_tolerance` in a row stops the run naming the step and the last good checkpoint."""

from __future__ import annotations

import json
import math

import pytest
import torch

from rsmoe import cli
from rsmoe.config import load_config
from rsmoe.distributed.env import shutdown_distributed
from rsmoe.training.loop import train
from tests.helpers import checkpoint_tensors, rows, same_tensors


def _train(overrides: list[str]) -> dict:
    try:
        return train(load_config("tiny", overrides))
    finally:
        shutdown_distributed()


def _scheduler(run_dir, tag) -> dict:
    f = next((run_dir / "checkpoints" / tag).glob("*model_states.pt"))
    sd = torch.load(f, weights_only=False)
    return {"last_epoch": sd["lr_scheduler"]["last_epoch"], "skipped": sd["skipped_steps"]}


@pytest.mark.parametrize("zero", [0, 2, 3])
def test_nan_loss_skips_the_step_and_changes_nothing(zero, tiny_overrides, tmp_path, dist_env, monkeypatch, capfd):
    monkeypatch.setenv("RSMOE_FAULT", "nan:loss:3")
    run_dir = tmp_path / f"z{zero}"
    out = _train(tiny_overrides + [f"run_dir={run_dir}", f"distributed.zero_stage={zero}", "train.steps=5",
                                   "checkpoint.every=1", "checkpoint.keep=10", "train.num_eval_samples=0"])
    assert out["step"] == 5 and math.isfinite(out["loss/total"])
    s2, s3, s4 = (checkpoint_tensors(run_dir, f"step0000000{i}") for i in (2, 3, 4))
    assert len(s2) > 0
    assert same_tensors(s2, s3), "the skipped step changed weights or optimizer state"
    assert not same_tensors(s3, s4), "training did not continue after the skipped step"
    # The LR schedule did not advance on the skipped step; DeepSpeed counted it as skipped.
    assert _scheduler(run_dir, "step00000003") == {"last_epoch": 2, "skipped": 1}
    assert _scheduler(run_dir, "step00000004") == {"last_epoch": 3, "skipped": 1}
    by_step = {r["step"]: r for r in rows(run_dir)}
    assert math.isnan(by_step[3]["loss/total"]) and by_step[3]["optim/skipped_steps"] == 1
    assert math.isfinite(by_step[4]["loss/total"]) and by_step[5]["optim/skipped_steps"] == 1
    assert "step 3: non-finite loss; optimizer step skipped on every rank" in capfd.readouterr().err


def test_nan_tolerance_stops_naming_step_and_last_good_checkpoint(sample_shards, tmp_path, dist_env, monkeypatch, capsys):
    monkeypatch.setenv("RSMOE_FAULT", "inf:loss:3,4,5")
    run_dir = tmp_path / "halt"
    rc = cli.main(["train", "--config", "tiny", "--run-dir", str(run_dir), "--deepspeed", "ds_configs/zero2.json",
                   f"data.train_shards={sample_shards['train']}", "train.num_eval_samples=0", "train.steps=8",
                   "checkpoint.every=1", "train.nan_tolerance=2"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("rsmoe train: error")]
    assert rc == 1
    assert err == ["rsmoe train: error: non-finite loss at 2 consecutive steps (3..4); stopped at step 4; last good "
                   "checkpoint: step00000003. Lower optim.lr, check the data, or raise train.nan_tolerance"]
    # The named checkpoint is complete and holds the last good parameters (step 3 was skipped).
    assert (run_dir / "checkpoints" / "latest").read_text() == "step00000003"
    assert same_tensors(checkpoint_tensors(run_dir, "step00000002"), checkpoint_tensors(run_dir, "step00000003"))
    assert not (run_dir / "checkpoints" / "step00000004").exists()
    assert max(r["step"] for r in rows(run_dir)) == 3


def test_fault_spec_is_validated(monkeypatch):
    from rsmoe.testing import faults

    monkeypatch.setenv("RSMOE_FAULT", "nan:loss:3:1;hang:after_step:5")
    assert faults.active("loss", 3) is None  # rank 0 here; the NaN is armed for rank 1 only
    assert faults.active("after_step", 5) == "hang" and faults.active("after_step", 4) is None
    with pytest.raises(ValueError, match="ACTION:POINT:STEPS"):
        faults.parse("explode:loss:1")
    assert json.dumps(faults.parse("exit:before_complete:4")[0].steps, default=sorted) == "[4]"
