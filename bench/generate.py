"""Generation throughput: all experts in ONE batched generate call vs experts in turn; VQA with each image encoded once.

Both modes run in the same process on the same model and images, alternating, best of
`--repeats`. A Stage II model is built from a preset with random adapters (no training needed:
the cost of generation does not depend on the weights' values). Every row generates exactly
`--max-new-tokens` tokens (min_new_tokens = max_new_tokens) so both modes do the same work; pass
`--free-length` to let rows stop at EOS instead.

    python bench/generate.py                              # tiny preset, random weights, CPU
    python bench/generate.py --config demo --images 8     # real SmolLM2-135M (rsmoe assets --prepare smollm2-135m-instruct)

Prints a table: captions/s (one caption = every expert's sub-caption + the composed caption),
generated tokens/s, and the speed-up of batched over in-turn.

`--vqa-questions K` (default 8) adds a VQA table: K questions per image answered in batches of
`--vqa-batch` questions, each image through the vision encoder once per batch (`image_index`,
what `rsmoe eval` does) vs once per question (the image repeated per row, as before).
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch

from rsmoe.config import load_config
from rsmoe.data.loader import preprocess_image
from rsmoe.data.sample import sample_root
from rsmoe.config import GenerationArgs
from rsmoe.inference.generate import answer, caption, images_once
from rsmoe.models.build import build_model
from rsmoe.data.processor import Processor


class FixedLength(GenerationArgs):
    """Every row generates exactly max_new_tokens, so batched and in-turn do equal work."""

    def kwargs(self, processor):
        out = super().kwargs(processor)
        out["min_new_tokens"] = self.max_new_tokens
        return out


def load_images(n: int, cfg) -> torch.Tensor:
    v = cfg.model.vision
    files = sorted(sample_root().rglob("images/*.png"))[:n]
    if not files:
        raise SystemExit("no sample images found under data/sample")
    mean, std = np.asarray(v.image_mean, np.float32), np.asarray(v.image_std, np.float32)
    arrs = [preprocess_image(files[i % len(files)].read_bytes(), v.image_size, mean, std) for i in range(n)]
    return torch.from_numpy(np.stack(arrs))


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="tiny", help="preset (tiny: random weights; demo: real SmolLM2-135M)")
    ap.add_argument("--images", type=int, default=16, help="images per measurement")
    ap.add_argument("--batch-size", type=int, nargs="+", default=[1, 8], help="images per generate call (one row per expert each)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--num-beams", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--free-length", action="store_true", help="stop rows at EOS (work then differs between modes)")
    ap.add_argument("--vqa-questions", type=int, default=8, help="questions per image for the VQA table (0 = skip it)")
    ap.add_argument("--vqa-batch", type=int, default=32, help="questions per answer() call")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: on a shared or loaded CPU more threads spin-wait and swamp the comparison; 0 = torch default)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)

    cfg = load_config(a.config)
    m = cfg.model
    model, llm_tok, q_tok = build_model(m, seed=0)
    n_exp = len(m.experts)
    model.to_stage2(list(range(n_exp)), 0, m.experts)
    # Non-zero adapters, so each row really uses its own expert's weights.
    with torch.no_grad():
        for p in model.experts.lora_parameters():
            p.normal_(0, 0.02)
    dev = torch.device(a.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    model.to(dev, dtype).eval()
    proc = Processor(llm_tok, q_tok, m.experts, m.max_prompt_len, m.max_target_len, m.qformer.max_instruction_len)
    pixels = load_images(a.images, cfg)
    gen_cls = GenerationArgs if a.free_length else FixedLength
    gen = gen_cls(max_new_tokens=a.max_new_tokens, num_beams=a.num_beams)

    def run_all(bs: int, sequential: bool) -> None:
        for s in range(0, a.images, bs):
            caption(model, proc, pixels[s : s + bs].to(dev), None, gen, sequential=sequential)
            if dev.type == "cuda":
                torch.cuda.synchronize()

    print(f"# config={a.config} device={dev} ({platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}) "
          f"experts={n_exp} images={a.images} max_new_tokens={a.max_new_tokens} beams={a.num_beams} "
          f"length={'free (EOS)' if a.free_length else 'fixed'} best of {a.repeats}")
    header = f"| {'batch':>5} | {'mode':<24} | {'captions/s':>10} | {'tokens/s':>9} | {'speed-up':>8} |"
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    run_all(a.batch_size[0], False)  # warm-up (lazy init, allocator)
    for bs in a.batch_size:
        best = {False: float("inf"), True: float("inf")}
        for _ in range(a.repeats):
            for sequential in (False, True):  # alternate so drift hits both modes alike
                best[sequential] = min(best[sequential], timed(lambda: run_all(bs, sequential)))
        tokens = a.images * n_exp * a.max_new_tokens
        for sequential, label in ((True, "experts in turn"), (False, "batched (one call)")):
            t = best[sequential]
            speed = best[True] / t
            tok = f"{tokens / t:9.1f}" if not a.free_length else f"{'~':>9}"
            print(f"| {bs:>5} | {label:<24} | {a.images / t:>10.2f} | {tok} | {speed:>7.2f}x |")
    if a.vqa_questions:
        vqa_table(a, model, proc, pixels, dev)


QUESTIONS = [("Is there a road?", "presence"), ("How many buildings are there?", "count"),
             ("Is it a rural or an urban area?", "rural_urban"), ("Is there a water area?", "presence"),
             ("Are there more buildings than roads?", "comp"), ("How many roads are there?", "count")]


def vqa_table(a, model, proc, pixels, dev) -> None:
    rows = [(i, *QUESTIONS[(i + j) % len(QUESTIONS)]) for i in range(a.images) for j in range(a.vqa_questions)]
    gen = FixedLength(max_new_tokens=4)

    def run_all(shared: bool) -> None:
        for s in range(0, len(rows), a.vqa_batch):
            chunk = rows[s : s + a.vqa_batch]
            qs, types = [q for _, q, _ in chunk], [t for _, _, t in chunk]
            if shared:
                images, image_index = images_once([i for i, _, _ in chunk])
                answer(model, proc, pixels[images].to(dev), qs, types, gen, image_index=image_index)
            else:
                answer(model, proc, pixels[[i for i, _, _ in chunk]].to(dev), qs, types, gen)
            if dev.type == "cuda":
                torch.cuda.synchronize()

    run_all(True)  # warm-up
    best = {False: float("inf"), True: float("inf")}
    for _ in range(a.repeats):
        for shared in (True, False):
            best[shared] = min(best[shared], timed(lambda: run_all(shared)))
    print(f"\n# VQA: {a.images} images x {a.vqa_questions} questions, {a.vqa_batch} questions per call, 4 new tokens, best of {a.repeats}")
    header = f"| {'vision encoder runs':<26} | {'answers/s':>9} | {'speed-up':>8} |"
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for shared, label in ((False, "once per question (before)"), (True, "once per image per call")):
        print(f"| {label:<26} | {len(rows) / best[shared]:>9.2f} | {best[False] / best[shared]:>7.2f}x |")


if __name__ == "__main__":
    main()
