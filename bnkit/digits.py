"""The real data set and small network the examples, benchmarks and ``bnkit demo`` share.

scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes) need no download, so
every experiment runs on a fresh machine in seconds. ``digits_cnn`` is a small conv net with a
normalization layer after each convolution; ``train`` and ``evaluate`` are a plain SGD loop;
``batches(..., class_sorted=True)`` gives the non-i.i.d. small batches where batch norm's statistics
fail, and ``shift`` a changed brightness and contrast (a domain shift).

Needs scikit-learn (``pip install "bnkit[demo]"``).
"""
from __future__ import annotations

import copy
from typing import Callable, Iterator

import torch
from torch import nn

__all__ = ["load_digits", "digits_cnn", "batches", "train", "evaluate", "shift", "small_batch_comparison",
           "small_batch_methods", "SMALL_BATCH", "mean_spread"]


def load_digits(test_fraction: float = 0.25, seed: int = 0):
    """``(x_train, y_train, x_test, y_test)``: images ``(N, 1, 8, 8)`` float32 in [0, 1], int64 labels.

    The split is stratified-free but seeded, so it is the same on every machine.
    """
    try:
        from sklearn.datasets import load_digits as _sk_load_digits
    except ImportError as e:
        raise ImportError('bnkit.digits needs scikit-learn: pip install "bnkit[demo]"') from e
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
            drop_last: bool = True, class_sorted: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Mini-batches of ``(x, y)``; ``drop_last`` avoids a last batch of one in training.

    ``class_sorted=True``: the samples are sorted by label (in random order within a class) and cut
    into batches, which are then visited in random order, so each batch holds one class or two
    (non-i.i.d. batches, as from a sorted or per-user data stream).
    """
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x), generator=g) if shuffle or class_sorted else torch.arange(len(x))
    if class_sorted:
        order = order[torch.sort(y[order], stable=True).indices]
    stop = len(x) - (len(x) % batch_size if drop_last else 0)
    starts = list(range(0, stop, batch_size))
    if class_sorted:
        starts = [starts[i] for i in torch.randperm(len(starts), generator=g).tolist()]
    for i in starts:
        idx = order[i:i + batch_size]
        yield x[idx], y[idx]


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int = 5, batch_size: int = 64,
          lr: float = 0.1, seed: int = 0, on_step: Callable[[int], None] | None = None,
          class_sorted: bool = False, lr_drop_at: int | None = None) -> nn.Module:
    """Plain SGD with momentum 0.9 and cross-entropy; ``on_step(step)`` is called after each step.

    ``class_sorted``: see :func:`batches`. ``lr_drop_at``: from this step on the learning rate is
    ``lr / 10`` (a step decay).
    """
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    model.train()
    step = 0
    for epoch in range(epochs):
        for xb, yb in batches(x, y, batch_size, seed=seed + epoch, class_sorted=class_sorted):
            if step == lr_drop_at:
                for group in opt.param_groups:
                    group["lr"] = lr / 10
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


def shift(x: torch.Tensor, contrast: float = 0.5, brightness: float = 0.3) -> torch.Tensor:
    """The images with another contrast and brightness, ``x * contrast + brightness``: a domain shift
    (another scanner or camera) that leaves the digits readable but moves every layer's statistics."""
    return x * contrast + brightness


#: The small-batch case: class-sorted batches of 4 (one or two classes each), 3 epochs, SGD at lr 0.05
#: with a step decay to lr / 10 for the last third. ``bnkit demo`` and examples/small_batch_digits.py use it.
SMALL_BATCH = {"batch_size": 4, "epochs": 3, "lr": 0.05}


