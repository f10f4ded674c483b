"""SLURM scripts under a fake SLURM: tests/fake_slurm/{srun,scancel,scontrol,sbatch} run everything locally.

The batch script is run the way slurmd runs it (bash, SLURM_* set, cwd = submit dir); the fake srun
starts one process group per task and the fake scancel signals whole groups, as SLURM signals every
process of a job step (so DataLoader workers get USR2 too).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import (
    REPO,
    SCRUB,
    eval_available,
    free_port,
    metric_steps,
    wait_until,
)

FAKE = Path(REPO) / "tests" / "fake_slurm"


def kill_leftover_tasks(state: Path) -> None:
    """A failed test must not leave ranks running on a shared machine (the fake tasks are session leaders)."""
    pgids = state / "step.pgids"
    for line in pgids.read_text().split() if pgids.exists() else []:
        try:
            os.killpg(int(line), signal.SIGKILL)
        except ProcessLookupError:
            pass


def fake_slurm_env(state: Path, job_id: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "FAKE_")) and k not in SCRUB}
    state.mkdir(parents=True, exist_ok=True)
    env.update(
        PATH=f"{FAKE}:{env['PATH']}",
        FAKE_SLURM_DIR=str(state),
        SLURM_JOB_ID=str(job_id),
        SLURM_JOB_NAME="rsmoe-stage1",
        SLURM_NTASKS="2",
        SLURM_NTASKS_PER_NODE="2",
        SLURM_TASKS_PER_NODE="2",
        SLURM_JOB_NUM_NODES="1",
        SLURM_JOB_NODELIST="localhost",
        SLURM_SUBMIT_DIR=REPO,
        SLURM_CPUS_PER_TASK="1",
        CUDA_VISIBLE_DEVICES="",  # CPU ranks even on a machine with GPUs
        PYTHON=sys.executable,
        CONFIG="tiny",
        MASTER_PORT=str(free_port()),
    )
    env.update(extra)
    return env


def test_sbatch_headers_requeue_on_signal_to_all_ranks():
    for stage in (1, 2):
        heads = re.findall(r"^#SBATCH\s+(\S+)", (Path(REPO) / "slurm" / f"stage{stage}.sbatch").read_text(), re.M)
        # No "B:": the signal must reach the srun tasks (the ranks), not the batch shell.
        assert "--signal=USR2@120" in heads and "--requeue" in heads and "--open-mode=append" in heads, heads


def test_sbatch_preempt_checkpoint_requeue_then_resume(sample_shards, tmp_path):
    """USR2 to every process of the step -> checkpoint at the next step -> `scontrol requeue` -> the rerun
    of the same batch script resumes from `latest` and finishes. Two ranks, one DataLoader worker each."""
    state, run_dir = tmp_path / "slurm", tmp_path / "stage1"
    env = fake_slurm_env(state, 4242, RUN_DIR=str(run_dir))
    cmd = ["bash", "slurm/stage1.sbatch", f"data.train_shards={sample_shards['train']}", "train.steps=40",
           "checkpoint.every=1000", "train.log_every=1", "train.num_eval_samples=0", "data.num_workers=1"]
    log_path = tmp_path / "slurm-4242.out"  # what --output=RUN_DIR/logs/slurm-%j.out --open-mode=append gives
    try:
        with open(log_path, "a") as log:
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
            wait_until(lambda: len(metric_steps(run_dir)) >= 2, proc, 300, "two training steps")
            subprocess.run(["scancel", "--signal=USR2", "4242"], env=env, check=True, timeout=30)
            rc = proc.wait(timeout=300)
    finally:
        kill_leftover_tasks(state)
    first = log_path.read_text()
    assert rc == 3, first[-4000:]  # not success: afterok dependents must wait for the requeued run
    assert "world 2 = ep 1 x dp 2" in first
    assert (state / "scontrol.log").read_text().split("\n")[0] == "requeue 4242"
    tag = (run_dir / "checkpoints" / "latest").read_text().strip()
    stopped = int(tag.removeprefix("step"))
    assert 2 <= stopped < 40 and (run_dir / "checkpoints" / tag / "COMPLETE").exists()
    assert not (run_dir / "final").exists()
    assert f"stage 1 stopped before its last step at {run_dir}/checkpoints/{tag}" in first
    for rank in (0, 1):
        assert "stopping at step" in (run_dir / "logs" / f"train_rank{rank}.log").read_text()

    # SLURM reruns the requeued job: same script, same environment, SLURM_RESTART_COUNT=1.
    env["SLURM_RESTART_COUNT"] = "1"
    try:
        with open(log_path, "a") as log:
            rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=400).returncode
    finally:
        kill_leftover_tasks(state)
    second = log_path.read_text()[len(first):]
    assert rc == 0, second[-4000:]
    assert f"resuming from: {run_dir}/checkpoints/{tag}" in second
    assert f"resumed from {tag} at step {stopped}" in second
    assert metric_steps(run_dir) == list(range(1, 41))  # no step lost or repeated across the requeue
    assert (run_dir / "final" / "config.yaml").exists() and (run_dir / "final" / "stage1_adapter").is_dir()
    assert (state / "scontrol.log").read_text().count("requeue") == 1
    assert list((run_dir / "logs").glob(".started-*")) == []


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"INIT_FROM": "/nonexistent/stage1"}, "Stage II needs a finished Stage I run: '/nonexistent/stage1'"),
        ({"SLURM_NTASKS_PER_NODE": "4", "CUDA_VISIBLE_DEVICES": "0,1", "DEVICE": "cuda"},
         "4 ranks per node but only 2 GPU(s) are visible"),
        ({"SLURM_JOB_ID": ""}, "not inside a SLURM job"),
    ],
)
def test_sbatch_bad_setup_one_clear_line(tmp_path, extra, message):
    env = fake_slurm_env(tmp_path / "slurm", 5, RUN_DIR=str(tmp_path / "stage2"), **extra)
    proc = subprocess.run(["bash", "slurm/stage2.sbatch"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert not (tmp_path / "slurm" / "srun.log").exists()  # nothing was launched


def read_submissions(state: Path) -> dict[int, tuple[list[str], dict[str, str]]]:
    out = {}
    for args_file in sorted((state / "sbatch").glob("*.args")):
        env = dict(line.split("=", 1) for line in args_file.with_suffix(".env").read_text().splitlines() if "=" in line)
        out[int(args_file.stem)] = (args_file.read_text().splitlines(), env)
    return out


def option(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_submit_pipeline_chains_stages_and_eval(tmp_path):
    state, root = tmp_path / "slurm", tmp_path / "runs" / "demo2n"
    env = fake_slurm_env(state, 0, NODES="2", GPUS="4", CONFIG="demo", RUN_ROOT=str(root), FAKE_SLURM_CLUSTER="c1",
                         PARTITION="gpu", EVAL_SHARDS="/data/rsieval/test-*.tar", STAGE2_OVERRIDES="distributed.ep=3")
    for k in [k for k in env if k.startswith("SLURM_")]:
        del env[k]  # submitted from a login node, not from inside a job
    proc = subprocess.run(["bash", "slurm/submit_pipeline.sh", "optim.lr=2e-4"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    jobs = read_submissions(state)
    with_eval = eval_available()
    assert sorted(jobs) == ([1001, 1002, 1003] if with_eval else [1001, 1002]), proc.stderr
    assert proc.stdout.split() == [str(j) for j in sorted(jobs)]  # ";c1" stripped from --parsable output

    (a1, e1), (a2, e2) = jobs[1001], jobs[1002]
    for args in (a1, a2):
        assert option(args, "--nodes") == "2" and option(args, "--ntasks-per-node") == "4"
        assert option(args, "--gpus-per-node") == "4" and option(args, "--partition") == "gpu"
        assert "--parsable" in args and "--export=ALL" in args and "--kill-on-invalid-dep=yes" in args
    assert "--dependency" not in a1
    assert option(a2, "--dependency") == "afterok:1001"
    assert option(a1, "--output") == f"{root}/stage1/logs/slurm-%j.out"
    assert option(a2, "--output") == f"{root}/stage2/logs/slurm-%j.out"
    assert (root / "stage1" / "logs").is_dir() and (root / "stage2" / "logs").is_dir()  # SLURM won't create them
    assert a1[-2:] == [f"{REPO}/slurm/stage1.sbatch", "optim.lr=2e-4"]
    assert a2[-3:] == [f"{REPO}/slurm/stage2.sbatch", "optim.lr=2e-4", "distributed.ep=3"]
    assert e1["RUN_DIR"] == f"{root}/stage1" and e1["CONFIG"] == "demo" and e1["RSMOE_REPO"] == REPO
    assert e2["RUN_DIR"] == f"{root}/stage2" and e2["INIT_FROM"] == f"{root}/stage1"
    if with_eval:
        a3, e3 = jobs[1003]
        assert option(a3, "--dependency") == "afterok:1002" and option(a3, "--ntasks-per-node") == "4"
        assert a3[-1] == f"{REPO}/slurm/eval.sbatch"
        assert e3["MODEL"] == f"{root}/stage2" and e3["EVAL_SHARDS"] == "/data/rsieval/test-*.tar"
    else:
        assert "no eval job: 'rsmoe eval' is not available" in proc.stderr


def test_submit_pipeline_dry_run_and_bad_input(tmp_path):
    env = fake_slurm_env(tmp_path / "slurm", 0, RUN_ROOT=str(tmp_path / "r"), DRY_RUN="1", EVAL="0")
    proc = subprocess.run(["bash", "slurm/submit_pipeline.sh"], cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.split() == ["dry-stage1", "dry-stage2"], proc.stderr
    assert "--dependency afterok:dry-stage1" in proc.stderr
    assert not (tmp_path / "slurm" / "sbatch").exists()
    env.update(NODES="two")
    proc = subprocess.run(["bash", "slurm/submit_pipeline.sh"], cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "slurm/submit_pipeline.sh: error: NODES='two' is not a positive integer; set NODES to the number of nodes per training job")
