"""Training-step benchmark: rsmoe's Stage I / Stage II step against the plain baseline, same run.

    python bench/train_step.py --shape tiny                      # CPU, seconds
    python bench/train_step.py --shape small                     # CPU, a few minutes
    python bench/train_step.py --shape rsmoe-1b --json out.json  # GPU (bf16), docs/design.md §7 shapes

Every configuration runs in its own child process (clean peak memory, clean DeepSpeed state) on
random weights with the real shapes. Rows of the table:

* ``copies`` (Stage II; ``impl=baseline``): plain transformers + peft with one full model copy per expert
  (each its own frozen ViT under no_grad -> Q-Former -> projection -> ``get_peft_model(LlamaForCausalLM)``
  with LoRA on the FFN, HF's own ``labels=`` loss), the copies in turn (forward, backward, optimizer
  step each). Nobody who knows peft writes this; it is kept as the earlier reference.
* ``peft`` (``impl=fair``; in Stage I the one-model baseline): what a peft user writes. Stage II: ONE frozen
  base with E named adapters (``get_peft_model(..., adapter_name=)`` + ``add_adapter``), the experts in turn
  (``set_adapter``, forward, backward), the frozen visual prefix computed once per sample under no_grad and
  reused for every expert, one fused AdamW over all adapters, one global clip (1.0) and step: the same
  optimisation as rsmoe's summed loss. Same precision and optimizer as rsmoe.
* ``rsmoe``: ``build_model`` -> (Stage II: ``to_stage2``) -> one step through plain torch
  (``--zero none``) or a one-rank DeepSpeed engine from ``rsmoe.training.engine.build_engine`` with
  ``ds_configs/zero2.json`` / ``zero3.json``. Stage II runs all experts as rows of one batched
  forward over one frozen base, the visual prefix computed once per sample.
* ``+cache`` (``--cache``): frozen features not recomputed. rsmoe: its real feature cache
  (``data.feature_cache=memory``; the warm-up steps fill it, every timed step hits, as from the second
  epoch; hashing and lookups are in the time). peft: the frozen features precomputed once (Stage I the
  encoder tokens, Stage II the prefix): an ideal cache that costs nothing per step.

Samples are images: a Stage II sample trains every expert once (one row per expert).

Model FLOPs (what one step needs, whatever the implementation; work an implementation repeats,
such as the baseline's per-copy vision pass, or wastes, such as logits on prompt positions or the
dense multi-adapter LoRA's extra slices, is not credited). Per image:
  vision (frozen, forward only):   2*P_vis*T_v + 4*L_v*T_v^2*h_v            (+ patch embedding)
  Q-Former, per T_q = Q + I tokens:  F_q = 2*P_qf*T_q + 4*L_q*T_q^2*h_q + cross-attention
                                   (queries only: 2*(2 h_q^2)*Q + 2*(2 h_v h_q)*T_v + 4*Q*T_v*h_q per x-layer)
                                   trained (Stage I): 3*F_q;  frozen (Stage II): F_q
  projection:                      2*h_q*d*Q, x3 when trained
Per LLM row of S = Q + L_text positions, T_t target tokens (the rows are B in Stage I, B*E in II):
  frozen linears:   fwd 2*P_llm*S + bwd 2*P_llm*S (activation gradients only: frozen weights need
                    no weight gradients)                                      = 4*P_llm*S
  attention core:   fwd 2*L*S^2*d (causal half of QK^T and AV), bwd 2x fwd     = 6*L*S^2*d
  LoRA (own adapter): per adapted (in, out): fwd 2*r*(in+out)*S, x3 with bwd = 6*r*(in+out)*S
  LM head (frozen, target positions only): 4*d*V*T_t
+cache rows are credited without the frozen work they take from the cache (Stage I: vision; Stage II: the
whole visual side), so their TFLOP/s is what they compute, not the work they skip.
P_* count the matmul weights of the transformer layers (embeddings are lookups). Achieved TFLOP/s =
model FLOPs / step time; the ceiling is a big matmul measured in the same run, in the runs'
precision (bf16 8192^3 on GPU; on CPU, fp32 by default, the best of 1024^3 and 2048^3 over 3 rounds). These formulas reproduce docs/design.md §7's anchors (70.1 samples/s ->
~76 TFLOP/s for the 1-expert step).

Options: --zero none/2/3 (several), --cache, --precision auto/fp32/bf16, --grad-ckpt, --attn sdpa/flash_attention_2
(flash only if installed), --profile [STAGE:ZERO ...] (torch.profiler top ops of rsmoe runs; default Stage II),
--lora-micro (multi-adapter LoRA implementations on one FFN layer). No assertion on time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------- shapes


@dataclass
class Shape:
    name: str
    image: int
    patch: int
    v_hidden: int
    v_layers: int
    v_heads: int
    v_inter: int
    queries: int
    q_hidden: int
    q_layers: int
    q_heads: int
    q_inter: int
    instr_len: int
    d: int
    inter: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    lora_r: int
    prompt_len: int
    target_len: int
    batch: int
    experts: int = 3
    q_vocab: int = 30522
    lora_targets: list[str] = field(default_factory=lambda: ["gate_proj", "up_proj", "down_proj"])

    @property
    def text_len(self) -> int:
        return self.prompt_len + self.target_len


SHAPES = {
    # Runs in seconds on a laptop CPU.
    "tiny": Shape("tiny", image=64, patch=16, v_hidden=64, v_layers=2, v_heads=4, v_inter=128,
                  queries=8, q_hidden=64, q_layers=2, q_heads=4, q_inter=128, instr_len=8,
                  d=64, inter=128, layers=2, heads=4, kv_heads=2, vocab=1000, lora_r=4,
                  prompt_len=8, target_len=24, batch=4, q_vocab=1000),
    # A scaled-down RS-MoE (every part present, ~60M params): a couple of minutes on 2 CPU cores.
    "small": Shape("small", image=112, patch=14, v_hidden=256, v_layers=4, v_heads=4, v_inter=1024,
                   queries=32, q_hidden=256, q_layers=4, q_heads=4, q_inter=1024, instr_len=16,
                   d=512, inter=1408, layers=4, heads=8, kv_heads=2, vocab=8000, lora_r=8,
                   prompt_len=16, target_len=48, batch=4, q_vocab=8000),
    # docs/design.md §7: EVA ViT-g/14 224 px (InstructBlipVisionConfig defaults), InstructBLIP Q-Former
    # (32 queries, BERT-base), TinyLlama-1.1B-shaped experts, LoRA r=8 on the FFN, 32 prefix +
    # 96 text tokens (16 prompt + 80 caption) = 128 LLM positions, batch 16.
    "rsmoe-1b": Shape("rsmoe-1b", image=224, patch=14, v_hidden=1408, v_layers=39, v_heads=16, v_inter=6144,
                      queries=32, q_hidden=768, q_layers=12, q_heads=12, q_inter=3072, instr_len=16,
                      d=2048, inter=5632, layers=22, heads=32, kv_heads=4, vocab=32000, lora_r=8,
                      prompt_len=16, target_len=80, batch=16),
}


# ---------------------------------------------------------------- FLOPs


def model_flops(s: Shape, stage: int) -> dict[str, float]:
    """Model FLOPs of one step (see the module docstring). Returns the parts and 'total'."""
    t_v = (s.image // s.patch) ** 2 + 1
    p_vis = s.v_layers * (4 * s.v_hidden**2 + 2 * s.v_hidden * s.v_inter)
    vision = 2 * p_vis * t_v + 4 * s.v_layers * t_v**2 * s.v_hidden + 2 * 3 * s.patch**2 * s.v_hidden * (t_v - 1)
    t_q = s.queries + s.instr_len
    p_qf = s.q_layers * (4 * s.q_hidden**2 + 2 * s.q_hidden * s.q_inter)
    x_layers = math.ceil(s.q_layers / 2)  # cross_attention_frequency 2
    cross = x_layers * (2 * 2 * s.q_hidden**2 * s.queries + 2 * 2 * s.v_hidden * s.q_hidden * t_v + 4 * s.queries * t_v * s.q_hidden)
    qf_fwd = 2 * p_qf * t_q + 4 * s.q_layers * t_q**2 * s.q_hidden + cross
    proj_fwd = 2 * s.q_hidden * s.d * s.queries
    train_visual = 3 if stage == 1 else 1
    per_image = vision + train_visual * (qf_fwd + proj_fwd)

    seq = s.queries + s.text_len
    kv = s.d * s.kv_heads // s.heads
    p_llm = s.layers * (s.d * (2 * s.d + 2 * kv) + 3 * s.d * s.inter)
    linears = 4 * p_llm * seq
    attn = 6 * s.layers * seq**2 * s.d
    in_out = {"gate_proj": s.d + s.inter, "up_proj": s.d + s.inter, "down_proj": s.inter + s.d,
              "q_proj": 2 * s.d, "o_proj": 2 * s.d, "k_proj": s.d + kv, "v_proj": s.d + kv}
    lora = 6 * s.lora_r * s.layers * sum(in_out[t] for t in s.lora_targets) * seq
    head = 4 * s.d * s.vocab * s.target_len
    rows = s.batch * (s.experts if stage == 2 else 1)
    per_row = linears + attn + lora + head
    return {"vision": s.batch * vision, "visual_rest": s.batch * (per_image - vision), "llm": rows * per_row,
            "total": s.batch * per_image + rows * per_row, "rows": rows, "llm_tokens": rows * seq}


# ---------------------------------------------------------------- device helpers


def _sync(dev) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize()


def _clock(dev) -> float:
    """Wall clock on GPU; process CPU time on CPU (the dev machines are shared)."""
    return time.perf_counter() if dev.type == "cuda" else time.process_time()


def matmul_ceiling(dev, precision: str) -> tuple[float, str]:
    """TFLOP/s of big square matmul loops in the runs' precision (same threads and clock as the runs):
    the best of a few sizes and rounds, since a CPU's best GEMM size differs by dtype and the machine is noisy."""
    import torch

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    if dev.type == "cuda":
        sizes, flop_budget, what = [8192], 2 * 8192**3 * 50, f"{precision} 8192^3 matmul"
    else:
        sizes, flop_budget = [1024, 2048], 2 * 1024**3 * 20
        what = f"{precision} matmul, best of 1024^3/2048^3 x 3 rounds, CPU, {torch.get_num_threads()} thread(s), CPU time"
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, device=dev, dtype=dtype)
        b = torch.randn(n, n, device=dev, dtype=dtype)
        iters = max(2, flop_budget // (2 * n**3))
        for _ in range(3 if dev.type == "cuda" else 1):
            a @ b
        for _ in range(1 if dev.type == "cuda" else 3):
            _sync(dev)
            t = _clock(dev)
            for _ in range(iters):
                a @ b
            _sync(dev)
            best = max(best, 2 * n**3 * iters / (_clock(dev) - t) / 1e12)
    return best, what


def peak_gib(dev) -> tuple[float, str]:
    import torch

    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30, "max allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "peak RSS (whole process)"


# ---------------------------------------------------------------- inputs


class ShapeTokenizer:
    """Stands in for a tokenizer where build_model only needs the vocabulary size and pad id."""

    def __init__(self, n: int):
        self.n, self.pad_token_id, self.eos_token_id = n, 0, 1

    def __len__(self) -> int:
        return self.n


def make_inputs(s: Shape, stage: int, dev, seed: int = 0) -> dict:
    import torch

    g = torch.Generator().manual_seed(seed)
    b = s.batch
    e = s.experts if stage == 2 else 1
    rows = b * e
    ids = torch.randint(5, s.vocab, (rows, s.text_len), generator=g)
    labels = ids.clone()
    labels[:, : s.prompt_len] = -100
    return {
        "pixel_values": torch.randn(b, 3, s.image, s.image, generator=g).to(dev),
        "qformer_input_ids": torch.randint(5, s.q_vocab, (b, s.instr_len), generator=g).to(dev),
        "qformer_attention_mask": torch.ones(b, s.instr_len, dtype=torch.long, device=dev),
        "input_ids": ids.to(dev),
        "attention_mask": torch.ones(rows, s.text_len, dtype=torch.long, device=dev),
        "labels": labels.to(dev),
        # sample-major rows: (sample 0: experts 0..E-1), (sample 1: ...), as Processor.stage2_inputs
        "adapter_index": torch.arange(e).repeat(b).to(dev),
        "row_sample": torch.arange(b).repeat_interleave(e).to(dev),
    }


# ---------------------------------------------------------------- rsmoe


def rsmoe_model_args(s: Shape, grad_ckpt: bool, attn: str):
    from rsmoe.config import ModelArgs

    m = ModelArgs()
    m.vision.type, m.vision.path = "vit", ""
    m.vision.image_size, m.vision.patch_size = s.image, s.patch
    m.vision.hidden_size, m.vision.num_layers, m.vision.num_heads, m.vision.intermediate_size = s.v_hidden, s.v_layers, s.v_heads, s.v_inter
    q = m.qformer
    q.num_query_tokens, q.hidden_size, q.num_layers, q.num_heads, q.intermediate_size = s.queries, s.q_hidden, s.q_layers, s.q_heads, s.q_inter
    q.max_instruction_len = s.instr_len
    llm = m.llm
    llm.hidden_size, llm.intermediate_size, llm.num_layers, llm.num_heads, llm.num_kv_heads = s.d, s.inter, s.layers, s.heads, s.kv_heads
    llm.attn_implementation = attn
    m.lora.r, m.lora.alpha, m.lora.target_modules = s.lora_r, 2 * s.lora_r, list(s.lora_targets)
    m.experts = ["theme", "objects", "relations"][: s.experts]
    m.max_prompt_len, m.max_target_len = s.prompt_len, s.target_len
    m.gradient_checkpointing = grad_ckpt
    return m


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def build_rsmoe_step(s: Shape, stage: int, zero: str, precision: str, grad_ckpt: bool, attn: str, dev, cache: bool = False):
    """Returns (step_fn, info). step_fn() runs one forward + backward + optimizer step. `cache`: rsmoe's
    feature cache (memory store, as `data.feature_cache=memory`); the warm-up steps fill it, so every timed
    step hits (the steady state from the second epoch), hashing and lookups included."""
    import torch

    from rsmoe.config import TrainArgs
    from rsmoe.io.feature_cache import attach_feature_cache
    from rsmoe.models.build import build_model

    m = rsmoe_model_args(s, grad_ckpt, attn)
    with torch.device(dev):  # random init directly on the GPU: seconds instead of a minute for 2B params
        model, _, _ = build_model(m, seed=0, tokenizers=(ShapeTokenizer(s.vocab), ShapeTokenizer(s.q_vocab)))
    if stage == 2:
        model.to_stage2(list(range(s.experts)), 0, m.experts)
    args = TrainArgs()
    args.model, args.stage = m, stage
    args.train.micro_batch_size, args.train.precision, args.train.steps = s.batch, precision, 1000
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    inputs = make_inputs(s, stage, dev)
    info = {}
    if cache:
        info["_cache"] = attach_feature_cache(model, "memory", 1024.0)
    if zero == "none":
        from rsmoe.training.engine import build_optimizer

        model.to(dev, dtype)
        params = [p for p in model.parameters() if p.requires_grad]
        opt, _ = build_optimizer(params, args)

        def step():
            out = model(**inputs)
            out["loss"].backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return out["loss"]

        model.train()
        return step, info

    from rsmoe.distributed.env import init_distributed
    from rsmoe.distributed.layout import ParallelLayout
    from rsmoe.training.engine import build_engine, load_ds_json

    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    init_distributed()
    layout = ParallelLayout(n_experts=s.experts, ep=1, world_size=1, rank=0)
    layout.build_groups()
    model.to(dev)
    ds = load_ds_json(REPO / "ds_configs" / f"zero{zero[0]}.json")
    if zero == "3naive":  # zero3.json before rsmoe's residency rule: DeepSpeed's per-tensor 1e5, per-module hooks
        import rsmoe.training.engine

        ds["zero_optimization"]["stage3_param_persistence_threshold"] = 100000
        rsmoe.training.engine.mark_frozen_resident_leaves = lambda model, resident: []
    engine, cfg = build_engine(model, args, layout, ds)
    z = cfg["zero_optimization"]
    info["ds_zero"] = {k: z[k] for k in ("stage", "stage3_param_persistence_threshold", "stage3_model_persistence_threshold") if k in z}
    engine.train()

    def step():
        out = engine(**inputs)
        engine.backward(out["loss"])
        engine.step()
        return out["loss"]

    return step, info


# ---------------------------------------------------------------- baseline (transformers + peft)


def _plain_blip(s: Shape, dtype, attn: str, grad_ckpt: bool, adapters: list[str], dev):
    """InstructBLIP-style model in plain transformers + peft: frozen ViT -> Q-Former -> projection ->
    Llama with LoRA on the FFN, one peft adapter per name in `adapters` (named adapters on ONE base)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from torch import nn
    from transformers import (InstructBlipQFormerConfig, InstructBlipQFormerModel, InstructBlipVisionConfig,
                              InstructBlipVisionModel, LlamaConfig, LlamaForCausalLM)

    class PlainBlipLM(nn.Module):
        def __init__(self):
            super().__init__()
            vcfg = InstructBlipVisionConfig(hidden_size=s.v_hidden, intermediate_size=s.v_inter, num_hidden_layers=s.v_layers,
                                            num_attention_heads=s.v_heads, image_size=s.image, patch_size=s.patch)
            self.vision = InstructBlipVisionModel(vcfg).requires_grad_(False)
            qcfg = InstructBlipQFormerConfig(vocab_size=s.q_vocab, hidden_size=s.q_hidden, num_hidden_layers=s.q_layers,
                                             num_attention_heads=s.q_heads, intermediate_size=s.q_inter, encoder_hidden_size=s.v_hidden)
            self.qformer = InstructBlipQFormerModel(qcfg)
            self.query_tokens = nn.Parameter(torch.randn(1, s.queries, s.q_hidden) * 0.02)
            self.proj = nn.Linear(s.q_hidden, s.d)
            lcfg = LlamaConfig(vocab_size=s.vocab, hidden_size=s.d, intermediate_size=s.inter, num_hidden_layers=s.layers,
                               num_attention_heads=s.heads, num_key_value_heads=s.kv_heads, tie_word_embeddings=False,
                               max_position_embeddings=s.queries + s.text_len + 16)
            lcfg._attn_implementation = attn
            llm = LlamaForCausalLM(lcfg)
            if grad_ckpt:
                llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                llm.enable_input_require_grads()
            lora = dict(r=s.lora_r, lora_alpha=2 * s.lora_r, lora_dropout=0.0, target_modules=list(s.lora_targets))
            self.llm = get_peft_model(llm, LoraConfig(**lora), adapter_name=adapters[0])
            for name in adapters[1:]:
                self.llm.add_adapter(name, LoraConfig(**lora))

        def image_tokens(self, pixel_values):
            with torch.no_grad():
                return self.vision(pixel_values=pixel_values.to(dtype)).last_hidden_state

        def prefix(self, img, qformer_input_ids, qformer_attention_mask):
            b, q = img.shape[0], s.queries
            mask = torch.cat([qformer_attention_mask.new_ones(b, q), qformer_attention_mask], 1)
            qo = self.qformer(input_ids=qformer_input_ids, attention_mask=mask, query_embeds=self.query_tokens.expand(b, -1, -1),
                              encoder_hidden_states=img).last_hidden_state[:, :q]
            return self.proj(qo)

        def lm_loss(self, prefix, input_ids, attention_mask, labels):
            b, q = prefix.shape[:2]
            embeds = torch.cat([prefix, self.llm.get_input_embeddings()(input_ids)], 1)
            full_mask = torch.cat([attention_mask.new_ones(b, q), attention_mask], 1)
            full_labels = torch.cat([labels.new_full((b, q), -100), labels], 1)
            return self.llm(inputs_embeds=embeds, attention_mask=full_mask, labels=full_labels).loss

        def forward(self, pixel_values, qformer_input_ids, qformer_attention_mask, input_ids, attention_mask, labels):
            img = self.image_tokens(pixel_values)
            return self.lm_loss(self.prefix(img, qformer_input_ids, qformer_attention_mask), input_ids, attention_mask, labels)

    with torch.device(dev):
        mdl = PlainBlipLM()
    return mdl.to(dev, dtype)


def _baseline_inputs(s: Shape, dev) -> dict:
    inp = make_inputs(s, 1, dev)  # every expert sees all B samples with its own sub-caption
    return {k: v for k, v in inp.items() if k not in ("adapter_index", "row_sample")}


def build_baseline_step(s: Shape, stage: int, precision: str, grad_ckpt: bool, attn: str, dev, cache: bool = False):
    """Stage I: one model. Stage II: one full model copy per expert, the copies in turn (as before).
    `cache` (Stage I only): the encoder tokens computed once at build time and reused every step."""
    import torch

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    copies = s.experts if stage == 2 else 1
    torch.manual_seed(0)
    models, opts = [], []
    for _ in range(copies):
        mdl = _plain_blip(s, dtype, attn, grad_ckpt, ["default"], dev)
        if stage == 2:  # Stage II: only the expert's LoRA trains
            for n, p in mdl.named_parameters():
                p.requires_grad_("lora_" in n)
        params = [p for p in mdl.parameters() if p.requires_grad]
        opts.append((params, torch.optim.AdamW(params, lr=1e-4, fused=True)))  # same optimizer as rsmoe's
        models.append(mdl.train())
    inp = _baseline_inputs(s, dev)
    img = models[0].image_tokens(inp["pixel_values"]) if cache else None

    def step():
        total = 0.0  # summed over the copies, as rsmoe's loss sums its experts' losses
        for mdl, (params, opt) in zip(models, opts):
            if img is None:
                loss = mdl(**inp)
            else:
                prefix = mdl.prefix(img, inp["qformer_input_ids"], inp["qformer_attention_mask"])
                loss = mdl.lm_loss(prefix, inp["input_ids"], inp["attention_mask"], inp["labels"])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            total = total + loss.detach()
        return total

    return step, {}


def build_fair_step(s: Shape, precision: str, grad_ckpt: bool, attn: str, dev, cache: bool = False):
    """Stage II as a peft user writes it: ONE frozen base with E named adapters (`add_adapter`), the experts
    in turn (`set_adapter`), the frozen visual prefix computed once per sample (no_grad) and reused for
    every expert; one fused AdamW over all adapters, one global clip and step (as rsmoe: summed loss).
    `cache`: the prefix computed once at build time (an ideal, cost-free feature cache: every step a hit)."""
    import torch

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    names = [f"expert{i}" for i in range(s.experts)]
    torch.manual_seed(0)
    mdl = _plain_blip(s, dtype, attn, grad_ckpt, names, dev).train()
    for n, p in mdl.named_parameters():
        p.requires_grad_("lora_" in n)
    params = [p for p in mdl.parameters() if p.requires_grad]
    assert len(params) == 2 * len(names) * s.layers * len(s.lora_targets), len(params)
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    inp = _baseline_inputs(s, dev)

    def visual_prefix():
        with torch.no_grad():
            return mdl.prefix(mdl.image_tokens(inp["pixel_values"]), inp["qformer_input_ids"], inp["qformer_attention_mask"])

    cached = visual_prefix() if cache else None

    def step():
        prefix = cached if cached is not None else visual_prefix()
        total = 0.0
        for name in names:
            mdl.llm.set_adapter(name)  # peft: this adapter active (and trainable), the others off
            loss = mdl.lm_loss(prefix, inp["input_ids"], inp["attention_mask"], inp["labels"])
            loss.backward()
            total = total + loss.detach()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return total

    return step, {}


# ---------------------------------------------------------------- child: one configuration


def run_child(spec: dict) -> dict:
    import torch

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cpu":
        torch.set_num_threads(spec.get("threads", 1))
    s = SHAPES[spec["shape"]]
    if spec.get("batch"):
        s.batch = spec["batch"]
    precision = spec["precision"]
    if precision == "auto":
        precision = "bf16" if dev.type == "cuda" else "fp32"
    attn = spec["attn"]
    if attn == "flash_attention_2":
        from transformers.utils import is_flash_attn_2_available

        if not is_flash_attn_2_available():
            attn = "sdpa"
    torch.manual_seed(0)
    cache = spec.get("cache", False)
    if spec["impl"] == "baseline":
        step, info = build_baseline_step(s, spec["stage"], precision, spec["grad_ckpt"], attn, dev, cache)
    elif spec["impl"] == "fair":
        step, info = build_fair_step(s, precision, spec["grad_ckpt"], attn, dev, cache)
    else:
        step, info = build_rsmoe_step(s, spec["stage"], spec["zero"], precision, spec["grad_ckpt"], attn, dev, cache)
    for _ in range(spec["warmup"]):
        loss = step()
    _sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, cpu = [], []
    for _ in range(spec["steps"]):
        t, c = time.perf_counter(), time.process_time()
        loss = step()
        _sync(dev)
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    profile = None
    if spec.get("profile"):
        from torch.profiler import ProfilerActivity, profile as tprofile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
        try:  # after the timing: a profiler failure must not cost the run's numbers
            with tprofile(activities=acts) as prof:
                for _ in range(2):
                    step()
                _sync(dev)
            key = "self_device_time_total" if dev.type == "cuda" else "self_cpu_time_total"
            profile = prof.key_averages().table(sort_by=key, row_limit=18, max_name_column_width=48)
        except Exception as exc:  # noqa: BLE001
            profile = f"profiler failed: {type(exc).__name__}: {exc}"
    mem, mem_kind = peak_gib(dev)
    fcache = info.pop("_cache", None)
    if fcache is not None:  # what the cache holds per image / per prefix, and this run's hits
        sizes = {("encoder" if ns == fcache.encoder_ns else "prefix"): b / n / 2**20 for ns, (n, b) in fcache.store.by_namespace.items()}
        info["cache_mib_per_entry"] = sizes
        info["cache_stats"] = fcache.stats()
    # Median wall time. On CPU the primary figure is the process's CPU time per step at one thread:
    # on a shared machine wall time also measures the neighbours, CPU time measures our work.
    wall_s = sorted(times)[len(times) // 2]
    cpu_s = sorted(cpu)[len(cpu) // 2]
    step_s = wall_s if dev.type == "cuda" else cpu_s
    fl = model_flops(s, spec["stage"])
    if spec.get("cache"):  # credited only with what it still computes: the cached frozen parts are not counted
        fl["total"] -= fl["vision"] + (fl["visual_rest"] if spec["stage"] == 2 else 0)
    out = {
        **spec, "device": torch.cuda.get_device_name() if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "precision": precision, "attn": attn, "step_s": step_s, "wall_s": wall_s, "cpu_s": cpu_s,
        "timing": "wall" if dev.type == "cuda" else f"process CPU time, {torch.get_num_threads()} thread(s)",
        "wall_s_all": times, "cpu_s_all": cpu,
        "samples_per_s": s.batch / step_s, "tokens_per_s": fl["llm_tokens"] / step_s,
        "tflops": fl["total"] / step_s / 1e12, "model_tflop_per_step": fl["total"] / 1e12,
        "peak_gib": mem, "peak_kind": mem_kind, "loss": float(loss), "batch": s.batch, **info,
    }
    if profile:
        out["profile"] = profile
    return out


def spawn(spec: dict, timeout: int) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**spec, "error": f"timed out after {timeout} s"}
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
    return {**spec, "error": " | ".join(tail) or f"exit {p.returncode}"}


# ---------------------------------------------------------------- LoRA micro-benchmark


def lora_micro(s: Shape, dev, dtype_name: str) -> list[tuple[str, float, float]]:
    """One gate_proj-shaped layer, B*E rows: the multi-adapter LoRA delta, fwd+bwd, three ways."""
    import torch
    import torch.nn.functional as F

    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    rows, n, r = s.batch * s.experts, s.experts, s.lora_r
    seq = s.queries + s.text_len
    x = torch.randn(rows, seq, s.d, device=dev, dtype=dtype, requires_grad=True)
    A = (torch.randn(n, r, s.d, device=dev, dtype=dtype) * 0.02).requires_grad_()
    B = (torch.randn(n, s.inter, r, device=dev, dtype=dtype) * 0.02).requires_grad_()
    W = torch.randn(s.inter, s.d, device=dev, dtype=dtype) * 0.02
    idx = torch.arange(n, device=dev).repeat(s.batch)

    def gather_bmm():  # the previous MultiLoRALinear
        return torch.bmm(torch.bmm(x, A[idx].transpose(1, 2)), B[idx].transpose(1, 2))

    def per_adapter():
        out = x.new_zeros(rows, seq, s.inter)
        for i in range(n):
            sel = (idx == i).nonzero().squeeze(1)
            out = out.index_add(0, sel, F.linear(F.linear(x[sel], A[i]), B[i]))
        return out

    def dense_masked():  # the current MultiLoRALinear._multi_adapter_delta
        h = F.linear(x, A.reshape(n * r, -1))
        keep = F.one_hot(idx, n).to(h.dtype).repeat_interleave(r, dim=1)
        return F.linear(h * keep[:, None, :], B.permute(1, 0, 2).reshape(s.inter, n * r))

    def frozen_base():  # for scale: the frozen layer itself
        return F.linear(x, W)

    ref = gather_bmm().detach()
    res = []
    for name, fn in (("gather A[idx],B[idx] + bmm (before)", gather_bmm), ("loop over adapters", per_adapter),
                     ("dense masked, 2 GEMMs (now)", dense_masked), ("frozen base linear (scale)", frozen_base)):
        err = (fn().detach().float() - ref.float()).abs().max().item() if "frozen" not in name else float("nan")
        for _ in range(2):
            fn().sum().backward()
        _sync(dev)
        ts = []
        for _ in range(7):
            t = _clock(dev)
            fn().sum().backward()
            _sync(dev)
            ts.append(_clock(dev) - t)
        res.append((name, sorted(ts)[3] * 1e3, err))
    return res


# ---------------------------------------------------------------- parent


def plan(a) -> list[dict]:
    base = {"shape": a.shape, "precision": a.precision, "grad_ckpt": a.grad_ckpt, "attn": a.attn,
            "warmup": a.warmup, "steps": a.steps, "batch": a.batch, "threads": a.threads}
    runs = []
    for stage in a.stages:
        if not a.no_baseline:
            # Stage I: one model (copies == the fair peft baseline); Stage II: E copies, then one base + E named adapters.
            runs.append({**base, "impl": "baseline", "stage": stage, "zero": "-"})
            if stage == 2:
                runs.append({**base, "impl": "fair", "stage": stage, "zero": "-"})
            if a.cache:
                runs.append({**base, "impl": "baseline" if stage == 1 else "fair", "stage": stage, "zero": "-", "cache": True})
        zeros = (a.stage1_zero or a.zero) if stage == 1 else a.zero
        for z in zeros:
            wanted = f"{stage}:{z}" in a.profile if a.profile else (a.profile == [] and stage == 2 and z == a.zero[0])
            runs.append({**base, "impl": "rsmoe", "stage": stage, "zero": z, "profile": bool(wanted)})
        if a.cache:
            runs.append({**base, "impl": "rsmoe", "stage": stage, "zero": zeros[0], "cache": True})
    return runs


def label(r: dict) -> str:
    """copies = one full model per expert (Stage II); peft = the fair baseline (one base, named adapters; in
    Stage I the one model); +cache = frozen features cached (rsmoe: the real cache; peft: precomputed)."""
    name = {"baseline": "copies" if r["stage"] == 2 else "peft", "fair": "peft", "rsmoe": "rsmoe"}[r["impl"]]
    return name + ("+cache" if r.get("cache") else "")


def print_table(results: list[dict], ceiling: float, ceiling_what: str) -> None:
    hdr = f"{'impl':12} {'stage':5} {'zero':6} {'s/step':>8} {'wall s':>8} {'samples/s':>10} {'tokens/s':>10} {'TFLOP/s':>8} {'%ceil':>6} {'peak GiB':>9}  loss (sum over experts)"
    print(hdr)
    print("-" * len(hdr))
    for r in results:
        if "error" in r:
            print(f"{label(r):12} {r['stage']:<5} {r['zero']:6} ERROR {r['error']}")
            continue
        print(f"{label(r):12} {r['stage']:<5} {r['zero']:6} {r['step_s']:8.3f} {r['wall_s']:8.3f} {r['samples_per_s']:10.2f} {r['tokens_per_s']:10.0f} "
              f"{r['tflops']:8.3f} {100 * r['tflops'] / ceiling:5.1f}% {r['peak_gib']:9.2f}  {r['loss']:.3f}")
    ok = [r for r in results if "error" not in r]
    print(f"\ns/step: {ok[0]['timing'] if ok else '-'} (median); wall s: median wall time; "
          f"ceiling: {ceiling:.3f} TFLOP/s ({ceiling_what}, same run); peak memory: {ok[0]['peak_kind'] if ok else '-'}")
    print("copies: one full model per expert, in turn; peft: one frozen base + named adapters (set_adapter), the visual "
          "prefix once per sample; +cache: frozen features from a cache (rsmoe: data.feature_cache=memory, all hits; "
          "peft: precomputed once)")
    for stage in sorted({r["stage"] for r in ok}):
        rows = {(label(r), r["zero"]): r for r in ok if r["stage"] == stage}
        peft = {c: rows.get((f"peft{c}", "-")) for c in ("", "+cache")}
        copies = rows.get(("copies", "-"))
        for (name, zero), r in rows.items():
            if not name.startswith("rsmoe"):
                continue
            c = "+cache" if name.endswith("+cache") else ""
            parts = []
            if peft[c]:
                parts.append(f"vs peft{c} {r['samples_per_s'] / peft[c]['samples_per_s']:.2f}x samples/s, "
                             f"{r['peak_gib'] / peft[c]['peak_gib']:.2f}x memory")
            if copies and not c:
                parts.append(f"vs copies {r['samples_per_s'] / copies['samples_per_s']:.2f}x samples/s, "
                             f"{r['peak_gib'] / copies['peak_gib']:.2f}x memory")
            if c and (name[:-6], zero) in rows:
                parts.append(f"cache speed-up {rows[(name[:-6], zero)]['step_s'] / r['step_s']:.2f}x")
            if parts:
                print(f"stage {stage}: {name} zero={zero}: " + "; ".join(parts))
        if peft[""] and peft["+cache"]:
            print(f"stage {stage}: peft cache speed-up {peft['']['step_s'] / peft['+cache']['step_s']:.2f}x")
        for r in ok:
            if r["stage"] == stage and r.get("cache_mib_per_entry"):
                sizes = ", ".join(f"{k} {v:.3f} MiB" for k, v in sorted(r["cache_mib_per_entry"].items()))
                st = r["cache_stats"]
                print(f"stage {stage}: cache entry size: {sizes}; hits/misses encoder {st['encoder_hits']:.0f}/{st['encoder_misses']:.0f}, "
                      f"prefix {st['prefix_hits']:.0f}/{st['prefix_misses']:.0f}")
        z2 = rows.get(("rsmoe", "2"))
        for (name, zero), z3 in rows.items():
            if name == "rsmoe" and zero.startswith("3") and z2:
                print(f"stage {stage}: ZeRO-{zero} step / ZeRO-2 step = {z3['step_s'] / z2['step_s']:.2f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    p.add_argument("--stages", type=int, nargs="+", default=[1, 2], choices=[1, 2])
    p.add_argument("--zero", nargs="+", default=["none", "2", "3"], choices=["none", "2", "3", "3naive"],
                   help="rsmoe runs: plain torch ('none') and/or one-rank DeepSpeed ZeRO-2/3 (ds_configs/zero*.json); "
                        "'3naive' = zero3.json with DeepSpeed's default per-tensor persistence (1e5) instead of rsmoe's rule")
    p.add_argument("--stage1-zero", nargs="+", choices=["none", "2", "3", "3naive"],
                   help="rsmoe Stage I runs (default: as --zero)")
    p.add_argument("--no-baseline", action="store_true")
    p.add_argument("--cache", action="store_true",
                   help="also rsmoe with its feature cache (first --zero) and the peft baseline with precomputed frozen features")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"], help="auto: bf16 on GPU, fp32 on CPU")
    p.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing (rsmoe and baseline)")
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "flash_attention_2", "eager"])
    p.add_argument("--batch", type=int, default=0, help="override the shape's batch (samples per step)")
    p.add_argument("--threads", type=int, default=1, help="CPU only: torch threads per run (timing = process CPU time)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--timeout", type=int, default=900, help="seconds per configuration")
    p.add_argument("--profile", nargs="*", metavar="STAGE:ZERO",
                   help="torch.profiler top ops of these rsmoe runs, e.g. 1:2 2:3 (no value: Stage II with the first --zero)")
    p.add_argument("--lora-micro", action="store_true", help="also time the multi-adapter LoRA implementations")
    p.add_argument("--json", help="write all results here")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print("RESULT " + json.dumps(run_child(json.loads(a.child))), flush=True)
        return 0

    import torch

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cpu":
        torch.set_num_threads(a.threads)
    precision = a.precision if a.precision != "auto" else ("bf16" if dev.type == "cuda" else "fp32")
    ceiling, what = matmul_ceiling(dev, precision)
    s = SHAPES[a.shape]
    if a.batch:
        s.batch = a.batch
    print(f"shape {a.shape}: batch {s.batch}, {s.experts} experts, LLM d={s.d} L={s.layers} V={s.vocab}, "
          f"{s.queries}+{s.text_len} positions per row | device {dev} | ceiling {ceiling:.3f} TFLOP/s ({what})")
    results = []
    for spec in plan(a):
        r = spawn(spec, a.timeout)
        results.append(r)
        msg = r.get("error") or f"{r['step_s']:.3f} s/step, {r['samples_per_s']:.2f} samples/s"
        print(f"  {label(spec):12} stage {spec['stage']} zero {spec['zero']:4}: {msg}", flush=True)
    print()
    print_table(results, ceiling, what)
    for r in results:
        if r.get("profile"):
            print(f"\nprofile: rsmoe stage {r['stage']} zero {r['zero']} ({r['device']})\n{r['profile']}")
    micro = None
    if a.lora_micro:
        micro = lora_micro(s, dev, precision)
        print(f"\nmulti-adapter LoRA, one gate_proj ({s.d}->{s.inter}, r={s.lora_r}), {s.batch * s.experts} rows x "
              f"{s.queries + s.text_len} positions, fwd+bwd, {precision}:")
        for name, ms, err in micro:
            print(f"  {name:40} {ms:9.2f} ms   max|diff| vs before {err:.1e}")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({"shape": asdict(s), "ceiling_tflops": ceiling, "ceiling": what,
                                            "flops": {st: model_flops(s, st) for st in (1, 2)},
                                            "results": results, "lora_micro": micro}, indent=2))
        print(f"\nwrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
