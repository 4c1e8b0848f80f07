"""Small batches on real data: plain BN vs ghost BN, BatchRenorm, GroupNorm and FrozenBN fine-tuning.

Trains bnkit.digits' small CNN (scikit-learn's 8x8 digits, no download) at batch sizes 2, 4, 8
and 32 and prints the eval accuracy of each method; saves a plot and the table to --out (a new
temporary directory by default; an existing plot is never overwritten without --force).

    python examples/small_batch_digits.py [--out DIR] [--steps 250] [--force]

Every run takes about the same number of SGD steps (--steps), so small batches see fewer samples;
compare the methods within a column. The learning rate scales with sqrt(batch size / 32).

Methods:
  plain BN        bnkit.BatchNorm2d (= torch.nn.BatchNorm2d)
  ghost BN        bnkit.BatchNorm2d(virtual_batch_size=8), only at batch 32 (smaller batches are one chunk)
  BatchRenorm     bnkit.BatchRenorm2d with the paper's warm-up (rmax 1->3, dmax 0->5) over the first half,
                  renorm_momentum=0.1 (the paper's 0.01 is for runs of many thousand steps)
  GroupNorm       torch.nn.GroupNorm(4 groups), no batch statistics at all
  FrozenBN f.t.   pretrain with plain BN at batch 64, then bnkit.freeze(model) and fine-tune at the batch size
                  (learning rate / 10, as usual for fine-tuning)
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time

import torch
from torch import nn

import bnkit
from bnkit import digits

BATCH_SIZES = (2, 4, 8, 32)
GHOST_SIZE = 8
PRETRAIN_BATCH = 64


def _lr(batch_size: int) -> float:
    return 0.1 * math.sqrt(batch_size / 32)


def _train(model, x, y, batch_size: int, steps: int, lr: float, seed: int):
    """About ``steps`` SGD steps: a prefix of the data for one epoch, or whole epochs."""
    if steps * batch_size <= len(x):
        return digits.train(model, x[:steps * batch_size], y[:steps * batch_size], epochs=1,
                            batch_size=batch_size, lr=lr, seed=seed)
    epochs = max(1, round(steps * batch_size / len(x)))
    return digits.train(model, x, y, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed)


def run(steps: int, seed: int = 0) -> tuple[dict, float]:
    """``({method: {batch_size: accuracy}}, pretrained accuracy)``."""
    torch.manual_seed(seed)
    x, y, xt, yt = digits.load_digits(seed=seed)
    results: dict[str, dict[int, float]] = {}

    def record(method, bs, model):
        results.setdefault(method, {})[bs] = digits.evaluate(model, xt, yt)

    pretrained = _train(digits.digits_cnn(seed=seed), x, y, PRETRAIN_BATCH, steps, _lr(PRETRAIN_BATCH), seed)
    pretrained_acc = digits.evaluate(pretrained, xt, yt)
    state = pretrained.state_dict()
    for bs in BATCH_SIZES:
        norms = {"plain BN": lambda c: bnkit.BatchNorm2d(c),
                 "BatchRenorm": lambda c: bnkit.BatchRenorm2d(c, renorm_momentum=0.1,
                                                              **bnkit.renorm_warmup(steps // 2, hold=steps // 10)),
                 "GroupNorm": lambda c: nn.GroupNorm(4, c)}
        if bs > GHOST_SIZE:
            norms[f"ghost BN (virtual {GHOST_SIZE})"] = lambda c: bnkit.BatchNorm2d(c, virtual_batch_size=GHOST_SIZE)
        for method, norm in norms.items():
            record(method, bs, _train(digits.digits_cnn(norm, seed=seed), x, y, bs, steps, _lr(bs), seed))
        model = digits.digits_cnn(seed=seed)
        model.load_state_dict(state)
        record("FrozenBN fine-tune", bs, _train(bnkit.freeze(model), x, y, bs, steps, _lr(bs) / 10, seed + 1))
    return results, pretrained_acc


def table(results: dict, pretrained_acc: float) -> str:
    head = "| method | " + " | ".join(f"batch {bs}" for bs in BATCH_SIZES) + " |"
    lines = [head, "|---|" + "---:|" * len(BATCH_SIZES)]
    for method, accs in results.items():
        lines.append(f"| {method} | " + " | ".join(f"{accs[bs]:.3f}" if bs in accs else "-" for bs in BATCH_SIZES)
                     + " |")
    lines.append(f"\n(pretrained at batch {PRETRAIN_BATCH} before the FrozenBN fine-tuning: {pretrained_acc:.3f})")
    return "\n".join(lines)


def plot(results: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, accs in results.items():
        sizes = sorted(accs)
        ax.plot(sizes, [accs[s] for s in sizes], "o-", label=method)
    ax.set_xscale("log", base=2)
    ax.set_xticks(BATCH_SIZES, [str(b) for b in BATCH_SIZES])
    ax.set_xlabel("training batch size")
    ax.set_ylabel("eval accuracy (digits test split)")
    ax.set_title("Normalization at small batch sizes")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="output directory (default: a new temporary directory)")
    parser.add_argument("--steps", type=int, default=250, help="SGD steps per run (about)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="overwrite an existing plot/table in --out")
    args = parser.parse_args(argv)
    out = args.out or tempfile.mkdtemp(prefix="bnkit-small-batch-")
    png, md = os.path.join(out, "small_batch.png"), os.path.join(out, "small_batch.md")
    existing = [p for p in (png, md) if os.path.exists(p)]
    if existing and not args.force:
        print(f"error: {', '.join(existing)} exists; pass --force to overwrite or choose another --out",
              file=sys.stderr)
        return 2
    os.makedirs(out, exist_ok=True)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    start = time.perf_counter()
    results, pretrained_acc = run(args.steps, args.seed)
    text = table(results, pretrained_acc)
    print(text)
    with open(md, "w") as f:
        f.write(text + "\n")
    plot(results, png)
    print(f"\n~{args.steps} steps per run, {time.perf_counter() - start:.0f} s; wrote {png} and {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
