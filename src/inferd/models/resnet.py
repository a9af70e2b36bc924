"""ResNet with basic blocks, written to match torchvision's module for module.

torchvision cannot always be installed beside a given torch, yet users have torchvision
checkpoints (``resnet18-f37072fd.pth``). This module rebuilds ``torchvision.models.resnet18``
and ``resnet34`` with the same module names, parameter shapes and forward pass (He et al.,
"Deep Residual Learning for Image Recognition", with the stride on the 3x3 convolution as in
torchvision), so such a state dict loads with ``strict=True`` and gives the same outputs. When
torchvision is importable, :func:`build` uses it for those two.

``resnet-small`` is a narrow ResNet (one basic block per stage, 16 to 128 channels, a 3x3
stem without max-pooling) for small pictures: the digits demo trains it in seconds on a CPU.

torch is imported when this module is, so import it only once a torch model is loading.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["ARCHITECTURES", "BasicBlock", "ResNet", "build"]


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions and a shortcut (a 1x1 convolution when the shape changes)."""

    expansion = 1

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        result: Tensor = self.relu(out)
        return result


class ResNet(nn.Module):
    """torchvision's ``ResNet`` for basic blocks, with optional widths and a small-input stem."""

    def __init__(
        self,
        layers: Sequence[int],
        num_classes: int = 1000,
        in_channels: int = 3,
        widths: Sequence[int] = (64, 128, 256, 512),
        small_input: bool = False,
    ) -> None:
        super().__init__()
        if len(layers) != 4 or len(widths) != 4:
            raise ValueError("a ResNet has four stages: give four layer counts and four widths")
        self.inplanes = widths[0]
        if small_input:
            self.conv1 = nn.Conv2d(
                in_channels, widths[0], kernel_size=3, stride=1, padding=1, bias=False
            )
        else:
            self.conv1 = nn.Conv2d(
                in_channels, widths[0], kernel_size=7, stride=2, padding=3, bias=False
            )
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool: nn.Module = (
            nn.Identity() if small_input else nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        )
        self.layer1 = self._make_layer(widths[0], layers[0])
        self.layer2 = self._make_layer(widths[1], layers[1], stride=2)
        self.layer3 = self._make_layer(widths[2], layers[2], stride=2)
        self.layer4 = self._make_layer(widths[3], layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[3] * BasicBlock.expansion, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * BasicBlock.expansion:
            downsample = nn.Sequential(
                _conv1x1(self.inplanes, planes * BasicBlock.expansion, stride),
                nn.BatchNorm2d(planes * BasicBlock.expansion),
            )
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * BasicBlock.expansion
        layers.extend(BasicBlock(self.inplanes, planes) for _ in range(1, blocks))
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        out: Tensor = self.fc(x)
        return out


# name -> (blocks per stage, widths, small-input stem)
ARCHITECTURES: dict[str, tuple[tuple[int, ...], tuple[int, ...], bool]] = {
    "resnet18": ((2, 2, 2, 2), (64, 128, 256, 512), False),
    "resnet34": ((3, 4, 6, 3), (64, 128, 256, 512), False),
    "resnet-small": ((1, 1, 1, 1), (8, 16, 32, 64), True),
}


def build(
    architecture: str, num_classes: int, in_channels: int = 3, use_torchvision: bool = True
) -> nn.Module:
    """An untrained network of ``architecture`` (a key of :data:`ARCHITECTURES`).

    torchvision's own class is used for ``resnet18``/``resnet34`` on 3 channels when it is
    installed (and ``use_torchvision``); the state dicts are interchangeable either way.
    """
    if architecture not in ARCHITECTURES:
        known = ", ".join(sorted(ARCHITECTURES))
        raise ValueError(f"unknown architecture {architecture!r} (known: {known})")
    layers, widths, small = ARCHITECTURES[architecture]
    if use_torchvision and not small and in_channels == 3:
        tv = _torchvision_models()
        if tv is not None:
            net: nn.Module = getattr(tv, architecture)(weights=None, num_classes=num_classes)
            return net
    return ResNet(layers, num_classes, in_channels, widths, small)


def _torchvision_models() -> Any:
    try:
        import torchvision.models
    except Exception:  # not installed, or built for another torch
        return None
    return torchvision.models
