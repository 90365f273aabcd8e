"""`dpiqa-jax COMMAND ...`: parse arguments and call the library. Each command lives in
`dpiqa_jax/commands/<name>.py` with `register(subparsers)` that sets `run` on its parser."""
import argparse
import importlib
import sys

from dpiqa_jax.errors import UserError

COMMANDS = ("train", "evaluate", "predict", "embed_prompts", "distill", "export")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dpiqa-jax", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"dpiqa_jax.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"dpiqa_jax.commands.{name}":
                raise
            continue  # a command not built yet
        module.register(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except (UserError, FileNotFoundError) as e:
        print(f"dpiqa-jax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
