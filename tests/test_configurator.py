import json

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
