"""dtype=auto fits the hardware (inference.resolve_dtype): bf16 only where it is fast (a CUDA GPU with native bf16, a
CPU with AMX or AVX512-BF16), float32 on other CPUs, never float16 on a CPU; TINYLLM_CPU_BF16 forces the CPU's
answer; no config or script default hard-codes bf16; and the trainer, eval.py and rag.py say what they chose and why."""
import ast
import glob
import io
import os
import subprocess
import sys

import pytest
import torch

import inference
from model import ModelConfig, Transformer
from trainer import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPUS = {"amx": (True, True), "avx512_bf16": (False, True), "avx2": (False, False)}  # (AMX, AVX512-BF16)


@pytest.fixture
def cpu(monkeypatch):
    """cpu(kind) makes this CPU report the capability of CPUS[kind] to torch's checks."""
    monkeypatch.delenv(inference.CPU_BF16_VARIABLE, raising=False)

    def set_cpu(kind):
        amx, avx512_bf16 = CPUS[kind]
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    return set_cpu


@pytest.mark.parametrize("kind,dtype,why", [("amx", "bfloat16", "auto: the CPU has AMX"),
                                            ("avx512_bf16", "bfloat16", "auto: the CPU has AVX512-BF16"),
                                            ("avx2", "float32", "no fast bf16 (no AMX or AVX512-BF16)")])
def test_auto_on_cpu_takes_bf16_only_with_amx_or_avx512_bf16(cpu, kind, dtype, why):
    cpu(kind)
    chosen, reason = inference.resolve_dtype("auto", "cpu")
    assert chosen == dtype and why in reason
    assert inference.resolve_dtype("auto", torch.device("cpu"))[0] == dtype


def test_explicit_dtypes_are_kept_and_bf16_on_a_slow_cpu_says_so(cpu):
    cpu("avx2")
    for name in ("float32", "bfloat16", "float16"):
        assert inference.resolve_dtype(name, "cpu")[0] == name
    assert "float32 is many times faster here" in inference.resolve_dtype("bfloat16", "cpu")[1]
    cpu("amx")
    assert inference.resolve_dtype("bfloat16", "cpu") == ("bfloat16", "as set")
    with pytest.raises(SystemExit, match="dtype='float64': expected one of auto, float32, bfloat16, float16"):
        inference.resolve_dtype("float64", "cpu")


def test_auto_never_takes_fp16_on_a_cpu(cpu, monkeypatch):
    for kind in CPUS:
        cpu(kind)
        assert inference.resolve_dtype("auto", "cpu")[0] != "float16"
    for forced in ("0", "1"):
        monkeypatch.setenv(inference.CPU_BF16_VARIABLE, forced)
        assert inference.resolve_dtype("auto", "cpu")[0] != "float16"


@pytest.mark.parametrize("native,dtype", [(True, "bfloat16"), (False, "float16")])
def test_auto_on_cuda_takes_bf16_where_native_else_fp16(monkeypatch, native, dtype):
    asked = []

    def is_bf16_supported(including_emulation=True):
        asked.append(including_emulation)
        return native or including_emulation  # an old GPU emulates bf16: that does not count
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    chosen, why = inference.resolve_dtype("auto", "cuda")
    assert chosen == dtype and asked == [False] and "GPU" in why
    assert inference.resolve_dtype("float32", "cuda") == ("float32", "as set")


def test_the_variable_forces_the_cpu_answer(cpu, monkeypatch):
    cpu("amx")
    monkeypatch.setenv(inference.CPU_BF16_VARIABLE, "0")
    assert inference.resolve_dtype("auto", "cpu") == ("float32", "auto: TINYLLM_CPU_BF16=0")
    cpu("avx2")
    monkeypatch.setenv(inference.CPU_BF16_VARIABLE, "1")
    assert inference.resolve_dtype("auto", "cpu") == ("bfloat16", "auto: TINYLLM_CPU_BF16=1")
    monkeypatch.setenv(inference.CPU_BF16_VARIABLE, "yes")
    with pytest.raises(SystemExit, match="TINYLLM_CPU_BF16='yes': expected 1 .* or 0"):
        inference.resolve_dtype("auto", "cpu")


def test_without_torchs_checks_the_flags_of_proc_cpuinfo_answer(monkeypatch):
    monkeypatch.delenv(inference.CPU_BF16_VARIABLE, raising=False)
    for check in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):  # an older torch
        monkeypatch.delattr(torch.cpu, check, raising=False)
    for flags, dtype in [("fpu sse avx2 avx512f avx512_bf16", "bfloat16"), ("amx_tile amx_bf16", "bfloat16"),
                         ("fpu sse avx2 fma", "float32")]:
        monkeypatch.setattr(inference, "open", lambda path, *a, **k: io.StringIO(f"flags\t\t: {flags}\n"),
                            raising=False)
        assert inference.resolve_dtype("auto", "cpu")[0] == dtype, flags

    def no_proc(path, *a, **k):
        raise FileNotFoundError(path)
    monkeypatch.setattr(inference, "open", no_proc, raising=False)  # not Linux: no answer, no bf16
    assert inference.resolve_dtype("auto", "cpu")[0] == "float32"


