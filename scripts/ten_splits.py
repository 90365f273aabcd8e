"""The 10-split protocol: train one config on 10 seeded random 80/20 splits, then report the
median and mean +- std of SRCC and PLCC over the splits.

    python scripts/ten_splits.py --config configs/live_challenge.py --workroot runs/clive10 \
        -- --config.model.sd_dir=/models/sd-v1-5 --config.dataset.manual_dir=/data/ChallengeDB_release

Split k uses `--config.dataset.split=random:k` and trains in WORKROOT/split_k; rerunning the
script resumes an unfinished split and skips finished ones. `--report-only` just summarises.
Two numbers are reported per metric: `best` (the best evaluation of each run, the checkpoint
selection of the authors and of most IQA papers) and `final` (the last evaluation).
Arguments after `--` go to every `dpiqa-jax train` (e.g. `--distributed` on a pod).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="a config file (configs/NAME.py[:ARG])")
    p.add_argument("--workroot", required=True, help="one workdir per split goes here")
    p.add_argument("--seeds", type=int, nargs="+", default=list(range(10)), help="split seeds (default 0-9)")
    p.add_argument("--report-only", action="store_true", help="summarise the finished splits, train nothing")
    p.add_argument("train_args", nargs="*", help="after --: more `dpiqa-jax train` arguments")
    return p.parse_args(argv)


def train(args, seed: int) -> None:
    workdir = os.path.join(args.workroot, f"split_{seed}")
    if os.path.exists(os.path.join(workdir, "results.json")):
        return
    command = ["dpiqa-jax", "train", "--config", args.config, "--workdir", workdir,
               f"--config.dataset.split=random:{seed}", *args.train_args]
    print("+", " ".join(command), flush=True)
    code = subprocess.run(command).returncode
    if code:  # its own message is above; the finished splits stay finished
        sys.exit(f"ten_splits: split {seed} stopped (exit code {code}); run the same command again to resume")


def summary(args) -> dict:
    runs = {}
    for seed in args.seeds:
        path = os.path.join(args.workroot, f"split_{seed}", "results.json")
        if os.path.exists(path):
            with open(path) as f:
                runs[seed] = json.load(f)
    if not runs:
        sys.exit(f"no finished split under {args.workroot}")
    report = {"splits": sorted(runs), "per_split": {}}
    for metric in ("srcc", "plcc"):
        for kind in ("best", "final"):
            values = [_value(r, kind, metric) for r in runs.values()]
            report["per_split"][f"{kind}_{metric}"] = values
            report[f"{kind}_{metric}"] = {
                "median": statistics.median(values), "mean": statistics.fmean(values),
                "std": statistics.stdev(values) if len(values) > 1 else 0.0}
    return report


def _value(results: dict, kind: str, metric: str) -> float:
    entry = results["best"][metric] if kind == "best" else results["final"]
    return entry["metrics"][metric]


def main(argv=None):
    args = parse_args(argv)
    if not args.report_only:
        for seed in args.seeds:
            train(args, seed)
    report = summary(args)
    with open(os.path.join(args.workroot, "ten_splits.json"), "w") as f:
        json.dump(report, f, indent=2)
    print(f"{len(report['splits'])} splits ({args.workroot}/ten_splits.json)")
    print("| | median | mean +- std |\n| --- | --- | --- |")
    for key in ("best_srcc", "best_plcc", "final_srcc", "final_plcc"):
        s = report[key]
        print(f"| {key} | {s['median']:.4f} | {s['mean']:.4f} +- {s['std']:.4f} |")


if __name__ == "__main__":
    main()
