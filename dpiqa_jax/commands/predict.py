"""`dpiqa-jax predict`: score image files with a teacher or a student checkpoint."""
import csv
import glob
import json
import os
import sys

from tqdm import tqdm

from dpiqa_jax import outputs
from dpiqa_jax.commands import positive_int
from dpiqa_jax.commands.export import add_student_arguments, student_spec
from dpiqa_jax.errors import UserError

RESULT_SUFFIXES = (".json", ".csv")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def register(sub):
    p = sub.add_parser("predict", help="score images with a teacher or a student checkpoint")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files, folders (recursive) or globs")
    p.add_argument("--checkpoint", required=True,
                   help="a teacher (the authors' .pth or .safetensors, or a teacher.save_teacher folder) or "
                        "a student (the authors' .pth or .safetensors, or our .msgpack/.safetensors export)")
    p.add_argument("--prompt-embeddings", help="prompt matrix (.pth/.npy/.safetensors); default: "
                   "quality_embeddings.pth beside an authors' checkpoint")
    p.add_argument("--model-config", help="teacher config JSON for a .pth whose shapes are not SD-1.5's")
    p.add_argument("--output", help="write results to OUT.json or OUT.csv (default: a table on stdout)")
    p.add_argument("--latent", choices=("mean", "sample"), default="mean",
                   help="posterior mean (deterministic, default) or a random draw as the authors do")
    p.add_argument("--save-maps", metavar="DIR",
                   help="also write each image's quality feature map as a heatmap PNG in DIR")
    p.add_argument("--score-range", action="store_true",
                   help="also print the checkpoint's score scale and which direction is better")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--seed", type=int, default=0, help="seed of the draws with --latent sample")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="compute dtype (params stay float32): float32 (default) gives the authors' scores "
                        "to float32 rounding; bfloat16 is faster on GPUs and TPUs, at its precision")
    add_student_arguments(p)
    p.set_defaults(run=run)


def expand_paths(patterns):
    """Files as given, folders searched recursively for images, globs expanded; in a stable order."""
    found = []
    for pattern in patterns:
        if os.path.isdir(pattern):
            for root, _, names in sorted(os.walk(pattern)):
                found += [os.path.join(root, n) for n in sorted(names) if n.lower().endswith(IMAGE_SUFFIXES)]
        elif os.path.exists(pattern):
            found.append(pattern)
        else:
            matches = sorted(glob.glob(pattern, recursive=True))
            if not matches:
                raise UserError(f"{pattern}: no such file, folder or matching glob")
            found += [m for m in matches if os.path.isfile(m)]
    return found


class Results:
    """Where the scores go: a .csv as they come, batch by batch, so that a run killed midway keeps the
    scores so far; a .json, or the table on stdout (its width needs every path), at the end, which an
    interrupted run (Ctrl-C, an error) also reaches with the scores so far."""

    def __init__(self, output):
        self.output, self.rows, self._csv = output, [], None  # rows: kept for the .json or the table
        if output and output.endswith(".csv"):  # else .json (RESULT_SUFFIXES, checked before any scoring)
            self._file = open(output, "w", newline="")
            self._csv = csv.DictWriter(self._file, fieldnames=["path", "score"])
            self._csv.writeheader()
            self._file.flush()

    def add(self, rows: list[dict]) -> None:
        if self._csv:  # on disk at once, not kept: a folder of any size streams through
            self._csv.writerows(rows)
            self._file.flush()
        else:
            self.rows += rows

    def close(self) -> None:
        if self._csv:
            self._file.close()
        elif self.rows and self.output is None:
            width = max(len(r["path"]) for r in self.rows)
            for r in self.rows:
                print(f"{r['path']:<{width}}  {r['score']:.6f}")
        elif self.rows:
            with open(self.output, "w") as f:
                json.dump(self.rows, f, indent=1)


def map_file(folder: str, path: str) -> str:
    """DIR/<the image's path (relative to here when below it), '/' turned into '__'>.png: distinct
    images get distinct files."""
    name = os.path.relpath(path)
    if name.startswith(os.pardir):
        name = os.path.abspath(path).lstrip(os.sep)
    return os.path.join(folder, os.path.splitext(name.replace(os.sep, "__"))[0] + ".png")


def save_maps(folder: str, paths, images, maps, scores) -> None:
    from dpiqa_jax.heatmaps import render

    for path, image, fmap, score in zip(paths, images, maps, scores, strict=True):
        render(image, fmap, title=f"{os.path.basename(path)}  score {score:.4f}").save(map_file(folder, path))


def run(args):
    import jax.numpy as jnp

    from dpiqa_jax import scorer as scorer_lib

    paths = expand_paths(args.paths)
    if not paths:
        raise UserError("no image files found in " + " ".join(args.paths))
    if args.output:
        outputs.file(args.output, RESULT_SUFFIXES)
    if args.save_maps:
        outputs.folder(args.save_maps, "maps folder")
    scorer = scorer_lib.load(args.checkpoint, args.prompt_embeddings, args.model_config,
                             student_spec=student_spec(args), latent=args.latent, batch_size=args.batch_size,
                             seed=args.seed, dtype=jnp.dtype(args.dtype))
    if args.score_range:
        print(f"scores: {scorer.describe_range()}", file=sys.stderr)
    results, failed = Results(args.output), []
    # A progress bar with images/s on a terminal only (disable=None), so that logs stay clean.
    with tqdm(total=len(paths), unit="img", disable=None, file=sys.stderr) as bar:
        def skip(path, message):
            tqdm.write(f"skipped: {message}", file=sys.stderr)
            failed.append(path)
            bar.update(1)

        try:
            for good, images, scores, maps in scorer.batches(paths, on_error=skip):
                results.add([{"path": p, "score": float(s)} for p, s in zip(good, scores, strict=True)])
                if args.save_maps:
                    save_maps(args.save_maps, good, images, maps, scores)
                bar.update(len(good))
        finally:
            results.close()
    return 1 if failed else 0
