"""`dpiqa-jax COMMAND ...`: parse arguments and call the library. Each command lives in
`dpiqa_jax/commands/<name>.py` with `register(subparsers)` that sets `run` on its parser."""
import argparse
import importlib
import os
import sys
import traceback

from dpiqa_jax.commands.train import joined_distributed
from dpiqa_jax.errors import UserError

COMMANDS = ("train", "evaluate", "distill", "export", "predict", "embed_prompts", "caches")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dpiqa-jax", description="DP-IQA image quality assessment in JAX")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"dpiqa_jax.commands.{name}").register(sub)
    return parser


def use_compilation_cache() -> None:
    """Keeps compiled programs across runs (JAX's persistent compilation cache), so that a rerun, a
    resume or the next experiment with the same shapes skips most of the compile. The folder is
    $JAX_COMPILATION_CACHE_DIR where set (JAX reads it itself), else ~/.cache/dpiqa_jax/xla
    (under $XDG_CACHE_HOME where set)."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR") is not None:
        return
    import jax

    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    jax.config.update("jax_compilation_cache_dir", os.path.join(root, "dpiqa_jax", "xla"))


def main(argv=None) -> int:
    """Runs one command in this process and returns its exit code (user errors: one line, 2)."""
    args = build_parser().parse_args(argv)
    use_compilation_cache()
    try:
        return int(args.run(args) or 0)
    except (UserError, FileNotFoundError) as e:
        print(f"dpiqa-jax {args.command}: error: {e}", file=sys.stderr)
        return 2
    except Exception:
        if not joined_distributed():
            raise
        traceback.print_exc()
        return 1


def run_as_command() -> None:
    """The `dpiqa-jax` program. A failed command exits at once, skipping the interpreter's teardown
    (where orbax's threads print tracebacks of reads cut short) and jax.distributed's shutdown
    barrier (which waits for the other processes, themselves waiting for this one)."""
    code = main()
    if code:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run_as_command()
