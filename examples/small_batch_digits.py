"""Small, non-i.i.d. batches on real data: plain BN and its remedies side by side, over several seeds.

bnkit.digits' small CNN (scikit-learn's 8x8 digits, no download) is trained on batches of 4 images
sorted by class (each batch holds one or two classes, as from a sorted or per-user data stream), 3
epochs of SGD at lr 0.05 with lr / 10 for the last third. Every method of a seed starts from the same
weights and sees the same batches. Printed: test accuracy, mean ± std over seeds, and each method's
change from plain BN per seed (mean ± std, and how many seeds gained). A plot and the table go to
--out (a new temporary directory by default; existing files are never overwritten without --force).

    python examples/small_batch_digits.py [--seeds 5] [--out DIR] [--force]

Methods (bnkit.digits.small_batch_methods):
  plain BN, shuffled batches   the same training on i.i.d. batches of 4: what the sorting costs
  plain BN                     bnkit.BatchNorm2d (= torch.nn.BatchNorm2d)
  plain BN + bnkit.calibrate   the plain model with its statistics recomputed on the training images
  BatchRenorm (warm-up)        bnkit.BatchRenorm2d with the paper's warm-up: plain BN for the first
                               10% of steps, then rmax 1 -> 3 and dmax 0 -> 5 until half way;
                               renorm_momentum 0.1 (the paper's 0.01 is for runs of many thousand steps)
  ghost BN (virtual batch 2)   statistics per pair of images
  FrozenBN for the last third  bnkit.freeze(model) when the learning rate drops
  GroupNorm (8 groups)         no batch statistics at all
  BatchRenorm, fixed 3 / 5     rmax=3, dmax=5 from the first step (why BatchRenorm2d asks for its bounds)
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

import torch

import bnkit
from bnkit import digits


def methods(steps: int) -> dict:
    """All of bnkit.digits' methods, plus BatchRenorm with fixed bounds from the first step."""
    out = digits.small_batch_methods(steps)
    out["BatchRenorm, fixed rmax=3, dmax=5"] = {
        "norm": lambda c: bnkit.BatchRenorm2d(c, rmax=3.0, dmax=5.0, renorm_momentum=0.1)}
    return out


def table(results: dict) -> str:
    plain = results["plain BN"]
    lines = ["| method | test accuracy % (change from plain BN per seed) |", "|---|---:|"]
    for name, accs in results.items():
        lines.append(f"| {name} | {digits.mean_spread(accs, None if name == 'plain BN' else plain)} |")
    return "\n".join(lines)


def plot(results: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(results)
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(names) + 1.2))
    for i, name in enumerate(names):
        accs = [100 * a for a in results[name]]
        ax.scatter(accs, [i] * len(accs), s=14, color="grey")
        ax.plot([sum(accs) / len(accs)], [i], "o", color="C0")
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("test accuracy (%): seeds (grey) and mean (blue)")
    ax.set_title("digits CNN, class-sorted batches of 4", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=digits.SMALL_BATCH["epochs"])
    parser.add_argument("--train-images", type=int, help="train on this many images only (smoke tests)")
    parser.add_argument("--out", help="output directory (default: a new temporary directory)")
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
    torch.set_num_threads(1)  # 8x8 images: threads cost more than they save
    start = time.perf_counter()
    steps = args.epochs * (len(digits.load_digits()[0][:args.train_images]) // digits.SMALL_BATCH["batch_size"])
    results = digits.small_batch_comparison(range(args.seeds), epochs=args.epochs, methods=methods(steps),
                                            train_images=args.train_images)
    text = (f"{table(results)}\n\n{args.seeds} seeds, {args.epochs} epochs; {time.strftime('%Y-%m-%d')}, "
            f"{platform.machine()}, {os.cpu_count()} CPU cores, {time.perf_counter() - start:.0f} s")
    print(text)
    with open(md, "w") as f:
        f.write(text + "\n")
    plot(results, png)
    print(f"wrote {png} and {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
