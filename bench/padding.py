"""Padding share of the training rows, and what length-aware batching (`train.length_groups`) saves.

    python bench/padding.py                                  # demo preset tokenizers, padding share only
    python bench/padding.py --time 12 --groups 1 2 3         # + training-step CPU time on the demo model
    python bench/padding.py --set train.micro_batch_size=16  # another batch size (any dotted override)

Reads the bundled sample (the shards `rsmoe prepare` builds; made in a temporary folder when
`--shards` is not given), turns batches into training rows exactly as the loop does (Processor,
per-step RNG, the preset's micro batch and vqa_prob, Stage II's overrides) and counts, per stage:

* padding share = padded positions / all positions of the LLM rows, text only (prompt + target, what
  the batch pads) and with the visual prefix (Q positions per row, never padded: what the LLM computes);
* the same with the rows of each batch split into k length groups (rsmoe.models.experts.length_groups:
  the split of the sorted rows that pads least), and with no padding at all (packing's bound).

`--time N`: the preset's real model (demo: EfficientNet-lite0 + MiniLM Q-Former + SmolLM2-135M), one
plain-torch training step (forward, backward, AdamW) on each of the first N batches for every k in
`--groups`, the k alternated per batch; process CPU time at --threads (the machine is shared), median
and total. Losses of k > 1 are compared with k = 1 on the same batch (the same function of the same
tokens: equal up to float rounding). No assertion on time.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from rsmoe.config import load_config
from rsmoe.data.loader import build_loader
from rsmoe.data.sample import build_sample_shards
from rsmoe.models.experts import length_groups
from rsmoe.training.builders import build_processor


def stage_args(preset: str, stage: int, shards: str, overrides: list[str]):
    return load_config(preset, [f"stage={stage}", f"data.train_shards={shards}", *overrides])


def batches_of(args, n: int, seed: int = 0):
    v = args.model.vision
    loader = build_loader(args.data.train_shards, batch_size=args.train.micro_batch_size, image_size=v.image_size,
                          image_mean=tuple(v.image_mean), image_std=tuple(v.image_std), seed=seed,
                          shuffle_buffer=args.data.shuffle_buffer, batches_per_epoch=n)
    return list(loader)


def rows_of(args, processor, batches) -> list[dict]:
    out = []
    experts = list(range(len(args.model.experts)))
    for step, batch in enumerate(batches):
        rng = random.Random(f"{args.seed}/{step}/0/0")  # as the training loop: (seed, step, micro, dp rank)
        if args.stage == 1:
            out.append(processor.stage1_inputs(batch, rng, args.data.vqa_prob))
        else:
            out.append(processor.stage2_inputs(batch, rng, experts, args.data.vqa_prob))
    return out


def padding(inputs: list[dict], q: int, k: int | None) -> tuple[float, float, float]:
    """(text padding share, share with the prefix, mean rows per batch); k None = no padding (packed)."""
    real = total = rows = 0
    for x in inputs:
        lengths = x["attention_mask"].sum(1).tolist()
        rows += len(lengths)
        real += sum(lengths)
        if k is None:
            total += sum(lengths)
        else:
            total += sum(len(g) * max(lengths[i] for i in g) for g in length_groups(lengths, k))
    prefix = rows * q
    return 1 - real / total, 1 - (real + prefix) / (total + prefix), rows / len(inputs)


def time_steps(args, inputs: list[dict], groups: list[int], threads: int) -> dict[int, list[float]]:
    from rsmoe.models.build import build_model
    from rsmoe.training.engine import build_optimizer

    torch.set_num_threads(threads)
    model, _, _ = build_model(args.model, args.seed)
    if args.stage == 2:
        model.to_stage2(list(range(len(args.model.experts))), args.seed, args.model.experts)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt, _ = build_optimizer(params, args)
    times: dict[int, list[float]] = {k: [] for k in groups}
    losses: dict[int, list[float]] = {k: [] for k in groups}
    state = {id(p): p.detach().clone() for p in params}
    for x in inputs:
        for k in (groups if len(times[groups[0]]) % 2 == 0 else groups[::-1]):  # alternate the order
            with torch.no_grad():  # every k starts from the same weights: same batch, same step
                for p in params:
                    p.copy_(state[id(p)])
            model.length_groups = k
            t = time.process_time()
            out = model(**x)
            out["loss"].backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            times[k].append(time.process_time() - t)
            losses[k].append(float(out["loss"]))
    for k in groups[1:]:
        diff = max(abs(a - b) / abs(b) for a, b in zip(losses[k], losses[groups[0]]))
        print(f"    k={k}: max relative loss difference vs k={groups[0]} on the same batches: {diff:.1e}")
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="demo", help="preset whose tokenizers, lengths, batch sizes and vqa_prob are used")
    p.add_argument("--shards", help="training shard pattern (default: build the bundled sample in a temporary folder)")
    p.add_argument("--batches", type=int, default=200, help="batches per stage for the padding share")
    p.add_argument("--groups", type=int, nargs="+", default=[1, 2, 3, 4], help="length groups k to report (1 = today)")
    p.add_argument("--time", type=int, default=0, metavar="N", help="also time N training steps per k on the preset's model")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--stages", type=int, nargs="+", default=[1, 2], choices=[1, 2])
    p.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="KEY=VALUE",
                   help="dotted config overrides, e.g. --set train.micro_batch_size=16")
    a = p.parse_args(argv)
    tmp = None
    shards = a.shards
    if not shards:
        tmp = tempfile.TemporaryDirectory()
        build_sample_shards(tmp.name)
        shards = str(Path(tmp.name) / "train-*.tar")
    for stage in a.stages:
        args = stage_args(a.config, stage, shards, a.overrides)
        from rsmoe.models.build import build_tokenizers

        processor = build_processor(args, *build_tokenizers(args.model))
        inputs = rows_of(args, processor, batches_of(args, max(a.batches, a.time)))
        q = args.model.qformer.num_query_tokens
        print(f"stage {stage} ({a.config}: micro batch {args.train.micro_batch_size}, vqa_prob {args.data.vqa_prob}, "
              f"{len(args.model.experts)} experts, max prompt/target {args.model.max_prompt_len}/{args.model.max_target_len}, "
              f"{q} prefix positions), {a.batches} batches:")
        lengths = [n for x in inputs[: a.batches] for n in x["attention_mask"].sum(1).tolist()]
        print(f"  row text lengths: min {min(lengths)}, median {statistics.median(lengths):.0f}, max {max(lengths)}")
        for k in a.groups:
            text, allpos, rows = padding(inputs[: a.batches], q, k)
            print(f"  k={k}: padding share {100 * text:5.1f}% of text positions, {100 * allpos:5.1f}% of LLM positions "
                  f"({rows:.1f} rows per batch)")
        text, allpos, _ = padding(inputs[: a.batches], q, None)
        print(f"  no padding (packing bound): {100 * text:.1f}% / {100 * allpos:.1f}%")
        if a.time:
            times = time_steps(args, inputs[: a.time], a.groups, a.threads)
            base = statistics.median(times[a.groups[0]])
            for k in a.groups:
                med = statistics.median(times[k])
                print(f"  k={k}: step {med:.3f} s CPU (median of {len(times[k])}), total {sum(times[k]):.1f} s, "
                      f"{base / med:.2f}x vs k={a.groups[0]}")
    if tmp:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
