"""`dpiqa-jax train --config configs/NAME.py[:ARG] --workdir DIR [--config.KEY=VALUE ...]`.

Re-running the same command resumes from DIR/checkpoints/latest.
"""
import argparse
import json
import sys

from dpiqa_jax.commands import positive_int
from dpiqa_jax.errors import UserError


def register(subparsers) -> None:
    parser = add_run_parser(subparsers, "train", "train the teacher (resumes when WORKDIR has a checkpoint)",
                            __doc__)
    parser.set_defaults(run=run)


def add_run_parser(subparsers, name: str, help_text: str, doc: str) -> argparse.ArgumentParser:
    """The parser of a command that runs the training loop: --config, --workdir, multi-host
    arguments and --config.KEY=VALUE overrides."""
    parser = subparsers.add_parser(
        name, help=help_text, description=doc.splitlines()[0],
        epilog="Overrides: --config.KEY=VALUE (or --config.KEY VALUE), e.g. --config.optim.lr=2e-5.")
    parser.add_argument("--config", required=True, metavar="FILE.py[:ARG]", help="a config file")
    parser.add_argument("--workdir", required=True, help="checkpoints, metrics and results go here")
    add_distributed_arguments(parser)
    collect_config_overrides(parser)
    return parser


def add_distributed_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("multi-host (jax.distributed)")
    group.add_argument("--distributed", action="store_true",
                       help="join a multi-process run; on TPU pods and SLURM the rest is detected")
    group.add_argument("--coordinator", help="HOST:PORT of process 0 (else $JAX_COORDINATOR_ADDRESS)")
    group.add_argument("--num-processes", type=int)
    group.add_argument("--process-id", type=int)
    group.add_argument("--heartbeat-timeout", type=positive_int, default=60, metavar="SECONDS",
                       help="when a process dies, the others stop after this long (default 60)")


_joined = False  # whether this process is part of a jax.distributed run


def initialize_distributed(args) -> None:
    """Calls jax.distributed.initialize when asked to; must run before anything touches devices."""
    global _joined
    if args.distributed or args.coordinator or args.num_processes:
        import jax

        jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                                   process_id=args.process_id,
                                   heartbeat_timeout_seconds=args.heartbeat_timeout)
        _joined = True


def joined_distributed() -> bool:
    return _joined


def leave_together() -> None:
    """For a stop that every process makes at the same step (SIGTERM's sync point, a non-finite
    loss): the processes leave through jax.distributed's shutdown barrier. Were process 0 to exit
    first, the others' clients would abort on losing its coordination service."""
    if _joined:
        import jax

        jax.distributed.shutdown()


def collect_config_overrides(parser: argparse.ArgumentParser) -> None:
    """`--config.KEY=VALUE` flags cannot be declared ahead (keys depend on the file): the parser hands
    every argument it does not know to `args.overrides`, which `split_override_args` checks."""
    parse_known = parser.parse_known_args

    def parse_known_args(args=None, namespace=None):
        namespace, rest = parse_known(args, namespace)
        namespace.overrides = list(rest)
        return namespace, []

    parser.parse_known_args = parse_known_args


def run(args) -> int:
    return run_config(args)


def run_config(args, make_task=None) -> int:
    """Loads the config with its overrides, then trains `make_task(config)` (default: the teacher)."""
    from dpiqa_jax.train import config_util

    pairs = config_util.split_override_args(args.overrides)
    config = config_util.load_config(args.config)
    config_util.apply_overrides(config, pairs)
    initialize_distributed(args)
    from dpiqa_jax.train.loop import NonFiniteError, train_and_evaluate
    from dpiqa_jax.train.preemption import EXIT_CODE, Preempted

    try:
        results = train_and_evaluate(config, args.workdir, make_task and make_task(config))
    except NonFiniteError as e:
        leave_together()
        raise UserError(str(e)) from None
    except Preempted as e:
        print(f"dpiqa-jax {args.command}: {e}", file=sys.stderr)
        leave_together()
        return EXIT_CODE
    final = results["final"]["metrics"]
    print(json.dumps({"step": results["final"]["step"], "srcc": final["srcc"], "plcc": final["plcc"]}),
          file=sys.stdout)
    return 0
