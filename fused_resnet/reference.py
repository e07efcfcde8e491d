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
