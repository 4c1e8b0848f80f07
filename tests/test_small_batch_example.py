"""The small-batch example runs end to end (tiny step count) and never overwrites its output silently."""
import importlib.util
import pathlib

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "small_batch_digits.py"


def _load():
    spec = importlib.util.spec_from_file_location("small_batch_digits", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_writes_table_and_plot_and_refuses_to_overwrite(tmp_path, capsys):
    example = _load()
    out = tmp_path / "out"
    assert example.main(["--out", str(out), "--steps", "2"]) == 0
    table = (out / "small_batch.md").read_text()
    assert (out / "small_batch.png").stat().st_size > 0
    for method in ("plain BN", "BatchRenorm", "GroupNorm", "FrozenBN fine-tune", "ghost BN (virtual 8)"):
        assert f"| {method} |" in table
    assert example.main(["--out", str(out), "--steps", "2"]) == 2
    assert "exists; pass --force" in capsys.readouterr().err
