"""The ``bnkit`` command.

``bnkit demo``       train a small BN CNN on scikit-learn's bundled digits and show batch norm's pitfalls
``bnkit doctor``     diagnose a saved model (TorchScript; ``torch.save`` of the whole model with ``--trust-pickle``)
``bnkit momentum``   convert a momentum between PyTorch, Keras and half-life conventions

Errors print one line; ``--debug`` shows the traceback instead. Exit status: 0 success, 1 a file or
the data cannot be used (or an unexpected error; ``doctor --strict``: an error finding), 2 a usage
error (unknown or bad option), 130 interrupted. Model files load without running code from them
(TorchScript, weights-only ``torch.load``); a pickled whole model needs ``--trust-pickle``.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

__all__ = ["main"]


class CLIError(Exception):
    """A usage error (bad option or option value): printed as one line, exit status 2."""

    status = 2


class InputError(CLIError):
    """A file or data that cannot be used (missing, unreadable, wrong content): one line, exit status 1."""

    status = 1


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of argparse's usage block
        raise CLIError(f"{message} (see '{self.prog} --help')")


def _output_dir(path: str, force: bool) -> Path:
    """Refuse an existing path unless ``force``; even then only the report's own files are replaced
    (never delete a folder the user named by mistake, such as ``--out .``)."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise CLIError(f"output path {out} exists and is not a directory")
    if out.exists() and not force:
        raise CLIError(f"output directory {out} exists; pass --force to write the report into it anyway")
    return out


def _first_line(e: Exception, limit: int = 200) -> str:
    return (str(e).strip().splitlines() or [""])[0][:limit]


# ---- bnkit momentum ----
def _momentum(args, console) -> int:
    from rich.table import Table

    from .stats.momentum import convert

    given = [(c, v) for c, v in (("decay", args.keras), ("momentum", args.torch), ("half_life", args.half_life))
             if v is not None]
    convention, value = given[0]
    try:
        values = {to: convert(value, convention, to) for to in ("momentum", "decay", "half_life")}
    except ValueError as e:
        raise CLIError(str(e)) from None
    flag = {"decay": "--keras", "momentum": "--torch", "half_life": "--half-life"}[convention]
    # The code column must mean the same momentum when pasted: 10 digits (6 turn Decay(0.9999999) into
    # Decay(1), which never updates), inf spelled as Python reads it, and no HalfLife(0), which bnkit refuses.
    code = {k: 'float("inf")' if v == float("inf") else f"{v:.10g}" for k, v in values.items()}
    half_life = (f"bnkit.BatchNorm2d(C, momentum=bnkit.momentum.HalfLife({code['half_life']}))"
                 if values["half_life"] > 0 else "none: momentum 1 keeps only the newest batch")
    t = Table(title=f"{flag} {value:g}", title_justify="left")
    for col in ("convention", "value", "in bnkit / torch"):
        t.add_column(col, overflow="fold")  # the code column wraps rather than ending in "…"
    t.add_row("PyTorch momentum (weight of the new batch)", f"{values['momentum']:.6g}",
              f"torch.nn.BatchNorm2d(C, momentum={code['momentum']})")
    t.add_row("Keras/TF/Flax momentum (weight of the old value)", f"{values['decay']:.6g}",
              f"bnkit.BatchNorm2d(C, momentum=bnkit.momentum.Decay({code['decay']}))")
    t.add_row("half-life (steps until a batch's weight halves)", f"{values['half_life']:.6g}", half_life)
    console.print(t)
    return 0


# ---- bnkit doctor ----
PICKLE_WARNING = ("--trust-pickle: unpickling {path} runs whatever code the file holds, with your permissions; "
                  "use it only for files you made or fully trust")


def _load_model(path: str, trust_pickle: bool = False):
    """A model from a TorchScript archive or a weights-only ``torch.load`` (torch reads safetensors files
    too: tensors only, reported as a state_dict); a pickled whole model only with
    ``trust_pickle`` (unpickling runs code from the file, so it is the user's explicit choice)."""
    import torch

    p = Path(path)
    if not p.is_file():
        raise InputError(f"cannot read model file {path}: no such file")
    try:
        model = torch.jit.load(str(p), map_location="cpu")  # TorchScript: the file's code runs in TorchScript only
    except Exception:
        model = _load_torch_file(p, path, trust_pickle)
    if isinstance(model, dict):
        what = "state_dict" if all(isinstance(v, torch.Tensor) for v in model.values()) else "dict"
        raise InputError(f"{path} holds a {what}, not a model; save the whole model with "
                         f"torch.jit.save(torch.jit.script(bnkit.convert(model, 'torch')), path) (or "
                         f"torch.save(model, path) and --trust-pickle)")
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"{path} holds a {type(model).__name__}, not a torch.nn.Module")
    return model