def small_batch_methods(steps: int) -> dict[str, dict]:
    """The remedies compared on class-sorted small batches: name -> how to build and train the model.

    Each entry holds ``norm`` (the normalization layer factory for :func:`digits_cnn`) and optionally
    ``shuffled`` (train on i.i.d. batches instead), ``calibrate`` (recompute the statistics after
    training with :func:`bnkit.calibrate`) or ``freeze`` (:func:`bnkit.freeze` turns every batch norm
    into a FrozenBatchNorm2d when the learning rate drops, for the last third).
    """
    from . import nn as bnn

    plain = bnn.BatchNorm2d
    return {
        "plain BN, shuffled batches (reference)": {"norm": plain, "shuffled": True},
        "plain BN": {"norm": plain},
        "plain BN + bnkit.calibrate": {"norm": plain, "calibrate": True},
        "BatchRenorm (warm-up)": {"norm": lambda c: bnn.BatchRenorm2d(
            c, renorm_momentum=0.1, **bnn.renorm_warmup(steps // 2, hold=steps // 10))},
        "ghost BN (virtual batch 2)": {"norm": lambda c: bnn.GhostBatchNorm2d(c, virtual_batch_size=2)},
        "FrozenBN for the last third": {"norm": plain, "freeze": True},
        "GroupNorm (8 groups)": {"norm": lambda c: nn.GroupNorm(8, c)},
    }


def small_batch_comparison(seeds=(0, 1, 2), batch_size: int = SMALL_BATCH["batch_size"],
                           epochs: int = SMALL_BATCH["epochs"], lr: float = SMALL_BATCH["lr"],
                           methods=None, on_run: Callable[[str, int], None] | None = None,
                           train_images: int | None = None) -> dict[str, list[float]]:
    """Test accuracy per method and seed, trained on class-sorted batches; every method of a seed starts
    from the same initial weights and sees the same batches.

    ``methods``: a subset of the names of :func:`small_batch_methods` (default: all; "plain BN" is
    always run, the others are compared with it), or a dict like the one it returns.
    ``on_run(method, seed)`` is called before each run (progress reporting). ``train_images``: train
    on the first that many training images only (smoke tests)."""
    from .tools.calibrate import calibrate
    from .tools.conversion import freeze

    x, y, xt, yt = load_digits()
    x, y = x[:train_images], y[:train_images]
    steps = epochs * (len(x) // batch_size)
    drop = 2 * steps // 3  # lr / 10 from here on (and FrozenBN's switch)
    results: dict[str, list[float]] = {}
    for seed in seeds:
        trained = {}
        chosen = methods if isinstance(methods, dict) else {
            name: how for name, how in small_batch_methods(steps).items()
            if methods is None or name == "plain BN" or name in methods}
        for name, how in chosen.items():
            if on_run is not None:
                on_run(name, seed)
            if how.get("calibrate"):  # the plain model of this seed, recalibrated
                model = copy.deepcopy(trained["plain BN"])
                calibrate(model, list(x.split(64)), num_batches=None, progress=False)
            else:
                model = digits_cnn(how["norm"], seed=seed)
                train(model, x, y, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                      class_sorted=not how.get("shuffled"), lr_drop_at=drop,
                      on_step=(lambda s, m=model: s == drop and freeze(m)) if how.get("freeze") else None)
            trained[name] = model
            results.setdefault(name, []).append(evaluate(model, xt, yt))
    return results


def mean_spread(values, baseline=None) -> str:
    """``"mean ± std"`` of accuracies in percent (std over seeds, n - 1); with ``baseline`` (the same
    seeds' accuracies of another method) also the paired difference and how many seeds gained."""
    v = torch.tensor(values, dtype=torch.float64) * 100
    text = f"{v.mean():.1f} ± {v.std():.1f}" if len(v) > 1 else f"{v.mean():.1f}"
    if baseline is None:
        return text
    d = v - torch.tensor(baseline, dtype=torch.float64) * 100
    spread = f" ± {d.std():.1f}" if len(d) > 1 else ""
    return f"{text} ({d.mean():+.1f}{spread}; {int((d > 0).sum())}/{len(d)} seeds better)"
