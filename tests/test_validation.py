"""Bad input gets a clear error naming the problem, as PyTorch's own modules do."""

import pytest
import torch

import fused_resnet


@pytest.fixture
def blk():
    return fused_resnet.Residual(4, 4)


def test_wrong_rank(blk):
    with pytest.raises(ValueError, match=r"4D input.*3D input"):
        blk(torch.randn(4, 5, 5))
    with pytest.raises(ValueError, match=r"4D input.*5D input"):
        blk(torch.randn(1, 4, 5, 5, 5))


def test_wrong_channels(blk):
    with pytest.raises(ValueError, match="expected an input with 4 channels, got 3 channels"):
        blk(torch.randn(2, 3, 5, 5))


def test_non_floating_dtype(blk):
    with pytest.raises(RuntimeError, match="floating-point input, got dtype torch.int64"):
        blk(torch.ones(2, 4, 5, 5, dtype=torch.long))


def test_dtype_mismatch(blk):
    with pytest.raises(RuntimeError, match="dtype torch.float16 but its parameters have dtype torch.float32"):
        blk(torch.randn(2, 4, 5, 5).half())


def test_device_mismatch(blk):
    x = torch.randn(2, 4, 5, 5, device="meta")
    with pytest.raises(RuntimeError, match="input is on meta but its parameters are on cpu"):
        blk(x)


def test_batch_of_one_in_training():
    blk = fused_resnet.Residual(4, 8, use_1x1conv=True, stride=2).train()
    with pytest.raises(ValueError, match="more than 1 value per channel.*batch of one"):
        blk(torch.randn(1, 4, 2, 2))   # output 1x1: a single value per channel, as BatchNorm2d refuses
    blk.eval()
    assert blk(torch.randn(1, 4, 2, 2)).shape == (1, 8, 1, 1)
    assert blk(torch.randn(1, 4, 5, 5)).shape == (1, 8, 3, 3)  # serving a batch of one
    blk.bn2.train()  # one batch norm taking batch statistics is enough to refuse, as in eager
    with pytest.raises(ValueError, match="more than 1 value per channel.*batch of one"):
        blk(torch.randn(1, 4, 2, 2))


def test_batch_of_one_with_spatial_extent_trains_like_eager():
    # BatchNorm2d accepts a batch of one when the image has more than one position; so do we.
    blk = fused_resnet.Residual(4, 4).train()
    assert blk(torch.randn(1, 4, 3, 3)).shape == (1, 4, 3, 3)


@pytest.mark.parametrize("training", [True, False])
def test_empty_input(blk, training):
    blk.train(training)
    with pytest.raises(ValueError, match="non-empty input"):
        blk(torch.randn(0, 4, 5, 5))


def test_named_backend_that_cannot_serve():
    from fused_resnet.backends import BackendUnavailable
    names = fused_resnet.available_backends()
    blk = fused_resnet.Residual(4, 4, backend="cuda")
    err = "not available" if "cuda" not in names else "cannot run this input"
    with pytest.raises(BackendUnavailable, match=err):
        blk(torch.randn(2, 4, 5, 5))
