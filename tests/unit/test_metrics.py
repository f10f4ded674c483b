"""The logged per-expert losses: token-weighted over the logging window, absent (not 0) without tokens."""

from __future__ import annotations

import math

import torch

from rsmoe.training.metrics import LossWindow


def test_window_is_token_weighted_and_leaves_out_experts_without_tokens():
    w = LossWindow(["theme", "objects", "relations"])
    # step 1: theme 10 tokens (summed loss 20), objects none, relations 2 tokens (summed loss 6)
    w.add(torch.tensor([20.0, 0.0, 6.0]), torch.tensor([10.0, 0.0, 2.0]))
    # step 2: theme 30 tokens (summed loss 30), objects none, relations none
    w.add(torch.tensor([30.0, 0.0, 0.0]), torch.tensor([30.0, 0.0, 0.0]))
    s = w.scalars()
    assert s["loss/theme"] == (20 + 30) / (10 + 30)  # not the mean of the step means (2.0 and 1.0)
    assert "loss/objects" not in s and s["tokens/objects"] == 0
    assert s["loss/relations"] == 3.0 and s["tokens/relations"] == 2
    assert s["loss/total"] == (20 + 30 + 6) / (10 + 30 + 2)
    w.reset()
    w.add(torch.tensor([0.0, 4.0, 0.0]), torch.tensor([0.0, 4.0, 0.0]))
    assert set(k for k in w.scalars() if k.startswith("loss/")) == {"loss/total", "loss/objects"}


def test_a_non_finite_step_shows_in_its_window():
    w = LossWindow(["llm"])
    w.add(torch.tensor([float("nan")]), torch.tensor([5.0]))
    assert math.isnan(w.scalars()["loss/llm"]) and math.isnan(w.scalars()["loss/total"])