def _load_torch_file(p: Path, path: str, trust_pickle: bool):
    import re
    import warnings

    import torch

    try:
        with warnings.catch_warnings():  # torch's notes on pickle protocols: the error below says what matters
            warnings.simplefilter("ignore")
            return torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:
        refused = e
    if not trust_pickle:
        named = re.search(r"Unsupported global: GLOBAL (\S+)", str(refused))
        what = (f"a pickled Python object (it names {named.group(1)})" if named else
                f"not a TorchScript, weights-only torch.save or safetensors file ({type(refused).__name__})")
        raise InputError(f"cannot read model file {path}: it is {what}. Unpickling runs whatever code the file "
                         f"holds; if it is a torch.save(model) you made or fully trust, pass --trust-pickle")
    print(f"bnkit: warning: {PICKLE_WARNING.format(path=path)}", file=sys.stderr)
    try:
        return torch.load(str(p), map_location="cpu", weights_only=False)
    except Exception as e:
        raise InputError(f"cannot read model file {path} as a TorchScript or torch.save model "
                         f"({type(e).__name__}: {_first_line(e)})") from None


def _load_data(args):
    import torch

    if args.demo_data:
        from .digits import load_digits

        return load_digits()[0]
    p = Path(args.data)
    if not p.is_file():
        raise InputError(f"cannot read data file {args.data}: no such file")
    try:
        data = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:
        raise InputError(f"cannot read data file {args.data} with torch.load(weights_only=True) "
                         f"({type(e).__name__}); save the inputs with torch.save(tensor, path)") from None
    if isinstance(data, (tuple, list)) and data and isinstance(data[0], torch.Tensor):
        data = data[0]  # an (inputs, targets) pair
    if not isinstance(data, torch.Tensor) or not data.is_floating_point() or data.dim() < 2:
        what = f"a tensor of shape {tuple(data.shape)} and dtype {data.dtype}" if isinstance(data, torch.Tensor) \
            else f"a {type(data).__name__}"
        raise InputError(f"data file {args.data} holds {what}; expected a floating-point tensor (N, ...) of inputs")
    if data.shape[0] == 0:
        raise InputError(f"data file {args.data} holds 0 samples (shape {tuple(data.shape)})")
    return data


def _check_feeds(model, data, path: str) -> None:
    """Run one small batch so a shape mismatch is one clear line before any measurement."""
    import torch

    try:
        with torch.no_grad():
            copy.deepcopy(model).eval()(data[:2])
    except Exception as e:
        raise InputError(f"the model in {path} cannot take the data (input shape {tuple(data.shape[1:])} per "
                       f"sample): {_first_line(e)}") from None


def _doctor(args, console) -> int:
    from .tools.doctor import doctor

    out = _output_dir(args.out, args.force) if args.out else None
    model = _load_model(args.model, args.trust_pickle)
    data = _load_data(args)
    _check_feeds(model, data, args.model)
    try:
        report = doctor(model, data, num_batches=args.num_batches, batch_size=args.batch_size, mode=args.mode)
    except ValueError as e:  # the options are checked by the parser: what is left is the model or the data
        raise InputError(_first_line(e, 400)) from None
    report.print(console)
    if out is not None:
        report.save(out)
        console.print(f"report written to {out}/index.html")
    return 1 if any(f.severity == "error" for f in report.findings) and args.strict else 0


# ---- bnkit demo ----
DEMO_EXTRA = 'pip install "bnkit[demo]"'
# The demo's share of bnkit.digits.small_batch_methods, to stay near a minute on 2 cores; the example
# runs all of them (BatchRenorm, ghost BN, GroupNorm) with more seeds.
DEMO_SMALL_BATCH_METHODS = ("plain BN, shuffled batches (reference)", "plain BN + bnkit.calibrate",
                            "FrozenBN for the last third")


