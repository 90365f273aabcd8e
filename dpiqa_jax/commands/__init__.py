"""The CLI's commands, one module each (see `dpiqa_jax.cli`)."""
import argparse


def positive(convert, what: str):
    """An argparse type: a number above 0, read by `convert` (int, float); `what` names it in the error."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = 0
        if not value > 0:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    return parse


positive_int = positive(int, "a positive integer")  # a count or size of at least 1
