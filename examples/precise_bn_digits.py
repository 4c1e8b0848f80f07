"""Population statistics after large-batch, short training: EMA vs equal-weight averaging vs bnkit.calibrate.

The small BN CNN of ``bnkit.digits`` is trained on scikit-learn's 8x8 digits with batch 512 for a
few epochs (a handful of SGD steps), so the EMA running statistics (momentum 0.1) lag behind the
final weights. The same trained weights are then evaluated with four sets of statistics:

* EMA: the running statistics as training left them;
* update_bn: ``torch.optim.swa_utils.update_bn`` (fvcore's original scheme): every batch weighs
  the same, per-batch unbiased variances are averaged (no between-batch term);
* calibrate precise: exact pooled statistics, upstream layers normalizing with batch statistics;
* calibrate eval_consistent: exact pooled statistics of the activations eval really produces.

Each recomputation reads the training set once in batches of 64 (the last one holds 4 images).
Run: ``python examples/precise_bn_digits.py`` (23 s on a busy 2-core machine, 2026-11-30).
"""
import copy
import os
import platform
import time

import torch
from rich.console import Console
from rich.table import Table

import bnkit
from bnkit.digits import batches, digits_cnn, evaluate, load_digits, train

SEEDS = (0, 1, 2)
EPOCHS, BATCH, LR = 6, 512, 0.5
CALIBRATION_BATCH = 64


def with_update_bn(model, loader):
    model = copy.deepcopy(model)
    torch.optim.swa_utils.update_bn(loader, model)
    return model


def with_calibrate(model, loader, mode):
    model = copy.deepcopy(model)
    bnkit.calibrate(model, loader, num_batches=None, mode=mode, progress=False)
    return model


@torch.no_grad()
def eval_mismatch(model, loader):
    """Largest ``|running_var / var - 1|`` over layers and channels, ``var`` being the unbiased variance of
    the layer's actual input in eval mode over the calibration data: how far eval's normalization is off."""
    model.eval()
    inputs = {m: [] for _, m in bnkit.batch_norm_layers(model)}
    handles = [m.register_forward_pre_hook(lambda m, args: inputs[m].append(args[0])) for m in inputs]
    for xb, _ in loader:
        model(xb)
    for h in handles:
        h.remove()
    worst = 0.0
    for m, xs in inputs.items():
        x = torch.cat(xs).transpose(0, 1).flatten(1).double()
        worst = max(worst, (m.running_var.double() / x.var(1) - 1).abs().max().item())
    return worst


def main():
    global START
    START = time.perf_counter()
    # Tiny tensors: one thread avoids threading overhead (and behaves the same on a busy machine).
    torch.set_num_threads(1)
    x_train, y_train, x_test, y_test = load_digits()
    loader = list(batches(x_train, y_train, CALIBRATION_BATCH, shuffle=True, seed=123, drop_last=False))
    methods = {
        "EMA running statistics (momentum 0.1)": lambda m: m,
        "torch update_bn (equal-weight batches)": lambda m: with_update_bn(m, loader),
        "bnkit.calibrate precise": lambda m: with_calibrate(m, loader, "precise"),
        "bnkit.calibrate eval_consistent": lambda m: with_calibrate(m, loader, "eval_consistent"),
    }
    accuracy = {name: [] for name in methods}
    mismatch = {name: [] for name in methods}
    for seed in SEEDS:
        model = train(digits_cnn(seed=seed), x_train, y_train, epochs=EPOCHS, batch_size=BATCH, lr=LR, seed=seed)
        for name, recompute in methods.items():
            recomputed = recompute(model)
            accuracy[name].append(evaluate(recomputed, x_test, y_test))
            mismatch[name].append(eval_mismatch(recomputed, loader))

    steps = EPOCHS * (len(x_train) // BATCH)
    table = Table(title=f"digits CNN, batch {BATCH}, {EPOCHS} epochs ({steps} SGD steps): "
                        f"test accuracy (%), and eval mismatch of the statistics")
    table.add_column("statistics")
    for seed in SEEDS:
        table.add_column(f"seed {seed}", justify="right")
    table.add_column("mean ± std", justify="right")
    table.add_column("max |running_var / eval var - 1|", justify="right")
    for name, values in accuracy.items():
        v = torch.tensor(values) * 100
        table.add_row(name, *(f"{x:.1f}" for x in v.tolist()), f"{v.mean():.1f} ± {v.std():.1f}",
                      f"{max(mismatch[name]):.2g}")
    Console(width=140).print(table)
    print(f"{time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} CPU cores, 1 thread, "
          f"{time.perf_counter() - START:.0f} s")


if __name__ == "__main__":
    main()
