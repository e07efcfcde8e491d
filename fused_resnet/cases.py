"""The case tables: one source of truth for the shapes that tests, benchmarks and the CLI use."""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class BlockCase:
    """A ``Residual(in_channels, out_channels, use_1x1conv, stride)`` on (batch, in_channels, size, size)."""

    in_channels: int
    out_channels: int
    size: int
    batch: int
    use_1x1conv: bool = False
    stride: int = 1
    width: int | None = None  # non-square inputs

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.in_channels, self.size, self.width or self.size)

    @property
    def id(self) -> str:
        kind = "1x1s2" if self.use_1x1conv else "id"
        return (f"{kind}-{self.in_channels}to{self.out_channels}-{self.size}x{self.width or self.size}"
                f"-b{self.batch}")

    @property
    def out_shape(self) -> tuple[int, int, int, int]:
        s = self.stride
        return (self.batch, self.out_channels, (self.size - 1) // s + 1, ((self.width or self.size) - 1) // s + 1)

    @classmethod
    def from_id(cls, case_id: str) -> "BlockCase | None":
        """The case an ``id`` names (None for anything else, e.g. a ResNet-18 case)."""
        m = re.fullmatch(r"(id|1x1s2)-(\d+)to(\d+)-(\d+)x(\d+)-b(\d+)", case_id)
        if m is None:
            return None
        kind, cin, cout, h, w, n = m.groups()
        one = kind == "1x1s2"
        return cls(int(cin), int(cout), int(h), int(n), use_1x1conv=one, stride=2 if one else 1,
                   width=None if w == h else int(w))


@dataclass(frozen=True)
class BottleneckCase:
    """torchvision's ``Bottleneck(inplanes, planes, stride)`` on (batch, inplanes, size, size), with its
    downsample (1x1 stride-s conv + BN) when ``downsample``: 1x1, 3x3 (stride), 1x1 to 4 x planes."""

    inplanes: int
    planes: int
    size: int
    batch: int
    stride: int = 1
    downsample: bool = False

    @property
    def out_channels(self) -> int:
        return 4 * self.planes

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.inplanes, self.size, self.size)

    @property
    def out_shape(self) -> tuple[int, int, int, int]:
        p = (self.size - 1) // self.stride + 1
        return (self.batch, self.out_channels, p, p)

    @property
    def id(self) -> str:
        kind = f"bneck-ds-s{self.stride}" if self.downsample else "bneck"
        return f"{kind}-{self.inplanes}to{self.out_channels}-w{self.planes}-{self.size}x{self.size}-b{self.batch}"


# ResNet-50's stage shapes at 224: (planes, output size); each stage's first block takes the previous
# stage's output (layer1's: the stem's 64 channels) with its downsample, stride 2 from layer2 on.
RESNET50_STAGES = [(64, 56), (128, 28), (256, 14), (512, 7)]


def bottleneck_cases(batch: int) -> list[BottleneckCase]:
    cases = []
    for i, (planes, size) in enumerate(RESNET50_STAGES):
        cases.append(BottleneckCase(4 * planes, planes, size, batch))
        inplanes, stride = (64, 1) if i == 0 else (2 * planes, 2)
        cases.append(BottleneckCase(inplanes, planes, size * stride, batch, stride, downsample=True))
    return cases


# Stage inputs of the seed's ResNet-18 at 224 (and the chapter's 96 training resize): identity blocks
# at every stage, and the 1x1-stride-2 block that enters stages 2-4.
SEED_STAGES_224 = [(64, 56), (128, 28), (256, 14), (512, 7)]
SEED_STAGES_96 = [(64, 24), (128, 12), (256, 6), (512, 3)]
SEED_BATCHES = (1, 32, 256)


def seed_block_cases(batches=SEED_BATCHES, stages=SEED_STAGES_224) -> list[BlockCase]:
    cases = []
    for batch in batches:
        for i, (c, size) in enumerate(stages):
            cases.append(BlockCase(c, c, size, batch))
            if i > 0:
                prev_c, prev_size = stages[i - 1]
                cases.append(BlockCase(prev_c, c, prev_size, batch, use_1x1conv=True, stride=2))
    return cases


# Small cases for CPU tests (Triton interpreter included): odd sizes and channel counts.
SMALL_BLOCK_CASES = [
    BlockCase(5, 5, 7, 2),
    BlockCase(3, 6, 9, 2, use_1x1conv=True, stride=2, width=11),
    BlockCase(13, 13, 5, 3),
    BlockCase(3, 24, 7, 2, use_1x1conv=True, stride=2),
]
