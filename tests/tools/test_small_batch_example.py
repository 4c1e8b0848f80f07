"""The small-batch example runs end to end (a tiny configuration) and never overwrites its output silently."""
import importlib.util
import pathlib

import pytest
import torch

EXAMPLE = pathlib.Path(__file__).resolve().parents[2] / "examples" / "small_batch_digits.py"


@pytest.fixture(autouse=True)
def _keep_threads():
    """The example sets one thread for itself; later tests must run as configured."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _load():
    spec = importlib.util.spec_from_file_location("small_batch_digits", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_writes_table_and_plot_and_refuses_to_overwrite(tmp_path, capsys):
    example = _load()
    out = tmp_path / "out"
    tiny = ["--out", str(out), "--seeds", "2", "--epochs", "1", "--train-images", "48"]
    assert example.main(tiny) == 0
    table = (out / "small_batch.md").read_text()
    assert (out / "small_batch.png").stat().st_size > 0
    for method in ("plain BN, shuffled batches (reference)", "plain BN + bnkit.calibrate", "BatchRenorm (warm-up)",
                   "ghost BN (virtual batch 2)", "FrozenBN for the last third", "GroupNorm (8 groups)",
                   "BatchRenorm, fixed rmax=3, dmax=5"):
        assert f"| {method} | " in table and "seeds better" in table.split(f"| {method} | ")[1].split("\n")[0]
    assert "| plain BN | " in table and "2 seeds, 1 epochs" in table
    assert example.main(tiny) == 2
    assert "exists; pass --force" in capsys.readouterr().err


def test_class_sorted_batches_hold_one_or_two_classes():
    import torch

    from bnkit import digits

    x, y, _, _ = digits.load_digits()
    seen = [b for _, b in digits.batches(x, y, 4, seed=3, class_sorted=True)]
    assert len(seen) == len(x) // 4
    assert max(len(set(b.tolist())) for b in seen) == 2 and sum(len(set(b.tolist())) == 1 for b in seen) > len(seen) / 2
    assert torch.cat(seen).bincount().tolist() == y.bincount().tolist()  # each image once (1348 = 4 * 337)
    firsts = [int(b[0]) for b in seen[:20]]
    assert firsts != sorted(firsts)  # the batches are visited in random order, not class by class
