#!/usr/bin/env bash
# One-GPU check (H100/H200), one call that ends within 9 minutes:
#   1. the CUDA test tier (tests/gpu, <= 160 s): both stages of `tiny` in bf16 close to the CPU fp32 run,
#      ZeRO-2 and ZeRO-3 on one NCCL rank vs plain torch, batched expert generate == experts in turn,
#      SDPA vs eager (and flash-attn when installed) logits, `rsmoe eval` on CUDA;
#   2. the training-step benchmark at the RS-MoE-1B shape (docs/design.md §7), bf16, batch 16, <= 360 s,
#      each configuration its own process:
#      Stage I:  peft (the one-model baseline), peft+cache (encoder tokens precomputed), rsmoe (plain torch),
#                rsmoe+cache (data.feature_cache=memory, warm: every timed step hits);
#      Stage II: copies (3 full model copies in turn), peft (the fair baseline: one frozen base, 3 named
#                adapters via set_adapter, the visual prefix once per sample), peft+cache, rsmoe plain / ZeRO-3
#                (rsmoe's residency rule), rsmoe+cache;
#      plus the multi-adapter LoRA micro-benchmark and torch.profiler top ops of the plain Stage II step.
#      ZeRO-2 Stage II and naive ZeRO-3 are left out to fit the time (add `2 3naive` to --zero).
# Logs and JSON go to $OUT when set (else bench/out/). No assertion on time.
#
# WHEELS TO CARRY (the GPU image has torch 2.11, transformers 5.17, peft, accelerate, tensorboard, tqdm,
# pyyaml, pillow, numpy, pytest, einops, msgpack, ninja, psutil, py-cpuinfo; nothing can be downloaded
# there). On a machine with the package registries, from the repository root, once:
#   DS_BUILD_OPS=0 pip wheel --no-deps -w wheels deepspeed==0.19.8        # pure Python, no CUDA ops built
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d wheels \
#       pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
#       hjson==3.1.0 webdataset==1.0.2 braceexpand==0.1.7
# (about 25 MB) and keep ./wheels ignored by git but carried (WHEELS=/path to use another folder). The
# script installs them with `pip install --no-index --no-deps --target` when an import fails.
# NOT CARRIED, and what that skips: pycocoevalcap (101 MB with its jars, over the carry limit) -> the
# eval test scores VQA only (caption metrics are tested on CPU in CI); flash-attn (not on the image) ->
# the flash-attn logits test is skipped (SDPA vs eager still runs).
# DeepSpeed's FusedAdam would JIT-build and fail on Hopper ("invalid literal for int() ... '0a'");
# rsmoe hands DeepSpeed a torch AdamW(fused=True), so nothing is built. Should any op be built anyway,
# TORCH_CUDA_ARCH_LIST=9.0 (set below) avoids that failure.
#
# Usage (repository root):  bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PY="${PYTHON:-python}"
OUTDIR="${OUT:-bench/out}"
mkdir -p "$OUTDIR"
WHEELS="${WHEELS:-wheels}"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY -c "import torch, transformers, peft; print('torch', torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__, '| cuda', torch.cuda.is_available())"

ZERO="none 3"
if ! $PY -c "import deepspeed, webdataset" 2>/dev/null; then
  if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    echo "installing the carried wheels from $WHEELS (no index, no deps) into /tmp/rsmoe-site"
    $PY -m pip install --quiet --no-index --no-deps --no-compile --target /tmp/rsmoe-site "$WHEELS"/*.whl
    export PYTHONPATH="/tmp/rsmoe-site:$PYTHONPATH"
  fi
fi
if ! $PY -c "import deepspeed; print('deepspeed', deepspeed.__version__)"; then
  echo "DeepSpeed unavailable (see the preparation notes at the top): running the plain-torch rows only"
  ZERO="none"
fi

# 1. The CUDA tier (GPUs visible to pytest only with RSMOE_TEST_GPU=1).
RSMOE_TEST_GPU=1 timeout 160 $PY -m pytest -q -rs -s -m gpu tests/gpu 2>&1 | tee "$OUTDIR/cuda_tier.txt"
echo "cuda tier exit ${PIPESTATUS[0]}"

# 2. The benchmark (9 configurations; 100 s cap each, 360 s in all).
timeout 360 $PY bench/train_step.py --shape rsmoe-1b --precision bf16 --zero $ZERO --stage1-zero none --cache \
  --warmup 2 --steps 5 --timeout 100 --lora-micro --profile 2:none --json "$OUTDIR/train_step_rsmoe-1b.json" 2>&1 | tee "$OUTDIR/train_step_rsmoe-1b.txt"
echo "exit ${PIPESTATUS[0]}"
