"""Config files with `get_config(arg)` and `--config.KEY=VALUE` overrides, parsed with argparse.

A config is an ml_collections `ConfigDict`, locked once loaded: an unknown key or a value of the
wrong type is a one-line `UserError` naming the key (and, for unknown keys, listing the valid ones),
raised before anything is compiled.
"""
import ast
import importlib.util
import os
import sys
from typing import Iterable

import ml_collections

from dpiqa_jax import outputs
from dpiqa_jax.errors import UserError

PREFIX = "--config."
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def load_config(spec: str) -> ml_collections.ConfigDict:
    """`spec` is `path/to/file.py` or `path/to/file.py:ARG`; returns `get_config(ARG)`, locked.

    The file's folder is put first on `sys.path` while it loads, so configs can `import default`.
    """
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise UserError(f"config file {path!r} does not exist")
    folder = os.path.dirname(os.path.abspath(path))
    sys.path.insert(0, folder)
    sys.modules.pop("default", None)  # a `default` module of another config folder may be cached
    try:
        module_spec = importlib.util.spec_from_file_location(f"_dpiqa_config_{abs(hash(path))}", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    finally:
        sys.path.remove(folder)
    if not hasattr(module, "get_config"):
        raise UserError(f"config file {path!r} has no get_config(arg) function")
    try:
        config = module.get_config(arg or None)
    except ValueError as e:  # the config's own check of its argument (e.g. an unknown variant)
        raise UserError(f"config {spec!r}: {e}") from None
    if not isinstance(config, ml_collections.ConfigDict):
        raise UserError(f"get_config of {path!r} must return an ml_collections.ConfigDict")
    config.lock()
    return config


def flat_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """Every settable leaf as a dotted key, sorted."""
    keys = []
    for name in config.keys():
        value = config[name]
        if isinstance(value, ml_collections.ConfigDict):
            keys.extend(flat_keys(value, f"{prefix}{name}."))
        else:
            keys.append(prefix + name)
    return sorted(keys)


def split_override_args(tokens: Iterable[str]) -> list[tuple[str, str]]:
    """Reads `--config.KEY=VALUE` and `--config.KEY VALUE` pairs; anything else is an error."""
    tokens, pairs = list(tokens), []
    while tokens:
        token = tokens.pop(0)
        if not token.startswith(PREFIX):
            raise UserError(f"unrecognised argument {token!r} (overrides look like --config.KEY=VALUE)")
        key, eq, value = token[len(PREFIX):].partition("=")
        if not eq:
            if not tokens:
                raise UserError(f"--config.{key} needs a value")
            value = tokens.pop(0)
        pairs.append((key, value))
    return pairs


def apply_overrides(config: ml_collections.ConfigDict, pairs: Iterable[tuple[str, str]]) -> None:
    """Sets each dotted key to its string value, parsed to the type the config declares for it."""
    valid = flat_keys(config)
    for key, text in pairs:
        if key not in valid:
            raise UserError(f"unknown config key {key!r}; valid keys: {', '.join(valid)}")
        *groups, leaf = key.split(".")
        parent = config
        for group in groups:
            parent = parent[group]
        kind = parent.get_type(leaf)
        try:
            parent[leaf] = _parse(text, kind)
        except (TypeError, ValueError, SyntaxError) as e:
            raise UserError(f"config key {key!r} takes a {kind.__name__}, got {text!r} ({e})") from None


def _parse(text: str, kind: type):
    if text.lower() == "none":
        return None
    if kind is bool:
        if text.lower() not in _TRUE + _FALSE:
            raise ValueError("expected true or false")
        return text.lower() in _TRUE
    if kind in (int, float, str):
        return kind(text)
    if kind in (tuple, list):
        value = ast.literal_eval(text) if text.strip() else ()
        return kind(value) if isinstance(value, (tuple, list)) else kind((value,))
    return ast.literal_eval(text)


def require_choice(config: ml_collections.ConfigDict, key: str, choices: Iterable[str]) -> None:
    value = get(config, key)
    if value not in choices:
        raise UserError(f"config key {key!r} is {value!r}; choose one of {', '.join(map(repr, choices))}")


def require_at_least(config: ml_collections.ConfigDict, key: str, minimum: int) -> None:
    value = get(config, key)
    if value < minimum:
        raise UserError(f"config key {key!r} is {value}; it must be at least {minimum}")


def require_existing(config: ml_collections.ConfigDict, key: str) -> None:
    """A path setting, when set, must name something that exists."""
    value = get(config, key)
    if value is not None and not os.path.exists(os.path.expanduser(value)):
        raise UserError(f"config key {key!r}: path {value!r} does not exist")


def require_folder(config: ml_collections.ConfigDict, key: str) -> None:
    """A folder setting, when set, must be a folder that exists or can be made, and is writable."""
    value = get(config, key)
    if value is not None:
        outputs.folder(os.path.expanduser(value), f"folder of config key {key!r}")


def has(config: ml_collections.ConfigDict, key: str) -> bool:
    try:
        get(config, key)
        return True
    except KeyError:
        return False


def get(config: ml_collections.ConfigDict, key: str):
    value = config
    for part in key.split("."):
        value = value[part]
    return value
