"""fused_resnet: the seed ResNet residual block as fused GPU kernels, as a drop-in module.

Example::

    >>> import torch, fused_resnet
    >>> blk = fused_resnet.Residual(64, 64).cuda().eval()
    >>> y = blk(torch.randn(8, 64, 56, 56, device="cuda"))
"""

from .backends import available_backends
from .modules import FusedBlock, Residual, block_layout, convert, is_seed_residual, resnet18, resnet_block

__all__ = ["Residual", "FusedBlock", "resnet_block", "resnet18", "convert", "is_seed_residual", "block_layout",
           "available_backends"]
__version__ = "0.1.0"
