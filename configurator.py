"""nanoGPT-style configuration: a script's header globals are its hyperparameters.

    python pretrain.py config/tiny.py --batch_size=32 --compile=False

Positional arguments are config files (Python files of assignments, or JSON objects) applied in order; then each
`--key=value` overrides one global. Values are parsed as Python literals (falling back to a plain string) and
must keep the type of the default, so a typo or a wrong type fails at start-up instead of hours into a run.
`--help` or `-h` anywhere prints the script's docstring and its settings (default and comment each, read from
the source, grouped as it groups them) and exits.
"""
import ast
import dataclasses
import difflib
import inspect
import io
import json
import os
import sys
import tokenize

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
    help_if_asked(scope, argv)
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



# ----------------------------------------------------------------------------------------------------------- --help

HELP_FLAGS = ("-h", "--help")


def help_if_asked(scope, argv):
    """With --help or -h anywhere in argv: print the usage and settings of the script of `scope` and exit 0.
    apply() calls it first; a script with work to do before apply() calls it itself."""
    if any(arg in HELP_FLAGS for arg in argv):
        print(usage(scope))
        raise SystemExit(0)


def usage(scope):
    """The script's docstring as written, then its settings in groups, each as `key = default  # comment`."""
    # the locals() of a function (convert.py) have no __file__: their settings are in the script that runs
    script = scope if "__file__" in scope else vars(sys.modules["__main__"])
    lines = [(script.get("__doc__") or "").strip(), "", "settings (config files, then --key=value):"]
    for title, group in setting_groups(scope, script.get("__file__")):
        lines += [""] + [f"  {line}" for line in title.splitlines()]
        for key, comment in group.items():
            setting = f"    {key} = {scope[key]!r}"
            column = max(len(setting) + 2, 32)  # comments in a column, as in the source; a long default pushes it
            lines += [f"{setting if n == 0 else '':<{column}}# {note}" for n, note in enumerate(comment.splitlines())]
            lines += [setting] if not comment else []
    return "\n".join(lines)


def setting_groups(scope, path):
    """[(title, {key: comment})]: the settings of `scope` in the order and sections of the source at `path`. A
    section is headed by a comment line `# -- title` or `# ---- title ----`; the keys a `globals().update(...)`
    takes from a dataclass (trainer.TrainConfig, tuning.TuningConfig) form a group of their own with that class's
    comments, and stay there when the script only changes their default (its own comment, if any, wins)."""
    keys = [k for k in config_keys(scope) if not k.isupper()]  # module constants are not settings
    groups, group_of = [], {}
    if path and os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            source = f.read()
        comments, tree = _comments(source), ast.parse(source)
        # the settings are a module's globals, or the locals of the function that assigns most of them
        body = max([tree.body] + [n.body for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)],
                   key=lambda body: len(_assignments(body, comments, keys)))
        section, own = "", None  # own: the group of the script's own settings in this section
        for item in _sections_and_statements(body, comments):
            if isinstance(item, str):
                section, own = item, None
                continue
            for cls, provided in _dataclass_updates(item, scope, path):
                groups.append((f"{cls.__name__} ({os.path.basename(inspect.getsourcefile(cls))})", {}))
                for key, comment in _class_assignments(cls, provided).items():
                    if key in group_of:  # a later class's default wins (fine_tuning.py: tuning's init_from)
                        del group_of[key][key]
                    group_of[key] = groups[-1][1]
                    group_of[key][key] = comment
                section = os.path.basename(path)  # the header spoke of the classes; what follows is the script's
            for key, comment in _assignments([item], comments, keys).items():
                if key in group_of:
                    group_of[key][key] = comment or group_of[key][key]  # a new default of a class's key
                    continue
                if own is None:
                    own = {}
                    groups.append((section, own))
                group_of[key] = own
                own[key] = comment
    rest = {k: "" for k in keys if k not in group_of}
    return [(title, group) for title, group in groups + [("other", rest)] if group]


def _comments(source):
    """{line: (column, text, alone)} of the comments in `source`; alone: nothing but the comment on its line."""
    found = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            line, column = token.start
            found[line] = (column, token.string[1:].strip(), not token.line[:column].strip())
    return found


def _assignments(body, comments, keys):
    """{key: comment} of the statements `key = ...` (or `key: type = ...`) in `body`. The comment is the one
    after the statement, with the comment lines under it (at its column or right of it) that follow."""
    found = {}
    for stmt in body:
        targets = stmt.targets if isinstance(stmt, ast.Assign) else [getattr(stmt, "target", None)]
        names = [t.id for t in targets if isinstance(t, ast.Name) and t.id in keys]
        after = [comments[n] for n in range(stmt.lineno, stmt.end_lineno + 1) if n in comments and not comments[n][2]]
        text = after[0][1] if after else ""
        line = stmt.end_lineno + 1
        while after and line in comments and comments[line][2] and comments[line][0] >= after[0][0]:
            text += "\n" + comments[line][1]
            line += 1
        found.update(dict.fromkeys(names, text))
    return found


def _sections_and_statements(body, comments):
    """The statements of `body` in order, each section header's title (a str) before the statements under it."""
    column, first, last = body[0].col_offset, body[0].lineno, body[-1].end_lineno
    def header(line, start=True):  # a comment line of its own at the statements' column: `# --` starts a header
        col, text, alone = comments.get(line, (None, "", False))
        return alone and col == column and text.startswith("--") == start

    headers = {}
    for line in filter(header, range(first, last + 1)):
        title = [comments[line][1].strip("- ")]
        while header(line + len(title), start=False):  # the header's own lines that follow
            title.append(comments[line + len(title)][1])
        headers[line] = "\n".join(title)
    items = sorted([(line, 0, title) for line, title in headers.items()] + [(s.lineno, 1, s) for s in body],
                   key=lambda item: item[:2])
    return [item for _, _, item in items]


def _dataclass_updates(stmt, scope, path):
    """[(dataclass, the keys taken from it)] of a statement `globals().update(<expression>)`. Which keys it takes
    (all of vars(Config()), or a chosen few) is what the expression evaluates to."""
    call = stmt.value if isinstance(stmt, ast.Expr) else None
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute) and call.func.attr == "update"
            and isinstance(call.func.value, ast.Call) and isinstance(call.func.value.func, ast.Name)
            and call.func.value.func.id == "globals" and len(call.args) == 1):
        return []
    provided = eval(compile(ast.Expression(call.args[0]), path, "eval"), dict(scope))
    classes = []
    for node in ast.walk(call.args[0]):  # the `module.Class` names in the expression
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                and inspect.ismodule(scope.get(node.value.id)):
            cls = getattr(scope[node.value.id], node.attr, None)
            if isinstance(cls, type) and dataclasses.is_dataclass(cls) and cls not in classes:
                classes.append(cls)
    return [(cls, [k for k in provided if k in {f.name for f in dataclasses.fields(cls)}]) for cls in classes]


def _class_assignments(cls, keys):
    """{key: comment} of the fields of dataclass `cls` among `keys`, in the class's order."""
    with open(inspect.getsourcefile(cls), encoding="utf-8") as f:
        source = f.read()
    node = next(n for n in ast.parse(source).body if isinstance(n, ast.ClassDef) and n.name == cls.__name__)
    return _assignments(node.body, _comments(source), keys)
