"""Helpers shared by the tests (imported as `tests.helpers`; no test module imports another):
free ports, launching real process groups (torchrun / `rsmoe train`), killing them, reading what a
run left on disk, and training the tiny Stage I + Stage II run several tests evaluate."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def descendants(pid: int) -> list[int]:
    """Every live process below `pid` (children first found by parent id in /proc)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def tagged_processes(tag: str) -> list[int]:
    """Live processes whose environment holds RSMOE_TEST_TAG=<tag> (a launched job's every process,
    orphans included: children inherit the environment even when they outlive their parent)."""
    needle = f"RSMOE_TEST_TAG={tag}".encode()
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/environ", "rb") as f:
                    if needle in f.read().split(b"\0"):
                        out.append(int(d))
            except OSError:
                continue
    return out


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and every process below it, as a scheduler kills a job's cgroup: torchrun
    starts each rank in its own session, so killing torchrun's process group alone would orphan them."""
    victims = descendants(proc.pid)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
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


def launch(args: list[str], nproc: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run train.py under torchrun with `nproc` CPU ranks; assert it succeeded."""
    proc = run(torchrun_cmd(args, nproc=nproc), timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def train_tiny_runs(root: Path, sample_shards: dict) -> dict[str, Path]:
    """A tiny Stage I + Stage II run under `root`, trained in this process (about 10 s)."""
    from rsmoe.config import load_config
    from rsmoe.distributed.env import shutdown_distributed
    from rsmoe.training.loop import train

    saved = {k: os.environ.get(k) for k in ("MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE")}
    os.environ["MASTER_PORT"] = str(free_port())
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        os.environ.pop(k, None)
    common = [f"data.train_shards={sample_shards['train']}", f"data.val_shards={sample_shards['val']}",
              f"deepspeed_config={os.path.join(REPO, 'ds_configs', 'zero2.json')}", "train.steps=6",
              "train.num_eval_samples=0", "optim.lr=3e-3"]
    try:
        for extra in ([f"run_dir={root / 'stage1'}"], ["stage=2", f"run_dir={root / 'stage2'}", f"init_from={root / 'stage1'}"]):
            try:
                train(load_config("tiny", common + extra))
            finally:
                shutdown_distributed()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return {"stage1": root / "stage1", "stage2": root / "stage2"}


def few_sample_shard(shard_dir: str | Path, out: Path, n: int = 3) -> str:
    """A shard of the first `n` samples of `shard_dir`'s first training shard (images repeat every few steps)."""
    import tarfile

    src = sorted(Path(shard_dir).glob("train-*.tar"))[0]
    out.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(src) as tin, tarfile.open(out, "w") as tout:
        keys: list[str] = []
        for m in tin.getmembers():
            key = m.name.split(".", 1)[0]
            if key not in keys:
                if len(keys) == n:
                    break
                keys.append(key)
            tout.addfile(m, tin.extractfile(m))
    return str(out)


# ---------------------------------------------------------------- launcher and SLURM scripts

# Variables a developer's shell may carry that would change what the launcher scripts do.
SCRUB = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS", "DS_ACCELERATOR",
         "CONFIG", "RUN_ROOT", "RUN_DIR", "INIT_FROM", "STAGE2_INIT", "DS_CONFIG", "GPUS", "NODES", "DEVICE", "MODEL",
         "EVAL_SHARDS", "EVAL_ARGS", "EVAL", "SBATCH_ARGS", "SRUN_ARGS", "RSMOE_REPO", "PYTHON", "DRY_RUN")


def metric_steps(run_dir: Path) -> list[int]:
    f = run_dir / "metrics.jsonl"
    return [json.loads(line)["step"] for line in f.read_text().splitlines()] if f.exists() else []


def wait_until(cond, proc: subprocess.Popen, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) before {what}")
        if time.monotonic() > end:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def eval_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("rsmoe.eval.run") is not None


# ---------------------------------------------------------------- small models and batches


def random_adapters(model, seed: int = 1, scale: float = 0.2):
    """Give every expert a non-trivial adapter (a fresh one's B is zero, so every expert would agree)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.experts.lora_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model


def fixed_stage2_batch(g: torch.Generator, b: int = 2, e: int = 3, image: int = 64) -> dict:
    """A tiny-preset Stage II batch of random ids: b images, one row per (image, expert), full masks."""
    inputs = {
        "pixel_values": torch.randn(b, 3, image, image, generator=g),
        "qformer_input_ids": torch.randint(5, 100, (b, 6), generator=g),
        "qformer_attention_mask": torch.ones(b, 6, dtype=torch.long),
        "input_ids": torch.randint(5, 100, (b * e, 10), generator=g),
        "attention_mask": torch.ones(b * e, 10, dtype=torch.long),
        "adapter_index": torch.arange(e).repeat(b),
        "row_sample": torch.arange(b).repeat_interleave(e),
    }
    inputs["labels"] = inputs["input_ids"].clone()
    return inputs
