"""The bnkit command, driven through main(argv) and, for a few cases, a real `python -m bnkit` subprocess."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from bnkit.digits import digits_cnn
from bnkit.cli import CLIError, main

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # rich wraps table cells to the terminal width


def run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def _one_line_error(rc, err, *fragments, status=2):
    """Usage errors exit 2, files or data that cannot be used exit 1; either way one line, no traceback."""
    assert rc == status and err.count("\n") == 1 and "Traceback" not in err, (rc, err)
    for f in fragments:
        assert f in err, err


@pytest.fixture
def digits_model(tmp_path):
    model = digits_cnn(width=4).eval()
    with torch.no_grad():
        model[1].running_mean += 1.0  # a planted stale statistic for the doctor to find
    path = tmp_path / "model.pt"
    torch.save(model, path)
    return path


def test_momentum_conversions(capsys):
    rc, out, _ = run(capsys, "momentum", "--keras", "0.99")
    assert rc == 0 and "momentum=0.01)" in out and "Decay(0.99))" in out
    assert "68.9" in out  # half-life: log(0.5) / log(0.99) = 68.97 steps
    rc, out, _ = run(capsys, "momentum", "--half-life", "1")
    assert rc == 0 and "momentum=0.5)" in out
    _one_line_error(*run(capsys, "momentum", "--torch", "1.5")[::2], "momentum must be in [0, 1]")
    _one_line_error(*run(capsys, "momentum")[::2], "one of the arguments --keras --torch --half-life is required")


def test_doctor_on_a_saved_model(capsys, digits_model, tmp_path, calibrate):
    out_dir = tmp_path / "rep"
    rc, out, err = run(capsys, "doctor", str(digits_model), "--trust-pickle", "--demo-data", "--out", str(out_dir))
    assert rc == 0 and "EMA running statistics differ" in out and (out_dir / "index.html").is_file()
    assert err.count("\n") == 1 and "--trust-pickle: unpickling" in err and "runs whatever code" in err
    _one_line_error(*run(capsys, "doctor", str(digits_model), "--demo-data", "--out", str(out_dir))[::2],
                    "exists", "--force")
    rc, _, _ = run(capsys, "doctor", str(digits_model), "--trust-pickle", "--demo-data", "--out", str(out_dir),
                   "--force", "--strict")
    assert rc == 1  # --strict: an error finding fails the command


def test_doctor_on_torchscript_with_a_data_file(capsys, tmp_path, calibrate):
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, momentum=0.99), nn.ReLU()).eval()
    torch.jit.save(torch.jit.script(model), tmp_path / "m.ts")
    torch.save((torch.randn(40, 1, 8, 8), torch.zeros(40)), tmp_path / "data.pt")
    rc, out, _ = run(capsys, "doctor", str(tmp_path / "m.ts"), "--data", str(tmp_path / "data.pt"))
    assert rc == 0 and "Keras" in out and "TorchScript" in out


def test_doctor_bad_input(capsys, digits_model, tmp_path):
    _one_line_error(*run(capsys, "doctor", str(tmp_path / "nope.pt"), "--demo-data")[::2], "no such file", status=1)
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    _one_line_error(*run(capsys, "doctor", str(tmp_path / "junk.pt"), "--demo-data")[::2], "cannot read model file",
                    status=1)
    torch.save(nn.BatchNorm2d(3).state_dict(), tmp_path / "sd.pt")
    _one_line_error(*run(capsys, "doctor", str(tmp_path / "sd.pt"), "--demo-data")[::2], "state_dict",
                    "torch.jit.save", status=1)
    torch.save(torch.randn(10, 3, 8, 8), tmp_path / "wrong.pt")
    _, err = run(capsys, "doctor", str(digits_model), "--trust-pickle", "--data", str(tmp_path / "wrong.pt"))[::2]
    _one_line_error(1, err.split("\n", 1)[1], "cannot take the data", "(3, 8, 8)", status=1)  # after the warning
    torch.save(torch.arange(10), tmp_path / "ints.pt")
    _, err = run(capsys, "doctor", str(digits_model), "--trust-pickle", "--data", str(tmp_path / "ints.pt"))[::2]
    _one_line_error(1, err.split("\n", 1)[1], "expected a floating-point tensor", status=1)
    with pytest.raises(CLIError):  # --debug: the exception itself, with its traceback
        main(["doctor", str(tmp_path / "nope.pt"), "--demo-data", "--debug"])


def test_demo_quick(capsys, tmp_path, calibrate):
    out_dir = tmp_path / "demo"
    rc, out, _ = run(capsys, "demo", "--quick", "--out", str(out_dir))
    assert rc == 0
    for section in ("1. train/eval gap", "2. EMA running statistics vs population", "3. batch-size effects",
                    "4. bnkit.doctor", "5. small, non-i.i.d. batches", "6. domain shift"):
        assert section in out
    for method in ("plain BN, shuffled batches", "plain BN + bnkit.calibrate", "FrozenBN for the last third", "bnkit.calibrate on unlabeled shifted images (AdaBN)"):
        assert method in out, method
    assert sorted(p.name for p in out_dir.iterdir()) == ["ema_vs_population.png", "index.html",
                                                        "layer_errors.png", "report.json"]
    _one_line_error(*run(capsys, "demo", "--quick", "--out", str(out_dir))[::2], "exists")


def test_demo_without_the_demo_extra_says_how_to_install_it(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # as if scikit-learn were not installed
    _one_line_error(*run(capsys, "demo", "--out", str(tmp_path / "d"))[::2], "scikit-learn",
                    'pip install "bnkit[demo]"')
    assert not (tmp_path / "d").exists()
    monkeypatch.setitem(sys.modules, "rich", None)
    monkeypatch.setitem(sys.modules, "rich.console", None)
    _one_line_error(*run(capsys, "demo")[::2], "rich", 'pip install "bnkit[demo]"')
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # none of the extra: the line the README quotes
    rc, _, err = run(capsys, "demo")
    assert (rc, err) == (2, 'bnkit: error: bnkit demo needs scikit-learn, matplotlib, rich, which are not '
                            'installed: pip install "bnkit[demo]"\n')


def test_the_layer_library_works_without_the_demo_extra():
    """`pip install bnkit` has no scikit-learn, rich or matplotlib: layers and tools still work."""
    code = """
