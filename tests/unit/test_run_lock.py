"""One job per run directory: the lock's decisions, with holders faked on disk."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from dataclasses import asdict

import pytest

from rsmoe.training import run_lock
from rsmoe.training.run_lock import LOCK, Holder, RunDirLocked, RunLock


def write_holder(run_dir, holder: Holder, age_s: float = 0.0) -> None:
    path = run_dir / LOCK
    path.write_text(json.dumps(asdict(holder)))
    t = time.time() - age_s
    os.utime(path, (t, t))


@pytest.fixture
def other_process():
    proc = subprocess.Popen(["sleep", "60"])
    yield proc
    proc.kill()
    proc.wait()


def live_holder(pid: int, **kw) -> Holder:
    me = Holder.this_process()
    return Holder(**{**asdict(me), "pid": pid, "proc_start": run_lock._proc_start(pid), "token": "other", **kw})


def test_a_live_holder_refuses_with_who_and_what_to_do(tmp_path, other_process):
    write_holder(tmp_path, live_holder(other_process.pid))
    for decide in (RunLock(tmp_path).check, RunLock(tmp_path).acquire):
        with pytest.raises(RunDirLocked, match=rf"is in use by another job: host \S+, pid {other_process.pid}, started "):
            decide()
    assert json.loads((tmp_path / LOCK).read_text())["token"] == "other"  # untouched


def test_a_dead_holder_on_this_host_is_taken_over(tmp_path, caplog):
    dead = subprocess.Popen(["true"])
    dead.wait()
    write_holder(tmp_path, live_holder(dead.pid, proc_start="12345"))
    lock = RunLock(tmp_path)
    lock.acquire()
    assert json.loads((tmp_path / LOCK).read_text())["token"] == lock.me.token
    assert "taking over a stale lock" in caplog.text and f"pid {dead.pid} is not running" in caplog.text
    lock.release()
    assert not (tmp_path / LOCK).exists()


def test_a_reused_pid_is_not_the_holder(tmp_path, other_process):
    write_holder(tmp_path, live_holder(other_process.pid, proc_start="1"))  # same pid, another process start
    lock = RunLock(tmp_path)
    lock.acquire()
    lock.release()


def test_another_host_is_stale_only_without_heartbeat(tmp_path):
    far = live_holder(1, host="node-that-died", proc_start=None)
    write_holder(tmp_path, far, age_s=5)
    with pytest.raises(RunDirLocked, match="node-that-died"):
        RunLock(tmp_path, stale_after_s=60).acquire()
    write_holder(tmp_path, far, age_s=120)
    lock = RunLock(tmp_path, stale_after_s=60)
    lock.acquire()
    lock.release()


def test_the_holder_heartbeat_keeps_the_lock_fresh(tmp_path, monkeypatch):
    monkeypatch.setattr(run_lock, "HEARTBEAT_S", 0.05)
    lock = RunLock(tmp_path)
    lock.acquire()
    old = time.time() - 100
    os.utime(tmp_path / LOCK, (old, old))
    time.sleep(0.3)
    assert time.time() - (tmp_path / LOCK).stat().st_mtime < 5
    lock.release()


def test_a_requeued_attempt_waits_for_its_predecessor(tmp_path, other_process, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    monkeypatch.setattr(run_lock, "POLL_S", 0.05)
    write_holder(tmp_path, live_holder(other_process.pid, job="4242", restart=0))
    t0 = time.monotonic()
    with pytest.raises(RunDirLocked, match=r"waited 1 s for it to exit"):
        RunLock(tmp_path, wait_s=1).acquire()  # the predecessor never exits: bounded wait, then refused
    assert 1 <= time.monotonic() - t0 < 5
    threading.Timer(0.5, (tmp_path / LOCK).unlink).start()  # this time it exits during the wait
    lock = RunLock(tmp_path, wait_s=10)
    lock.acquire()
    assert json.loads((tmp_path / LOCK).read_text())["token"] == lock.me.token
    lock.release()


def test_another_slurm_job_does_not_wait(tmp_path, other_process, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4243")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    write_holder(tmp_path, live_holder(other_process.pid, job="4242", restart=0))
    t0 = time.monotonic()
    with pytest.raises(RunDirLocked, match="SLURM job 4242"):
        RunLock(tmp_path, wait_s=30).acquire()
    assert time.monotonic() - t0 < 5


def test_two_contenders_for_one_stale_lock_one_wins(tmp_path):
    write_holder(tmp_path, live_holder(1, host="gone", proc_start=None), age_s=1000)
    locks, errors = [RunLock(tmp_path, stale_after_s=1) for _ in range(4)], []

    def take(lock):
        try:
            lock.acquire()
        except RunDirLocked as exc:
            errors.append(exc)

    threads = [threading.Thread(target=take, args=(lk,)) for lk in locks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    owner = json.loads((tmp_path / LOCK).read_text())["token"]
    assert sum(lk.me.token == owner for lk in locks) == 1 and len(errors) == 3
    for lk in locks:
        lk.release()
    assert not (tmp_path / LOCK).exists()


def test_release_never_removes_another_jobs_lock(tmp_path, other_process):
    lock = RunLock(tmp_path)
    lock.acquire()
    write_holder(tmp_path, live_holder(other_process.pid))  # someone took over (e.g. we were presumed dead)
    lock.release()
    assert json.loads((tmp_path / LOCK).read_text())["token"] == "other"


def test_preflight_checks_the_lock_on_rank_0_only(tmp_path, other_process, monkeypatch, sample_shards):
    """In a multi-rank job rank 0 takes the lock; a slower rank's preflight must not see that lock and fail
    alone (rank 0 would wait in the lock's collective for ever: a 2-rank hang seen in CI)."""
    from rsmoe.config import load_config
    from rsmoe.training.preflight import preflight

    run = tmp_path / "run"
    run.mkdir()
    write_holder(run, live_holder(other_process.pid))
    args = load_config("tiny", [f"run_dir={run}", f"data.train_shards={sample_shards['train']}"])
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    preflight(args)  # rank 1: no lock check
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(RunDirLocked, match="is in use by another job"):
        preflight(args)
