"""One job per run directory, with real processes: a second job (1 or 2 ranks) on a directory a live job
holds stops at once naming the holder; after the holder is killed with -9 the next job takes over the
stale lock with a warning and resumes."""

from __future__ import annotations

import json
import time

from tests.helpers import kill_group, rows, rsmoe_cmd, run, start, torchrun_cmd


def test_second_job_refused_then_stale_lock_taken_over_after_kill_9(sample_shards, tmp_path):
    run_dir = tmp_path / "run"
    args = ["--config", "tiny", "--run-dir", str(run_dir), f"data.train_shards={sample_shards['train']}",
            "train.steps=400", "checkpoint.every=20", "train.num_eval_samples=0", "train.log_every=10"]
    first = start(rsmoe_cmd(args))
    try:
        deadline = time.monotonic() + 240
        while not ((run_dir / "checkpoints" / "latest").exists() and (run_dir / "metrics.jsonl").exists()):
            assert first.poll() is None, first.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "the first job wrote no checkpoint"
            time.sleep(0.2)
        holder = json.loads((run_dir / "LOCK").read_text())
        for cmd in (rsmoe_cmd(args), torchrun_cmd(args, nproc=2)):
            t0 = time.monotonic()
            second = run(cmd, timeout=180)
            lines = [ln for ln in second.stderr.splitlines() if "error:" in ln]
            print(f"second job ({'2 ranks' if 'torch.distributed.run' in ' '.join(cmd) else '1 rank'}) refused "
                  f"in {time.monotonic() - t0:.1f} s: {lines}")
            assert second.returncode != 0
            assert len([ln for ln in lines if ln.startswith("rsmoe train: error:")]) == 1, second.stderr[-3000:]
            assert f"pid {holder['pid']}" in lines[0] and "is in use by another job" in lines[0]
            assert first.poll() is None  # the holder trains on
        step_before = max(r["step"] for r in rows(run_dir))
    finally:
        kill_group(first)  # kill -9: no release, a stale LOCK stays
    assert (run_dir / "LOCK").exists()
    again = run(rsmoe_cmd(args[:-4] + ["train.steps=60", "checkpoint.every=20", "train.num_eval_samples=0",
                                        "train.log_every=10"]), timeout=400)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "taking over a stale lock" in again.stderr and f"pid {holder['pid']} is not running" in again.stderr
    assert "resumed from step" in again.stderr and step_before >= 10
    assert not (run_dir / "LOCK").exists()  # released at the end
