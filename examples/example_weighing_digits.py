"""Inference example weighing (Summers & Dinneen, ICLR 2020) on the digits data.

A network trained with small normalization batches has learned to see activations normalized by
noisy, per-batch statistics that include the example itself. At inference, mixing each example's
own statistics into the population statistics with weight alpha (default 1 / B_train) gives the
layers inputs closer to what they saw in training. This script trains bnkit.digits' CNN with small
batches and prints eval accuracy for several alphas.

    python examples/example_weighing_digits.py [--batch-sizes 2 4 8] [--epochs 3]
"""
import argparse

import torch

import bnkit
from bnkit.digits import digits_cnn, evaluate, load_digits, train


def set_example_weight(model, alpha):
    for _, layer in bnkit.batch_norm_layers(model):
        layer.example_weight = alpha


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seeds", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    x_train, y_train, x_test, y_test = load_digits()
    alphas = [None, "auto", 0.05, 0.1]
    print(f"{'batch':>5} | " + " | ".join(f"{'alpha=' + str(a):>12}" for a in alphas) + "   (eval accuracy, mean over seeds)")
    for bs in args.batch_sizes:
        acc = {a: 0.0 for a in alphas}
        for seed in range(args.seeds):
            model = digits_cnn(seed=seed)
            train(model, x_train, y_train, epochs=args.epochs, batch_size=bs, lr=0.02, seed=seed)
            for a in alphas:
                set_example_weight(model, a)
                acc[a] += evaluate(model, x_test, y_test) / args.seeds
        print(f"{bs:>5} | " + " | ".join(f"{acc[a]:>12.4f}" for a in alphas))


if __name__ == "__main__":
    main()