def _require_demo_extra() -> None:
    """The demo trains on scikit-learn's digits, prints with rich and plots with matplotlib: the demo extra."""
    missing = []
    for module, package in (("sklearn", "scikit-learn"), ("matplotlib", "matplotlib"), ("rich", "rich")):
        try:
            __import__(module)
        except ImportError:
            missing.append(package)
    if missing:
        raise CLIError(f"bnkit demo needs {', '.join(missing)}, which are not installed: {DEMO_EXTRA}")


def _train(model, x, y, epochs: int, batch_size: int, progress, label: str, seed: int = 0):
    from .digits import train

    steps = epochs * (len(x) // batch_size)
    task = progress.add_task(label, total=steps)
    train(model, x, y, epochs=epochs, batch_size=batch_size, seed=seed,
          on_step=lambda s: progress.update(task, completed=s))
    return model


def _accuracy_without_eval(model, x, y, batch_size: int) -> float:
    """Accuracy when model.eval() was forgotten: batch statistics of each test batch (frozen: no update)."""
    import torch

    from .digits import batches
    from .tools.freezing import frozen_stats

    model.train()
    correct = total = 0
    with torch.no_grad(), frozen_stats(model):
        for xb, yb in batches(x, y, batch_size, shuffle=False, drop_last=True):
            correct += int((model(xb).argmax(1) == yb).sum())
            total += len(yb)
    model.eval()
    return correct / total


def _calibrated(model, x, batch_size: int = 256):
    """A copy of ``model`` whose statistics are recomputed on the images ``x`` (no labels needed)."""
    from .tools.calibrate import calibrate  # lazy: its own module

    c = copy.deepcopy(model)
    calibrate(c, list(x.split(batch_size)), num_batches=None, mode="precise", progress=False)
    return c.eval()


def _demo(args, console) -> int:
    import torch

    start = time.perf_counter()
    _require_demo_extra()
    out = _output_dir(args.out, args.force)
    # 8x8 images: thread start-up costs more than it saves, and on shared cores intra-op threads
    # were measured to make training ~70x slower. One thread is fast everywhere for this model.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _demo_run(args, console, out, start)
    finally:
        torch.set_num_threads(threads)


def _rows(console, header: str, rows, note: str) -> None:
    """A two-column table (what, mean ± spread over seeds) and a note below it."""
    from rich.table import Table

    t = Table(title_justify="left")
    t.add_column(header)
    t.add_column("test accuracy, mean ± std over seeds", justify="right")
    for row in rows:
        t.add_row(*row)
    console.print(t)
    console.print(note)


def _demo_run(args, console, out: Path, start: float) -> int:
    import platform

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from .digits import SMALL_BATCH, digits_cnn, evaluate, load_digits, mean_spread, shift, small_batch_comparison
    from .tools.doctor import doctor

    seeds = [args.seed] if args.quick else [args.seed + i for i in range(3)]
    x, y, xt, yt = load_digits()
    epochs = 1 if args.quick else 3
    sweep = [(128, 1)] if args.quick else [(128, 3), (256, 3), (256, 12)]
    forgot_eval_batches = (8, 64) if args.quick else (2, 8, 64)
    console.rule("[bold]bnkit demo[/]: batch norm on scikit-learn's 8x8 digits (real data, no download)")
    console.print(f"{len(x)} training and {len(xt)} test images; a 3-layer CNN with bnkit.BatchNorm2d after each "
                  f"convolution (momentum 0.1, as torch.nn); every number is a mean over seeds {seeds} with its "
                  f"standard deviation. {time.strftime('%Y-%m-%d')}, {platform.machine()}, "
                  f"{os.cpu_count()} CPU cores, 1 thread.")
    columns = (TextColumn("{task.description:<34}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        models = [_train(digits_cnn(seed=s), x, y, epochs, 64, progress, f"main model {s}, batch 64 x {epochs} ep", s)
                  for s in seeds]
        runs = [(bs, ep, [_train(digits_cnn(seed=s), x, y, ep, bs, progress, f"batch {bs} x {ep} ep, seed {s}", s)
                          for s in seeds]) for bs, ep in sweep]
    for m in models:
        m.eval()
    ema = [evaluate(m, xt, yt) for m in models]
    calibrated = [_calibrated(m, x) for m in models]
    cal = [evaluate(m, xt, yt) for m in calibrated]

    console.rule("1. train/eval gap: what model.eval() changes")
    _rows(console, "main model (batch 64)", [("eval mode (running statistics)", mean_spread(ema))] + [
        (f"model.eval() forgotten, test batches of {bs}",
         mean_spread([_accuracy_without_eval(m, xt, yt, bs) for m in models])) for bs in forgot_eval_batches],
        "Without eval() every prediction depends on the other images in its batch, the more so the smaller the "
        "batch (a batch of one fails outright). Where large test batches beat eval mode, the running statistics "
        "are stale: see 2. bnkit.freeze_stats(model, use_running=True) keeps a model in eval behaviour whatever "
        "its mode.")

    console.rule("2. EMA running statistics vs population statistics (bnkit.calibrate)")
    _rows(console, "main model (batch 64)", [("EMA running statistics (what training left)", mean_spread(ema)),
                                             ("population statistics (bnkit.calibrate, PreciseBN)",
                                              mean_spread(cal, ema))],
          "The EMA averages statistics of weights that kept changing; after short training it lags behind. "
          "Recomputing them on the training data costs one pass and no training.")

    console.rule("3. batch-size effects (same learning rate)")
    t = Table()
    for col in ("batch size", "epochs", "steps", "eval, EMA", "eval, calibrated", "forgot eval(), batches of 8"):
        t.add_column(col, justify="right")
    for bs, ep, ms in runs:
        for m in ms:
            m.eval()
        run_ema = [evaluate(m, xt, yt) for m in ms]
        t.add_row(str(bs), str(ep), str(ep * (len(x) // bs)), mean_spread(run_ema),
                  mean_spread([evaluate(_calibrated(m, x), xt, yt) for m in ms], run_ema),
                  mean_spread([_accuracy_without_eval(m, xt, yt, 8) for m in ms]))
    console.print(t)
    fewest = min(ep * (len(x) // bs) for bs, ep, _ in runs)
    console.print(f"Large batches mean few steps per epoch: the EMA has seen too few updates of the final weights "
                  f"(after {fewest} updates at momentum 0.1, 0.9^{fewest} = {0.9 ** fewest:.0%} of the running "
                  f"statistics is still their initial value), and calibration recovers the gap; longer training "
                  f"closes it. In brackets: the change from the EMA column, per seed.")

    console.rule("4. bnkit.doctor on the main model (seed {})".format(seeds[0]))
    report = doctor(models[0], x, batch_size=128)
    report.print(console)
    report.save(out)
    console.print(f"report written to {out}/index.html ({', '.join(sorted(p.name for p in out.iterdir()))})")

    sb = dict(SMALL_BATCH, epochs=1) if args.quick else SMALL_BATCH
    console.rule(f"5. small, non-i.i.d. batches: batches of {sb['batch_size']} sorted by class (1-2 classes each)")
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("small-batch runs", total=None)
        results = small_batch_comparison(seeds, **sb, methods=DEMO_SMALL_BATCH_METHODS,
                                         on_run=lambda name, s: progress.advance(task))
    plain = results["plain BN"]
    _rows(console, f"method ({sb['epochs']} epochs, lr {sb['lr']}, lr / 10 for the last third)",
          [(name, mean_spread(acc, None if name == "plain BN" else plain)) for name, acc in results.items()],
          "Batch statistics of one or two classes carry the label: training leans on them, eval's population "
          "statistics do not have them. In brackets: the change from plain BN per seed (mean ± std) and how many "
          "seeds gained; a change smaller than its spread is noise. Larger, shuffled batches are the real fix. "
          "examples/small_batch_digits.py adds BatchRenorm, ghost BN and GroupNorm and runs 5 seeds.")

    console.rule("6. domain shift: test images at half the contrast and +0.3 brightness")
    shifted_x, shifted_xt = shift(x), shift(xt)
    _rows(console, "main model (batch 64)", [
        ("clean test images, calibrated on the training images", mean_spread(cal)),
        ("shifted test images, EMA statistics of the training images", mean_spread(
            [evaluate(m, shifted_xt, yt) for m in models])),
        ("shifted, statistics calibrated on the training images", mean_spread(
            [evaluate(m, shifted_xt, yt) for m in calibrated])),
        ("shifted, bnkit.calibrate on unlabeled shifted images (AdaBN)", mean_spread(
            [evaluate(_calibrated(m, shifted_x), shifted_xt, yt) for m in models], cal))],
        "Test-time adaptation: bnkit.calibrate(model, unlabeled_target_batches) re-estimates every layer's "
        "statistics on the new domain (AdaBN, Li et al. 2016) without labels or training; here on the shifted "
        "training images (no test image is used). In brackets: the change from clean test images.")
    console.print(f"demo finished in {time.perf_counter() - start:.0f} s")
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    # main() looks for --debug in argv itself, so that it also applies to errors while parsing
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the full traceback on errors")
    p = _Parser(prog="bnkit", description="bnkit: batch normalization for PyTorch, done right.", parents=[common])
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    d = sub.add_parser("demo", parents=[common], help="train a BN CNN on the bundled digits and show the pitfalls")
    d.add_argument("--out", default="bnkit-demo-report", help="report folder (default: ./bnkit-demo-report)")
    d.add_argument("--force", action="store_true", help="write the report into the folder even if it exists "
                   "(its own files are replaced, nothing else is deleted)")
    d.add_argument("--quick", action="store_true", help="one seed and one epoch: a few seconds instead of about 20 (for tests)")
    d.add_argument("--seed", type=int, default=0, help="the first of the seeds (default 0: seeds 0, 1, 2)")
    d.set_defaults(func=_demo)

    doc = sub.add_parser("doctor", parents=[common], help="diagnose the batch-norm layers of a saved model")
    doc.add_argument("model", help="TorchScript file (torch.jit.save), or torch.save(model) with --trust-pickle")
    doc.add_argument("--trust-pickle", action="store_true",
                     help="load a torch.save(model) pickle: this runs any code in the file, only for files you trust")
    src = doc.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="torch.save'd input tensor (N, ...) or (inputs, targets) pair")
    src.add_argument("--demo-data", action="store_true", help="use the bundled digits images (N, 1, 8, 8)")
    doc.add_argument("--out", help="also write the report folder (HTML + PNG) here")
    doc.add_argument("--force", action="store_true", help="write into --out even if it exists (its own files are replaced, nothing else is deleted)")
    doc.add_argument("--batch-size", type=_positive_int, default=64)
    doc.add_argument("--num-batches", type=_positive_int, default=50)
    doc.add_argument("--mode", choices=("precise", "eval_consistent"), default="precise",
                     help="how bnkit.calibrate measures the population statistics")
    doc.add_argument("--strict", action="store_true", help="exit 1 when there is an error finding")
    doc.set_defaults(func=_doctor)

    m = sub.add_parser("momentum", parents=[common], help="convert a momentum between conventions")
    g = m.add_mutually_exclusive_group(required=True)
    g.add_argument("--keras", type=float, help="Keras/TF/Flax momentum (weight of the old value), e.g. 0.99")
    g.add_argument("--torch", type=float, help="PyTorch momentum (weight of the new batch), e.g. 0.1")
    g.add_argument("--half-life", type=float, help="steps after which a batch's weight has halved")
    m.set_defaults(func=_momentum)

    return p


def main(argv: list[str] | None = None) -> int:
    """Run the ``bnkit`` command with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        from rich.console import Console
    except ImportError:
        try:  # `pip install bnkit` lacks the whole extra: the demo names every package it needs
            if argv[:1] == ["demo"]:
                _require_demo_extra()
        except CLIError as e:
            print(f"bnkit: error: {e}", file=sys.stderr)
            return e.status
        print(f"bnkit: error: the bnkit command prints with rich, which is not installed: {DEMO_EXTRA}",
              file=sys.stderr)
        return 2
    console = Console(highlight=False)
    debug = "--debug" in argv
    try:
        args = _parser().parse_args(argv)
        return args.func(args, console)
    except CLIError as e:
        if debug:
            raise
        print(f"bnkit: error: {e}", file=sys.stderr)
        return e.status
    except KeyboardInterrupt:
        print("bnkit: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # anything unexpected: one line, the traceback with --debug
        if debug:
            raise
        print(f"bnkit: error: {type(e).__name__}: {_first_line(e)} (run with --debug for the traceback)",
              file=sys.stderr)
        return 1