import sys
for m in ("sklearn", "rich", "matplotlib"):
    sys.modules[m] = None  # any import of them (or their submodules) now raises ImportError
import torch, bnkit
from torch import nn
x = torch.randn(32, 3, 6, 6)
model = nn.Sequential(nn.Conv2d(3, 4, 3), bnkit.BatchNorm2d(4), nn.ReLU())
model(x)
bnkit.calibrate(model, list(x.split(8)))  # progress=True: no bar without rich
folded, _ = bnkit.fold(model.eval())
report = bnkit.doctor(model, x, batch_size=8)
try:
    str(report)
except ImportError as e:
    print(e)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ("bnkit.doctor: the report's printing needs rich, which is not installed: "
                                   'pip install "bnkit[demo]"')


def _subprocess(*argv):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "bnkit", *argv], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=120)


def test_python_dash_m_bnkit():
    ok = _subprocess("momentum", "--torch", "0.1")
    assert ok.returncode == 0 and "Decay(0.9))" in ok.stdout
    bad = _subprocess("doctor", "missing-model.pt", "--demo-data")
    assert bad.returncode == 1 and bad.stderr.strip().count("\n") == 0 and "Traceback" not in bad.stderr
    assert "missing-model.pt" in bad.stderr
    debug = _subprocess("doctor", "missing-model.pt", "--demo-data", "--debug")
    assert debug.returncode == 1 and "Traceback" in debug.stderr


