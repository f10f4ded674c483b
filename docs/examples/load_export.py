"""Rebuild an rsmoe export with plain transformers + peft (no rsmoe): the visual side and every expert.

    visual = load_visual("exports/demo")                  # (pixel_values, q_ids, q_mask) -> prefix
    expert = load_expert("exports/demo", "theme")         # PeftModel: base/ + adapters/theme/
    experts = load_experts("exports/demo")                # one PeftModel, every adapter by name

Pixels are preprocessed as in training (resize to model.vision.image_size, then (x - image_mean) /
image_std from config.yaml); the Q-Former reads the instruction tokenised by visual/qformer_tokenizer.
"""

import json
import os

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import (AutoModelForCausalLM, InstructBlipConfig, InstructBlipQFormerConfig,
                          InstructBlipQFormerModel, InstructBlipVisionModel)


def _sub(state, prefix):
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def load_visual(export_dir):
    """Vision encoder -> Q-Former (with the learned query tokens) -> language projection, as one function."""
    vdir = os.path.join(export_dir, "visual")
    info = json.load(open(os.path.join(export_dir, "export.json")))["visual"]
    state = load_file(os.path.join(vdir, "model.safetensors"))

    # The Q-Former's config is its own file. (Its weights are stored under InstructBLIP's composite names,
    # qformer.*: InstructBlipQFormerModel.from_pretrained("visual") would find none of them and silently
    # return a randomly initialised Q-Former.)
    qformer = InstructBlipQFormerModel(InstructBlipQFormerConfig.from_json_file(os.path.join(vdir, "qformer_config.json")))
    qformer.load_state_dict(_sub(state, "qformer."), strict=False)  # strict=False: position_ids is a buffer
    assert not [k for k in qformer.state_dict() if k not in _sub(state, "qformer.") and "position_ids" not in k]
    query_tokens = state["query_tokens"]
    proj = torch.nn.Linear(state["language_projection.weight"].shape[1], state["language_projection.weight"].shape[0])
    proj.load_state_dict(_sub(state, "language_projection."))

    if info["vision"]["type"] == "vit":  # InstructBLIP's ViT: config.json is an InstructBlipConfig
        vit = InstructBlipVisionModel(InstructBlipConfig.from_pretrained(vdir).vision_config)
        vit.load_state_dict(_sub(state, "vision_model."), strict=False)
        assert not [k for k in vit.state_dict() if k not in _sub(state, "vision_model.") and "position_ids" not in k]
        vision = lambda px: vit(pixel_values=px).last_hidden_state  # noqa: E731
        modules = [vit]
    else:  # EfficientNet-lite0 (pip install --no-deps efficientnet-lite-pytorch==0.1.0): 1280-wide tokens
        from efficientnet_lite_pytorch import EfficientNet

        net = EfficientNet.from_name("efficientnet-lite0")
        net.load_state_dict(load_file(os.path.join(vdir, "vision_encoder.safetensors")))
        vision = lambda px: net.extract_features(px).flatten(2).transpose(1, 2)  # noqa: E731
        modules = [net]
    for m in [qformer, proj, *modules]:
        m.eval()

    @torch.no_grad()
    def prefix(pixel_values, qformer_input_ids, qformer_attention_mask):
        image = vision(pixel_values)
        if info.get("token_norm"):  # model.vision.token_norm: parameter-free LayerNorm per encoder token
            image = torch.nn.functional.layer_norm(image, image.shape[-1:])
        q = query_tokens.expand(image.shape[0], -1, -1)
        mask = torch.cat([torch.ones(q.shape[:2], dtype=qformer_attention_mask.dtype), qformer_attention_mask], dim=1)
        out = qformer(input_ids=qformer_input_ids, attention_mask=mask, query_embeds=q, encoder_hidden_states=image,
                      encoder_attention_mask=torch.ones(image.shape[:2], dtype=torch.long))
        out = proj(out.last_hidden_state[:, : q.shape[1]])
        if info.get("prefix_rms"):  # model.prefix_norm: each token at the LLM word embeddings' RMS
            out = out * (info["prefix_rms"] * torch.rsqrt(out.pow(2).mean(-1, keepdim=True) + 1e-6))
        return out

    return prefix


def _base(export_dir):
    return AutoModelForCausalLM.from_pretrained(os.path.join(export_dir, "base"), dtype=torch.float32)


def load_expert(export_dir, name):
    """One expert: the exported base with that expert's peft adapter (merged/<name> is the same, merged)."""
    return PeftModel.from_pretrained(_base(export_dir), os.path.join(export_dir, "adapters", name)).eval()


def load_experts(export_dir):
    """Every expert on one base, each adapter under its expert's name: pass adapter_names=[expert of each
    row] to forward/generate for a batch that mixes experts."""
    names = [e["name"] for e in json.load(open(os.path.join(export_dir, "export.json")))["experts"]]
    model = PeftModel.from_pretrained(_base(export_dir), os.path.join(export_dir, "adapters", names[0]),
                                      adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(os.path.join(export_dir, "adapters", name), adapter_name=name)
    return model.eval(), names


def expert_inputs(expert, prefix, prompt_ids):
    """What an expert reads: inputs_embeds = [visual prefix | embedded prompt], and its attention mask."""
    tok = expert.get_input_embeddings()(prompt_ids)
    embeds = torch.cat([prefix.to(tok.dtype), tok], dim=1)
    return embeds, torch.ones(embeds.shape[:2], dtype=torch.long)
