"""A crash ends the job: an exception on any rank, with DataLoader workers, ends every process of the
job promptly with a non-zero exit and the error line, and leaves no process behind."""

from __future__ import annotations

import time
import uuid

import pytest

from tests.helpers import (
    kill_group,
    rsmoe_cmd,
    start,
    tagged_processes,
    torchrun_cmd,
    wait_for_line,
)


@pytest.mark.parametrize("ranks,workers", [(1, 1), (1, 2), (2, 1), (2, 2)])
def test_an_exception_ends_every_process_within_60_s(ranks, workers, sample_shards, tmp_path):
    run_dir = tmp_path / "run"
    args = ["--config", "tiny", "--run-dir", str(run_dir), f"data.train_shards={sample_shards['train']}",
            f"data.num_workers={workers}", "train.steps=20", "train.num_eval_samples=0"]
    crashing = ranks - 1  # the last rank raises; with two ranks the other one is still training
    tag = uuid.uuid4().hex
    cmd = rsmoe_cmd(args) if ranks == 1 else torchrun_cmd(args, nproc=ranks)
    proc = start(cmd, RSMOE_FAULT=f"raise:after_step:2:{crashing}", RSMOE_TEST_TAG=tag)
    try:
        wait_for_line(run_dir / "logs" / f"train_rank{crashing}.log", "fault injection: raise", proc, timeout=240)
        raised = time.monotonic()
        out, _ = proc.communicate(timeout=60)
        exited = time.monotonic() - raised
    except BaseException:
        kill_group(proc)
        raise
    time.sleep(1)  # let a worker that outlived its trainer show up
    left = tagged_processes(tag)
    print(f"{ranks} rank(s), {workers} worker(s): exit {proc.returncode} {exited:.1f} s after the exception")
    assert proc.returncode != 0, out[-3000:]
    assert "InjectedCrash: fault injection: raise at after_step of step 2" in out, out[-3000:]
    assert not left, f"processes left behind: {left}"
