"""The CUDA tier: what CPU runs cannot show (NCCL process groups, bf16, CUDA kernels). Every test is
marked `gpu` and skips without a CUDA device; the suite hides GPUs from every other test.

Run it with `bash bench/gpu_check.sh` (which sets RSMOE_TEST_GPU=1 and carries the missing wheels), or
`RSMOE_TEST_GPU=1 python -m pytest -q -m gpu tests/gpu`. To check this file's own logic without a GPU,
`RSMOE_GPU_TIER_ON_CPU=1 python -m pytest -q tests/gpu` runs the same checks on the CPU (gloo, fp32).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from tests.helpers import REPO, fixed_stage2_batch, free_port, random_adapters, run

ON_CPU = os.environ.get("RSMOE_GPU_TIER_ON_CPU") == "1"
DEVICE = "cpu" if ON_CPU else "cuda"
PRECISION = "fp32" if ON_CPU else "bf16"
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not ON_CPU and not torch.cuda.is_available(), reason="needs a CUDA GPU (or RSMOE_GPU_TIER_ON_CPU=1)"),
]
needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                     reason="deepspeed is not installed (carry its wheel: bench/gpu_check.sh)")


def rows(run_dir) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train(args: list[str], cpu: bool = False) -> subprocess.CompletedProcess:
    """`rsmoe train` in its own process: on the GPU, or (cpu=True) with every GPU hidden."""
    if cpu or ON_CPU:
        env = {"CUDA_VISIBLE_DEVICES": ""}
    else:  # tests.helpers.run hides GPUs and picks DeepSpeed's CPU accelerator unless told otherwise
        env = {"CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES") or "0", "DS_ACCELERATOR": "cuda"}
    proc = run([sys.executable, "-m", "rsmoe.cli", "train", *args], timeout=600, **env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def tiny(sample_shards, run_dir, *extra) -> list[str]:
    return ["--config", "tiny", "--run-dir", str(run_dir), f"data.train_shards={sample_shards['train']}",
            "train.num_eval_samples=0", "train.log_every=1", *extra]


@needs_deepspeed
def test_both_stages_train_on_the_gpu_close_to_the_cpu_fp32_run(sample_shards, tmp_path):
    gpu, cpu = tmp_path / "gpu", tmp_path / "cpu"
    for root, on_cpu, precision in ((gpu, False, PRECISION), (cpu, True, "fp32")):
        train(tiny(sample_shards, root / "s1", "train.steps=4", f"train.precision={precision}"), cpu=on_cpu)
        train(tiny(sample_shards, root / "s2", "--stage", "2", "--init-from", str(root / "s1"), "train.steps=4",
                   f"train.precision={precision}"), cpu=on_cpu)
    for stage in ("s1", "s2"):
        g, c = rows(gpu / stage), rows(cpu / stage)
        assert all(torch.isfinite(torch.tensor(r["loss/total"])) for r in g)
        # Step 1 sees the same batch from the same weights: only the arithmetic differs (bf16 vs fp32).
        rel = abs(g[0]["loss/total"] - c[0]["loss/total"]) / c[0]["loss/total"]
        print(f"{stage}: step-1 loss {DEVICE}/{PRECISION} {g[0]['loss/total']:.4f} vs cpu/fp32 {c[0]['loss/total']:.4f} ({rel:.1e})")
        assert rel < 0.03, (stage, g[0], c[0])
    assert (gpu / "s2" / "final" / "adapters" / "relations" / "adapter_model.safetensors").exists()


def _stage2_model():
    from rsmoe.config import load_config
    from rsmoe.models.build import build_model

    args = load_config("tiny", ["stage=2", "optim.warmup_steps=0", "optim.lr=0.1", "optim.eps=1e-2",
                                f"train.precision={PRECISION}"])
    model, _, _ = build_model(args.model, seed=0)
    model.to_stage2([0, 1, 2], 0, args.model.experts)
    return model, args


def _plain_torch_adapters(steps: int) -> list[torch.Tensor]:
    """The reference: plain torch, fp32, the same model, data, AdamW and schedule."""
    from rsmoe.training.engine import build_optimizer

    torch.backends.cuda.matmul.allow_tf32 = False
    model, args = _stage2_model()
    model.to(DEVICE)
    params = model.experts.lora_parameters()
    opt, sched = build_optimizer(params, args)
    g = torch.Generator().manual_seed(3)
    inputs = {k: v.to(DEVICE) for k, v in fixed_stage2_batch(g).items()}
    for _ in range(steps):
        model(**inputs)["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, args.optim.clip_grad)
        opt.step()
        sched.step()
        opt.zero_grad()
    return [p.detach().float().cpu() for p in params]


def _deepspeed_adapters(zero: int, steps: int) -> list[torch.Tensor]:
    import deepspeed

    from rsmoe.distributed.env import init_distributed, shutdown_distributed
    from rsmoe.distributed.layout import ParallelLayout
    from rsmoe.training.engine import build_engine, load_ds_json

    os.environ["MASTER_PORT"] = str(free_port())
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        os.environ.pop(k, None)
    init_distributed()  # NCCL on CUDA: one rank
    try:
        layout = ParallelLayout(n_experts=3, ep=1, world_size=1, rank=0)
        layout.build_groups()
        model, args = _stage2_model()
        engine, _ = build_engine(model, args, layout, load_ds_json(os.path.join(REPO, "ds_configs", f"zero{zero}.json")))
        g = torch.Generator().manual_seed(3)
        inputs = {k: v.to(engine.device) for k, v in fixed_stage2_batch(g).items()}
        for _ in range(steps):
            out = engine(**inputs)
            engine.backward(out["loss"])
            engine.step()
        params = model.experts.lora_parameters()
        with deepspeed.zero.GatheredParameters([p for p in params if hasattr(p, "ds_id")]):
            return [p.detach().float().cpu().clone() for p in params]
    finally:
        shutdown_distributed()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


@needs_deepspeed
@pytest.mark.parametrize("zero", [2, 3])
def test_zero_on_one_nccl_rank_trains_the_adapters_plain_torch_trains(zero):
    steps = 4
    want = _plain_torch_adapters(steps)
    got = _deepspeed_adapters(zero, steps)
    worst = max(_rel(a, b) for a, b in zip(got, want) if b.abs().max() > 0)
    print(f"ZeRO-{zero} {PRECISION} vs plain torch fp32 after {steps} steps: max rel. adapter difference {worst:.2e}")
    # bf16 weights and activations with fp32 master copies (eps=1e-2 keeps Adam's update ~linear in the
    # gradient, so arithmetic noise does not flip near-zero updates): ~1e-2 expected, fp32 ~1e-6.
    assert worst < (5e-2 if PRECISION == "bf16" else 1e-4), worst


def _random_adapter_model(dtype: torch.dtype, attn: str = "sdpa"):
    from rsmoe.config import load_config
    from rsmoe.models.build import build_model
    from rsmoe.training.builders import build_processor

    args = load_config("tiny", [f"model.llm.attn_implementation={attn}"])
    model, llm_tok, q_tok = build_model(args.model, seed=0)
    model.to_stage2([0, 1, 2], 0, args.model.experts)
    random_adapters(model)
    return model.to(DEVICE, dtype).eval(), build_processor(args, llm_tok, q_tok)


def test_batched_expert_generate_equals_experts_in_turn():
    from rsmoe.config import GenerationArgs
    from rsmoe.inference.generate import caption

    torch.backends.cuda.matmul.allow_tf32 = False
    model, proc = _random_adapter_model(torch.float32)
    pixels = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    gen = GenerationArgs(max_new_tokens=12)
    batched = caption(model, proc, pixels, gen=gen)
    in_turn = caption(model, proc, pixels, gen=gen, sequential=True)
    assert [r["experts"] for r in batched] == [r["experts"] for r in in_turn]


@pytest.mark.parametrize("other", ["eager", "flash_attention_2"])
def test_attention_kernels_give_the_same_logits(other):
    if other == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        pytest.skip("flash-attn is not installed (pip install -e .[gpu])")
    dtype = torch.float32 if ON_CPU else torch.bfloat16
    inputs = {k: v.to(DEVICE) for k, v in fixed_stage2_batch(torch.Generator().manual_seed(4)).items()}
    outs = []
    for attn in ("sdpa", other):
        model, _ = _random_adapter_model(dtype, attn)
        with torch.no_grad():
            prefix = model.visual(inputs["pixel_values"].to(dtype), inputs["qformer_input_ids"], inputs["qformer_attention_mask"])
            outs.append(model(**inputs, prefix=prefix)["expert_loss"].float().cpu())
    print(f"sdpa vs {other}: per-expert losses {outs[0].tolist()} vs {outs[1].tolist()}")
    torch.testing.assert_close(outs[1], outs[0], rtol=2e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-3)


@needs_deepspeed
def test_eval_runs_on_cuda(sample_shards, tmp_path):
    root = tmp_path / "run"
    train(tiny(sample_shards, root / "s1", "train.steps=2", f"train.precision={PRECISION}"))
    train(tiny(sample_shards, root / "s2", "--stage", "2", "--init-from", str(root / "s1"), "train.steps=2",
               f"train.precision={PRECISION}"))
    task = "both" if importlib.util.find_spec("pycocoevalcap") else "vqa"  # caption metrics need pycocoevalcap
    env = {"CUDA_VISIBLE_DEVICES": ""} if ON_CPU else {"CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES") or "0",
                                                      "DS_ACCELERATOR": "cuda"}
    proc = run([sys.executable, "-m", "rsmoe.cli", "eval", "--model", str(root / "s2"), "--shards", sample_shards["val"],
                "--out", str(tmp_path / "eval"), "--device", DEVICE, "--task", task, "--limit", "6", "--bootstrap", "20",
                "--no-meteor", "--max-new-tokens", "8", "--vqa-max-new-tokens", "4", "--questions-per-image", "3"], timeout=600, **env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    meta = json.loads((tmp_path / "eval" / "results.json").read_text())["meta"]
    print(f"eval on {meta['device']}: {meta['n_images']} images, {meta['n_questions']} questions, task {task}")
    assert meta["device"].startswith(DEVICE) and meta["n_images"] == 6
