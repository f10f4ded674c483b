"""Load an rsmoe export with plain transformers + peft (the docs/examples/load_export.py snippet) and compare
with numbers rsmoe computed: run by tests/unit/test_export*.py under this venv's transformers 5.x and under a
second venv with transformers 4.x (RSMOE_TF4_PYTHON). No rsmoe import: this is what a user's process has.

    python check_export.py EXPORT_DIR REFERENCE.safetensors REFERENCE.json   -> one JSON line on stdout
"""

import importlib.util
import json
import os
import sys

import peft
import torch
import transformers
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

SNIPPET = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "docs", "examples", "load_export.py")


def main(export_dir, ref_tensors, ref_json):
    spec = importlib.util.spec_from_file_location("load_export", SNIPPET)
    snippet = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(snippet)
    ref, meta = load_file(ref_tensors), json.load(open(ref_json))
    out = {"transformers": transformers.__version__, "peft": peft.__version__, "tokens_equal": {}, "max_abs": {}}

    for sub, want in meta["token_ids"].items():  # tokenizers: same ids as rsmoe's for the same texts
        tok = AutoTokenizer.from_pretrained(os.path.join(export_dir, sub))
        out["tokens_equal"][sub] = [tok(t)["input_ids"] for t in meta["texts"]] == want
    out["tokenizer_class"] = type(AutoTokenizer.from_pretrained(os.path.join(export_dir, "base"))).__name__

    with torch.no_grad():
        prefix = snippet.load_visual(export_dir)(ref["pixel_values"], ref["qformer_input_ids"], ref["qformer_attention_mask"])
        out["max_abs"]["visual_prefix"] = (prefix - ref["prefix"]).abs().max().item()
        prompt = ref["prompt_ids"]
        base = AutoModelForCausalLM.from_pretrained(os.path.join(export_dir, "base"))
        embeds, mask = snippet.expert_inputs(base, ref["prefix"], prompt)
        out["max_abs"]["base"] = (base(inputs_embeds=embeds, attention_mask=mask).logits - ref["logits/base"]).abs().max().item()
        for name in meta["experts"]:
            got = snippet.load_expert(export_dir, name)(inputs_embeds=embeds, attention_mask=mask).logits
            out["max_abs"][f"peft/{name}"] = (got - ref[f"logits/{name}"]).abs().max().item()
            if os.path.isdir(os.path.join(export_dir, "merged", name)):
                merged = AutoModelForCausalLM.from_pretrained(os.path.join(export_dir, "merged", name))
                got = merged(inputs_embeds=embeds, attention_mask=mask).logits
                out["max_abs"][f"merged/{name}"] = (got - ref[f"logits/{name}"]).abs().max().item()
        # one PeftModel holding every adapter, one mixed batch: row i runs expert i % n
        experts, names = snippet.load_experts(export_dir)
        rows = [names[i % len(names)] for i in range(embeds.shape[0])]
        got = experts(inputs_embeds=embeds, attention_mask=mask, adapter_names=rows).logits
        want = torch.stack([ref[f"logits/{r}"][i] for i, r in enumerate(rows)])
        out["max_abs"]["peft/mixed_batch"] = (got - want).abs().max().item()
    out["max_abs_logit"] = max(ref[k].abs().max().item() for k in ref if k.startswith("logits/"))
    print(json.dumps(out))


if __name__ == "__main__":
    main(*sys.argv[1:4])
