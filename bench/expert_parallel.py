"""Expert parallelism vs replicated experts: memory per rank and step time, same preset, same samples per step.

    python bench/expert_parallel.py                       # tiny preset, 2 experts, 2 CPU ranks (~2 min)
    python bench/expert_parallel.py --shape wide          # wider random LLM, LoRA r=64 (a few minutes on CPU)
    python bench/expert_parallel.py --ranks 4 --experts theme,objects,relations,extra -- optim.lr=1e-4

Builds a Stage I model directory once (one process, 1 step), then runs Stage II through the real
launcher (torchrun + train.py code path, ZeRO from --deepspeed) for each layout, all with the same
number of samples per optimizer step (R = --ranks, B = --micro):

  one process   ep=1 dp=1  micro B*R   every expert, the reference a single machine would run
  replicated    ep=1 dp=R  micro B     every rank holds every expert; adapter gradients all-reduced over R
  expert-par.   ep=R dp=1  micro B*R   rank r holds n/R experts; visual prefix split over R and all-gathered

Every rank therefore forwards the same number of (sample, expert) rows in the two R-rank layouts;
what expert parallelism changes is which adapters, gradients and optimizer states a rank holds.
Per rank it reports the peak memory (CUDA: max allocated; CPU: peak RSS, and its growth over the
process's RSS after imports), trainable parameters and optimizer-state bytes held; per layout the
median step time (steps after the first) and samples/s. Runs on GPU unchanged (nccl, one GPU per rank).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHAPES = {
    "tiny": [],
    # ~40M-parameter random LLM, LoRA r=64 on the FFN: adapters + Adam states are ~64 MB per expert.
    "wide": ["model.llm.hidden_size=512", "model.llm.num_layers=8", "model.llm.num_heads=8", "model.llm.num_kv_heads=4",
             "model.llm.intermediate_size=2048", "model.lora.r=64", "model.lora.alpha=128"],
}


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


# ---------------------------------------------------------------- worker (one rank, under torchrun)


def worker(out_dir: Path, overrides: list[str]) -> None:
    import deepspeed  # noqa: F401  (imported lazily by training; counted in the baseline like torch)

    import rsmoe.training.engine
    import rsmoe.training.loop
    from rsmoe.config import load_config
    from rsmoe.distributed.env import shutdown_distributed

    base_rss = rss_mib()  # after imports: what every rank pays before any model exists
    engines = []
    build = rsmoe.training.engine.build_engine

    def keep(*a, **k):  # observe the engine the training loop builds; nothing else changes
        engine, cfg = build(*a, **k)
        engines.append(engine)
        return engine, cfg

    rsmoe.training.loop.build_engine = keep
    try:
        rsmoe.training.loop.train(load_config("tiny", overrides))
        _record(out_dir, engines[0], base_rss)
    finally:
        shutdown_distributed()


def _record(out_dir: Path, engine, base_rss: float) -> None:
    import torch

    from rsmoe.distributed.env import world_info_from_env

    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters() if p.requires_grad)
    opt_bytes = sum(t.numel() * t.element_size() for st in engine.optimizer.optimizer.state.values()
                    for t in st.values() if torch.is_tensor(t) and t.dim() > 0)
    if torch.cuda.is_available():
        peak, delta = torch.cuda.max_memory_allocated() / 2**20, float("nan")
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
        delta = peak - base_rss
    rank = world_info_from_env().rank
    (out_dir / f"rank{rank}.json").write_text(json.dumps(
        {"rank": rank, "peak_mib": peak, "delta_mib": delta, "trainable": trainable, "opt_mib": opt_bytes / 2**20}))


# ---------------------------------------------------------------- driver


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict:
    e = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONPATH": str(REPO)}
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    return e


def run(cmd: list[str], log: Path) -> None:
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=REPO, env=env(), stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        sys.exit(f"bench: {' '.join(cmd[:6])} ... failed (rc {proc.returncode}); see {log}")


def layout_row(name: str, tmp: Path, nproc: int, ep: int, micro: int, common: list[str]) -> dict:
    out = tmp / name
    out.mkdir()
    overrides = common + [f"run_dir={out / 'run'}", f"distributed.ep={ep}", f"train.micro_batch_size={micro}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
           str(Path(__file__).resolve()), "--worker", str(out), "--", *overrides]
    run(cmd, out / "log.txt")
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]
    rows = [json.loads(x) for x in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    step_s = statistics.median(r["speed/step_s"] for r in rows[1:]) if len(rows) > 1 else rows[0]["speed/step_s"]
    return {"layout": name, "ranks": nproc, "ep": ep, "dp": nproc // ep, "micro": micro, "step_s": step_s,
            "samples_s": rows[-1]["speed/samples_per_s"] * rows[-1]["speed/step_s"] / step_s, "per_rank": ranks}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    ap.add_argument("--ranks", type=int, default=2, help="R: ranks of the two multi-rank layouts (ep=R for EP)")
    ap.add_argument("--experts", default="theme,objects", help="comma-separated; their number must divide by --ranks")
    ap.add_argument("--micro", type=int, default=2, help="B: micro batch per rank of the replicated layout")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--deepspeed", default="ds_configs/zero2.json")
    ap.add_argument("--no-single", action="store_true", help="skip the one-process row")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="extra dotted config overrides (after --)")
    ns = ap.parse_args()
    if ns.worker:
        return worker(Path(ns.worker), ns.overrides)

    experts = [e for e in ns.experts.split(",") if e]
    if len(experts) % ns.ranks:
        sys.exit(f"bench: {len(experts)} experts cannot be split over {ns.ranks} ranks; pass --experts with a multiple of --ranks")
    shards = REPO / "data" / "shards" / "sample"
    if not list(shards.glob("train-*.tar")):
        run([sys.executable, "-m", "rsmoe.cli", "prepare"], Path(tempfile.gettempdir()) / "rsmoe_prepare.log")
    data = [f"data.train_shards={shards}/train-*.tar", f"data.val_shards={shards}/val-*.tar"]
    shape = SHAPES[ns.shape]
    with tempfile.TemporaryDirectory(prefix="rsmoe_bench_ep_") as d:
        tmp = Path(d)
        stage1 = tmp / "stage1"
        run([sys.executable, "-m", "rsmoe.cli", "train", "--config", "tiny", "--stage", "1", "--run-dir", str(stage1),
             *data, *shape, "train.steps=1", "train.num_eval_samples=0", f"deepspeed_config={ns.deepspeed}"],
            tmp / "stage1.log")
        common = [*data, *shape, "stage=2", f"init_from={stage1}", f"model.experts=[{','.join(experts)}]",
                  f"deepspeed_config={ns.deepspeed}", f"train.steps={ns.steps}", "train.log_every=1",
                  "train.num_eval_samples=0", f"checkpoint.every={ns.steps + 1}", *ns.overrides]
        R, B = ns.ranks, ns.micro
        layouts = [] if ns.no_single else [("one process", 1, 1, B * R)]
        layouts += [("replicated", R, 1, B), ("expert-parallel", R, R, B * R)]
        results = []
        for name, nproc, ep, micro in layouts:
            print(f"running {name}: ranks {nproc}, ep {ep}, micro batch {micro} ...", file=sys.stderr, flush=True)
            results.append(layout_row(name, tmp, nproc, ep, micro, common))
    print_table(results, ns, experts)


def print_table(results: list[dict], ns, experts: list[str]) -> None:
    import torch

    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    mem = "peak alloc MiB" if torch.cuda.is_available() else "peak RSS MiB (growth)"
    print(f"\nexpert parallelism, shape '{ns.shape}', experts {experts}, {ns.deepspeed}, {ns.steps} steps, {dev}")
    print(f"same samples per optimizer step in every row: {ns.micro * ns.ranks}\n")
    print(f"| layout | ranks | ep x dp | micro | s/step | samples/s | per rank: trainable params | optimizer MiB | {mem} |")
    print("|---|---|---|---|---|---|---|---|---|")
    base = results[0]["step_s"]
    for r in results:
        per = r["per_rank"]
        train = "/".join(f"{p['trainable']:,}" for p in per)
        opt = "/".join(f"{p['opt_mib']:.2f}" for p in per)
        if torch.cuda.is_available():
            peak = "/".join(f"{p['peak_mib']:.0f}" for p in per)
        else:
            peak = "/".join(f"{p['peak_mib']:.0f} ({p['delta_mib']:+.0f})" for p in per)
        print(f"| {r['layout']} | {r['ranks']} | {r['ep']} x {r['dp']} | {r['micro']} | {r['step_s']:.3f} "
              f"({r['step_s'] / base:.2f}x) | {r['samples_s']:.1f} | {train} | {opt} | {peak} |")


if __name__ == "__main__":
    main()
