"""kill -9 of a whole 2-rank job (torchrun + both ranks) in the middle of a checkpoint write, then the
same command again: it resumes from the last complete checkpoint and ends with the adapters of an
uninterrupted run. Also the 2-rank NaN skip (one rank's loss only) and data counters summed over ranks."""

from __future__ import annotations

import math
import os
import subprocess
import time

import pytest
import torch

from rsmoe.io.checkpoints import COMPLETE
from rsmoe.training.checkpointer import CheckpointManager
from tests.helpers import (
    REPO,
    adapter,
    checkpoint_tensors,
    free_port,
    kill_group,
    rows,
    rsmoe_cmd,
    run,
    same_tensors,
    start,
    torchrun_cmd,
    wait_for_line,
)


def test_sigkill_two_ranks_mid_checkpoint_then_same_command_resumes_exactly(sample_shards, tmp_path):
    common = ["--config", "tiny", "--deepspeed", "ds_configs/zero3.json", f"data.train_shards={sample_shards['train']}",
              "train.steps=6", "checkpoint.every=2", "train.log_every=1", "train.num_eval_samples=0"]
    full, crashed = tmp_path / "full", tmp_path / "crashed"
    port = free_port()
    ref = run(torchrun_cmd(common + ["--run-dir", str(full)]))
    assert ref.returncode == 0, ref.stderr[-3000:]

    # Steps 3-4 trained, step 4's state files written on both ranks, COMPLETE not yet: kill -9 everything.
    proc = start(torchrun_cmd(common + ["--run-dir", str(crashed)], port=port), RSMOE_FAULT="hang:before_complete:4")
    wait_for_line(crashed / "logs" / "train_rank0.log", "fault injection: hang at before_complete of step 4", proc)
    wait_for_line(crashed / "logs" / "train_rank1.log", "fault injection: hang at before_complete of step 4", proc)
    kill_group(proc)
    ckpt = crashed / "checkpoints"
    assert (ckpt / "latest").read_text() == "step00000002"
    assert (ckpt / "step00000004").is_dir() and not (ckpt / "step00000004" / COMPLETE).exists()
    assert CheckpointManager(crashed).latest_tag() == "step00000002"
    assert max(r["step"] for r in rows(crashed)) == 4  # progress past the checkpoint, about to be redone

    # The same command (same rendezvous port): no stale-store error, resumes from step 2.
    again = run(torchrun_cmd(common + ["--run-dir", str(crashed)], port=port))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from step00000002 at step 2" in again.stderr
    assert "removing incomplete checkpoint" in again.stderr
    a, b = adapter(full), adapter(crashed)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7)
    ra, rb = rows(full), rows(crashed)
    assert [r["step"] for r in rb] == [1, 2, 3, 4, 5, 6]  # no duplicate rows from the killed attempt
    for x, y in zip(ra, rb):
        assert math.isclose(x["loss/total"], y["loss/total"], rel_tol=1e-6), (x["step"], x["loss/total"], y["loss/total"])
    assert sorted(p.name for p in ckpt.glob("step*")) == ["step00000004", "step00000006"]


def test_two_ranks_nan_on_one_rank_is_skipped_on_both_then_tolerance_halts(sample_shards, tmp_path):
    """Rank 1 alone sees a NaN at step 3 (both ranks skip it); both see inf at 5 and 6 (tolerance 2: halt)."""
    run_dir = tmp_path / "nan2"
    proc = run(torchrun_cmd(["--config", "tiny", "--deepspeed", "ds_configs/zero2.json", "--run-dir", str(run_dir),
                             f"data.train_shards={sample_shards['train']}", "train.steps=8", "checkpoint.every=1",
                             "checkpoint.keep=10", "train.num_eval_samples=0", "train.nan_tolerance=2"]),
               RSMOE_FAULT="nan:loss:3:1;inf:loss:5,6")
    assert proc.returncode != 0
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("rsmoe train: error")]
    assert errors == ["rsmoe train: error: non-finite loss at 2 consecutive steps (5..6); stopped at step 6; last good "
                      "checkpoint: step00000005. Lower optim.lr, check the data, or raise train.nan_tolerance"], errors
    for r in (0, 1):
        log = (run_dir / "logs" / f"train_rank{r}.log").read_text()
        assert "step 3: non-finite loss; optimizer step skipped on every rank" in log, r
    assert same_tensors(checkpoint_tensors(run_dir, "step00000002"), checkpoint_tensors(run_dir, "step00000003"))
    assert not same_tensors(checkpoint_tensors(run_dir, "step00000003"), checkpoint_tensors(run_dir, "step00000004"))
    assert same_tensors(checkpoint_tensors(run_dir, "step00000004"), checkpoint_tensors(run_dir, "step00000005"))
    by_step = {r["step"]: r for r in rows(run_dir)}
    assert math.isnan(by_step[3]["loss/total"]) and by_step[5]["optim/skipped_steps"] == 2
    assert (run_dir / "checkpoints" / "latest").read_text() == "step00000005"


def test_killed_mid_export_final_is_refused_then_the_same_command_rewrites_it(sample_shards, tmp_path):
    """A run dying while it writes final/ (visual weights and config on disk, INCOMPLETE still there) leaves
    a directory that Stage II, export and the launchers refuse; the same command writes it again."""
    from rsmoe.io.export import ExportError, locate
    from rsmoe.io.model_dir import INCOMPLETE, IncompleteModelDir, stage1_dir

    run_dir = tmp_path / "run"
    common = ["--config", "tiny", f"data.train_shards={sample_shards['train']}", "train.steps=4", "checkpoint.every=2",
              "train.num_eval_samples=0", "--run-dir", str(run_dir)]
    died = run(rsmoe_cmd(common), RSMOE_FAULT="exit:in_export:4")
    assert died.returncode == 99, died.stderr[-3000:]
    final = run_dir / "final"
    assert (final / INCOMPLETE).exists() and (final / "visual.safetensors").exists() and (final / "config.yaml").exists()
    with pytest.raises(IncompleteModelDir, match="stopped before it finished"):
        stage1_dir(run_dir)  # what Stage II's --init-from resolves
    with pytest.raises(ExportError, match="--tag latest"):
        locate(run_dir, None)
    marker = run_dir / "logs" / ".started-t"
    marker.touch()
    time.sleep(0.05)
    (final / "config.yaml").touch()
    lib = os.path.join(REPO, "launchers", "lib.sh")
    check = f'source "{lib}"; rsmoe_finished "{run_dir}" "{marker}"'
    assert subprocess.run(["bash", "-c", check]).returncode == 1  # the launchers do not start Stage II on it

    again = run(rsmoe_cmd(common))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from step00000004 at step 4" in again.stderr  # nothing retrained: only final/ rewritten
    assert not (final / INCOMPLETE).exists()
    assert stage1_dir(run_dir) == final
    assert subprocess.run(["bash", "-c", check]).returncode == 0
    full = run(rsmoe_cmd(common[:-1] + [str(tmp_path / "full")]))
    assert full.returncode == 0, full.stderr[-3000:]
    a, b = adapter(tmp_path / "full"), adapter(run_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
