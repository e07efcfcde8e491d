"""Drop-in modules: the seed's ``Residual``, ``resnet_block`` and ResNet-18, run by fused kernels.

Example::

    >>> import fused_resnet
    >>> blk = fused_resnet.Residual(64, 128, use_1x1conv=True, stride=2)   # same signature as the seed
    >>> blk.load_state_dict(seed_block.state_dict())                        # same state_dict keys
    >>> model = fused_resnet.convert(seed_model)                            # or swap every block in place
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from . import reference
from .backends import BACKEND_NAMES
from .functional import BlockLayout, block_forward
from .sync import SyncGroup

__all__ = ["Residual", "FusedBlock", "resnet_block", "resnet18", "convert", "is_seed_residual", "block_layout"]

SEED_LAYOUT = BlockLayout((("conv1", "bn1"), ("conv2", "bn2")))
SEED_LAYOUT_1X1 = BlockLayout((("conv1", "bn1"), ("conv2", "bn2")), ("conv3", None))


def _check_backend_name(backend: str) -> str:
    if backend != "auto" and backend not in BACKEND_NAMES:
        raise ValueError(f"unknown backend {backend!r}; expected 'auto' or one of {list(BACKEND_NAMES)}")
    return backend


class Residual(reference.Residual):
    """The seed's residual block, ``relu(bn2(conv2(relu(bn1(conv1(X))))) + (conv3(X) or X))``, fused.

    Same constructor, submodule names (conv1, conv2, conv3, bn1, bn2), parameters and buffers as the seed:
    its ``state_dict`` loads strictly in both directions. ``backend`` picks the implementation ("auto",
    "torch", "triton", "cuda", "cpp"); "auto" can be overridden by the ``FUSED_RESNET_BACKEND`` variable.

    Example::

        >>> blk = Residual(3, 6, use_1x1conv=True, stride=2)
        >>> blk(torch.rand(4, 3, 6, 6)).shape
        torch.Size([4, 6, 3, 3])
    """

    def __init__(self, in_channels: int, out_channels: int, use_1x1conv: bool = False, stride: int = 1, *,
                 backend: str = "auto", sync_batchnorm: bool = False, process_group=None):
        if not use_1x1conv and (in_channels != out_channels or stride != 1):
            raise ValueError(
                f"Residual({in_channels}, {out_channels}, stride={stride}) adds its input to its output, which "
                f"needs in_channels == out_channels and stride 1; pass use_1x1conv=True")
        super().__init__(in_channels, out_channels, use_1x1conv, stride)  # the seed's submodules, as they are
        self.backend = _check_backend_name(backend)
        _set_sync(self, sync_batchnorm, process_group)

    auto_table = True  # auto's per-shape table is keyed on this block's geometry (backends.block_shape)
    sync_batchnorm: Optional[SyncGroup] = None  # set by convert(..., sync_batchnorm=True)

    @property
    def layout(self) -> BlockLayout:
        return SEED_LAYOUT if self.conv3 is None else SEED_LAYOUT_1X1

    def forward(self, X: Tensor) -> Tensor:
        return block_forward(self, self.layout, X)

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}" + (", sync_batchnorm=True" if self.sync_batchnorm else "")

    @classmethod
    def from_seed(cls, block: nn.Module, backend: str = "auto") -> "Residual":
        """A fused block that shares ``block``'s submodules (and so its parameters and buffers)."""
        if not is_seed_residual(block):
            raise ValueError(f"{type(block).__name__} does not have the seed Residual's structure")
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        for name in ("conv1", "conv2", "conv3", "bn1", "bn2"):
            setattr(fused, name, getattr(block, name))
        fused.backend = _check_backend_name(backend)
        fused.train(block.training)
        return fused


