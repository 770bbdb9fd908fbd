import importlib
import json
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

import configurator


def defaults():
    return {"batch_size": 12, "learning_rate": 6e-4, "compile": True, "out_dir": "out", "init_from": None,
            "betas": (0.9, 0.95), "_private": 1, "math": __import__("math")}


def test_overrides_parse_literals_and_keep_types():
    scope = defaults()
    cfg = configurator.apply(scope, ["--batch_size=32", "--learning_rate=1", "--compile=False",
                                     "--out_dir=runs/a", "--init_from=resume", "--betas=(0.8,0.9)"])
    assert scope["batch_size"] == 32 and scope["learning_rate"] == 1.0 and isinstance(scope["learning_rate"], float)
    assert scope["compile"] is False and scope["out_dir"] == "runs/a" and scope["init_from"] == "resume"
    assert scope["betas"] == (0.8, 0.9)
    assert set(cfg) == {"batch_size", "learning_rate", "compile", "out_dir", "init_from", "betas"}


def test_one_value_for_a_tuple_key_is_a_one_item_tuple():
    scope = defaults()
    configurator.apply(scope, ["--betas=0.9"])
    assert scope["betas"] == (0.9,)
    configurator.apply(scope, ["--betas=0.8,"])
    assert scope["betas"] == (0.8,)


def test_config_files_apply_in_order_then_flags(tmp_path):
    py = tmp_path / "a.py"
    py.write_text("batch_size = 4\nout_dir = 'x'\n")
    js = tmp_path / "b.json"
    js.write_text(json.dumps({"out_dir": "y"}))
    scope = defaults()
    configurator.apply(scope, [str(py), str(js), "--batch_size=8"])
    assert scope["batch_size"] == 8 and scope["out_dir"] == "y"


@pytest.mark.parametrize("arg,message", [
    ("--batch_sise=3", "did you mean 'batch_size'"),
    ("--batch_size=3.5", "expects int"),
    ("--compile=yes", "expects bool"),
    ("--batch_size", "expected --key=value"),
])
def test_bad_arguments_fail_clearly(arg, message):
    with pytest.raises(SystemExit, match=message):
        configurator.apply(defaults(), [arg])


def test_bad_config_file_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"batch_size": 3,\n oops}')
    with pytest.raises(SystemExit, match=r"bad.json:2"):
        configurator.apply(defaults(), [str(bad)])
    with pytest.raises(SystemExit, match="not found"):
        configurator.apply(defaults(), [str(tmp_path / "missing.py")])


# ------------------------------------------------------------------------------------------------------------ --help

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = '''"""Train a thing.

    python thing.py --steps=3
"""
import trainer

# -- the training loop's settings
#    (every field of trainer.TrainConfig)
globals().update(vars(trainer.TrainConfig()))
max_iters = 5
batch_size = 4                # things per batch
# -- the data
data_dir = "data/x"           # where the things are: a folder
                              # or a file
steps = 3
LIMITS = (1, 2)
'''


def script_scope(tmp_path):
    path = tmp_path / "thing.py"
    path.write_text(SCRIPT)
    return runpy.run_path(str(path))


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_prints_usage_and_settings_and_exits_0(tmp_path, capsys, flag):
    scope = script_scope(tmp_path)
    with pytest.raises(SystemExit) as stop:
        configurator.apply(scope, ["--steps=4", flag, "--batch_sise=3"])  # anywhere; before any other argument
    assert stop.value.code == 0 and scope["steps"] == 3
    out = capsys.readouterr().out
    assert out.startswith("Train a thing.\n\n    python thing.py --steps=3\n")
    lines = [re.sub(" +", " ", line.strip()) for line in out.splitlines()]
    # the settings a script takes from trainer.TrainConfig, in a group of their own, with trainer.py's comments
    trainer_group = lines[lines.index("TrainConfig (trainer.py)") + 1:lines.index("the data")]
    assert "grad_accum = 1 # micro-batches per optimizer step, summed over all processes" in trainer_group
    assert "max_iters = 5 # optimizer steps" in trainer_group  # the script's default, trainer.py's comment
    assert "batch_size = 4 # things per batch" in trainer_group  # the script's own default and comment
    own = lines[lines.index("the data") + 1:]
    assert own[:3] == ["data_dir = 'data/x' # where the things are: a folder", "# or a file", "steps = 3"]
    assert "LIMITS" not in out and "the training loop's settings" not in out  # constants; a section with no own key


@pytest.mark.slow
def test_help_of_every_script(capsys):
    """Every script that takes --key=value answers --help, and every setting it accepts is listed in a group."""
    scripts = [f.stem for f in ROOT.glob("*.py") if "configurator.apply(" in f.read_text() and f.name != "configurator.py"]
    run_apart = {"bench", "convert", "rag"}  # apply() at import; locals(); work before apply()
    assert run_apart < set(scripts) and len(scripts) > 10
    for name in sorted(set(scripts) - run_apart):
        scope = vars(importlib.import_module(name))
        with pytest.raises(SystemExit) as stop:
            configurator.apply(scope, ["--help"])
        out = capsys.readouterr().out
        assert stop.value.code == 0 and out.startswith(scope["__doc__"].strip()), name
        assert "\n  other\n" not in out, f"{name}: settings whose place in the source was not found"
        missing = [k for k in configurator.config_keys(scope) if not k.isupper() and f"    {k} = " not in out]
        assert not missing, f"{name}: {missing}"
    procs = {name: subprocess.Popen([sys.executable, str(ROOT / f"{name}.py"), "-h"], cwd=ROOT, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for name in sorted(run_apart | {"pretrain"})}  # side by side: each spends seconds importing torch
    outs = {name: p.communicate(timeout=120) + (p.returncode,) for name, p in procs.items()}
    for name, (out, err, code) in outs.items():
        assert code == 0 and "settings (config files, then --key=value):" in out, f"{name}: {err[-2000:]}"
    assert re.search(r"    src = '' +# a checkpoint folder or a .gguf file", outs["convert"][0])  # main()'s locals
    assert "python rag.py index" in outs["rag"][0] and "    chunk_tokens = 128" in outs["rag"][0]
    pretrain = outs["pretrain"][0]  # as users see it: the trainer's and tuning's settings among the script's own
    for title in ("TrainConfig (trainer.py)", "data and the starting point", "TuningConfig (tuning.py)", "model ("):
        assert f"\n  {title}" in pretrain
    assert re.search(r"\n    max_iters = 2000 +# optimizer steps\n", pretrain)  # pretrain's default, trainer's comment
    assert "\n    lora_rank = 8\n" in pretrain and "\n    epochs = " not in pretrain  # only the tuning keys it takes
    assert re.search(r"\n    family = 'llama' +# llama .*\n +# parallel attention", pretrain)

