"""nanoGPT-style configuration: a script's header globals are its hyperparameters.

    python pretrain.py config/tiny.py --batch_size=32 --compile=False

Positional arguments are config files (Python files of assignments, or JSON objects) applied in order; then each
`--key=value` overrides one global. Values are parsed as Python literals (falling back to a plain string) and
must keep the type of the default, so a typo or a wrong type fails at start-up instead of hours into a run.
"""
import ast
import difflib
import json
import os

SIMPLE_TYPES = (int, float, bool, str, tuple, list, type(None))


def config_keys(scope):
    """The hyperparameters of a script: its public globals of simple types."""
    return [k for k, v in scope.items() if not k.startswith("_") and isinstance(v, SIMPLE_TYPES)]


def _check_and_set(scope, keys, key, value, where):
    if key not in keys:
        close = difflib.get_close_matches(key, keys, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise SystemExit(f"{where}: unknown config key '{key}'{hint}")
    default = scope[key]
    if default is not None and value is not None:
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)  # --lr=1 means 1.0
        elif isinstance(default, (tuple, list)):
            if not isinstance(value, (tuple, list)):  # --lengths=1024 means the one-item (1024,)
                value = (value,)
            value = type(default)(value)
        elif type(value) is not type(default):
            raise SystemExit(f"{where}: '{key}' expects {type(default).__name__} "
                             f"(default {default!r}), got {type(value).__name__} {value!r}")
    scope[key] = value


def _parse_value(text):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare string such as --device=cuda


def load_config_file(path):
    """The assignments of a config file as a dict (.py: executed; .json: an object)."""
    if not os.path.isfile(path):
        raise SystemExit(f"config file not found: {path}")
    with open(path, encoding="utf-8") as f:
        source = f.read()
    if path.endswith(".json"):
        try:
            values = json.loads(source)
        except json.JSONDecodeError as e:
            raise SystemExit(f"{path}:{e.lineno}: invalid JSON: {e.msg}")
        if not isinstance(values, dict):
            raise SystemExit(f"{path}: a JSON config must be an object of key: value")
        return values
    scope = {}
    exec(compile(source, path, "exec"), scope)
    return {k: v for k, v in scope.items() if not k.startswith("_") and isinstance(v, SIMPLE_TYPES)}


def apply(scope, argv):
    """Override the globals in `scope` from config files and --key=value; return the resolved config dict."""
    keys = config_keys(scope)
    for arg in argv:
        if not arg.startswith("--"):
            for key, value in load_config_file(arg).items():
                _check_and_set(scope, keys, key, value, arg)
        else:
            key, sep, text = arg[2:].partition("=")
            if not sep:
                raise SystemExit(f"argument '{arg}': expected --key=value")
            _check_and_set(scope, keys, key, _parse_value(text), f"argument '{arg}'")
    return {k: scope[k] for k in keys}
