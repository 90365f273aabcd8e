"""The evaluate command's argument handling and table (its runs are in test_train_loop.py and
test_distill.py)."""
import pytest

from dpiqa_jax.commands.evaluate import labels, manual_dirs, table
from dpiqa_jax.errors import UserError


def test_manual_dirs_plain_for_one_dataset_named_for_several():
    assert manual_dirs(["/data/koniq"], ["koniq10k"]) == {"koniq10k": "/data/koniq"}
    assert manual_dirs(["koniq10k=/a", "spaq=/b"], ["koniq10k", "spaq"]) == {"koniq10k": "/a", "spaq": "/b"}
    assert manual_dirs([], ["koniq10k", "spaq"]) == {}
    for entries in (["/a"], ["flive=/a"]):
        with pytest.raises(UserError, match="give NAME=DIR with NAME one of koniq10k, spaq"):
            manual_dirs(entries, ["koniq10k", "spaq"])


def test_labels_are_short_and_distinct():
    assert labels(["runs/koniq", "/w/koniq_student.msgpack", "a.pth"]) == ["koniq", "koniq_student", "a"]
    assert labels(["x/run", "y/run/"]) == ["0-run", "1-run"]


def test_table_has_a_row_per_checkpoint_and_a_column_per_dataset():
    cell = lambda s, p: {"srcc": s, "plcc": p}
    text = table({"a": {"koniq10k": cell(0.9, 0.91), "spaq": cell(0.8, 0.805)},
                  "b": {"koniq10k": cell(0.5, 0.25), "spaq": cell(0.1, 0.2)}})
    assert text.splitlines()[:4] == ["| checkpoint | koniq10k | spaq |", "|---|---|---|",
                                     "| a | 0.9000 / 0.9100 | 0.8000 / 0.8050 |",
                                     "| b | 0.5000 / 0.2500 | 0.1000 / 0.2000 |"]


def test_scatter_plot_draws_the_points_and_the_fitted_curve(tmp_path):
    import numpy as np
    from PIL import Image

    from dpiqa_jax.plots import scatter
    from dpiqa_jax.train.metrics import iqa_metrics

    rng = np.random.default_rng(0)
    pred = rng.uniform(0, 1, 300)
    target = 1 / (1 + np.exp(-8 * (pred - 0.5))) + rng.normal(0, 0.05, 300)
    scatter(pred, target, iqa_metrics(pred, target), "model on data", str(tmp_path / "s.png"))
    pixels = np.asarray(Image.open(tmp_path / "s.png").convert("RGB")).astype(int)
    red = (pixels[..., 0] > 180) & (pixels[..., 1] < 80) & (pixels[..., 2] < 80)  # tab:red, the curve
    blue = pixels[..., 2] - pixels[..., 0] > 40  # tab:blue at half opacity, the points
    assert pixels.shape == (500, 550, 3) and red.sum() > 300 and blue.sum() > 1000


def test_an_output_folder_that_cannot_be_one_is_one_line_before_any_work(tmp_path, monkeypatch, capsys):
    from dpiqa_jax.cli import main
    from dpiqa_jax.train import evaluator

    monkeypatch.setattr(evaluator, "evaluate_checkpoint", lambda *a, **k: pytest.fail("evaluated first"))
    (tmp_path / "taken").write_text("a file")
    assert main(["evaluate", "--checkpoint", "unused", "--dataset", "synthetic_iqa/tiny",
                 "--output", str(tmp_path / "taken")]) == 2
    taken = tmp_path / "taken"
    assert capsys.readouterr().err == (f"dpiqa-jax evaluate: error: {taken}: cannot be the output folder: a "
                                       "file is in its place\n")
