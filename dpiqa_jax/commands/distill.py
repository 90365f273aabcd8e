"""`dpiqa-jax distill --config FILE.py[:ARG] --workdir DIR --teacher CKPT`: distil the student.

Overrides as for `train` (--config.KEY=VALUE). The teacher is frozen; the loss is SPEC's.

The outputs are those of `train` (metrics.jsonl, results.json, best and latest checkpoints, with
DIR/student.json in place of model.json); re-running the same command resumes.
"""
from dpiqa_jax.commands.train import add_run_parser, run_config


def register(subparsers) -> None:
    help_text = "distil the student from a teacher (resumes when WORKDIR has a checkpoint)"
    parser = add_run_parser(subparsers, "distill", help_text, __doc__)
    parser.add_argument("--teacher", required=True, metavar="CKPT",
                        help="a teacher training workdir, an orbax checkpoint folder, or the authors' .pth")
    parser.set_defaults(run=run)


def run(args) -> int:
    from dpiqa_jax.train.distill import student_task

    return run_config(args, lambda config: student_task(config, args.teacher))
