"""Numerical parity of an export at a real size: rsmoe's batched multi-LoRA forward vs plain peft (fp32).

Builds a Stage II model from a preset with random adapters (B ~ N(0, --b-std); A as initialised), writes
base/ and adapters/ exactly as `rsmoe export` does (rsmoe.io.export.clean_lm, rsmoe.io.adapters), loads
them with plain transformers + peft, and prints max |logit diff| for: each expert alone
(PeftModel.from_pretrained), one mixed batch (adapter_names=[...]), and peft's merge_and_unload.

    python bench/export_parity.py                  # demo preset: SmolLM2-135M (rsmoe assets --prepare smollm2-135m-instruct)
    python bench/export_parity.py --config tiny
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from rsmoe.config import load_config
from rsmoe.io import adapters
from rsmoe.io.export import clean_lm
from rsmoe.models.build import build_model
from rsmoe.models.multi_lora import adapters_active


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="demo")
    ap.add_argument("--rows", type=int, default=6)
    ap.add_argument("--length", type=int, default=48)
    ap.add_argument("--b-std", type=float, default=0.01)
    a = ap.parse_args()
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    args = load_config(a.config)
    names = list(args.model.experts)
    model, tok, _ = build_model(args.model, args.seed)
    model.to_stage2(list(range(len(names))), args.seed, names)
    model.eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in model.experts.lora_layers.values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * a.b_std)
    ids = torch.randint(0, len(tok), (a.rows, a.length), generator=gen)
    slots = torch.arange(a.rows) % len(names)
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        clean_lm(model.experts).save_pretrained(d / "base")
        adapters.write_adapters(model.experts, {s: d / n for s, n in enumerate(names)})
        pm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(d / "base"), d / names[0], adapter_name=names[0])
        for n in names[1:]:
            pm.load_adapter(d / n, adapter_name=n)
        pm.eval()
        with torch.no_grad():
            with adapters_active(model.experts.lora_layers, slots):
                mixed = model.experts.base(input_ids=ids).logits
            print(f"{a.config}: {type(model.experts.base).__name__}, {sum(p.numel() for p in model.experts.base.parameters()) / 1e6:.0f}M "
                  f"parameters, {a.rows} rows x {a.length} tokens, fp32, max |logit| {mixed.abs().max():.1f}")
            theirs = pm(input_ids=ids, adapter_names=[names[s] for s in slots.tolist()]).logits
            print(f"  mixed batch, rsmoe vs peft adapter_names: max |logit diff| {(mixed - theirs).abs().max():.2e}")
            for s, n in enumerate(names):
                with adapters_active(model.experts.lora_layers, torch.full((a.rows,), s)):
                    ours = model.experts.base(input_ids=ids).logits
                pm.set_adapter(n)
                single = pm(input_ids=ids).logits
                merged = adapters.merged_model(d / "base", d / n)(input_ids=ids).logits
                print(f"  {n}: rsmoe vs peft {(ours - single).abs().max():.2e}, vs merge_and_unload {(ours - merged).abs().max():.2e}")


if __name__ == "__main__":
    main()
