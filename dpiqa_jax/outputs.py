"""Where the commands write, checked before any work: a path that cannot be written is one line at
once, rather than a traceback once the scoring, evaluation or training is done."""
import os

from dpiqa_jax.errors import UserError


def folder(path: str, what: str = "output folder") -> str:
    """`path`, made (with its parents) if need be, and writable."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as error:  # a file in its place or on its way, no permission, a read-only file system
        reason = "a file is in its place" if os.path.isfile(path) else error.strerror
        raise UserError(f"{path}: cannot be the {what}: {reason}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"{path}: cannot be the {what}: not writable")
    return path


def file(path: str, suffixes: tuple[str, ...] = (), what: str = "the output") -> str:
    """`path`, ending in one of `suffixes` (if given), not a folder, its folder made."""
    if suffixes and not path.endswith(suffixes):
        raise UserError(f"{path}: {what} must end in {' or '.join(suffixes)}")
    if os.path.isdir(path):
        raise UserError(f"{path}: is a folder; give a file name")
    folder(os.path.dirname(os.path.abspath(path)), "output file's folder")
    return path
