"""Built-in small architectures (MLP, small CNNs, a tiny ResNet): a registry filled by decorators, built by name."""

from __future__ import annotations

import difflib
import itertools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from rcat_ray.errors import ModelError

ArchBuilder = Callable[..., nn.Module]
_ARCHITECTURES: dict[str, ArchBuilder] = {}


def register_architecture(name: str) -> Callable[[ArchBuilder], ArchBuilder]:
    """Make ``name`` buildable from configs and self-describing checkpoints."""

    def deco(fn: ArchBuilder) -> ArchBuilder:
        _ARCHITECTURES[name] = fn
        return fn

    return deco


def architectures() -> list[str]:
    """Names of the built-in architectures."""
    return sorted(_ARCHITECTURES)


def build_architecture(name: str, *, num_classes: int, input_shape: tuple[int, int, int], **kwargs: Any) -> nn.Module:
    """Instantiate a registered architecture for a data shape."""
    if name.startswith("robustbench/"):
        from rcat_ray.core.models.loading import _robustbench_architecture  # loading builds on this module

        return _robustbench_architecture(name)
    if name not in _ARCHITECTURES:
        hint = difflib.get_close_matches(name, architectures(), n=1)
        extra = f" (did you mean '{hint[0]}'?)" if hint else ""
        raise ModelError(f"unknown architecture '{name}'{extra}; known: {', '.join(architectures())}")
    return _ARCHITECTURES[name](num_classes=num_classes, input_shape=tuple(input_shape), **kwargs)


@register_architecture("mlp")
def _mlp(*, num_classes: int, input_shape: tuple[int, int, int], hidden: tuple[int, ...] = (256, 128)) -> nn.Module:
    """The demo's old model (784-256-128-10 on Fashion-MNIST)."""
    dims = [int(torch.tensor(input_shape).prod()), *hidden]
    layers: list[nn.Module] = [nn.Flatten()]
    for a, b in itertools.pairwise(dims):
        layers += [nn.Linear(a, b), nn.ReLU()]
    layers.append(nn.Linear(dims[-1], num_classes))
    return nn.Sequential(*layers)


@register_architecture("small_cnn")
def _small_cnn(
    *, num_classes: int, input_shape: tuple[int, int, int], channels: tuple[int, int] = (16, 32), hidden: int = 100
) -> nn.Module:
    """The demo's new model: two 3x3 conv blocks (16, 32 channels) and a small head (~163k parameters)."""
    c, h, w = input_shape
    c1, c2 = channels
    feat = c2 * (h // 4) * (w // 4)
    return nn.Sequential(
        nn.Conv2d(c, c1, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(feat, hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


@register_architecture("tiny_convnet")
def _tiny_convnet(
    *, num_classes: int, input_shape: tuple[int, int, int], channels: tuple[int, int] = (8, 16), stem_stride: int = 4
) -> nn.Module:
    """A few thousand parameters for any image size (global average pooling): ImageNet-shaped (3x224x224) tests
    and benchmarks of the data path, where a model that costs little leaves the reading and decoding visible."""
    c1, c2 = channels
    return nn.Sequential(
        nn.Conv2d(input_shape[0], c1, stem_stride, stride=stem_stride),
        nn.ReLU(),
        nn.Conv2d(c1, c2, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(c2, num_classes),
    )


class _ResidualBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus the input (a 1x1 conv-BN projection when the shape changes), then ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
        )
        self.skip = (
            nn.Identity()
            if stride == 1 and c_in == c_out
            else nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.skip(x))


@register_architecture("tiny_resnet")
def _tiny_resnet(
    *, num_classes: int, input_shape: tuple[int, int, int], channels: tuple[int, int] = (8, 16)
) -> nn.Module:
    """A small ResNet with BatchNorm (stem, two residual blocks, global average pooling), as the paper's
    RobustBench models are built: what tests of BatchNorm under several training workers need."""
    c1, c2 = channels
    return nn.Sequential(
        nn.Conv2d(input_shape[0], c1, 3, padding=1, bias=False),
        nn.BatchNorm2d(c1),
        nn.ReLU(),
        _ResidualBlock(c1, c1, 1),
        _ResidualBlock(c1, c2, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(c2, num_classes),
    )