class FusedBlock(nn.Module):
    """A torchvision-style residual block (``BasicBlock``, ``Bottleneck``) run by the fused kernels. It holds
    the original's submodules under their own names (``conv1``, ``bn1``, ..., ``downsample``, ``relu``), so
    the ``state_dict`` is the original's, key for key, and parameters are shared with it. Made by
    ``convert()``; ``kind`` names the original class.

    Example::

        >>> model = fused_resnet.convert(torchvision.models.resnet50())
        >>> type(model.layer1[0]).__name__, model.layer1[0].kind
        ('FusedBlock', 'Bottleneck')
    """

    sync_batchnorm: Optional[SyncGroup] = None  # set by convert(..., sync_batchnorm=True)

    def __init__(self, block: nn.Module, layout: BlockLayout, backend: str = "auto"):
        super().__init__()
        for name, child in block.named_children():
            setattr(self, name, child)
        self.kind = type(block).__name__
        self.stride = getattr(block, "stride", 1)
        if hasattr(type(block), "expansion"):
            self.expansion = type(block).expansion
        self.layout = layout
        self.backend = _check_backend_name(backend)
        self.train(block.training)

    def forward(self, x: Tensor) -> Tensor:
        return block_forward(self, self.layout, x)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, backend={self.backend!r}" + (", sync_batchnorm=True" if self.sync_batchnorm
                                                                   else "")


_BN_TYPES = (nn.BatchNorm2d, nn.SyncBatchNorm)


def _is_conv(m: Optional[nn.Module], cin: int, cout: int, k: int, stride: int, padding: int,
             bias: Optional[bool] = None) -> bool:
    """A plain 2-D convolution of these shapes: no groups, no dilation, zero padding; with a bias when
    ``bias`` is True, without when False, either when None."""
    return (type(m) is nn.Conv2d and m.in_channels == cin and m.out_channels == cout
            and m.kernel_size == (k, k) and m.stride == (stride, stride) and m.padding == (padding, padding)
            and m.dilation == (1, 1) and m.groups == 1 and m.padding_mode == "zeros"
            and (bias is None or (m.bias is not None) == bias))


def _is_bn(m: Optional[nn.Module], c: int) -> bool:
    """An affine batch norm over ``c`` channels: BatchNorm2d, or SyncBatchNorm."""
    return type(m) in _BN_TYPES and m.num_features == c and m.affine


def is_seed_residual(block: nn.Module) -> bool:
    """Whether ``block`` has the seed Residual's structure: a module named ``Residual`` holding a 3x3
    conv1 (stride s), a 3x3 stride-1 conv2, affine bn1/bn2, and either no conv3 (then in == out, s == 1)
    or a 1x1 stride-s conv3; every conv biased. Identity with any class is not required."""
    if type(block).__name__ != "Residual":
        return False
    conv1 = getattr(block, "conv1", None)
    if type(conv1) is not nn.Conv2d:
        return False
    cin, cout, s = conv1.in_channels, conv1.out_channels, conv1.stride[0]
    conv3 = getattr(block, "conv3", None)
    if conv3 is None:
        shortcut_ok = cin == cout and s == 1
    else:
        shortcut_ok = _is_conv(conv3, cin, cout, 1, s, 0, bias=True)
    return (shortcut_ok and _is_conv(conv1, cin, cout, 3, s, 1, bias=True)
            and _is_conv(getattr(block, "conv2", None), cout, cout, 3, 1, 1, bias=True)
            and _is_bn(getattr(block, "bn1", None), cout) and _is_bn(getattr(block, "bn2", None), cout))


def _downsample_ok(block: nn.Module, cin: int, cout: int, stride: int) -> Optional[bool]:
    """torchvision's shortcut: None (identity: needs cin == cout and stride 1), or ``downsample`` =
    Sequential(1x1 stride-s conv, batch norm). True when fusable and present, False when fusable and
    absent, None when not fusable (a custom downsample)."""
    ds = getattr(block, "downsample", None)
    if ds is None:
        return False if cin == cout and stride == 1 else None
    if type(ds) is not nn.Sequential or len(ds) != 2:
        return None
    return True if _is_conv(ds[0], cin, cout, 1, stride, 0) and _is_bn(ds[1], cout) else None


