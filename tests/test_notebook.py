"""The Colab notebook executed top to bottom on the CPU (its demo path), as a user's kernel would,
from the session's smoke teacher run (the notebook would otherwise train one first)."""
import json

import nbclient
import nbformat
import pytest
from train_helpers import REPO, cache_folder, environment

pytest_plugins = ("train_fixtures",)
pytestmark = pytest.mark.slow

NOTEBOOK = REPO / "notebooks" / "dpiqa_colab.ipynb"


def test_the_notebook_runs_and_its_export_scores_as_the_student(smoke_run, train_root, tmp_path, monkeypatch):
    for key, value in environment(train_root).items():  # the kernel and its commands inherit these
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("DPIQA_NOTEBOOK_WORK", str(tmp_path / "work"))
    monkeypatch.setenv("DPIQA_NOTEBOOK_TEACHER", str(smoke_run))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(notebook, timeout=900, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()

    last = notebook.cells[-1]["outputs"]
    summary = json.loads("".join(o["text"] for o in last if o.get("name") == "stdout"))
    assert summary["photos"] == 9 and summary["heatmaps"] == 9 and summary["teacher_scores_finite"]
    # 24 images split 80/20: the fine-tuned teacher and the student are each evaluated on the 5 held out
    assert summary["finetune_test_images"] == summary["student_test_images"] == 5
    assert summary["export_max_abs_difference"] <= 1e-4
    work = tmp_path / "work"
    assert (work / "finetune" / "checkpoints" / "best_srcc").is_dir()
    assert (cache_folder(work / "student", "teacher_maps") / "teacher_map.npy").exists()
    assert (work / "maps" / "astronaut_blur.png").stat().st_size > 10_000
