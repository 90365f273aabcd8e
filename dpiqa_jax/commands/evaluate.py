"""`dpiqa-jax evaluate --checkpoint CKPT --dataset NAME [--split test] --output DIR`: SRCC, PLCC,
KRCC and RMSE of any teacher or student checkpoint on any dataset (cross-dataset tables)."""
import csv
import json
import os

from dpiqa_jax.commands.train import add_distributed_arguments, initialize_distributed


def register(subparsers) -> None:
    p = subparsers.add_parser("evaluate", help="score a dataset split with a teacher or student checkpoint",
                              description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True,
                   help="a training or distillation workdir (its best-by-SRCC checkpoint, else the latest), "
                        "an orbax checkpoint folder, the authors' teacher or student .pth, or an exported "
                        "student (.msgpack, .safetensors)")
    p.add_argument("--dataset", required=True, help="koniq10k, live_challenge, flive, spaq or synthetic_iqa")
    p.add_argument("--split", default="test", choices=("test", "train", "all"),
                   help="which part to score (all: train and test together)")
    p.add_argument("--protocol", default="random", metavar="SPEC",
                   help="how the dataset is split: random[:SEED[:FRACTION]] (the authors' 80/20, default), "
                        "official[:PART] or indices:TRAIN[,TEST]")
    p.add_argument("--manual-dir", help="the downloaded dataset (needed until the dataset is prepared)")
    p.add_argument("--data-dir", help="where TFDS keeps prepared datasets (default: TFDS's)")
    p.add_argument("--output", required=True, help="folder for results.json and predictions.csv")
    p.add_argument("--prompt-embeddings", help="prompt matrix for an authors' .pth (default: beside it)")
    p.add_argument("--model-config", help="teacher config JSON for a .pth whose shapes are not SD-1.5's")
    p.add_argument("--latent", choices=("mean", "sample"), default="mean",
                   help="posterior mean (deterministic, default) or a random draw as the authors do")
    p.add_argument("--seed", type=int, default=0, help="seed of the draws with --latent sample")
    p.add_argument("--batch-size", type=int, default=16, help="global, over every device")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
    add_distributed_arguments(p)
    p.set_defaults(run=run)


def run(args) -> int:
    initialize_distributed(args)
    import jax

    from dpiqa_jax.train.evaluator import evaluate_checkpoint

    metrics, predictions = evaluate_checkpoint(
        args.checkpoint, args.dataset, part=args.split, split=args.protocol, data_dir=args.data_dir,
        manual_dir=args.manual_dir, prompt_embeddings=args.prompt_embeddings, model_config=args.model_config,
        batch_size=args.batch_size, latents=args.latent, seed=args.seed, dtype=args.dtype)
    results = {"checkpoint": args.checkpoint, "dataset": args.dataset, "split": args.split,
               "protocol": args.protocol, "latent": args.latent, **metrics}
    if jax.process_index() == 0:
        os.makedirs(args.output, exist_ok=True)
        with open(os.path.join(args.output, "results.json"), "w") as f:
            json.dump(results, f, indent=2)
        with open(os.path.join(args.output, "predictions.csv"), "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["index", "target", "score"])
            writer.writerows(zip(predictions["index"].tolist(), predictions["target"].tolist(),
                                 predictions["score"].tolist(), strict=True))
        print(json.dumps({k: results[k] for k in ("srcc", "plcc", "krcc", "rmse", "num_images")}))
    return 0