def block_layout(block: nn.Module) -> Optional[BlockLayout]:
    """The layout of a block ``convert()`` can fuse: the seed's ``Residual``, or torchvision's
    ``BasicBlock`` / ``Bottleneck`` (recognised by class name and structure, never by import); None for
    anything else -- groups, dilation, other norms, a custom downsample are left alone."""
    if is_seed_residual(block):
        return block.layout if isinstance(block, Residual) else (
            SEED_LAYOUT if getattr(block, "conv3", None) is None else SEED_LAYOUT_1X1)
    kind = type(block).__name__
    if kind not in ("BasicBlock", "Bottleneck") or type(getattr(block, "relu", None)) is not nn.ReLU:
        return None
    conv1 = getattr(block, "conv1", None)
    if type(conv1) is not nn.Conv2d:
        return None
    cin = conv1.in_channels
    if kind == "BasicBlock":
        width, stride = conv1.out_channels, conv1.stride[0]
        ok = (_is_conv(conv1, cin, width, 3, stride, 1) and _is_bn(getattr(block, "bn1", None), width)
              and _is_conv(getattr(block, "conv2", None), width, width, 3, 1, 1)
              and _is_bn(getattr(block, "bn2", None), width))
        cout, chain = width, (("conv1", "bn1"), ("conv2", "bn2"))
    else:
        width = conv1.out_channels
        conv2, conv3 = getattr(block, "conv2", None), getattr(block, "conv3", None)
        if type(conv2) is not nn.Conv2d or type(conv3) is not nn.Conv2d:
            return None
        stride, cout = conv2.stride[0], conv3.out_channels
        ok = (_is_conv(conv1, cin, width, 1, 1, 0) and _is_bn(getattr(block, "bn1", None), width)
              and _is_conv(conv2, width, width, 3, stride, 1) and _is_bn(getattr(block, "bn2", None), width)
              and _is_conv(conv3, width, cout, 1, 1, 0) and _is_bn(getattr(block, "bn3", None), cout))
        chain = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))
    if not ok:
        return None
    downsample = _downsample_ok(block, cin, cout, stride)
    if downsample is None:
        return None
    return BlockLayout(chain, ("downsample.0", "downsample.1") if downsample else None)


def _set_sync(block: nn.Module, sync_batchnorm: bool, process_group) -> None:
    if sync_batchnorm:
        block.sync_batchnorm = SyncGroup(process_group)
    elif process_group is not None:
        raise ValueError("process_group is given but sync_batchnorm is False")
    else:
        block.__dict__.pop("sync_batchnorm", None)


def convert(model: nn.Module, backend: str = "auto", *, sync_batchnorm: bool = False,
            process_group=None) -> nn.Module:
    """Replace every block ``block_layout`` recognises inside ``model`` (nested containers included) --
    the seed's ``Residual``, torchvision's ``BasicBlock`` and ``Bottleneck`` -- by a fused block sharing
    its parameters and buffers, so optimizers and state_dicts keep working; modules that do not match are
    left alone. Returns the model (or the fused block when ``model`` itself is one).

    ``sync_batchnorm=True``: in training, every fused block synchronizes its batch statistics across
    ``process_group`` (default: the world) of torch.distributed, as ``nn.SyncBatchNorm`` would, while
    its batch norms stay ``BatchNorm2d`` (what DDP accepts on CPUs too). Blocks whose batch norms are
    ``nn.SyncBatchNorm`` synchronize over their own group without it. See ``fused_resnet.sync``.

    Example::

        >>> net = fused_resnet.convert(reference.resnet18())
        >>> net = fused_resnet.convert(torchvision.models.resnet50(), sync_batchnorm=True)
    """
    _check_backend_name(backend)
    if isinstance(model, (Residual, FusedBlock)):
        model.backend = backend
        _set_sync(model, sync_batchnorm, process_group)
        return model
    layout = block_layout(model)
    if layout is not None:
        fused = Residual.from_seed(model, backend) if is_seed_residual(model) else FusedBlock(model, layout, backend)
        _set_sync(fused, sync_batchnorm, process_group)
        return fused
    for name, child in model.named_children():
        converted = convert(child, backend, sync_batchnorm=sync_batchnorm, process_group=process_group)
        if converted is not child:
            setattr(model, name, converted)
    return model


def resnet_block(in_channels: int, out_channels: int, num_residuals: int, first_block: bool = False, *,
                 backend: str = "auto") -> nn.Sequential:
    """The seed's stage of residual blocks, built from fused blocks."""
    return reference.resnet_block(in_channels, out_channels, num_residuals, first_block,
                                  residual_cls=Residual, backend=backend)


def resnet18(in_channels: int = 1, num_classes: int = 10, *, backend: str = "auto") -> nn.Sequential:
    """The seed's ResNet-18 (an ``nn.Sequential`` with the chapter's child names), with fused blocks."""
    return reference.resnet18(in_channels, num_classes, residual_cls=Residual, backend=backend)
