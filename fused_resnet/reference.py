"""The seed's modules with the seed's exact semantics: the ground truth for tests and benchmarks.

Every convolution has ``bias=True`` and the 1x1 shortcut convolution has no batch norm after it, as in
the Dive-into-Deep-Learning chapter this project implements.

Example::

    >>> from fused_resnet import reference
    >>> net = reference.resnet18()
    >>> net(torch.rand(1, 1, 96, 96)).shape
    torch.Size([1, 10])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Residual(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, use_1x1conv: bool = False, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, stride=stride)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        if use_1x1conv:
            self.conv3 = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride)
        else:
            self.conv3 = None
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        Y = F.relu(self.bn1(self.conv1(X)))
        Y = self.bn2(self.conv2(Y))
        if self.conv3:
            X = self.conv3(X)
        return F.relu(Y + X)


class GlobalAvgPool2d(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, kernel_size=x.size()[2:])


class FlattenLayer(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], -1)


def resnet_block(in_channels: int, out_channels: int, num_residuals: int, first_block: bool = False,
                 residual_cls: type = Residual, **residual_kwargs) -> nn.Sequential:
    """The chapter's stage of ``num_residuals`` blocks; ``residual_cls`` lets the fused package reuse it."""
    if first_block:
        assert in_channels == out_channels
    blk = []
    for i in range(num_residuals):
        if i == 0 and not first_block:
            blk.append(residual_cls(in_channels, out_channels, use_1x1conv=True, stride=2, **residual_kwargs))
        else:
            blk.append(residual_cls(out_channels, out_channels, **residual_kwargs))
    return nn.Sequential(*blk)


def resnet18(in_channels: int = 1, num_classes: int = 10, residual_cls: type = Residual,
             **residual_kwargs) -> nn.Sequential:
    """The chapter's ResNet-18, with its child names (0-3, resnet_block1..4, global_avg_pool, fc)."""
    net = nn.Sequential(
        nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
    )
    widths = [(64, 64), (64, 128), (128, 256), (256, 512)]
    for i, (cin, cout) in enumerate(widths, start=1):
        net.add_module(f"resnet_block{i}", resnet_block(cin, cout, 2, first_block=(i == 1),
                                                        residual_cls=residual_cls, **residual_kwargs))
    net.add_module("global_avg_pool", GlobalAvgPool2d())
    net.add_module("fc", nn.Sequential(FlattenLayer(), nn.Linear(512, num_classes)))
    return net


# torchvision's ResNet blocks and ResNet-50, structure and names only (the same state_dict keys, the same
# forward): written here so the benchmarks can build them without torchvision, which the package never
# imports (tests check them against torchvision itself). convert() recognises them as it recognises
# torchvision's, by class name and structure.
class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x if self.downsample is None else self.downsample(x)
        return self.relu(out)


class Bottleneck(nn.Module):
    """ResNet v1.5: the stride on the 3x3 convolution."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += x if self.downsample is None else self.downsample(x)
        return self.relu(out)


def bottleneck_block(inplanes: int, planes: int, stride: int = 1, downsample: bool = False) -> Bottleneck:
    """A Bottleneck, with torchvision's downsample (1x1 stride-s conv + BN) when asked."""
    ds = None
    if downsample:
        ds = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride=stride, bias=False), nn.BatchNorm2d(planes * 4))
    return Bottleneck(inplanes, planes, stride, ds)


class ResNet50(nn.Module):
    """torchvision's ``resnet50()``: stem, four stages of 3, 4, 6, 3 Bottlenecks, pooling and classifier."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        inplanes = 64
        for i, (planes, blocks, stride) in enumerate([(64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)], start=1):
            layer = [bottleneck_block(inplanes, planes, stride, downsample=True)]
            inplanes = planes * 4
            layer += [bottleneck_block(inplanes, planes) for _ in range(blocks - 1)]
            setattr(self, f"layer{i}", nn.Sequential(*layer))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(2048, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet50(num_classes: int = 1000) -> ResNet50:
    return ResNet50(num_classes)
