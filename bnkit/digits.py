"""The real data set and small network the examples, benchmarks and ``bnkit demo`` share.

scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes) need no download, so
every experiment runs on a fresh machine in seconds. ``digits_cnn`` is a small conv net with a
normalization layer after each convolution; ``train`` and ``evaluate`` are a plain SGD loop.
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch import nn

__all__ = ["load_digits", "digits_cnn", "batches", "train", "evaluate"]


def load_digits(test_fraction: float = 0.25, seed: int = 0):
    """``(x_train, y_train, x_test, y_test)``: images ``(N, 1, 8, 8)`` float32 in [0, 1], int64 labels.

    The split is stratified-free but seeded, so it is the same on every machine.
    """
    try:
        from sklearn.datasets import load_digits as _sk_load_digits
    except ImportError as e:  # pragma: no cover - scikit-learn is a dependency
        raise ImportError("bnkit.digits needs scikit-learn: pip install scikit-learn") from e
    data = _sk_load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(len(x) * test_fraction))
    test, tr = perm[:n_test], perm[n_test:]
    return x[tr], y[tr], x[test], y[test]


def digits_cnn(norm: Callable[[int], nn.Module] | None = None, width: int = 16, seed: int = 0) -> nn.Sequential:
    """Three 3x3 convolutions (width, 2*width, 2*width), each followed by ``norm(channels)`` and ReLU.

    ``norm`` defaults to :class:`bnkit.BatchNorm2d`; pass ``torch.nn.BatchNorm2d``, a GroupNorm
    factory, or any ``channels -> Module``.
    """
    if norm is None:
        from .nn import BatchNorm2d as norm
    torch.manual_seed(seed)
    w = width
    return nn.Sequential(
        nn.Conv2d(1, w, 3, padding=1, bias=False), norm(w), nn.ReLU(),
        nn.Conv2d(w, 2 * w, 3, padding=1, bias=False), norm(2 * w), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(2 * w, 2 * w, 3, padding=1, bias=False), norm(2 * w), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * w, 10),
    )


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool = True, seed: int = 0,
            drop_last: bool = True) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Mini-batches of ``(x, y)``; ``drop_last`` avoids a last batch of one in training."""
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed)) if shuffle \
        else torch.arange(len(x))
    stop = len(x) - (len(x) % batch_size if drop_last else 0)
    for i in range(0, stop, batch_size):
        idx = order[i:i + batch_size]
        yield x[idx], y[idx]


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int = 5, batch_size: int = 64,
          lr: float = 0.1, seed: int = 0, on_step: Callable[[int], None] | None = None) -> nn.Module:
    """Plain SGD with momentum 0.9 and cross-entropy; ``on_step(step)`` is called after each step."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    model.train()
    step = 0
    for epoch in range(epochs):
        for xb, yb in batches(x, y, batch_size, seed=seed + epoch):
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
            step += 1
            if on_step is not None:
                on_step(step)
    return model


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    """Accuracy in eval mode (the model's mode is restored afterwards)."""
    was_training = model.training
    model.eval()
    correct = sum(int((model(xb).argmax(1) == yb).sum()) for xb, yb in
                  batches(x, y, batch_size, shuffle=False, drop_last=False))
    model.train(was_training)
    return correct / len(x)
