"""The CLI's commands, one module each (see `dpiqa_jax.cli`)."""
import argparse


def positive_int(text: str) -> int:
    """An argparse type: a count or size of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value
