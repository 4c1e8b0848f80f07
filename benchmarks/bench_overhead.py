"""Per-call host time of a bnkit layer next to torch.nn, on tensors small enough that Python and
dispatch are the whole cost (what a GPU step pays on the host for every layer call).

    python benchmarks/bench_overhead.py            # table: torch.nn, bnkit default, bnkit propagate
    python benchmarks/bench_overhead.py --repeats 9 --threads 1
    python benchmarks/bench_overhead.py --guard-ops   # what each op of the default guard costs

Cases: BatchNorm2d on 8x16x7x7 (train forward, train forward+backward, eval forward), and one
training step (forward, backward, SGD) of a 4-layer MLP with BatchNorm1d, batch 64. Each number is
the median over ``--repeats`` rounds of the mean time per call within a round (rounds alternate
between the implementations so drift hits them alike); the spread is min..max of the ratio.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import bnkit


def _mlp(bn):
    torch.manual_seed(0)
    layers = []
    for i in range(4):
        layers += [nn.Linear(64 if i else 32, 64), bn(64), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(64, 10))


def _cases(kind: str):
    bn2d = {"torch.nn": lambda: nn.BatchNorm2d(16), "bnkit": lambda: bnkit.BatchNorm2d(16),
            "bnkit propagate": lambda: bnkit.BatchNorm2d(16, nonfinite="propagate")}[kind]
    bn1d = {"torch.nn": nn.BatchNorm1d, "bnkit": bnkit.BatchNorm1d,
            "bnkit propagate": lambda c: bnkit.BatchNorm1d(c, nonfinite="propagate")}[kind]
    x = torch.randn(8, 16, 7, 7)
    xg = x.clone().requires_grad_(True)
    layer = bn2d()
    eval_layer = bn2d().eval()
    model = _mlp(bn1d)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    xb, yb = torch.randn(64, 32), torch.randint(0, 10, (64,))

    def mlp_step():
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(xb), yb).backward()
        opt.step()

    def no_grad_eval():
        with torch.no_grad():
            eval_layer(x)

    return {"train forward 8x16x7x7": lambda: layer(x),
            "train forward+backward 8x16x7x7": lambda: layer(xg).sum().backward(),
            "eval forward 8x16x7x7": no_grad_eval,
            "MLP train step (4x BatchNorm1d(64), batch 64)": mlp_step}


def _per_call_us(fn, calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls * 1e6


def _guard_ops(calls: int, repeats: int) -> None:
    """Host time of each op the default guard adds to a training call, next to torch's kernel (the
    cheapest run of each over ``repeats``): the floor a guard built from torch ops can reach."""
    from bnkit.stats.running import commit, nonfinite_flag
    c = 16
    x, w, b = torch.randn(8, c, 7, 7), torch.ones(c), torch.zeros(c)
    rm, rv, nbt, skipped = torch.zeros(c), torch.ones(c), torch.zeros((), dtype=torch.long), torch.zeros(())
    s0, s1 = rm.clone(), rv.clone()
    skip = nonfinite_flag(s0, s1)
    keep = skip.logical_not()
    ops = {"torch.batch_norm (training, the kernel itself)": lambda: torch.batch_norm(x, w, b, s0, s1, True, 0.1,
                                                                                        1e-5, False),
           "num_batches_tracked.add_ (torch.nn pays it too)": lambda: nbt.add_(keep),
           "scratch: 2x clone of the running statistics": lambda: (rm.clone(), rv.clone()),
           "nonfinite_flag (zeros_like + fused check)": lambda: nonfinite_flag(s0, s1),
           "keep = flag.logical_not()": lambda: skip.logical_not(),
           "2x torch.where into the buffers": lambda: (torch.where(keep, s0, rm, out=rm),
                                                     torch.where(keep, s1, rv, out=rv)),
           "skipped.add_(flag)": lambda: skipped.add_(skip),
           "for comparison: isfinite(t).all() on one tensor": lambda: torch.isfinite(s0).all(),
           "the whole commit (2x where + 2 counters)": lambda: commit(rm, rv, nbt, s0, s1, keep, skipped, skip)}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), best of {repeats} rounds x {calls} calls, "
          f"C={c}")
    print("| op | us per call |")
    print("|---|---|")
    for name, fn in ops.items():
        _per_call_us(fn, 50)
        print(f"| {name} | {min(_per_call_us(fn, calls) for _ in range(repeats)):.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--calls", type=int, default=400)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--guard-ops", action="store_true", help="time each op of the default guard instead")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.guard_ops:
        _guard_ops(args.calls * 10, args.repeats)
        return
    kinds = ("torch.nn", "bnkit", "bnkit propagate")
    cases = {k: _cases(k) for k in kinds}
    names = list(cases["torch.nn"])
    times = {(k, n): [] for k in kinds for n in names}
    for n in names:
        for k in kinds:
            _per_call_us(cases[k][n], 50)  # warm-up
        for _ in range(args.repeats):
            for k in kinds:
                times[k, n].append(_per_call_us(cases[k][n], args.calls))
    print(f"torch {torch.__version__}, {args.threads} thread(s), median of {args.repeats} rounds x {args.calls} calls")
    print("| case | torch.nn us | bnkit us | bnkit / torch.nn (min..max) | bnkit propagate us | propagate / torch.nn |")
    print("|---|---|---|---|---|---|")
    for n in names:
        ref = statistics.median(times["torch.nn", n])
        row = [n, f"{ref:.1f}"]
        for k in kinds[1:]:
            t = statistics.median(times[k, n])
            ratios = [a / b for a, b in zip(times[k, n], times["torch.nn", n])]
            row.append(f"{t:.1f}")
            row.append(f"{t / ref:.2f} ({min(ratios):.2f}..{max(ratios):.2f})" if k == "bnkit" else f"{t / ref:.2f}")
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
