"""Command-line overrides for train.py's module-level config: `--key=value` and config .py files.

    python train.py --max_iters=2000 --dataset=text --text_path=input.txt
    python train.py my_config.py --learning_rate=1e-3     # files first, flags after; later wins
    python train.py --help                                 # every key, its default and its comment

Only keys that already exist can be set, and a value keeps the type of the default (an int may
stand for a float). Anything else is a ConfigError naming the key; train.py prints it as one line.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

Value = bool | int | float | str
_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}


class ConfigError(ValueError):
    """An override names no config key, or its value does not fit the key's type."""


def convert(key: str, raw: str, default: Value) -> Value:
    """Parse the command-line string raw for key into the type of its default value."""
    kind = type(default)
    try:
        if kind is bool:
            if raw.lower() in _TRUE:
                return True
            if raw.lower() in _FALSE:
                return False
            raise ValueError
        if kind is int:
            return int(raw)
        if kind is float:
            return float(raw)
    except ValueError:
        raise ConfigError(f"--{key} expects {kind.__name__}, got {raw!r}") from None
    return raw  # strings are taken as written: --run_name=123 is the name "123", not a number


def check(key: str, value: object, default: Value, origin: str) -> Value:
    """Value for key from a config file, with the same type rule as the command line."""
    if type(value) is type(default) or (type(default) is float and type(value) is int):
        return type(default)(value)
    raise ConfigError(f"{key} in {origin} must be {type(default).__name__}, got {value!r}")


def load_file(path: str, defaults: dict[str, Value]) -> dict[str, Value]:
    """Simple values a config .py file assigns (it is run as Python: only use your own files)."""
    try:
        source = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    namespace: dict[str, object] = {}
    exec(compile(source, path, "exec"), namespace)  # the user's own file, like nanoGPT's config/*.py
    values = {}
    for key, value in namespace.items():
        if key.startswith("_") or not isinstance(value, (bool, int, float, str)):
            continue  # imports, helpers and builtins are not config
        if key not in defaults:
            raise ConfigError(f"Unknown config key: {key} (in {path})")
        values[key] = check(key, value, defaults[key], path)
    return values


def help_text(defaults: dict[str, Value], source_path: str) -> str:
    """One line per key: name, default and the comment written beside it in source_path."""
    comments = {}
    for line in Path(source_path).read_text(encoding="utf-8").splitlines():
        m = re.match(r"^(\w+)\s*=.*?#\s*(.*)$", line)
        if m:
            comments[m.group(1)] = m.group(2)
    width = max(len(k) for k in defaults)
    lines = [f"usage: python {Path(source_path).name} [config.py ...] [--key=value ...]", ""]
    lines += [f"  --{k:<{width}} = {v!r:<28} {comments.get(k, '')}".rstrip() for k, v in defaults.items()]
    return "\n".join(lines)


def configure(defaults: dict[str, Value], argv: list[str], source_path: str | None = None) -> dict[str, Value]:
    """The overrides argv asks for, checked against defaults; `--help` prints help_text and exits."""
    if "-h" in argv or "--help" in argv:
        print(help_text(defaults, source_path) if source_path else "\n".join(f"--{k}={v!r}" for k, v in defaults.items()))
        sys.exit(0)
    overrides: dict[str, Value] = {}
    for arg in argv:
        if not arg.startswith("--"):
            overrides.update(load_file(arg, defaults))
            continue
        key, eq, raw = arg[2:].partition("=")
        if key not in defaults:
            raise ConfigError(f"Unknown config key: {key} (see --help for the list)")
        if not eq:
            if type(defaults[key]) is not bool:
                raise ConfigError(f"--{key} needs a value: --{key}=...")
            raw = "true"  # a bare boolean flag switches it on
        overrides[key] = convert(key, raw, defaults[key])
    return overrides
