"""Run under torchrun (2 ranks) by tests/integration/test_reshape.py, which also imports `load_and_dump`.

    python -m torch.distributed.run --nproc_per_node 2 tests/helpers/reshape_worker.py OUT SHARDS_TRAIN SHARDS_VAL [ONE_RANK_RUN]

For ZeRO-2 and ZeRO-3: an uninterrupted 6-step run (OUT/z{z}_full), the same run stopped at step 3
(OUT/z{z}_parted), and the full state DeepSpeed's own same-world-size load restores from that step-3
tag (OUT/z{z}_dump.pt): the reference for the 1-rank resume. With ONE_RANK_RUN (a 1-rank ZeRO-3 run
stopped at step 3), it also resumes that run on these 2 ranks, dumps the reshaped state
(OUT/up_dump.pt) and trains it to the end.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch


def dump_state(engine) -> dict:
    """Full fp32 weights, Adam moments, step and LR of every trainable parameter. Collective under ZeRO-3."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    opt = engine.optimizer
    if hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
        # ZeRO-1/2 link the per-parameter views of the Adam state lazily (at the first step); link them now.
        opt._lazy_init_hp_params_optimizer_state()
    out: dict = {"params": {}}
    for name, p in engine.module.named_parameters():
        if not p.requires_grad:
            continue
        out["params"][name] = {
            "fp32": safe_get_full_fp32_param(p).clone(),
            "exp_avg": safe_get_full_optimizer_state(p, "exp_avg").clone(),
            "exp_avg_sq": safe_get_full_optimizer_state(p, "exp_avg_sq").clone(),
        }
    out["steps"] = sorted({int(s["step"]) for s in engine.optimizer.optimizer.state.values() if "step" in s})
    out["lr"] = engine.get_lr()[0]
    out["sched_epoch"] = engine.lr_scheduler.state_dict()["last_epoch"]
    return out


def load_and_dump(args):
    """Build the run's engine, restore its latest tag (reshaping if needed), dump the state on every rank."""
    from rsmoe.distributed.env import init_distributed
    from rsmoe.distributed.layout import ParallelLayout
    from rsmoe.training.builders import build_stage_model
    from rsmoe.training.checkpointer import CheckpointManager
    from rsmoe.training.engine import build_engine, load_ds_json

    info = init_distributed()
    layout = ParallelLayout(len(args.model.experts), 1, info.world_size, info.rank)
    layout.build_groups()
    model, _, _ = build_stage_model(args, layout)
    engine, _ = build_engine(model, args, layout, load_ds_json(args.deepspeed_config))
    restored, _tag = CheckpointManager(args.run_dir).load([engine])
    state = dump_state(engine)
    state["train_state"] = restored.to_dict()
    return state


def common(train_shards: str, val_shards: str, zero: int) -> list[str]:
    repo = Path(__file__).resolve().parents[2]
    return [f"data.train_shards={train_shards}", f"data.val_shards={val_shards}", "train.steps=6",
            "checkpoint.every=3", "train.log_every=1", "train.num_eval_samples=0",
            f"deepspeed_config={repo}/ds_configs/zero{zero}.json"]


def main() -> None:
    import torch.distributed as dist

    from rsmoe.config import load_config
    from rsmoe.distributed.env import shutdown_distributed
    from rsmoe.training.loop import train

    out, train_shards, val_shards = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    one_rank_run = sys.argv[4] if len(sys.argv) > 4 else None
    try:
        for z in (2, 3):
            c = common(train_shards, val_shards, z)
            train(load_config("tiny", c + [f"run_dir={out}/z{z}_full"]))
            train(load_config("tiny", c + [f"run_dir={out}/z{z}_parted", "train.stop_after_steps=3"]))
            state = load_and_dump(load_config("tiny", c + [f"run_dir={out}/z{z}_parted"]))
            if dist.get_rank() == 0:
                torch.save(state, out / f"z{z}_dump.pt")
        if one_rank_run:
            c = common(train_shards, val_shards, 3)
            state = load_and_dump(load_config("tiny", c + [f"run_dir={one_rank_run}"]))
            if dist.get_rank() == 0:
                torch.save(state, out / "up_dump.pt")
            train(load_config("tiny", c + [f"run_dir={one_rank_run}"]))
    finally:
        shutdown_distributed()


if __name__ == "__main__":
    main()