class _Planted:
    """Unpickling this object creates a marker file: what a malicious model file could do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def test_a_pickled_file_runs_no_code_without_trust_pickle(capsys, tmp_path):
    marker = tmp_path / "marker"
    torch.save(_Planted(marker), tmp_path / "planted.pt")
    _one_line_error(*run(capsys, "doctor", str(tmp_path / "planted.pt"), "--demo-data")[::2],
                    "pickled Python object", "exec", "--trust-pickle", status=1)
    assert not marker.exists()
    # The same file as plain pickle protocol 4 (no torch zip container) is refused too.
    import pickle
    with open(tmp_path / "planted.pkl", "wb") as f:
        pickle.dump(_Planted(marker), f, protocol=4)
    _one_line_error(*run(capsys, "doctor", str(tmp_path / "planted.pkl"), "--demo-data")[::2], "--trust-pickle",
                    status=1)
    assert not marker.exists()
    # With the flag the user chose to run it: the warning says so, and the code did run.
    rc, _, err = run(capsys, "doctor", str(tmp_path / "planted.pt"), "--trust-pickle", "--demo-data")
    assert rc == 1 and "warning: --trust-pickle" in err and "not a torch.nn.Module" in err
    assert marker.exists()


def test_torchscript_and_safetensors_load_without_the_flag(capsys, tmp_path):
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    torch.jit.save(torch.jit.script(model), tmp_path / "m.ts")
    rc, out, err = run(capsys, "doctor", str(tmp_path / "m.ts"), "--demo-data", "--num-batches", "2")
    assert rc == 0 and "TorchScript" in out and err == ""
    safetensors = pytest.importorskip("safetensors.torch")
    safetensors.save_file(model.state_dict(), str(tmp_path / "m.safetensors"))
    _one_line_error(*run(capsys, "doctor", str(tmp_path / "m.safetensors"), "--demo-data")[::2],
                    "holds a state_dict", status=1)


@pytest.mark.parametrize("options,fragment", [
    (["--batch-size", "0"], "--batch-size: expected a positive integer, got 0"),
    (["--num-batches", "-1"], "--num-batches: expected a positive integer, got -1"),
    (["--num-batches", "x"], "expected a positive integer, got 'x'"),
    (["--mode", "fast"], "invalid choice: 'fast'"),
    (["--no-such-option"], "unrecognized arguments"),
])
def test_usage_errors_exit_2(capsys, tmp_path, options, fragment):
    torch.jit.save(torch.jit.script(nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))), tmp_path / "m.ts")
    _one_line_error(*run(capsys, "doctor", str(tmp_path / "m.ts"), "--demo-data", *options)[::2], fragment, status=2)


@pytest.mark.parametrize("data,fragment", [
    (torch.randn(0, 1, 8, 8), "0 samples"),
    (torch.full((16, 1, 8, 8), float("nan")), "not finite"),
    ((torch.randn(16, 1, 8, 8) * torch.tensor([1.0] * 15 + [float("inf")]).view(16, 1, 1, 1), torch.zeros(16)),
     "sample 15"),
])
def test_bad_data_exits_1(capsys, tmp_path, data, fragment):
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    torch.jit.save(torch.jit.script(model), tmp_path / "m.ts")
    torch.save(data, tmp_path / "data.pt")
    _one_line_error(*run(capsys, "doctor", str(tmp_path / "m.ts"), "--data", str(tmp_path / "data.pt"))[::2],
                    fragment, status=1)


@pytest.mark.parametrize("option,value", [("--torch", "1"), ("--keras", "0"), ("--torch", "0"), ("--torch", "1e-7"),
                                          ("--keras", "0.99")])
def test_momentum_code_means_the_same_momentum_when_pasted(capsys, option, value):
    # The printed code used 6 digits (--torch 1e-7 printed Decay(1): momentum 0, no update ever),
    # HalfLife(0) for momentum 1 (bnkit refuses it) and HalfLife(inf) (a NameError in Python).
    import re

    import bnkit

    rc, out, _ = run(capsys, "momentum", option, value)
    momentum = float(value) if option == "--torch" else 1 - float(value)
    text = out.replace("\n", "")
    snippets = re.findall(r"bnkit\.BatchNorm2d\(C, momentum=(bnkit\.momentum\.\w+\((?:[^()]|\([^()]*\))*\))\)", text)
    snippets += re.findall(r"torch\.nn\.BatchNorm2d\(C, momentum=([^)]*)\)", text)
    assert rc == 0 and len(snippets) == (2 if momentum == 1 else 3), out  # no HalfLife for momentum 1
    for snippet in snippets:
        layer = eval(f"bnkit.BatchNorm2d(3, momentum={snippet})")
        assert layer.momentum == pytest.approx(momentum, rel=1e-9, abs=1e-12), snippet
