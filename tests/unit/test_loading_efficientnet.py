"""EfficientNet-lite0 token encoder: shapes, random init, and that the real ImageNet weights load."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

from rsmoe.assets import resolve_path
from rsmoe.models.efficientnet import EfficientNetEncoder

UCM_IMAGES = Path(__file__).resolve().parents[2] / "data" / "sample" / "ucm_captions" / "images"


@pytest.fixture(scope="module")
def pretrained() -> EfficientNetEncoder:
    return EfficientNetEncoder(resolve_path("asset:efficientnet-lite0"))


def _load_images(names: list[str], size: int = 224) -> torch.Tensor:
    from PIL import Image

    batch = []
    for name in names:
        image = Image.open(UCM_IMAGES / name).convert("RGB").resize((size, size), Image.BICUBIC)
        pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255.0
        batch.append((pixels - 0.5) / 0.5)  # the encoder's image_mean / image_std
    return torch.stack(batch)


def test_random_init_shapes_and_scale() -> None:
    torch.manual_seed(0)
    encoder = EfficientNetEncoder()
    assert (encoder.hidden_size, encoder.image_size) == (1280, 224)
    assert encoder.image_mean == encoder.image_std == (0.5, 0.5, 0.5)
    with torch.no_grad():
        tokens = encoder(torch.randn(2, 3, 224, 224))
    assert tokens.shape == (2, 49, 1280)
    # Usable features for random-weight tests (PyTorch's default init would give ~1e-9 here).
    assert 0.1 < tokens.std().item() < 100
    assert not torch.allclose(tokens[0], tokens[1])


def test_stays_in_eval_mode_when_parent_trains() -> None:
    encoder = EfficientNetEncoder()
    parent = torch.nn.Sequential(encoder)
    parent.train()
    assert not encoder.training and not any(m.training for m in encoder.modules())


def test_real_weights_match_reference_loader(pretrained: EfficientNetEncoder) -> None:
    from efficientnet_lite_pytorch import EfficientNet

    reference = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(resolve_path("asset:efficientnet-lite0"))).eval()
    pixels = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        ours = pretrained(pixels)
        theirs = reference.extract_features(pixels).flatten(2).transpose(1, 2)
        random_tokens = EfficientNetEncoder()(pixels)
    assert torch.equal(ours, theirs)
    assert not torch.allclose(ours, random_tokens, atol=1e-2)


def test_real_weights_classify_consistently(pretrained: EfficientNetEncoder) -> None:
    if not UCM_IMAGES.is_dir():
        pytest.skip(f"{UCM_IMAGES} not present")
    # UCM tiles: baseball diamond, harbor, overpass, sparse residential.
    pixels = _load_images(["209.png", "1010.png", "1407.png", "1811.png"])
    probs = pretrained.classify(pixels).softmax(-1)
    flipped = pretrained.classify(pixels.flip(-1)).softmax(-1)
    top1 = probs.argmax(-1)
    # Trained weights: confident, image-dependent and mirror-invariant predictions.
    # A random init gives ~uniform probabilities (max ≈ 0.001-0.03) and the same class for every image.
    assert probs.max(-1).values.min().item() > 0.1
    assert len(set(top1.tolist())) >= 3
    assert torch.equal(top1, flipped.argmax(-1))
    assert pretrained(pixels).shape == (4, 49, 1280)
