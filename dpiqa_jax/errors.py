"""User-facing errors: the CLI prints their message as one line and exits non-zero."""


class UserError(Exception):
    """A mistake in what the user gave us (a path, a file, a config key): no traceback."""
