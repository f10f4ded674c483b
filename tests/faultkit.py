"""Helpers for the fault tests: launch runs as real process groups, kill them, read what they left."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from conftest import REPO, free_port


def clean_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": REPO}
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "RSMOE_FAULT"):
        env.pop(k, None)
    env.update(extra)
    return env


def torchrun_cmd(args: list[str], nproc: int = 2, port: int | None = None) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            f"--master_port={port or free_port()}", os.path.join(REPO, "train.py"), *args]


def rsmoe_cmd(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "rsmoe.cli", "train", *args]


def start(cmd: list[str], **env: str) -> subprocess.Popen:
    """Own session, so killpg reaches the launcher and every rank (a whole-job kill -9)."""
    return subprocess.Popen(cmd, cwd=REPO, env=clean_env(**env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def run(cmd: list[str], timeout: int = 300, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=clean_env(**env), capture_output=True, text=True, timeout=timeout)


def wait_for_line(path: Path, text: str, proc: subprocess.Popen, timeout: float = 240) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if path.exists() and text in path.read_text():
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended (rc {proc.returncode}) before '{text}':\n{proc.stdout.read()[-4000:]}")
        time.sleep(0.2)
    kill_group(proc)
    raise AssertionError(f"timed out waiting for '{text}' in {path}")


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=60)
    if proc.stdout:
        proc.stdout.close()


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "final" / "stage1_adapter" / "adapter_model.safetensors")


def checkpoint_tensors(run_dir: Path, tag: str) -> list[torch.Tensor]:
    """Every non-empty tensor of a DeepSpeed tag (weights, fp32 master copies, Adam moments), in file order."""
    out: list[torch.Tensor] = []

    def walk(x) -> None:
        if torch.is_tensor(x):
            if x.numel():
                out.append(x)
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)

    for f in sorted((run_dir / "checkpoints" / tag).glob("*_states.pt")):
        walk(torch.load(f, weights_only=False))  # our own files, written by this test
    return out


def same_tensors(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, b))
