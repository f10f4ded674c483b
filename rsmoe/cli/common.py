"""Options that several commands share (which model, which device, how to decode)."""

from __future__ import annotations

import argparse


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="run directory (uses <run>/final) or a model directory")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="default: cuda if available")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"], help="default: bf16 on GPU, fp32 on CPU")


def add_generation_arguments(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    p.add_argument("--num-beams", type=int, default=1, help="1 = greedy decoding (default); >1 = beam search")
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help=f"generation length limit (default {max_new_tokens})")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeated tokens (default 1.0 = off)")
