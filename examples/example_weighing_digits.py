"""Inference example weighing (Summers & Dinneen, ICLR 2020) on the digits data.

A network trained with small normalization batches has learned to see activations normalized by
noisy, per-batch statistics that include the example itself. At inference, mixing each example's
own statistics into the population statistics with weight alpha (default 1 / B_train) gives the
layers inputs closer to what they saw in training. This script trains bnkit.digits' CNN with small
batches and prints eval accuracy for several alphas.

    python examples/example_weighing_digits.py [--batch-sizes 2 4 8] [--epochs 3] [--seeds 3]

Each cell: test accuracy in %, mean ± std over seeds; for alpha != off, in brackets the change from
alpha off on the same trained models (mean ± std) and how many seeds gained.
"""
import argparse
import os
import platform
import time

import torch

import bnkit
from bnkit.digits import digits_cnn, evaluate, load_digits, mean_spread, train


def set_example_weight(model, alpha):
    for _, layer in bnkit.batch_norm_layers(model):
        layer.example_weight = alpha


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seeds", type=int, default=3)
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # 8x8 images: threads cost more than they save
    start = time.perf_counter()
    x_train, y_train, x_test, y_test = load_digits()
    alphas = [None, "auto", 0.05, 0.1]
    print("| train batch | " + " | ".join("alpha off" if a is None else f"alpha {a}" for a in alphas) + " |")
    print("|---|" + "---|" * len(alphas))
    for bs in args.batch_sizes:
        acc = {a: [] for a in alphas}
        for seed in range(args.seeds):
            model = digits_cnn(seed=seed)
            train(model, x_train, y_train, epochs=args.epochs, batch_size=bs, lr=0.02, seed=seed)
            for a in alphas:
                set_example_weight(model, a)
                acc[a].append(evaluate(model, x_test, y_test))
        print(f"| {bs} | " + " | ".join(mean_spread(acc[a], None if a is None else acc[None]) for a in alphas) + " |")
    print(f"\n{args.seeds} seeds, {args.epochs} epochs; {time.strftime('%Y-%m-%d')}, {platform.machine()}, "
          f"{os.cpu_count()} CPU cores, 1 thread, {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
