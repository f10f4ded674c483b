"""EfficientNet-lite as a frozen vision encoder that yields a token grid.

It stands in for InstructBLIP's EVA ViT-g in small offline configurations: the last feature map
(1280 × 7 × 7 at 224 px) is flattened into 49 visual tokens for the Q-Former's cross-attention.
"""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

logger = logging.getLogger(__name__)

_INSTALL_HINT = "pip install --no-deps efficientnet-lite-pytorch==0.1.0"


def _efficientnet_class() -> type[nn.Module]:
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:  # only a runtime dependency of this optional encoder
        raise ImportError(f"EfficientNetEncoder needs efficientnet-lite-pytorch. Install it with: {_INSTALL_HINT}") from exc
    return EfficientNet


class EfficientNetEncoder(nn.Module):
    """``pixel_values [B,3,H,W]`` → ``tokens [B, (H/32)·(W/32), 1280]``.

    Inputs are normalised with mean = std = 0.5 (the TF-Lite preprocessing the weights were trained with).
    ``weights_path=None`` gives a random init (tests); pass ``resolve_path("asset:efficientnet-lite0")``
    for the ImageNet weights.
    """

    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def __init__(self, weights_path: str | os.PathLike[str] | None = None, variant: str = "efficientnet-lite0") -> None:
        super().__init__()
        efficientnet = _efficientnet_class()
        if not variant.startswith("efficientnet-lite"):
            raise ValueError(f"variant must be efficientnet-lite0..4, got {variant!r}")
        self.variant = variant
        self.net = efficientnet.from_name(variant)
        self.image_size: int = int(efficientnet.get_image_size(variant))
        self.hidden_size: int = int(self.net._conv_head.out_channels)
        if weights_path is not None:
            self.load_weights(weights_path)
        else:
            self._init_random()
        # Dropout/drop-connect only matter when training the CNN, which RS-MoE never does.
        self.eval()

    def _init_random(self) -> None:
        # The library leaves PyTorch's default conv init, whose signal shrinks ~1.7x per layer: in eval mode
        # (BN with unit running stats) the 1280-d tokens come out ~1e-9, useless to a Q-Former under test.
        # He-normal fan-in init keeps activations O(1) (fan-in, because PyTorch's fan-out of a depthwise conv
        # counts all channels and would shrink each depthwise layer by 1/sqrt(channels)).
        for module in self.net.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def load_weights(self, weights_path: str | os.PathLike[str]) -> None:
        path = os.fspath(weights_path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"EfficientNet weights file {path} does not exist (use asset:efficientnet-lite0)")
        state = torch.load(path, map_location="cpu", weights_only=True)
        missing, unexpected = self.net.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{path} does not fit {self.variant}: missing keys {missing[:5]}{'…' if len(missing) > 5 else ''}, "
                f"unexpected keys {unexpected[:5]}{'…' if len(unexpected) > 5 else ''}"
            )
        logger.info("loaded %s weights from %s", self.variant, path)

    def train(self, mode: bool = True) -> "EfficientNetEncoder":
        # Frozen by design: BatchNorm must keep its ImageNet running statistics even when the parent
        # model is put in training mode.
        return super().train(False)

    @property
    def dtype(self) -> torch.dtype:
        return self.net._conv_stem.weight.dtype

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        feats = self.net.extract_features(pixel_values.to(self.dtype))  # [B, C, h, w]
        return feats.flatten(2).transpose(1, 2)  # [B, h·w, C]

    @torch.no_grad()
    def classify(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """ImageNet logits ``[B, 1000]`` from the original head: a sanity check that real weights loaded."""
        return self.net(pixel_values.to(self.dtype))
