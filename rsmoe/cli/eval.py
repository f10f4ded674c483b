"""Score a trained RS-MoE on shards (captioning and VQA) and write a report.

    rsmoe eval --model runs/demo/stage2 --shards "data/shards/sample/val-*.tar"
    torchrun --nproc_per_node 4 -m rsmoe.cli eval --model runs/x/stage2 --shards "rsvqa/test-*.tar" --task vqa

Captions: BLEU-1..4, METEOR, ROUGE-L, CIDEr (SPICE reported unavailable offline) against the
sample's `references`. VQA: exact-match accuracy per question type and overall, with the RSVQA
protocol averages for RSVQA-LR/HR samples. 95% bootstrap intervals. Under torchrun / srun each rank
evaluates a disjoint share and rank 0 scores everything (docs/evaluation.md).
"""

from __future__ import annotations

import argparse

from rsmoe.distributed.env import shutdown_distributed, world_info_from_env
from rsmoe.eval.run import EvalOptions, evaluate, format_tables
from rsmoe.logs import setup_logging


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="run directory (uses <run>/final) or a model directory")
    p.add_argument("--shards", required=True, help="webdataset shard pattern(s) (brace/glob; several joined by ' :: ')")
    p.add_argument("--task", default="both", choices=["caption", "vqa", "both"])
    p.add_argument("--protocol", default="auto", choices=["auto", "rsvqa-lr", "rsvqa-hr", "none"],
                   help="RSVQA average: auto = by each sample's dataset (RSVQA-LR / RSVQA-HR)")
    p.add_argument("--out", default=None, help="report folder (default <run>/eval/<shard folder>-<split>)")
    p.add_argument("--batch-size", type=int, default=8, help="images per caption generate call (x experts rows)")
    p.add_argument("--vqa-batch-size", type=int, default=32, help="questions per VQA generate call")
    p.add_argument("--num-beams", type=int, default=1, help="1 = greedy (default), >1 = beam search")
    p.add_argument("--max-new-tokens", type=int, default=48, help="caption length limit per expert")
    p.add_argument("--vqa-max-new-tokens", type=int, default=8, help="answer length limit")
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--limit", type=int, default=0, help="only the first N samples of the shards (0 = all)")
    p.add_argument("--questions-per-image", type=int, default=0, help="only the first N questions of each image (0 = all)")
    p.add_argument("--setting", choices=["zero-shot", "fine-tuned"], default=None,
                   help="label for every dataset (default: per dataset, fine-tuned if the run trained on it)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for 95%% intervals (0 = off)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed, also seeds the grounding control's image swap")
    p.add_argument("--no-meteor", action="store_true", help="skip METEOR (saves the JVM start)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--instruction", default=None, help="caption instruction for every image (default: the sample's or the router's)")
    p.add_argument("--sequential", action="store_true", help="experts generate in turn (baseline) instead of one batched call")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers for image decoding")
    p.add_argument("--no-thumbnails", action="store_true", help="leave images out of the report")
    p.add_argument("--no-grounding-control", action="store_true",
                   help="skip the image-grounding control (on by default: every sample is evaluated again with another "
                        "image of its dataset and real - control is reported with a paired interval). Its cost: VQA "
                        "generation runs twice; captions are copied from the real arm (generated again only where a "
                        "sample's instruction differs from its partner's); caption scoring and bootstrap run about twice")


def options_from_cli(ns: argparse.Namespace) -> EvalOptions:
    return EvalOptions(
        model=ns.model, shards=ns.shards, task=ns.task, protocol=ns.protocol, out=ns.out, batch_size=ns.batch_size,
        vqa_batch_size=ns.vqa_batch_size, num_beams=ns.num_beams, max_new_tokens=ns.max_new_tokens,
        vqa_max_new_tokens=ns.vqa_max_new_tokens, repetition_penalty=ns.repetition_penalty, limit=ns.limit,
        questions_per_image=ns.questions_per_image, setting=ns.setting, bootstrap=ns.bootstrap, seed=ns.seed,
        meteor=not ns.no_meteor, device=ns.device, dtype=ns.dtype, instruction=ns.instruction,
        sequential=ns.sequential, num_workers=ns.num_workers, thumbnails=not ns.no_thumbnails,
        grounding_control=not ns.no_grounding_control,
    )


def run(ns: argparse.Namespace) -> int:
    setup_logging(world_info_from_env().rank)
    try:
        results = evaluate(options_from_cli(ns))
    finally:
        shutdown_distributed()
    if results is not None:
        print(format_tables(results))
        for w in results["meta"]["warnings"]:
            print(f"warning: {w}")
        print(f"report: {results['_paths']['html']}  (also {results['_paths']['md']}, {results['_paths']['json']})")
    return 0
