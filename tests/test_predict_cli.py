"""`dpiqa-jax predict` on teacher and student checkpoints saved the authors' way (torch.save of the
state dict) or exported by us; `dpiqa-jax export` end to end."""
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import safetensors.numpy
import torch
from oracle import rel_err
from PIL import Image
from test_export import SPEC, random_student_variables, write_authors_student
from test_teacher import TINY, tiny_pair

from dpiqa_jax.data.images import load_image
from dpiqa_jax.export import export_student
from dpiqa_jax.student_io import student_apply, student_state_dict


def dpiqa_jax(*args, cwd, env=None):
    return subprocess.run([sys.executable, "-m", "dpiqa_jax.cli", *map(str, args)], cwd=cwd,
                          env=_environment(env), capture_output=True, text=True, timeout=600)


def _environment(changes):
    """os.environ with `changes` (a value of None removes the variable)."""
    env = {**os.environ, **(changes or {})}
    return {key: value for key, value in env.items() if value is not None}


@pytest.fixture(scope="module")
def authors_files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("authors")
    ref, _, _ = tiny_pair(seed=3)
    torch.save(ref.state_dict(), tmp / "teacher.pth")
    prompts = torch.randn(5, 32, generator=torch.Generator().manual_seed(0))
    torch.save(prompts, tmp / "quality_embeddings.pth")
    (tmp / "model.json").write_text(json.dumps(TINY))
    rng = np.random.default_rng(0)
    paths = []
    for i, size in enumerate([(80, 70), (64, 64), (50, 90)]):
        path = tmp / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, size[::-1] + (3,), dtype=np.uint8)).save(path)
        paths.append(path)
    images = np.stack([load_image(str(p), 64) for p in paths])
    with torch.no_grad():
        expected = ref(torch.as_tensor(images).permute(0, 3, 1, 2), prompts)[0][:, 0].numpy()
    return tmp, paths, expected


def test_predict_authors_checkpoint_gives_oracle_scores(authors_files):
    tmp, paths, expected = authors_files
    out = tmp / "scores.json"
    # The prompt file is found beside the checkpoint; batch 2 leaves a padded last batch.
    result = dpiqa_jax("predict", "--checkpoint", tmp / "teacher.pth", "--model-config", tmp / "model.json",
                       "--batch-size", 2, "--output", out, *paths, cwd=tmp)
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())
    assert [r["path"] for r in rows] == [str(p) for p in paths]
    assert rel_err([r["score"] for r in rows], expected) < 1e-4


def test_predict_reports_a_bad_key_in_one_line(authors_files):
    tmp, paths, _ = authors_files
    state = torch.load(tmp / "teacher.pth", weights_only=True)
    del state["QFD.fc1.weight"]
    torch.save(state, tmp / "broken.pth")
    result = dpiqa_jax("predict", "--checkpoint", tmp / "broken.pth", "--model-config", tmp / "model.json",
                       "--prompt-embeddings", tmp / "quality_embeddings.pth", paths[0], cwd=tmp)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "broken.pth" in lines[0] and "QFD.fc1.weight" in lines[0]