def test_load_model_takes_auto(ckpt_folder, monkeypatch):
    for forced, dtype in (("0", torch.float32), ("1", torch.bfloat16)):
        monkeypatch.setenv(inference.CPU_BF16_VARIABLE, forced)
        model, _ = inference.load_model(ckpt_folder, "cpu", "auto")
        assert next(model.parameters()).dtype == dtype


def test_no_config_or_script_default_hard_codes_bf16():
    """The run dtypes of the configs, chat.py, rag.py and the benchmarks: auto (bench_eval compares dtypes on purpose;
    eval.py keeps float32 for figures equal to a reference)."""
    files = glob.glob(os.path.join(ROOT, "config", "*.py")) + [os.path.join(ROOT, f) for f in ("chat.py", "rag.py")]
    files += [f for f in glob.glob(os.path.join(ROOT, "bench*.py")) if not f.endswith("bench_eval.py")]
    found = {}
    for path in files:
        for node in ast.parse(open(path).read()).body:
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
                for target in node.targets:
                    if isinstance(target, ast.Name) and target.id in ("dtype", "decode_dtype"):
                        found[f"{os.path.basename(path)}: {target.id}"] = node.value.value
    assert len(found) >= 12 and {k: v for k, v in found.items() if v == "bfloat16"} == {}


def test_the_trainer_says_which_dtype_and_why(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(inference.CPU_BF16_VARIABLE, "0")
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=32, dim=16, n_layers=1, n_heads=2, max_seq_len=8))
    data = torch.randint(0, 32, (4, 9))

    def batch(step, micro=0):
        return data[:, :-1], data[:, 1:]
    trainer = Trainer(dict(out_dir=str(tmp_path), max_iters=1, batch_size=4, eval_interval=1, eval_iters=1,
                           warmup_iters=0, device="cpu"), model, batch, batch)
    assert trainer.dtype == "float32"
    trainer.fit()
    assert "dtype=float32 (auto: TINYLLM_CPU_BF16=0)" in capsys.readouterr().out


def test_eval_takes_auto_and_its_first_line_says_which_and_why(ckpt_folder, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("the cat sat on the mat.\n" * 8)
    r = subprocess.run([sys.executable, "eval.py", f"--ckpt={ckpt_folder}", "--task=ppl", f"--data={text}",
                        "--dtype=auto", "--device=cpu"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "OMP_NUM_THREADS": "1", inference.CPU_BF16_VARIABLE: "0"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == "dtype=float32 (auto: TINYLLM_CPU_BF16=0)"


def test_rag_says_which_dtype_and_why_on_stderr(ckpt_folder, monkeypatch, capsys):
    import rag
    monkeypatch.setenv(inference.CPU_BF16_VARIABLE, "1")
    monkeypatch.setattr(rag, "ckpt", ckpt_folder)
    monkeypatch.setattr(rag.Index, "open", classmethod(lambda cls, folder, tok=None: "index"))
    assert rag.dtype == "auto"
    model, _, index = rag._load("unused")
    assert next(model.parameters()).dtype == torch.bfloat16 and index == "index"
    assert "dtype=bfloat16 (auto: TINYLLM_CPU_BF16=1)" in capsys.readouterr().err


@pytest.mark.parametrize("script", ["pretrain.py", "fine_tuning.py", "dpo.py"])
def test_each_trainer_says_the_dtype_before_anything_else(script, tmp_path):
    """The first line of a training script, before the data or the model is read (here the data is missing)."""
    r = subprocess.run([sys.executable, script, f"--data_dir={tmp_path}/none", f"--out_dir={tmp_path}/out",
                        "--init_from=scratch" if script == "pretrain.py" else f"--init_from={tmp_path}/model",
                        "--device=cpu"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "OMP_NUM_THREADS": "1", inference.CPU_BF16_VARIABLE: "0"})
    assert r.stdout.splitlines()[0] == "dtype=float32 (auto: TINYLLM_CPU_BF16=0)", r.stdout + r.stderr


def test_device_auto_is_the_trainers_choice(monkeypatch):
    monkeypatch.setenv(inference.CPU_BF16_VARIABLE, "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert inference.resolve_dtype("auto", "auto") == ("float32", "auto: TINYLLM_CPU_BF16=0")
