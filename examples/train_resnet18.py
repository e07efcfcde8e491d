"""Train the chapter's ResNet-18 on real images, eager and fused side by side.

    python examples/train_resnet18.py --data ~/data/FashionMNIST/raw        # Fashion-MNIST, the chapter's data
    python examples/train_resnet18.py                                       # scikit-learn's bundled digits
    python examples/train_resnet18.py --smoke                               # a few steps, under a minute

Data that can be had offline: Fashion-MNIST's four IDX files (``train-images-idx3-ubyte`` and the
others, gzipped or not) in the directory ``--data`` names, as the chapter uses (28x28, resized to
``--size``, 96 in the chapter); without it, scikit-learn's digits (8x8, 1,797 images; an example-only
dependency the set-up script installs). The same initial weights are trained twice -- by the seed's
modules in eager PyTorch and by the fused blocks (``fused_resnet.resnet18``) -- with a progress bar, and
the last line compares their test accuracy and time per epoch.
"""

from __future__ import annotations

import argparse
import copy
import gzip
import os
import struct
import sys
import time

import torch
import torch.nn.functional as F

import fused_resnet
from fused_resnet import reference


def _idx(path: str) -> torch.Tensor:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    _, _, dtype, dims = struct.unpack(">BBBB", data[:4])
    shape = struct.unpack(">" + "I" * dims, data[4:4 + 4 * dims])
    return torch.frombuffer(bytearray(data[4 + 4 * dims:]), dtype=torch.uint8).reshape(shape)


def fashion_mnist(root: str):
    def find(stem: str) -> str:
        for name in (stem, stem + ".gz"):
            if os.path.exists(os.path.join(root, name)):
                return os.path.join(root, name)
        raise SystemExit(f"no {stem}[.gz] in {root}: expected Fashion-MNIST's IDX files there")

    load = {k: _idx(find(f"{k}-idx{3 if 'images' in k else 1}-ubyte"))
            for k in ("train-images", "train-labels", "t10k-images", "t10k-labels")}
    return ((load["train-images"].float() / 255, load["train-labels"].long()),
            (load["t10k-images"].float() / 255, load["t10k-labels"].long()), "Fashion-MNIST")


def digits():
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise SystemExit("scikit-learn is not installed (pip install scikit-learn), and no --data was given")
    d = load_digits()
    x, y = torch.tensor(d.images, dtype=torch.float32) / 16, torch.tensor(d.target)
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(len(y), generator=gen)
    x, y = x[order], y[order]
    cut = int(0.8 * len(y))
    return (x[:cut], y[:cut]), (x[cut:], y[cut:]), "scikit-learn digits"


def batches(x: torch.Tensor, y: torch.Tensor, size: int, batch: int, device: str, shuffle: bool, seed: int = 0):
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(len(y))
    for i in range(0, len(y), batch):
        idx = order[i:i + batch]
        xb = F.interpolate(x[idx].unsqueeze(1), size=(size, size), mode="bilinear", align_corners=False)
        yield xb.to(device), y[idx].to(device)


def train(name: str, model: torch.nn.Module, data, args, device: str) -> tuple[float, float]:
    """Train for the epochs asked (or the smoke steps), with a progress bar; (accuracy, seconds/epoch)."""
    (xtr, ytr), (xte, yte), _ = data
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    steps_per_epoch = -(-len(ytr) // args.batch)
    total = args.steps if args.smoke else args.epochs * steps_per_epoch
    step, seen, start = 0, 0, time.perf_counter()
    epochs_run = 0
    while step < total:
        model.train()
        for xb, yb in batches(xtr, ytr, args.size, args.batch, device, shuffle=True, seed=epochs_run):
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step, seen = step + 1, seen + len(yb)
            if step % 5 == 0 or step == total:
                if device == "cuda":
                    torch.cuda.synchronize()
                rate = seen / (time.perf_counter() - start)
                bar = "#" * int(30 * step / total)
                print(f"\r{name:>6} [{bar:<30}] step {step}/{total}  loss {loss.item():.3f}  {rate:7.1f} images/s",
                      end="", flush=True)
            if step == total:
                break
        epochs_run += 1
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    print()
    model.eval()
    correct = n = 0
    limit = 256 if args.smoke else len(yte)
    with torch.no_grad():
        for xb, yb in batches(xte[:limit], yte[:limit], args.size, args.batch, device, shuffle=False):
            correct += (model(xb).argmax(1) == yb).sum().item()
            n += len(yb)
    return correct / n, seconds * steps_per_epoch / step


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None, help="directory with Fashion-MNIST's IDX files")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--size", type=int, default=None, help="input size (default 96 for Fashion-MNIST, 32 "
                                                               "for digits)")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--smoke", action="store_true", help="a few steps on a small input: under a minute")
    parser.add_argument("--steps", type=int, default=12, help="steps of a --smoke run")
    args = parser.parse_args()
    data = fashion_mnist(os.path.expanduser(args.data)) if args.data else digits()
    args.size = args.size or (32 if args.smoke or not args.data else 96)
    if args.smoke:
        args.batch = min(args.batch, 32)
    device = args.device
    print(f"{data[2]}: {len(data[0][1])} training and {len(data[1][1])} test images at {args.size}x{args.size}, "
          f"device {device}, fused backends here: {fused_resnet.available_backends()}")
    torch.manual_seed(0)
    eager = reference.resnet18().to(device)
    fused = fused_resnet.resnet18(backend=args.backend).to(device)
    fused.load_state_dict(copy.deepcopy(eager.state_dict()))  # the same initial weights
    results = {}
    for name, model in (("eager", eager), ("fused", fused)):
        torch.manual_seed(1)
        results[name] = train(name, model, data, args, device)
    (acc_e, t_e), (acc_f, t_f) = results["eager"], results["fused"]
    print(f"eager: accuracy {100 * acc_e:.1f}%, {t_e:.2f} s/epoch | fused: accuracy {100 * acc_f:.1f}%, "
          f"{t_f:.2f} s/epoch ({t_e / t_f:.2f}x eager)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
