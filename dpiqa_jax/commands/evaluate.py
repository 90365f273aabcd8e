"""`dpiqa-jax evaluate`: metrics of checkpoints on datasets, scatter plots, a cross-dataset table.

    dpiqa-jax evaluate --checkpoint CKPT [CKPT ...] --dataset NAME [NAME ...] --output DIR

SRCC, PLCC (plain and after the 4-parameter logistic fit), KRCC and RMSE. One checkpoint on one
dataset writes DIR/{results.json, predictions.csv, scatter.png}; several write those in
DIR/CHECKPOINT/DATASET/ and the table of SRCC / PLCC to DIR/table.md and stdout.
"""
import csv
import json
import os

from dpiqa_jax import outputs
from dpiqa_jax.commands import positive_int
from dpiqa_jax.commands.train import add_distributed_arguments, initialize_distributed
from dpiqa_jax.errors import UserError


def register(subparsers) -> None:
    p = subparsers.add_parser("evaluate", help="score a dataset split with a teacher or student checkpoint",
                              description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, nargs="+", metavar="CKPT",
                   help="one or more of: a training or distillation workdir (its best-by-SRCC "
                        "checkpoint, else the latest), an orbax checkpoint folder, the authors' teacher or "
                        "student .pth, or an exported student (.msgpack, .safetensors)")
    p.add_argument("--dataset", required=True, nargs="+", metavar="NAME",
                   help="one or more of koniq10k, live_challenge, flive, spaq, synthetic_iqa")
    p.add_argument("--split", default="test", choices=("test", "train", "all"),
                   help="which part to score (all: train and test together)")
    p.add_argument("--protocol", default="random", metavar="SPEC",
                   help="how the dataset is split: random[:SEED[:FRACTION]] (the authors' 80/20, default), "
                        "official[:PART] or indices:TRAIN[,TEST]")
    p.add_argument("--manual-dir", action="append", default=[], metavar="[NAME=]DIR",
                   help="a downloaded dataset (needed until it is prepared); NAME=DIR for each of several")
    p.add_argument("--data-dir", help="where TFDS keeps prepared datasets (default: TFDS's)")
    p.add_argument("--output", required=True, help="folder for results.json, predictions.csv, scatter.png")
    p.add_argument("--prompt-embeddings", help="prompt matrix for an authors' .pth (default: beside it)")
    p.add_argument("--model-config", help="teacher config JSON for a .pth whose shapes are not SD-1.5's")
    p.add_argument("--latent", choices=("mean", "sample"), default="mean",
                   help="posterior mean (deterministic, default) or a random draw as the authors do")
    p.add_argument("--seed", type=int, default=0, help="seed of the draws with --latent sample")
    p.add_argument("--batch-size", type=positive_int, default=16, help="global, over every device")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
    add_distributed_arguments(p)
    p.set_defaults(run=run)


def manual_dirs(entries: list[str], datasets: list[str]) -> dict:
    """{dataset: manual folder} from --manual-dir values: NAME=DIR, or one DIR for one dataset."""
    if len(entries) == 1 and "=" not in entries[0] and len(datasets) == 1:
        return {datasets[0]: entries[0]}
    found = {}
    for entry in entries:
        name, sep, folder = entry.partition("=")
        if not sep or name not in datasets:
            raise UserError(f"--manual-dir {entry!r}: with several datasets, give NAME=DIR with NAME one of "
                            f"{', '.join(datasets)}")
        found[name] = folder
    return found


def labels(checkpoints: list[str]) -> list[str]:
    """Short distinct names of the checkpoints, for folders and the table's rows."""
    names = [os.path.splitext(os.path.basename(os.path.normpath(c)))[0] or c for c in checkpoints]
    return [n if names.count(n) == 1 else f"{i}-{n}" for i, n in enumerate(names)]


def table(rows: dict) -> str:
    """Markdown: a row per checkpoint, a column per dataset, cells 'SRCC / PLCC'."""
    datasets = list(next(iter(rows.values())))
    lines = ["| checkpoint | " + " | ".join(datasets) + " |", "|---" * (len(datasets) + 1) + "|"]
    for name, cells in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{cells[d]['srcc']:.4f} / {cells[d]['plcc']:.4f}"
                                                   for d in datasets) + " |")
    return "\n".join(lines) + "\n\nSRCC / PLCC\n"


def run(args) -> int:
    manual = manual_dirs(args.manual_dir, args.dataset)
    initialize_distributed(args)
    import jax

    if jax.process_index() == 0:
        outputs.folder(args.output)

    several = len(args.checkpoint) * len(args.dataset) > 1
    rows = {}
    for label, checkpoint in zip(labels(args.checkpoint), args.checkpoint, strict=True):
        rows[label] = {}
        for dataset in args.dataset:
            output = os.path.join(args.output, label, dataset.replace("/", "-")) if several else args.output
            rows[label][dataset] = evaluate_one(args, checkpoint, dataset, manual.get(dataset), output)
    if jax.process_index() == 0:
        if several:
            text = table(rows)
            with open(os.path.join(args.output, "table.md"), "w") as f:
                f.write(text)
            print(text)
        else:
            results = rows[label][dataset]
            print(json.dumps({k: results[k] for k in ("srcc", "plcc", "krcc", "rmse", "num_images")}))
    return 0


def evaluate_one(args, checkpoint: str, dataset: str, manual_dir, output: str) -> dict:
    """Scores `dataset` with `checkpoint`; the primary process writes the files into `output`."""
    import jax

    from dpiqa_jax.plots import scatter
    from dpiqa_jax.train.evaluator import evaluate_checkpoint

    metrics, predictions = evaluate_checkpoint(
        checkpoint, dataset, part=args.split, split=args.protocol, data_dir=args.data_dir,
        manual_dir=manual_dir, prompt_embeddings=args.prompt_embeddings, model_config=args.model_config,
        batch_size=args.batch_size, latents=args.latent, seed=args.seed, dtype=args.dtype)
    results = {"checkpoint": checkpoint, "dataset": dataset, "split": args.split,
               "protocol": args.protocol, "latent": args.latent, **metrics}
    if jax.process_index() == 0:
        os.makedirs(output, exist_ok=True)  # below args.output, checked before any work
        with open(os.path.join(output, "results.json"), "w") as f:
            json.dump(results, f, indent=2)
        with open(os.path.join(output, "predictions.csv"), "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["index", "target", "score"])
            writer.writerows(zip(predictions["index"].tolist(), predictions["target"].tolist(),
                                 predictions["score"].tolist(), strict=True))
        scatter(predictions["score"], predictions["target"], metrics,
                f"{os.path.basename(os.path.normpath(checkpoint))} on {dataset} ({args.split})",
                os.path.join(output, "scatter.png"))
    return results
