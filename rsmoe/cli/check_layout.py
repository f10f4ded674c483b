"""Check a parallel layout on this machine before a long job, with the tiny preset: prints PASS or FAIL.

    rsmoe check-layout --gpus 2 --ep 2            # on a 2-GPU node: NCCL, 2 ranks, experts split over them
    rsmoe check-layout --gpus 4 --ep 2 --zero 3   # ep=2 x dp=2 under ZeRO-3
    rsmoe check-layout --gpus 2 --ep 2 --cpu      # the same on CPU ranks (gloo)

It trains a tiny Stage I (one process), then Stage II with the layout under torchrun: stopped after
half the steps and resumed (checkpoint write and read through the layout), and the same Stage II with
replicated experts (ep=1) on the same data. The layout passes when every per-expert loss at every step
and every final adapter equal the replicated run's (relative 1e-3, fp32), every loss is finite and the
model directory is complete. Exit 0 on PASS, 1 on FAIL.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from rsmoe.data.sample import build_sample_shards
from rsmoe.errors import UserError
from rsmoe.io import adapters

REPO = Path(__file__).resolve().parents[2]
RTOL = 1e-3


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gpus", type=int, default=2, help="ranks to launch (GPUs, or CPU processes with --cpu); default 2")
    p.add_argument("--ep", type=int, default=2, help="expert-parallel size to check (divides 2 experts and --gpus); default 2")
    p.add_argument("--zero", type=int, choices=[2, 3], default=2, help="ZeRO stage of Stage II (default 2)")
    p.add_argument("--steps", type=int, default=6, help="Stage II steps (stopped and resumed half-way); default 6")
    p.add_argument("--cpu", action="store_true", help="CPU ranks with gloo instead of GPUs with NCCL")
    p.add_argument("--work", help="working directory (default: a temporary one, removed on PASS)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(cpu: bool) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    if cpu:
        env.update(CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu", OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"))
    return env


def _run(what: str, cmd: list[str], cpu: bool, log: Path) -> None:
    t0 = time.time()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=REPO, env=_env(cpu), stdout=f, stderr=subprocess.STDOUT).returncode
    print(f"  {what}: exit {rc} in {time.time() - t0:.0f} s (log {log})", flush=True)
    if rc != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
        raise LayoutFailed(f"{what} failed (exit {rc}); last lines of {log}:\n{tail}")


class LayoutFailed(Exception):
    pass


def _losses(run_dir: Path) -> dict[int, dict[str, float]]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: {k: v for k, v in r.items() if k.startswith("loss/")} for r in rows}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def compare(layout_run: Path, reference: Path, experts: list[str]) -> list[str]:
    """What differs between the layout's run and the replicated one (empty: they agree)."""
    problems = []
    got, want = _losses(layout_run), _losses(reference)
    if sorted(got) != sorted(want):
        problems.append(f"logged steps differ: {sorted(got)} vs {sorted(want)}")
    worst = 0.0
    for step in sorted(set(got) & set(want)):
        for key, value in want[step].items():
            mine = got[step].get(key)
            if mine is None or not math.isfinite(mine):
                problems.append(f"step {step}: {key} is {mine} (replicated run: {value})")
                continue
            err = abs(mine - value) / max(abs(value), 1e-12)
            worst = max(worst, err)
            if err > RTOL:
                problems.append(f"step {step}: {key} {mine:.6f} vs {value:.6f} (relative {err:.1e})")
    print(f"  per-expert losses: max relative difference {worst:.1e} over {len(got)} steps")
    worst = 0.0
    for e in experts:
        d = layout_run / "final" / "adapters" / e
        if not adapters.has_adapter(d):
            problems.append(f"final/adapters/{e} is missing")
            continue
        a, b = adapters.adapter_weights(d), adapters.adapter_weights(reference / "final" / "adapters" / e)
        worst = max([worst] + [_rel(a[k], b[k]) for k in b])
    print(f"  final adapters: max relative difference {worst:.1e}")
    if worst > RTOL:
        problems.append(f"final adapters differ from the replicated run's (relative {worst:.1e} > {RTOL:g})")
    if (layout_run / "final" / "INCOMPLETE").exists():
        problems.append("final/ is incomplete")
    return problems


def run(ns: argparse.Namespace) -> int:
    experts = ["theme", "objects"]
    if ns.ep < 1 or len(experts) % ns.ep or ns.gpus % ns.ep:
        raise UserError(f"--ep {ns.ep} must divide the 2 experts of the check and --gpus {ns.gpus}")
    if not ns.cpu and torch.cuda.device_count() < ns.gpus:
        raise UserError(f"--gpus {ns.gpus} but {torch.cuda.device_count()} CUDA GPU(s) are visible; "
                        "lower --gpus, or check the layout on CPU ranks with --cpu")
    work = Path(ns.work or tempfile.mkdtemp(prefix="rsmoe-check-layout-"))
    work.mkdir(parents=True, exist_ok=True)
    dp = ns.gpus // ns.ep
    print(f"rsmoe check-layout: {ns.gpus} {'CPU ranks (gloo)' if ns.cpu else 'GPUs (NCCL)'} = ep {ns.ep} x dp {dp}, "
          f"ZeRO-{ns.zero}, {ns.steps} Stage II steps; work dir {work}", flush=True)
    shards = build_sample_shards(work / "shards")
    data = [f"data.train_shards={work / 'shards' / 'train-*.tar'}", "train.num_eval_samples=0", "train.precision=fp32",
            "train.log_every=1", f"model.experts=[{','.join(experts)}]", "optim.lr=1e-2",
            # Adam's eps=1e-8 turns ~0 gradient entries into full steps whose sign is rounding noise, which
            # no two layouts (other row batching, other reduction order) share; 1e-2 keeps updates ~linear.
            "optim.eps=1e-2"]
    py = [sys.executable, "-m", "rsmoe.cli", "train", "--config", "tiny"]

    def torchrun(n: int) -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}", f"--master_port={_free_port()}",
                str(REPO / "train.py"), "--config", "tiny"]

    stage2 = ["--stage", "2", "--init-from", str(work / "stage1"), "--deepspeed", str(REPO / "ds_configs" / f"zero{ns.zero}.json"),
              *data, f"train.steps={ns.steps}", f"checkpoint.every={max(1, ns.steps // 2)}"]
    try:
        _run("Stage I (1 process)", [*py, "--run-dir", str(work / "stage1"), *data, "train.steps=2"], ns.cpu, work / "stage1.log")
        layout = [*torchrun(ns.gpus), "--run-dir", str(work / "layout"), *stage2, f"distributed.ep={ns.ep}"]
        _run(f"Stage II, ep={ns.ep}, stopped half-way", [*layout, f"train.stop_after_steps={max(1, ns.steps // 2)}"],
             ns.cpu, work / "layout_part1.log")
        _run(f"Stage II, ep={ns.ep}, resumed", layout, ns.cpu, work / "layout_part2.log")
        _run(f"Stage II, replicated experts, {dp} rank(s)", [*torchrun(dp), "--run-dir", str(work / "replicated"), *stage2],
             ns.cpu, work / "replicated.log")
        problems = compare(work / "layout", work / "replicated", experts)
    except LayoutFailed as exc:
        problems = [str(exc)]
    if problems:
        print("FAIL\n  " + "\n  ".join(problems) + f"\n  logs and runs kept in {work}")
        return 1
    print(f"PASS (samples: {shards['total']} in the shards)")
    if not ns.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0
