"""What a training stage builds before its loop: the model for this rank (with Stage II's starting
point and experts), its input processor, and its data loader."""

from __future__ import annotations

import logging

from rsmoe.config import TrainArgs
from rsmoe.data.loader import Loader, build_loader
from rsmoe.data.processor import Processor
from rsmoe.distributed.layout import ParallelLayout
from rsmoe.io import model_dir
from rsmoe.io.feature_cache import attach_feature_cache
from rsmoe.models.build import build_model
from rsmoe.models.model import RSMoE

log = logging.getLogger(__name__)


def build_processor(args: TrainArgs, llm_tok, q_tok) -> Processor:
    return Processor.for_model(args.model, llm_tok, q_tok, caption_source=args.data.caption_source,
                               vqa_sampling=args.data.vqa_sampling)


def build_stage_model(args: TrainArgs, layout: ParallelLayout) -> tuple[RSMoE, Processor, list[int]]:
    """(model, processor, this rank's global expert ids). Stage II starts from Stage I's directory:
    its LoRA merged into the base and one fresh adapter per expert this rank holds (and, with the
    learned router, a fresh router per expert). `stage2_init=untrained` (the one-stage arm) skips
    Stage I: the model as built from the config, whose fresh Stage I adapter is a no-op (B = 0). With
    `data.feature_cache`, the cache is its prefix_fn, fingerprinted on the weights just loaded."""
    init_dir = model_dir.stage2_init_dir(args)
    model, llm_tok, q_tok = build_model(args.model, args.seed, fresh=init_dir is None)
    local_ids = layout.local_expert_ids(args.stage)
    if args.stage == 2:
        if init_dir is not None:
            model_dir.load_stage1_parts(init_dir, model)
        model.to_stage2(local_ids, args.seed, args.model.experts, train_qformer=args.model.train_qformer_stage2)
    model.loss_per_sample = args.train.loss_normalisation == "sample"
    if args.train.itc_weight > 0 and args.stage == 1:
        model.enable_itc(args.train.itc_weight, args.train.itc_bank)
    attach_feature_cache(model, args.data.feature_cache, args.data.feature_cache_gb)
    # Rows every rank is sure to have: Stage I one per sample; Stage II at least one per local expert.
    sure_rows = args.train.micro_batch_size if args.stage == 1 else len(local_ids)
    model.length_groups = min(args.train.length_groups, sure_rows)
    if model.length_groups < args.train.length_groups:
        log.info("train.length_groups=%d capped at %d (the rows every rank is sure to have)", args.train.length_groups,
                 model.length_groups)
    return model, build_processor(args, llm_tok, q_tok), local_ids


def build_train_loader(args: TrainArgs, layout: ParallelLayout) -> Loader:
    v = args.model.vision
    return build_loader(
        args.data.train_shards,
        batch_size=args.train.micro_batch_size,
        image_size=v.image_size,
        image_mean=tuple(v.image_mean),
        image_std=tuple(v.image_std),
        rank=layout.dp_rank,  # every rank of one EP group reads the same batch
        world_size=layout.dp,
        seed=args.seed,
        num_workers=args.data.num_workers,
        shuffle_buffer=args.data.shuffle_buffer,
        batches_per_epoch=args.train.steps * args.train.grad_accum,
    )
