"""Training entry point for both stages: `deepspeed train.py --deepspeed ds_configs/zero3.json ...`.

    rsmoe train --config demo --stage 1 --run-dir runs/demo/stage1
    rsmoe train --config demo --stage 2 --run-dir runs/demo/stage2 --init-from runs/demo/stage1

The loop reads top to bottom: build everything, restore `latest` if there is one, then
`for step: for micro-batch: forward, backward, step`, logging, sample generations and
checkpoints on their cadence, and finally the exported model directory `<run>/final/`.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import resource
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from rsmoe import faults, guards, preemption
from rsmoe.checkpoint import CheckpointManager, export_final, final_dir_of, load_model_dir
from rsmoe.config import ConfigError, TrainArgs, dump_config, load_config, read_config
from rsmoe.data.loader import NoValidDataError
from rsmoe.distributed import ParallelLayout, device_type, init_distributed, shutdown_distributed
from rsmoe.engine import build_engine, load_ds_json, resolve_precision
from rsmoe.logger import MetricLogger, setup_logging
from rsmoe.models.rsmoe import RSMoE, build_model
from rsmoe.parallel import ExpertParallel
from rsmoe.processor import Processor
from rsmoe.safe_load import UnsafeCheckpointError

log = logging.getLogger("rsmoe.train")
INTERMIXED_ARGS = True  # dotted overrides may sit between options


# ---------------------------------------------------------------- command line


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="demo", help="preset name (tiny, demo, rsmoe-1b, rsmoe-7b) or a YAML path")
    p.add_argument("--stage", type=int, choices=[1, 2], help="1 = dense Stage I, 2 = MoE Stage II (overrides the preset)")
    p.add_argument("--run-dir", help="output directory of this stage (config, logs, tensorboard, checkpoints, final)")
    p.add_argument("--init-from", help="Stage II: the Stage I run directory (or its final/ directory)")
    p.add_argument("--deepspeed", "--deepspeed_config", dest="deepspeed", help="ZeRO JSON, e.g. ds_configs/zero3.json")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # set by launchers
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=2e-4 train.steps=50")


def args_from_cli(ns: argparse.Namespace) -> TrainArgs:
    dotted = list(ns.overrides)
    for flag, key in (("stage", "stage"), ("run_dir", "run_dir"), ("init_from", "init_from"), ("deepspeed", "deepspeed_config")):
        value = getattr(ns, flag)
        if value is not None:
            dotted.append(f"{key}={value}")
    return load_config(ns.config, dotted)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rsmoe train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_intermixed_args(argv))


# Errors a user fixes (exit 2) and deliberate stops (exit 1): one line on stderr, no traceback.
USER_ERRORS = (ConfigError, FileNotFoundError, NotADirectoryError, UnsafeCheckpointError)
HALTS = (guards.TrainingHalted, NoValidDataError)


def run(ns: argparse.Namespace) -> int:
    rank = int(os.environ.get("RANK", 0))
    try:
        train(args_from_cli(ns))
    except USER_ERRORS + HALTS as exc:
        _close_progress_bars()  # else the error line is glued to the end of a half-drawn bar
        # Config and NaN errors are identical on every rank: print once. Others can be rank-local.
        if rank == 0 or not isinstance(exc, (ConfigError, guards.TrainingHalted)):
            where = f"[rank {rank}] " if rank else ""
            print(f"rsmoe train: error: {where}{guards.one_line(exc)}", file=sys.stderr)
        return 2 if isinstance(exc, USER_ERRORS) else 1
    finally:
        shutdown_distributed()
    return 0


def _close_progress_bars() -> None:
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", [])):
        bar.close()


# ---------------------------------------------------------------- pieces


def random_frozen_prefixes(args: TrainArgs) -> list[str]:
    """Frozen parts without a source path: their weights must travel with the run."""
    out = []
    if not args.model.vision.path:
        out.append("visual.vision.")
    if not args.model.llm.path:
        out.append("experts.base.")
    return out


def build_stage_model(args: TrainArgs, layout: ParallelLayout) -> tuple[RSMoE, Processor, list[int]]:
    m = args.model
    model, llm_tok, q_tok = build_model(m, args.seed)
    processor = Processor(llm_tok, q_tok, m.experts, m.max_prompt_len, m.max_target_len, m.qformer.max_instruction_len)
    local_ids = layout.local_expert_ids(args.stage)
    if args.stage == 2:
        init = final_dir_of(args.init_from) if args.init_from else None
        if init is None:
            raise ConfigError("Stage II needs init_from (--init-from): the Stage I run directory")
        load_model_dir(init, model)
        model.to_stage2(local_ids, args.seed, train_qformer=m.train_qformer_stage2)
        model.expert_names = [m.experts[i] for i in local_ids]
    return model, processor, local_ids


def check_resume_compatible(args: TrainArgs, run_dir: Path) -> None:
    old_file = run_dir / "config.yaml"
    if not old_file.exists() or not args.checkpoint.resume:
        return
    old = read_config(old_file)
    if old.model != args.model or old.stage != args.stage:
        raise ConfigError(
            f"{run_dir} already holds a stage-{old.stage} run with a different model config; "
            "use a new --run-dir, or checkpoint.resume=false to start over in place"
        )


def to_device(inputs: dict, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}


def peak_memory_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def build_train_loader(args: TrainArgs, vision_args, layout: ParallelLayout):
    from rsmoe.data.loader import build_loader

    return build_loader(
        args.data.train_shards,
        batch_size=args.train.micro_batch_size,
        image_size=vision_args.image_size,
        image_mean=tuple(vision_args.image_mean),
        image_std=tuple(vision_args.image_std),
        rank=layout.dp_rank,  # every rank of one EP group reads the same batch
        world_size=layout.dp,
        seed=args.seed,
        num_workers=args.data.num_workers,
        shuffle_buffer=args.data.shuffle_buffer,
        batches_per_epoch=args.train.steps * args.train.grad_accum,
    )


def eval_batch(args: TrainArgs):
    """A fixed batch of held-out images for sample generations (the same on every rank)."""
    from rsmoe.data.loader import build_loader

    v = args.model.vision
    try:
        loader = build_loader(
            args.data.val_shards,
            batch_size=args.train.num_eval_samples,
            image_size=v.image_size,
            image_mean=tuple(v.image_mean),
            image_std=tuple(v.image_std),
        )
        return next(iter(loader))
    except (FileNotFoundError, StopIteration, ValueError) as exc:
        log.warning("no sample generations: validation shards unusable (%s)", exc)
        return None


def log_generations(engine, processor: Processor, batch, args: TrainArgs, metrics: MetricLogger, step: int,
                    ep_plan: ExpertParallel) -> None:
    """Collective: every rank generates (ZeRO-3 gathers weights within groups; EP ranks hold different experts)."""
    from rsmoe.engine import is_zero3
    from rsmoe.inference import GenerationArgs, caption

    model = engine.module
    was_training = model.training
    # Ranks stop at different lengths; under ZeRO-3 all must keep running forwards until the last is done.
    synced = is_zero3(engine) and dist.is_initialized() and dist.get_world_size() > 1
    gen = GenerationArgs(max_new_tokens=args.train.max_new_tokens, synced_gpus=synced or None)
    results = ep_plan.merge_generations(caption(model, processor, batch["pixel_values"], batch.get("instruction"), gen))
    model.train(was_training)
    lines = []
    for key, ref, res in zip(batch["key"], batch["caption"], results):
        experts = "  \n".join(f"**{k}**: {v}" for k, v in res["experts"].items())
        lines.append(f"### {key}\n{experts}  \n**composed**: {res['caption']}  \n**reference**: {ref}")
    metrics.text(step, "samples/generations", "\n\n".join(lines))
    log.info("step %d sample: %s", step, results[0]["caption"][:200] if results else "")


# ---------------------------------------------------------------- the loop


def train(args: TrainArgs) -> dict:
    guards.preflight(args)  # paths, layout, DeepSpeed JSON: fail in a second, before any heavy work
    info = init_distributed(args.distributed.backend)
    run_dir = Path(args.run_dir)
    setup_logging(info.rank, run_dir / "logs" / f"train_rank{info.rank}.log")
    ep = args.distributed.ep if args.stage == 2 else 1
    layout = ParallelLayout(n_experts=len(args.model.experts), ep=ep, world_size=info.world_size, rank=info.rank)
    layout.build_groups()
    ep_plan = ExpertParallel(args, layout)
    is_main = info.rank == 0
    if is_main:
        check_resume_compatible(args, run_dir)
        dump_config(args, run_dir / "config.yaml")
    log.info("stage %d | world %d = ep %d x dp %d | %s | %s", args.stage, info.world_size, layout.ep, layout.dp, device_type(), resolve_precision(args))

    model, processor, local_ids = build_stage_model(args, layout)
    ep_plan.attach(model)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)  # before ZeRO-3 partitions them
    engine, ds_cfg = build_engine(model, args, layout, load_ds_json(args.deepspeed_config))
    log.info("ZeRO-%d | trainable parameters %s | experts on this rank: %s",
             ds_cfg["zero_optimization"].get("stage", 0), f"{n_train:,}", model.expert_names)

    loader = build_train_loader(args, args.model.vision, layout)
    ckpt = CheckpointManager(run_dir, keep=args.checkpoint.keep)
    state = {"step": 0, "samples": 0, "tokens": 0, "data": None}
    if is_main:
        guards.sweep_incomplete(ckpt.dir)
    if args.checkpoint.resume:
        tag = ckpt.latest_tag()
        ep_plan.check_checkpoint(ckpt.dir / tag if tag else None)
        restored = ckpt.load([engine], subdirs=ep_plan.ckpt_subdirs)
        if restored:
            state.update(restored)
            loader.load_state_dict(state["data"])
            log.info("resumed from %s at step %d", restored["tag"], state["step"])

    preemption.install()
    gen_batch = eval_batch(args) if args.train.num_eval_samples > 0 else None
    metrics = MetricLogger(run_dir, enabled=is_main, resume_step=state["step"])
    guard = guards.NonFiniteGuard(engine, args.train.nan_tolerance)
    data_iter = iter(loader)
    names = ep_plan.logged_names(model)
    grad_group = layout.mpu(args.stage).get_data_parallel_group()
    dp_size = layout.dp
    last = {}
    from tqdm import tqdm

    pbar = tqdm(total=args.train.steps, initial=state["step"], disable=not is_main, desc=f"stage {args.stage}", dynamic_ncols=True)
    engine.train()
    while state["step"] < args.train.steps:
        t0 = time.time()
        loss_sum = torch.zeros(len(local_ids))  # this rank's experts
        tokens = torch.zeros(len(local_ids))
        n_tokens = 0
        for micro in range(args.train.grad_accum):
            batch = next(data_iter)
            # Seeded per (step, micro, data rank): instruction choice is reproducible after resume.
            rng = random.Random(f"{args.seed}/{state['step']}/{micro}/{layout.dp_rank}")
            if args.stage == 1:
                inputs = processor.stage1_inputs(batch, rng, args.data.vqa_prob)
            else:
                inputs = processor.stage2_inputs(batch, rng, local_ids, args.data.vqa_prob)
            inputs = to_device(inputs, engine.device)
            out = faults.poison_loss(engine(**inputs), state["step"] + 1)
            engine.backward(guard.loss_for_backward(out["loss"]))
            engine.step()
            loss_sum += out["expert_loss"].float().cpu()
            tokens += out["expert_tokens"].float().cpu()
            n_tokens += int(inputs["attention_mask"].sum()) + inputs["input_ids"].shape[0] * args.model.qformer.num_query_tokens
        state["step"] += 1
        state["samples"] += args.train.micro_batch_size * args.train.grad_accum * dp_size
        state["data"] = loader.state_dict()

        # Loss per expert, averaged over the expert's data-parallel replicas.
        expert_loss = loss_sum / args.train.grad_accum
        if dist.is_initialized() and dp_size > 1:
            dist.all_reduce(expert_loss, group=grad_group)
            expert_loss /= dp_size
        expert_loss = ep_plan.all_expert_losses(expert_loss)
        guard.end_step(engine, state["step"], ckpt.latest_tag())  # skipped on every rank, or halts
        dt = time.time() - t0
        step_tokens = ep_plan.sum_over_ep(n_tokens) * dp_size
        state["tokens"] += step_tokens
        last = {"loss/total": float(expert_loss.sum()), **{f"loss/{n}": float(l) for n, l in zip(names, expert_loss)}}
        if state["step"] % args.train.log_every == 0 or state["step"] == args.train.steps:
            gn = engine.get_global_grad_norm()
            scalars = {
                **last,
                "optim/lr": engine.get_lr()[0],
                "optim/grad_norm": float(gn) if gn is not None else float("nan"),
                "speed/samples_per_s": args.train.micro_batch_size * args.train.grad_accum * dp_size / dt,
                "speed/tokens_per_s": step_tokens / dt,
                "speed/step_s": dt,
                "memory/peak_gib": peak_memory_gib(),
                "optim/skipped_steps": guard.skipped,
            }
            stats = guards.global_data_stats(loader, grad_group, engine.device)
            scalars.update({f"data/{k}": v for k, v in stats.items()})
            metrics.log(state["step"], scalars)
        pbar.set_postfix({k.split("/")[1]: f"{v:.3f}" for k, v in last.items()})
        pbar.update(1)

        every_eval = args.train.eval_every
        if gen_batch is not None and ((every_eval and state["step"] % every_eval == 0) or state["step"] == args.train.steps):
            log_generations(engine, processor, gen_batch, args, metrics, state["step"], ep_plan)
        stop_now = args.train.stop_after_steps and state["step"] >= args.train.stop_after_steps
        if preemption.requested() or stop_now:
            ckpt.save([engine], state["step"], {k: v for k, v in state.items() if k != "tag"}, ep_plan.ckpt_subdirs)
            log.warning("stopping at step %d on a preemption signal; checkpoint %s written", state["step"], ckpt.latest_tag())
            if is_main:
                preemption.requeue()
            metrics.close()
            return {"step": state["step"], "preempted": True, **last}
        if state["step"] % args.checkpoint.every == 0 or state["step"] == args.train.steps:
            ckpt.save([engine], state["step"], {k: v for k, v in state.items() if k != "tag"}, ep_plan.ckpt_subdirs)
        faults.fire("after_step", state["step"])
    pbar.close()

    init_dir = final_dir_of(args.init_from) if args.stage == 2 else None
    out = export_final(
        engine.module,
        args,
        run_dir / "final",
        expert_names=args.model.experts,
        random_frozen=random_frozen_prefixes(args),
        init_dir=init_dir,
        write_adapters=layout.dp_rank == 0,
    )
    metrics.close()
    log.info("stage %d done: %d steps, final loss %s; model directory %s", args.stage, state["step"],
             {k: round(v, 4) for k, v in last.items()}, out)
    return {"step": state["step"], **last}


if __name__ == "__main__":
    sys.exit(main())