def test_embed_prompts_command_writes_the_prompt_matrix(tmp_path):
    from fixtures import write_tiny_clip_folder

    from dpiqa_jax.prompts import embed_prompts

    folder = write_tiny_clip_folder(tmp_path / "clip")
    result = dpiqa_jax("embed-prompts", "--clip", folder, "--output", tmp_path / "e.npy", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    written = np.load(tmp_path / "e.npy")
    assert written.shape == (1485, 32)
    np.testing.assert_allclose(written, embed_prompts(folder), rtol=1e-5, atol=1e-6)
    missing = dpiqa_jax("embed-prompts", "--clip", tmp_path / "nowhere", "--output", tmp_path / "x.npy",
                        cwd=tmp_path)
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1


def test_orbax_teacher_checkpoint_round_trips_through_predict(authors_files, tmp_path):
    import jax

    from dpiqa_jax.teacher import load_teacher, restore_teacher, save_teacher

    tmp, paths, expected = authors_files
    cfg, params, embeddings = load_teacher(str(tmp / "teacher.pth"), model_config=str(tmp / "model.json"))
    save_teacher(str(tmp_path / "ours"), cfg, params, embeddings)
    cfg2, params2, embeddings2 = restore_teacher(str(tmp_path / "ours"))
    assert cfg2 == cfg
    jax.tree_util.tree_map(np.testing.assert_array_equal, params2, params)
    np.testing.assert_array_equal(embeddings2, embeddings)
    out = tmp_path / "scores.csv"
    # No JAX_COMPILATION_CACHE_DIR: the command keeps its compiled programs under XDG_CACHE_HOME.
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache"), "JAX_COMPILATION_CACHE_DIR": None}
    result = dpiqa_jax("predict", "--checkpoint", tmp_path / "ours", "--output", out, *paths, cwd=tmp_path,
                       env=env)
    assert result.returncode == 0, result.stderr
    scores = [float(line.split(",")[-1]) for line in out.read_text().splitlines()[1:]]
    assert rel_err(scores, expected) < 1e-4
    assert any((tmp_path / "cache" / "dpiqa_jax" / "xla").iterdir())


# --- students ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def student_files(tmp_path_factory):
    """A tiny student saved the authors' way, three images, and the in-process model's scores."""
    tmp = tmp_path_factory.mktemp("student")
    variables = random_student_variables(SPEC)
    write_authors_student(tmp / "student.pth", variables)
    rng = np.random.default_rng(5)
    paths = []
    for i, size in enumerate([(90, 70), (64, 64), (40, 100)]):
        paths.append(tmp / f"img{i}.png")
        Image.fromarray(rng.integers(0, 256, size[::-1] + (3,), dtype=np.uint8)).save(paths[-1])
    images = np.stack([load_image(str(p), SPEC.image_size) for p in paths])
    return tmp, variables, paths, np.asarray(student_apply(SPEC)(variables, images)[0])


def test_predict_authors_student_pth(student_files, monkeypatch):
    from dpiqa_jax.cli import main

    tmp, _, paths, expected = student_files
    monkeypatch.chdir(tmp)
    # In this process (the next test runs the CLI in subprocesses): a batch of 3 reuses the compiled
    # program of the expected scores.
    assert main(["predict", "--checkpoint", "student.pth", "--variant", "b0", "--image-size", "64",
                 "--batch-size", "3", "--output", "scores.json", *map(str, paths)]) == 0
    rows = json.loads((tmp / "scores.json").read_text())
    assert [r["path"] for r in rows] == [str(p) for p in paths]
    assert rel_err([r["score"] for r in rows], expected) < 1e-5


def test_predict_scores_the_good_files_and_names_each_bad_one(student_files, tmp_path, monkeypatch, capsys):
    from dpiqa_jax.cli import main

    tmp, _, paths, expected = student_files
    bad = {"empty.jpg": b"", "page.jpg": b"<html><body>404</body></html>", "noise.png": os.urandom(300),
           "truncated.png": paths[0].read_bytes()[:200]}
    for name, content in bad.items():
        (tmp_path / name).write_bytes(content)
    files = [str(p) for p in paths] + [str(tmp_path / name) for name in bad]
    monkeypatch.chdir(tmp)
    assert main(["predict", "--checkpoint", "student.pth", "--variant", "b0", "--image-size", "64",
                 "--batch-size", "3", "--output", str(tmp_path / "scores.json"), *files]) == 1
    rows = json.loads((tmp_path / "scores.json").read_text())
    assert [r["path"] for r in rows] == [str(p) for p in paths]
    assert rel_err([r["score"] for r in rows], expected) < 1e-5
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == len(bad) and "Traceback" not in "".join(errors)
    for line, name in zip(errors, bad, strict=True):
        assert line.startswith(f"skipped: {tmp_path / name}: "), line


def test_a_csv_output_is_written_as_the_images_are_scored(student_files, tmp_path, monkeypatch):
    """A run killed midway (out of time, preempted) keeps the scores so far: each batch's rows are
    on disk before the next batch is scored."""
    from dpiqa_jax import scorer
    from dpiqa_jax.cli import main

    tmp, _, paths, expected = student_files
    out, lines_seen, real_load = tmp_path / "scores.csv", [], scorer.load

    def load(*args, **kwargs):
        loaded = real_load(*args, **kwargs)
        batches = loaded.batches

        def watched(*more, **options):
            for batch in batches(*more, **options):
                lines_seen.append(len(out.read_text().splitlines()))
                yield batch

        loaded.batches = watched
        return loaded

    monkeypatch.setattr(scorer, "load", load)
    monkeypatch.chdir(tmp)
    assert main(["predict", "--checkpoint", "student.pth", "--variant", "b0", "--image-size", "64",
                 "--batch-size", "1", "--output", str(out), *map(str, paths)]) == 0
    assert lines_seen == [1, 2, 3]  # the header, then each earlier batch's row, before the next batch
    rows = list(csv.DictReader(out.open()))
    assert [r["path"] for r in rows] == [str(p) for p in paths]
    assert rel_err([float(r["score"]) for r in rows], expected) < 1e-5


def test_save_maps_writes_a_heatmap_panel_per_image(student_files, tmp_path, monkeypatch, capsys):
    from dpiqa_jax import heatmaps, scorer
    from dpiqa_jax.cli import main

    tmp, _, paths, _ = student_files
    monkeypatch.chdir(tmp)
    maps = tmp_path / "maps"
    assert main(["predict", "--checkpoint", "student.pth", "--variant", "b0", "--image-size", "64",
                 "--batch-size", "3", "--score-range", "--save-maps", str(maps),
                 *[p.name for p in paths]]) == 0
    assert capsys.readouterr().err == ("scores: about 0 to 1 (the training label: MOS / 100), higher is "
                                       "better\n")
    assert sorted(f.name for f in maps.iterdir()) == sorted(f"{p.stem}.png" for p in paths)
    loaded = scorer.load(tmp / "student.pth", student_spec=SPEC, batch_size=3)
    fmap = loaded.feature_maps([paths[0]])[0]
    assert fmap.shape == (SPEC.image_size // 8, SPEC.image_size // 8, 8)  # 64 x 64 at 512 px
    panel = np.asarray(Image.open(maps / f"{paths[0].stem}.png"))
    expected = heatmaps.render(loaded.load([paths[0]])[0], fmap, title="x")
    assert panel.shape == np.asarray(expected).shape
    side, top, gap = heatmaps.SIDE, 20, heatmaps.GAP
    thumb, overlay = panel[top:top + side, :side], panel[top:top + side, side + gap:2 * side + gap]
    np.testing.assert_array_equal(thumb, np.asarray(expected)[top:top + side, :side])
    assert np.abs(overlay.astype(int) - thumb.astype(int)).mean() > 10  # the map is laid over it


def test_colour_ramp_runs_from_dark_to_bright():
    from dpiqa_jax.heatmaps import colorize

    colours = colorize(np.linspace(-3.0, 5.0, 50)[None]).astype(float)[0]
    luminance = colours @ [0.299, 0.587, 0.114]
    assert np.all(np.diff(luminance) > 0) and luminance[0] < 5 and luminance[-1] > 240
    assert np.all(colorize(np.full((2, 2), 7.0)) == colorize(np.zeros((2, 2))))  # a flat map is uniform


def test_predict_shows_a_progress_bar_with_images_per_second_on_a_terminal(student_files):
    """stderr a terminal (a pseudo-terminal here): the bar counts the images and shows the rate.
    (Elsewhere, as in the tests above, it stays off so that logs hold only results and errors.)"""
    import fcntl
    import pty
    import struct
    import termios

    tmp, _, paths, _ = student_files
    terminal, child_side = pty.openpty()
    # A new pseudo-terminal is 0 columns wide, where tqdm draws nothing: give it a terminal's size.
    fcntl.ioctl(child_side, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    command = [sys.executable, "-m", "dpiqa_jax.cli", "predict", "--checkpoint", "student.pth", "--variant",
               "b0", "--image-size", "64", "--batch-size", "2", "--output", "bar.json", *map(str, paths)]
    process = subprocess.Popen(command, cwd=tmp, env=_environment(None), stdout=subprocess.DEVNULL,
                               stderr=child_side)
    os.close(child_side)
    shown = b""
    while True:
        try:
            chunk = os.read(terminal, 4096)
        except OSError:  # EIO: the child's side is closed
            break
        if not chunk:
            break
        shown += chunk
    os.close(terminal)
    assert process.wait(timeout=600) == 0, shown[-2000:]
    assert f"{len(paths)}/{len(paths)}".encode() in shown and b"img/s" in shown, shown[-2000:]


def test_export_command_then_predict_the_export(student_files):
    tmp, _, paths, expected = student_files
    # Both commands run the model on 3 images at once: with a shared compilation cache, predict
    # reuses the program that export compiled to check its file.
    cache = {"JAX_COMPILATION_CACHE_DIR": str(tmp / "jax_cache"),
             "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    result = dpiqa_jax("export", "--checkpoint", "student.pth", "--variant", "b0", "--image-size", 64,
                       "--format", "msgpack", "--output", "exported.msgpack", cwd=tmp, env=cache)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and "exported.msgpack" in lines[0] and "max rel error" in lines[0]
    # Our export carries its spec: no --variant, --image-size, prompt file or model config.
    result = dpiqa_jax("predict", "--checkpoint", "exported.msgpack", "--batch-size", 3,
                       "--output", "scores.csv", *paths, cwd=tmp, env=cache)
    assert result.returncode == 0, result.stderr
    scores = [float(line.split(",")[-1]) for line in (tmp / "scores.csv").read_text().splitlines()[1:]]
    assert rel_err(scores, expected) < 1e-5


@pytest.mark.parametrize("kind", ["authors .pth", "authors legacy .pth", "authors .safetensors",
                                  "our msgpack", "our safetensors"])
def test_python_api_scores_every_student_file(student_files, tmp_path, kind):
    """`dpiqa_jax.load` tells a student from a teacher by the file alone."""
    import dpiqa_jax

    tmp, variables, paths, expected = student_files
    state = {k: np.ascontiguousarray(v) for k, v in student_state_dict(variables).items()}
    path = tmp / "student.pth"
    if kind == "authors legacy .pth":  # torch's pre-1.6 format, which torch cannot memory-map
        path = tmp_path / "legacy.pth"
        torch.save({k: torch.from_numpy(v) for k, v in state.items()}, path,
                   _use_new_zipfile_serialization=False)
    elif kind == "authors .safetensors":
        path = tmp_path / "student.safetensors"
        safetensors.numpy.save_file(state, str(path))
    elif kind.startswith("our"):
        fmt = kind.split()[-1]
        path = tmp_path / f"student.{fmt}"
        export_student(SPEC, variables, fmt, path)
    # Our exports carry their spec; the authors' files need it.
    scorer = dpiqa_jax.load(path, student_spec=SPEC if kind.startswith("authors") else None,
                            batch_size=len(paths))
    assert scorer.image_size == 64
    assert rel_err(scorer([str(p) for p in paths]), expected) < 1e-5


def test_teacher_and_student_options_do_not_mix(student_files, authors_files):
    from dpiqa_jax import scorer
    from dpiqa_jax.errors import UserError

    with pytest.raises(UserError, match="student checkpoint: prompt embeddings and sampled latents"):
        scorer.load(student_files[0] / "student.pth", prompt_embeddings="quality_embeddings.pth",
                    latent="sample")
    with pytest.raises(UserError, match="not a student checkpoint"):
        scorer.load(authors_files[0] / "teacher.pth", student_spec=SPEC)


def test_predict_paths_take_files_folders_recursively_and_globs(tmp_path, monkeypatch):
    from dpiqa_jax.commands.predict import expand_paths
    from dpiqa_jax.errors import UserError

    names = ("b.png", "a.JPG", "notes.txt", "sub/c.webp", "sub/deeper/d.bmp", "other/e.png", "other/f.jpg")
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    # a folder: its images at any depth (not the text file), sorted; a file as given; a glob
    assert expand_paths(["sub", "b.png"]) == ["sub/c.webp", "sub/deeper/d.bmp", "b.png"]
    assert expand_paths(["."]) == ["./a.JPG", "./b.png", "./other/e.png", "./other/f.jpg", "./sub/c.webp",
                                   "./sub/deeper/d.bmp"]
    assert expand_paths(["other/*.png", "**/d.bmp"]) == ["other/e.png", "sub/deeper/d.bmp"]
    with pytest.raises(UserError, match="missing/\\*.png: no such file, folder or matching glob"):
        expand_paths(["missing/*.png"])


@pytest.mark.parametrize("command, flag, value, message", [
    ("predict", "--output", "scores.txt", "{tmp}/scores.txt: the output must end in .json or .csv"),
    ("predict", "--output", "taken/scores.csv",
     "{tmp}/taken: cannot be the output file's folder: a file is in its place"),
    ("predict", "--output", "folder.csv", "{tmp}/folder.csv: is a folder; give a file name"),
    ("predict", "--save-maps", "taken", "{tmp}/taken: cannot be the maps folder: a file is in its place"),
    ("embed-prompts", "--output", "prompts.pth", "{tmp}/prompts.pth: the output must end in .npy"),
])
def test_an_output_that_cannot_be_written_is_one_line_before_any_work(tmp_path, monkeypatch, capsys, command,
                                                                        flag, value, message):
    from dpiqa_jax import prompts, scorer
    from dpiqa_jax.cli import main

    (tmp_path / "taken").write_text("a file")
    (tmp_path / "folder.csv").mkdir()
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    work = lambda *args, **kwargs: pytest.fail("the work began before the output was checked")  # noqa: E731
    monkeypatch.setattr(scorer, "load", work)
    monkeypatch.setattr(prompts, "embed_prompts", work)
    inputs = ["--checkpoint", "unused.pth", str(image)] if command == "predict" else ["--clip", "unused"]
    assert main([command, *inputs, flag, str(tmp_path / value)]) == 2
    assert capsys.readouterr().err == f"dpiqa-jax {command}: error: {message.format(tmp=tmp_path)}\n"


@pytest.mark.parametrize("command", [["predict", "--checkpoint", "unused", "a.png", "--batch-size"],
                                     ["export", "--checkpoint", "unused", "--format", "msgpack", "--output",
                                      "s.msgpack", "--image-size"]])
@pytest.mark.parametrize("value", ["0", "-3", "two"])
def test_sizes_below_one_are_refused_with_the_usage(command, value, capsys):
    """Before: predict --batch-size 0 was a traceback, -3 scored nothing and said nothing."""
    from dpiqa_jax.cli import main

    with pytest.raises(SystemExit) as stopped:
        main([*command, value])
    assert stopped.value.code == 2
    expected = f"error: argument {command[-1]}: expected a positive integer, got '{value}'\n"
    assert capsys.readouterr().err.endswith(expected)


def test_predict_in_bfloat16_scores_near_the_float32_scores(authors_files, student_files, tmp_path,
                                                              monkeypatch):
    """--dtype bfloat16 reaches the model (the scores move) and stays near the oracle's scores."""
    from dpiqa_jax.cli import main

    teacher_dir, teacher_paths, teacher_expected = authors_files
    student_dir, _, student_paths, student_expected = student_files
    student_flags = ["--checkpoint", "student.pth", "--variant", "b0", "--image-size", "64"]
    cases = {"teacher": (teacher_dir, ["--checkpoint", "teacher.pth", "--model-config", "model.json"],
                         teacher_paths, teacher_expected),
             "student": (student_dir, student_flags, student_paths, student_expected)}
    errors = {}
    for name, (folder, flags, paths, expected) in cases.items():
        monkeypatch.chdir(folder)
        out = tmp_path / f"{name}.json"
        assert main(["predict", *flags, "--dtype", "bfloat16", "--output", str(out), *map(str, paths)]) == 0
        errors[name] = rel_err([r["score"] for r in json.loads(out.read_text())], expected)
    # measured: teacher 0.061, student 0.020 (tiny random models); float32 is within 1e-4 (above)
    assert all(1e-4 < error < 0.15 for error in errors.values()), errors
