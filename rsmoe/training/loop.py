"""The training loop of both stages, as wiring: build the components, restore a TrainState or start
one, then step, log, sample, stop or checkpoint, and finally write the model directory `<run>/final/`.

`rsmoe train` (rsmoe.cli.train) and `deepspeed train.py ...` call `train(args)`.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from rsmoe.config import TrainArgs, dump_config
from rsmoe.data.loader import Loader
from rsmoe.data.processor import Processor
from rsmoe.distributed import collectives
from rsmoe.distributed.env import WorldInfo, device_type, init_distributed
from rsmoe.distributed.expert_parallel import ExpertParallel
from rsmoe.distributed.layout import ParallelLayout
from rsmoe.io import model_dir
from rsmoe.io.feature_cache import feature_cache_metrics
from rsmoe.logs import setup_logging
from rsmoe.testing import faults
from rsmoe.training import preemption
from rsmoe.training.builders import build_stage_model, build_train_loader
from rsmoe.training.checkpointer import CheckpointManager, write_final
from rsmoe.training.engine import build_engine, load_ds_json, resolve_precision
from rsmoe.training.metrics import (
    LossWindow,
    MetricLogger,
    global_data_stats,
    peak_memory_gib,
)
from rsmoe.training.nan_guard import NonFiniteGuard
from rsmoe.training.preflight import check_resume_compatible, preflight
from rsmoe.training.run_lock import holding
from rsmoe.training.samples import log_generations, sample_batch
from rsmoe.training.state import TrainState

log = logging.getLogger("rsmoe.train")


def to_device(inputs: dict, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}


@dataclass
class StepResult:
    loss_sum: torch.Tensor
    """(n_experts,) summed target-token loss per expert in logged order, over micro-batches and replicas."""
    tokens: torch.Tensor
    """(n_experts,) target tokens per expert, likewise."""
    positions: int
    """LLM positions (prefix + text) this step processed over every rank."""
    seconds: float
    route: torch.Tensor | None = None
    """Learned router: (route loss x questions, route accuracy x questions, questions) summed over
    micro-batches and data-parallel replicas; None for the other routers and Stage I."""
    itc: torch.Tensor | None = None
    """train.itc_weight > 0 (Stage I): (contrastive loss x caption rows, caption rows), summed likewise."""


def train_step(engine, processor: Processor, data_iter, guard: NonFiniteGuard, local_ids: list[int], args: TrainArgs,
               layout: ParallelLayout, ep_plan: ExpertParallel, state: TrainState) -> StepResult:
    """One optimizer step (grad_accum micro-batches). Collective: every rank calls it.

    Losses and token counts stay on the device and are reduced once per optimizer step: nothing here
    waits for the device per micro-batch (the inputs' sizes are read on the host before the copy)."""
    t0 = time.time()
    loss_sum = torch.zeros(len(local_ids), device=engine.device)  # this rank's experts
    tokens = torch.zeros(len(local_ids), device=engine.device)
    positions = 0
    route_sum = torch.zeros(3, device=engine.device)  # learned router: questions x (loss, acc), questions
    itc_sum = torch.zeros(2, device=engine.device)  # contrastive term: rows x loss, rows
    for micro in range(args.train.grad_accum):
        batch = next(data_iter)
        # Seeded per (step, micro, data rank): instruction choice is reproducible after resume.
        rng = random.Random(f"{args.seed}/{state.step}/{micro}/{layout.dp_rank}")
        if args.stage == 1:
            inputs = processor.stage1_inputs(batch, rng, args.data.vqa_prob, args.train.itc_questions and args.train.itc_weight > 0)
        else:
            inputs = processor.stage2_inputs(batch, rng, local_ids, args.data.vqa_prob)
        positions += int(inputs["attention_mask"].sum()) + inputs["input_ids"].shape[0] * args.model.qformer.num_query_tokens
        out = faults.poison_loss(engine(**to_device(inputs, engine.device)), state.step + 1)
        engine.backward(guard.loss_for_backward(out["loss"]))
        engine.step()
        loss_sum += out["expert_loss_sum"].float()
        tokens += out["expert_tokens"].float()
        if "route_loss" in out:
            nq = out["route_questions"].float()
            route_sum += torch.stack([out["route_loss"].float() * nq, out["route_acc"].float() * nq, nq])
        if "itc_loss" in out:
            itc_sum += torch.stack([out["itc_loss"].float() * out["itc_rows"], out["itc_rows"]])
    # Summed over the expert's data-parallel replicas, then every expert's in order (EP gathers blocks). The
    # route head's numbers are already whole-EP-group values (computed from gathered logits and losses).
    dp_group = layout.mpu(args.stage).get_data_parallel_group()
    n = len(local_ids)
    sums = collectives.all_sum(torch.cat([loss_sum, tokens, route_sum, itc_sum]), dp_group)
    loss_sum, tokens = ep_plan.all_expert_losses(sums[:n]), ep_plan.all_expert_losses(sums[n : 2 * n])
    route = sums[2 * n : 2 * n + 3].cpu() if processor.learned and args.stage == 2 else None
    itc = sums[2 * n + 3 :].cpu() if args.train.itc_weight > 0 and args.stage == 1 else None
    step_positions = int(ep_plan.sum_over_ep(torch.tensor([float(positions)], dtype=torch.float64)).item()) * layout.dp
    return StepResult(loss_sum.cpu(), tokens.cpu(), step_positions, time.time() - t0, route, itc)


def restore(ckpt: CheckpointManager, engine, loader: Loader, args: TrainArgs, ep_plan: ExpertParallel) -> TrainState:
    """The run's state from `checkpoints/latest` (engine, loader position, RNG), or a fresh one."""
    if collectives.rank() == 0:
        ckpt.sweep_incomplete()
    if not args.checkpoint.resume:
        return TrainState()
    tag = ckpt.latest_tag()
    ep_plan.check_checkpoint(ckpt.dir / tag if tag else None)
    restored = ckpt.load([engine])
    if restored is None:
        return TrainState()
    state, tag = restored
    loader.load_state_dict(state.data)
    log.info("resumed from %s at step %d", tag, state.step)
    return state


def train(args: TrainArgs) -> dict:
    preflight(args)  # paths, layout, DeepSpeed JSON: fail in a second, before any heavy work
    info = init_distributed(args.distributed.backend)
    run_dir = Path(args.run_dir)
    with holding(run_dir, args.checkpoint):  # one job per run directory (before it writes a log line there)
        setup_logging(info.rank, run_dir / "logs" / f"train_rank{info.rank}.log")
        return train_stage(args, info, run_dir)


def train_stage(args: TrainArgs, info: WorldInfo, run_dir: Path) -> dict:
    layout = ParallelLayout(n_experts=len(args.model.experts), ep=args.distributed.ep if args.stage == 2 else 1,
                            world_size=info.world_size, rank=info.rank)
    layout.build_groups()
    ep_plan = ExpertParallel(args, layout)
    is_main = info.rank == 0
    if is_main:
        check_resume_compatible(args, run_dir)
        dump_config(args, run_dir / "config.yaml")
    log.info("stage %d | world %d = ep %d x dp %d | %s | %s", args.stage, info.world_size, layout.ep, layout.dp,
             device_type(), resolve_precision(args))

    model, processor, local_ids = build_stage_model(args, layout)
    ep_plan.attach(model)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)  # before ZeRO-3 partitions them
    engine, ds_cfg = build_engine(model, args, layout, load_ds_json(args.deepspeed_config))
    log.info("ZeRO-%d | trainable parameters %s | experts on this rank: %s",
             ds_cfg["zero_optimization"].get("stage", 0), f"{n_train:,}", model.expert_names)
    loader = build_train_loader(args, layout)
    ckpt = CheckpointManager(run_dir, keep=args.checkpoint.keep, subdirs=ep_plan.ckpt_subdirs)
    state = restore(ckpt, engine, loader, args, ep_plan)

    preemption.install()
    samples = sample_batch(args)
    metrics = MetricLogger(run_dir, enabled=is_main, resume_step=state.step)
    guard = NonFiniteGuard(engine, args.train.nan_tolerance)
    names = ep_plan.logged_names(model)
    data_group = layout.mpu(args.stage).get_data_parallel_group()
    samples_per_step = args.train.micro_batch_size * args.train.grad_accum * layout.dp
    t = args.train
    pbar = tqdm(total=t.steps, initial=state.step, disable=not is_main, desc=f"stage {args.stage}", dynamic_ncols=True)
    data_iter = iter(loader)
    window = LossWindow(names)
    last: dict[str, float] = {}
    engine.train()
    while state.step < t.steps:
        result = train_step(engine, processor, data_iter, guard, local_ids, args, layout, ep_plan, state)
        state.step += 1
        state.samples += samples_per_step
        state.tokens += result.positions
        state.data = loader.state_dict()
        guard.end_step(engine, state.step, ckpt.latest_tag)  # skipped on every rank, or halts
        window.add(result.loss_sum, result.tokens, result.route, result.itc)
        last = {k: v for k, v in window.scalars().items() if k.startswith(("loss/", "route/"))}
        losses = {k: v for k, v in last.items() if k.startswith("loss/")}
        if state.step % t.log_every == 0 or state.step == t.steps:
            gn = engine.get_global_grad_norm()
            metrics.log(state.step, {
                **window.scalars(),
                "optim/lr": engine.get_lr()[0],
                "optim/grad_norm": float(gn) if gn is not None else float("nan"),
                "speed/samples_per_s": samples_per_step / result.seconds,
                "speed/tokens_per_s": result.positions / result.seconds,
                "speed/step_s": result.seconds,
                "memory/peak_gib": peak_memory_gib(),
                "optim/skipped_steps": guard.skipped,
                **{f"data/{k}": v for k, v in global_data_stats(loader, data_group).items()},
                **feature_cache_metrics(engine.module, data_group),  # hits and misses; {} when data.feature_cache=off
            })
            window.reset()
        pbar.set_postfix({k.split("/")[1]: f"{v:.3f}" for k, v in losses.items()})
        pbar.update(1)
        if samples is not None and ((t.eval_every and state.step % t.eval_every == 0) or state.step == t.steps):
            log_generations(engine, processor, samples, args, metrics, state.step, ep_plan)

        stopping = preemption.requested() or (t.stop_after_steps and state.step >= t.stop_after_steps)
        every = args.checkpoint.every
        if stopping or (every and state.step % every == 0) or state.step == t.steps:
            ckpt.save([engine], state)
        if stopping:
            log.warning("stopping at step %d on a preemption signal; checkpoint %s written", state.step, ckpt.latest_tag())
            if is_main:
                preemption.requeue()
            metrics.close()
            return {"step": state.step, "preempted": True, **last}
        faults.fire("after_step", state.step)
    pbar.close()

    out = write_final(engine.module, args, run_dir / "final",
                      init_dir=model_dir.stage2_init_dir(args),  # router/ablation (issue 17): None for stage2_init=untrained
                      write_adapters=layout.dp_rank == 0)
    metrics.close()
    log.info("stage %d done: %d steps, final loss %s; model directory %s", args.stage, state.step,
             {k: round(v, 4) for k, v in last.items()}, out)
    return {"step": state.step, **last}
