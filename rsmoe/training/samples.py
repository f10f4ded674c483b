"""Sample generations during training: a fixed batch of held-out images captioned by every expert,
written to TensorBoard as text (the same batch every time, so the captions can be compared)."""

from __future__ import annotations

import logging

from rsmoe.config import GenerationArgs, TrainArgs
from rsmoe.data.loader import build_loader
from rsmoe.distributed import collectives
from rsmoe.distributed.expert_parallel import ExpertParallel
from rsmoe.inference.generate import caption
from rsmoe.training.engine import is_zero3
from rsmoe.training.metrics import MetricLogger

log = logging.getLogger(__name__)


def sample_batch(args: TrainArgs):
    """A fixed batch of held-out images (the same on every rank); None when there is none to use."""
    if args.train.num_eval_samples <= 0:
        return None
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


def log_generations(engine, processor, batch, args: TrainArgs, metrics: MetricLogger, step: int,
                    ep_plan: ExpertParallel) -> None:
    """Collective: every rank generates (ZeRO-3 gathers weights within groups; EP ranks hold different experts)."""
    model = engine.module
    was_training = model.training
    # Ranks stop at different lengths; under ZeRO-3 all must keep running forwards until the last is done.
    synced = is_zero3(engine) and collectives.active()
    gen = GenerationArgs(max_new_tokens=args.train.max_new_tokens, synced_gpus=synced or None)
    results = ep_plan.merge_generations(caption(model, processor, batch["pixel_values"], batch.get("instruction"), gen))
    model.train(was_training)
    lines = []
    for key, ref, res in zip(batch["key"], batch["caption"], results):
        experts = "  \n".join(f"**{k}**: {v}" for k, v in res["experts"].items())
        lines.append(f"### {key}\n{experts}  \n**composed**: {res['caption']}  \n**reference**: {ref}")
    metrics.text(step, "samples/generations", "\n\n".join(lines))
    log.info("step %d sample: %s", step, results[0]["caption"][:200] if results else "")
