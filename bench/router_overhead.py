"""What the learned router costs: one Stage II forward + backward with model.router=template vs learned
(and none), same process, same batches, interleaved, median of `--repeats`.

A Stage II model is built from a preset with the Stage I part random (the cost does not depend on the
weights' values). Every mode sees the same sample batches and the same question draws (`--vqa-prob`);
the learned mode adds its soft prompts (k more positions per row) and one probe row per (question,
other expert). Prints CPU and wall seconds per step, rows per step, and the ratio to `template`.

    python bench/router_overhead.py                        # tiny preset
    python bench/router_overhead.py --config demo --batch 2 --repeats 5
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import time

import torch

from rsmoe.config import load_config
from rsmoe.data.loader import build_loader
from rsmoe.data.processor import Processor
from rsmoe.models.build import build_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--shards", default="data/shards/sample/train-*.tar", help="training shards (rsmoe prepare)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--vqa-prob", type=float, default=0.5)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")
    ap.add_argument("--modes", default="template,learned,none")
    ns = ap.parse_args()
    if ns.threads:
        torch.set_num_threads(ns.threads)
    modes = ns.modes.split(",")
    built = {}
    for mode in modes:
        args = load_config(ns.config, [f"model.router={mode}", "stage=2"])
        model, llm_tok, q_tok = build_model(args.model, args.seed)
        model.to_stage2(list(range(len(args.model.experts))), args.seed, args.model.experts)
        model.train()
        built[mode] = (model, Processor.for_model(args.model, llm_tok, q_tok), args)
    v = built[modes[0]][2].model.vision
    loader = iter(build_loader(ns.shards, batch_size=ns.batch, image_size=v.image_size, image_mean=tuple(v.image_mean),
                               image_std=tuple(v.image_std), seed=0, shuffle_buffer=50, batches_per_epoch=10**6))
    batches = [next(loader) for _ in range(ns.repeats + 1)]
    results = {m: {"cpu": [], "wall": [], "rows": []} for m in modes}
    for i, batch in enumerate(batches):
        for mode in modes:  # interleaved: drift in the machine's load hits every mode alike
            model, proc, args = built[mode]
            inputs = proc.stage2_inputs(batch, random.Random(i), list(range(len(args.model.experts))), ns.vqa_prob)
            c0, w0 = time.process_time(), time.perf_counter()
            out = model(**inputs)
            out["loss"].backward()
            model.zero_grad(set_to_none=True)
            c1, w1 = time.process_time(), time.perf_counter()
            if i:  # the first batch warms up
                results[mode]["cpu"].append(c1 - c0)
                results[mode]["wall"].append(w1 - w0)
                results[mode]["rows"].append(int(inputs["input_ids"].shape[0]))
    print(f"{ns.config}, batch {ns.batch}, vqa_prob {ns.vqa_prob}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}; median of {ns.repeats}")
    base = statistics.median(results["template"]["cpu"]) if "template" in results else None
    print(f"{'router':<10}{'CPU s/step':>12}{'wall s/step':>13}{'rows/step':>11}{'CPU vs template':>17}")
    for mode in modes:
        r = results[mode]
        cpu = statistics.median(r["cpu"])
        print(f"{mode:<10}{cpu:>12.3f}{statistics.median(r['wall']):>13.3f}{statistics.mean(r['rows']):>11.1f}"
              f"{(cpu / base if base else float('nan')):>16.2f}x")


if __name__ == "__main__":
    main()
