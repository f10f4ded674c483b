#!/usr/bin/env bash
# One-H100 check of the training step at the RS-MoE-1B shape (docs/design.md §7), ~7 minutes, <= 9.
#
# Runs bench/train_step.py --shape rsmoe-1b, bf16, batch 16, in one go (each configuration its own process):
#   Stage I:  peft (the one-model baseline), peft+cache (encoder tokens precomputed), rsmoe (plain torch),
#             rsmoe+cache (data.feature_cache=memory, warm: every timed step hits);
#   Stage II: copies (3 full model copies in turn), peft (the fair baseline: one frozen base, 3 named adapters
#             via set_adapter, the visual prefix once per sample), peft+cache (prefix precomputed), rsmoe
#             plain / ZeRO-2 / ZeRO-3 (rsmoe's residency rule), rsmoe+cache;
# plus the multi-adapter LoRA micro-benchmark and torch.profiler top ops (CPU+CUDA) of the plain Stage II step.
# Table on stdout; JSON to $OUT/train_step_rsmoe-1b.json when $OUT is set (else bench/out/). No assertion on time.
# Naive ZeRO-3 and Stage I under ZeRO-2 are left out to fit the time: add `3naive` to --zero or `--stage1-zero 2`.
#
# PREPARATION (on a machine with internet, once; the GPU image has no DeepSpeed and no network):
#   mkdir -p wheels && cd wheels
#   DS_BUILD_OPS=0 pip wheel --no-deps deepspeed==0.19.8          # pure-Python wheel, no CUDA ops built
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#       pydantic pydantic-core annotated-types typing-inspection hjson   # pydantic-core must be the cp312 wheel
#   (also ninja/py-cpuinfo/msgpack/psutil/einops if the image lacks them: `python -c "import deepspeed"` says)
# and put the folder at ./wheels (or point WHEELS=/path) so that it travels with the working tree.
# This script installs them with `pip install --no-index --no-deps` when `import deepspeed` fails.
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

ZERO="none 2 3"
if ! $PY -c "import deepspeed" 2>/dev/null; then
  if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    echo "installing DeepSpeed from $WHEELS (no index, no deps)"
    $PY -m pip install --quiet --no-index --no-deps "$WHEELS"/*.whl
  fi
fi
if ! $PY -c "import deepspeed; print('deepspeed', deepspeed.__version__)"; then
  echo "DeepSpeed unavailable (see the preparation notes at the top): running the plain-torch rows only"
  ZERO="none"
fi

# Every configuration is its own process (clean peak memory); 120 s cap each, 11 configurations.
timeout 560 $PY bench/train_step.py --shape rsmoe-1b --precision bf16 --zero $ZERO --stage1-zero none --cache \
  --warmup 2 --steps 6 --timeout 120 --lora-micro --profile 2:none --json "$OUTDIR/train_step_rsmoe-1b.json" 2>&1 | tee "$OUTDIR/train_step_rsmoe-1b.txt"
echo "exit ${PIPESTATUS[0]}"
