"""A longer context: RoPE scaling applied to a trained model (checkpoint.extend_context, the scripts'
rope_scaling/extend_to), LongLoRA's shifted sparse attention (model.shifted_sparse_attention, s2_attn_groups), and
eval.py's perplexity-per-length and passkey tasks."""
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import checkpoint
import configurator
import convert
import eval as evaluate
import passkey
from conftest import ROOT, char_tokenizer_folder, run_script, tiny_transformer
from model import ModelConfig, Transformer, rope_cos_sin, shifted_sparse_attention
from test_pretrain import make_data_dir

transformers = pytest.importorskip("transformers")


def max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


# ----------------------------------------------------------------------------- RoPE scaling

@pytest.mark.parametrize("kind", ["linear", "dynamic", "yarn"])
def test_scaling_factor_1_is_plain_rope(kind):
    """Plain RoPE (RoFormer): position p turns feature pair i by p * theta^(-2i/d); a factor of 1 changes nothing
    (dynamic NTK's base still grows past max_seq_len at factor 1, in transformers too: it is checked within)."""
    c = ModelConfig(dim=64, n_heads=4, max_seq_len=32, rope_scaling={"rope_type": kind, "factor": 1.0})
    pos = torch.arange(32 if kind == "dynamic" else 100)
    angle = pos[:, None].double() * 10000.0 ** (-torch.arange(0, 16, 2).double() / 16)
    cos, sin = rope_cos_sin(c, pos)
    assert max_diff(cos, torch.cat([angle.cos()] * 2, -1)) < 1e-5
    assert max_diff(sin, torch.cat([-angle.sin(), angle.sin()], -1)) < 1e-5


@pytest.mark.parametrize("kind", ["linear", "dynamic", "yarn"])
def test_extended_model_round_trips_through_save_load_and_transformers(tmp_path, kind):
    model = tiny_transformer(100, max_seq_len=32)
    checkpoint.extend_context(model, kind, 128)
    c = model.config
    if kind == "dynamic":  # transformers' max_position_embeddings is where dynamic NTK starts to grow
        assert c.max_seq_len == 32 and c.rope_scaling == {"rope_type": "dynamic", "factor": 4.0}
    else:
        assert c.max_seq_len == 128 and c.rope_scaling["factor"] == 4.0
    if kind == "yarn":
        assert c.rope_scaling["original_max_position_embeddings"] == 32
    convert.save_pretrained(model, tmp_path)
    saved = json.load(open(tmp_path / "config.json"))
    assert saved["rope_scaling"] == c.rope_scaling and saved["max_position_embeddings"] == c.max_seq_len
    back = convert.from_pretrained(tmp_path)
    assert back.config == c
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    idx = torch.randint(0, 100, (2, 120))  # well past the 32 tokens the model was "trained" at
    with torch.no_grad():
        logits = model(idx)[0]
        assert max_diff(back(idx)[0], logits) <= 1e-5
        assert max_diff(hf(idx).logits, logits) <= 1e-4
        unscaled = tiny_transformer(100, max_seq_len=32)(idx)[0]
        assert max_diff(unscaled, logits) > 1e-2  # the scaling did change something


def test_extending_restates_the_scaling_instead_of_stacking_it():
    model = tiny_transformer(100, max_seq_len=32)
    first = dict(checkpoint.extend_context(model, "yarn", 128))
    assert checkpoint.extend_context(model, "yarn", 128) == first and model.config.max_seq_len == 128
    assert checkpoint.extend_context(model, "linear", 64) == {"rope_type": "linear", "factor": 2.0}
    assert checkpoint.original_context(model.config) == 32
    assert checkpoint.extend_context(model, "", 0) == {"rope_type": "linear", "factor": 2.0}  # nothing asked
    for kind, length, message in [("yarn", 32, "must exceed"), ("ntk", 64, "expected one of"), ("yarn", 0, "extend_to")]:
        with pytest.raises(SystemExit, match=message):
            checkpoint.extend_context(model, kind, length)


# ----------------------------------------------------------------------------- S²-Attn

def group_mask(T, n, groups, shifted):
    """LongLoRA's attention pattern written out as a (T, T) mask of a length-n (padded) sequence: query i sees key
    j <= i in its own group; shifted groups start half a group later, the first half-group on its own."""
    size = n // groups
    g = (torch.arange(T) + (size // 2 if shifted else 0)) // size
    return (g[:, None] == g[None, :]) & torch.ones(T, T, dtype=torch.bool).tril()


def s2_reference(q, k, v, groups):
    """Dense attention under group_mask: heads H//2 on shifted (LongLoRA's split of the heads)."""
    B, H, T, d = q.shape
    k, v = k.repeat_interleave(H // k.shape[1], 1), v.repeat_interleave(H // v.shape[1], 1)
    n = T + (-T % (2 * groups))
    mask = torch.stack([group_mask(T, n, groups, h >= H // 2) for h in range(H)])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def longlora_roll(q, k, v, groups):
    """LongLoRA's own S²-Attn (llama_attn_replace.py, forward_noflashattn): roll half the heads by -size/2, causal
    attention per group, roll back. Its wrapped first half-group sees the last one; the rest is the reference."""
    B, H, T, d = q.shape
    size = T // groups

    def shift(x):
        x = torch.cat((x[:, :H // 2], x[:, H // 2:].roll(-size // 2, dims=2)), 1)
        return x.transpose(1, 2).reshape(B * groups, size, H, d).transpose(1, 2)
    y = F.scaled_dot_product_attention(shift(q), shift(k), shift(v), is_causal=True)
    y = y.transpose(1, 2).reshape(B, T, H, d)
    y[:, :, H // 2:] = y[:, :, H // 2:].roll(size // 2, dims=1)
    return y.transpose(1, 2)


def qkv(T, H=4, H_kv=4, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, H, T, d, generator=g), torch.randn(2, H_kv, T, d, generator=g),
            torch.randn(2, H_kv, T, d, generator=g))


def test_s2_attn_one_group_is_causal_attention():
    q, k, v = qkv(24)
    assert max_diff(shifted_sparse_attention(q, k, v, 1), F.scaled_dot_product_attention(q, k, v, is_causal=True)) \
        < 1e-6
    assert max_diff(group_mask(24, 24, 1, False).float(), torch.ones(24, 24).tril()) == 0


def test_s2_attn_undoes_the_shift_exactly_as_longlora():
    q, k, v = qkv(32)
    ours, theirs = shifted_sparse_attention(q, k, v, 4), longlora_roll(q, k, v, 4)
    # everything but the shifted heads' first half-group (4 tokens), where LongLoRA's roll wraps around
    assert max_diff(ours[:, :2], theirs[:, :2]) < 1e-5
    assert max_diff(ours[:, 2:, 4:], theirs[:, 2:, 4:]) < 1e-5
    assert max_diff(ours[:, 2:, :4], theirs[:, 2:, :4]) > 1e-3  # theirs: the first tokens saw the last ones
    assert max_diff(ours, s2_reference(q, k, v, 4)) < 1e-5


@pytest.mark.parametrize("T,H,H_kv", [(32, 4, 2), (30, 5, 5), (7, 4, 1), (50, 2, 1)])
def test_s2_attn_pads_a_length_the_groups_do_not_divide(T, H, H_kv):
    """A length that 2 * groups does not divide is padded at the end (odd head counts and GQA too)."""
    q, k, v = qkv(T, H, H_kv)
    ours = shifted_sparse_attention(q, k, v, 4)
    assert ours.shape == q.shape
    assert max_diff(ours, s2_reference(q, k, v, 4)) < 1e-5


def test_s2_attn_never_attends_to_a_later_token():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64))
    model.s2_groups = 4
    model.train()
    idx = torch.randint(0, 50, (1, 64))
    with torch.no_grad():
        base = model(idx)[0]
        for j in (1, 5, 8, 30, 60):  # 1 and 5 lie in the first half-group, which LongLoRA's roll lets see the end
            changed = idx.clone()
            changed[0, j:] = (changed[0, j:] + 1) % 50
            out = model(changed)[0]
            assert max_diff(out[:, :j], base[:, :j]) == 0
            assert max_diff(out[:, j], base[:, j]) > 0


def test_s2_attn_trains_only_and_its_loss_at_one_group_is_the_plain_loss():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, max_seq_len=64)).train()
    idx, targets = torch.randint(0, 50, (2, 64)), torch.randint(0, 50, (2, 64))
    plain = model(idx, targets)[1]
    model.s2_groups = 1  # one group: the whole sequence, nothing to shift
    assert model(idx, targets)[1].item() == pytest.approx(plain.item(), abs=1e-6)
    model.s2_groups = 4
    s2 = model(idx, targets)[1]
    assert abs(s2.item() - plain.item()) > 1e-4
    s2.backward()  # trains: gradients reach every weight
    assert all(p.grad is not None for p in model.parameters())
    model.eval()  # evaluation attends in full
    assert model(idx, targets)[1].item() == pytest.approx(plain.item(), abs=1e-6)
    model.train()
    with pytest.raises(ValueError, match="packed rows"):
        model(idx, targets, doc_ids=torch.zeros(2, 64, dtype=torch.long))


# ----------------------------------------------------------------------------- the scripts

def test_pretrain_extends_a_model_then_trains_s2_attn_with_lora(tmp_path):
    data = make_data_dir(str(tmp_path / "data"))
    base, yarn, lora = (str(tmp_path / n) for n in ("base", "yarn", "lora"))
    common = ["config/tiny.py", f"--data_dir={data}", "--max_iters=10", "--eval_interval=10", "--eval_iters=1"]
    run_script("pretrain.py", common + [f"--out_dir={base}", "--block_size=32"])
    run_script("pretrain.py", common + [f"--out_dir={yarn}", f"--init_from={base}/hf", "--rope_scaling=yarn",
                                        "--extend_to=128", "--block_size=128"])
    saved = json.load(open(os.path.join(yarn, "hf", "config.json")))
    assert saved["max_position_embeddings"] == 128
    assert saved["rope_scaling"] == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
    # resumed (the model rebuilt from base/hf, extended, the checkpoint loaded): the same scaling, not stacked
    r = run_script("pretrain.py", common + [f"--out_dir={yarn}", "--init_from=resume", "--max_iters=12",
                                            "--rope_scaling=yarn", "--extend_to=128", "--block_size=128"])
    assert json.load(open(os.path.join(yarn, "hf", "config.json")))["rope_scaling"] == saved["rope_scaling"]
    assert "step 12/12" in r.stdout or "step 12" in r.stdout
    r = run_script("pretrain.py", common + [f"--out_dir={lora}", f"--init_from={base}/hf", "--rope_scaling=yarn",
                                            "--extend_to=128", "--block_size=128", "--s2_attn_groups=4",
                                            "--method=lora", "--trainable=embed,norm,attn_norm,mlp_norm"])
    assert os.path.isfile(os.path.join(lora, "adapter", "adapter_model.safetensors"))
    assert json.load(open(os.path.join(lora, "hf", "config.json")))["rope_scaling"] == saved["rope_scaling"]
    losses = [float(x) for x in re.findall(r"\| loss ([\d.]+)", r.stdout)]
    assert losses and all(math.isfinite(x) for x in losses)


def test_fine_tuning_extends_the_model_and_trains_with_s2_attn(tmp_path):
    from conftest import tiny_model_with_data
    from test_finetune import records
    model, data = tiny_model_with_data(tmp_path, records(), "sft", max_seq_len=64)
    out = str(tmp_path / "out")
    run_script("fine_tuning.py", [f"--init_from={model}", f"--data_dir={data}", f"--out_dir={out}", "--method=lora",
                                  "--rope_scaling=linear", "--extend_to=128", "--s2_attn_groups=4", "--max_iters=4",
                                  "--sample_prompts=0", "--merge_dtype=float32"])
    saved = json.load(open(os.path.join(out, "hf", "config.json")))
    assert saved["rope_scaling"] == {"rope_type": "linear", "factor": 2.0} and saved["max_position_embeddings"] == 128


def run_failing(script, args):
    r = subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode != 0
    return r.stdout + r.stderr


def test_settings_that_cannot_work_stop_at_start(tmp_path):
    data = make_data_dir(str(tmp_path / "data"))
    model = str(tmp_path / "model")
    char_tokenizer_folder(model)
    convert.save_pretrained(tiny_transformer(128, max_seq_len=64), model)
    common = ["config/tiny.py", f"--data_dir={data}", f"--out_dir={tmp_path}/out"]
    for args, message in [(["--rope_scaling=yarn"], "set both"), (["--s2_attn_groups=-1"], "must not be negative"),
                          (["--method=lora"], "LoRA adapts a trained model"),
                          ([f"--init_from={model}", "--block_size=128"], "--rope_scaling=yarn --extend_to=N"),
                          ([f"--init_from={model}", "--rope_scaling=yarn", "--extend_to=32"], "must exceed")]:
        assert message in run_failing("pretrain.py", common + args), args
    assert "set both" in run_failing("fine_tuning.py", [f"--init_from={model}", "--extend_to=128"])
    assert "packing" in run_failing("fine_tuning.py", [f"--init_from={model}", "--s2_attn_groups=4", "--packing=True"])


# ----------------------------------------------------------------------------- evaluation

class KeyReader:
    """A stand-in model that answers the passkey question right (when `right`): generate() finds the key."""

    def __init__(self, tok, right=True):
        self.tok, self.right = tok, right

    def generate(self, prompts, max_new_tokens, temperature):
        rows = []
        for p in prompts:
            key = re.search(r"pass key is (\d+)", self.tok.decode(p)).group(1)
            answer = self.tok.encode(f" {key if self.right else int(key) + 1}. ")[:max_new_tokens]
            rows.append(p + answer + [0] * (max_new_tokens - len(answer)))
        width = max(map(len, rows))
        return torch.tensor([[0] * (width - len(r)) + r for r in rows])


def test_passkey_prompts_fit_their_length_and_place_the_key_at_its_depth(tmp_path):
    tok = char_tokenizer_folder(str(tmp_path / "tok"))
    for depth in (0.0, 0.5, 1.0):
        ids = passkey.prompt(tok, 31415, 1000, depth)
        text = tok.decode(ids)
        assert 1000 - 90 < len(ids) <= 1000  # one filler sentence (~90 characters) of slack at most
        info = "The pass key is 31415. Remember it. 31415 is the pass key."
        start, end = len(passkey.INTRO) + 1, len(text) - len(passkey.QUESTION) - 1 - len(info)
        where = (text.index(info) - start) / (end - start)  # the fraction of the filler before the key
        assert abs(where - depth) < 0.1 and text.endswith("What is the pass key? The pass key is")
    with pytest.raises(SystemExit, match="too short"):
        passkey.prompt(tok, 1, 100, 0.5)
    right = passkey.run(KeyReader(tok), tok, [400, 800], [0, 1], 3, 2, seed=0)
    assert right == {"400": {"acc@0": 1.0, "acc@1": 1.0, "acc_mean": 1.0},
                     "800": {"acc@0": 1.0, "acc@1": 1.0, "acc_mean": 1.0}}
    wrong = passkey.run(KeyReader(tok, right=False), tok, [400], [0.5], 3, 2, seed=0)
    assert wrong["400"]["acc_mean"] == 0.0


def test_passkey_lengths_beyond_memory_are_refused_with_the_figure(monkeypatch, ckpt_folder):
    model = tiny_transformer(100, max_seq_len=64)
    monkeypatch.setattr(passkey, "free_memory", lambda device: 2**30, raising=False)
    passkey.check_memory(model, [300, 2000], 16)  # 16 x 2016^2 x 6 bytes of masks: 0.4 GiB, fits
    with pytest.raises(SystemExit) as e:
        passkey.check_memory(model, [300, 8000], 16)
    msg = str(e.value)
    assert msg.startswith("--lengths=8000: a passkey batch of 16 prompt(s) of 8,000 tokens needs about 6.0 GiB on cpu")
    fit = re.search(r"lengths up to ([\d,]+) fit at --batch_size=16, 8,000 at --batch_size=1", msg)[1]
    fit = int(fit.replace(",", ""))
    need = [sum(passkey.memory(model, 16, n).values()) for n in (fit, fit + 1)]
    assert need[0] <= 0.9 * 2**30 < need[1] and 2900 < fit < 3100  # the masks grow with rows x length^2
    for key in configurator.config_keys(vars(evaluate)):  # main() sets them: put back after the test
        monkeypatch.setattr(evaluate, key, getattr(evaluate, key))
    monkeypatch.setattr(passkey, "run", lambda *args: pytest.fail("generating before the memory check"))
    monkeypatch.setattr(sys, "argv", ["eval.py", "--task=passkey", f"--ckpt={ckpt_folder}", "--lengths=300,8000",
                                      "--trials=20", "--batch_size=16"])
    with pytest.raises(SystemExit, match="--lengths=8000: a passkey batch of 16 prompt"):
        evaluate.main()


PEAK_PROBE = r"""import re
from conftest import tiny_transformer
import passkey

def vm(field):
    return int(re.search(field + r":\s+(\d+) kB", open("/proc/self/status").read())[1]) * 1024

model = tiny_transformer(100)
open("/proc/self/clear_refs", "w").write("5")  # the peak RSS (VmHWM) starts again from here
base = vm("VmRSS")
model.generate([[5] * 3000, [5] * 2999], max_new_tokens=4, temperature=0)
print(vm("VmHWM") - base, sum(passkey.memory(model, 2, 3000).values()))
"""


def test_passkey_memory_estimate_is_near_the_measured_peak():
    """The estimate against the peak RSS of a real generate() (2 rows of 3,000 tokens), in a fresh process."""
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs Linux's /proc/self/clear_refs to measure a peak")
    r = subprocess.run([sys.executable, "-c", PEAK_PROBE], cwd=os.path.join(ROOT, "tests"), capture_output=True,
                       text=True, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT})
    assert r.returncode == 0, r.stderr[-2000:]
    measured, estimated = map(int, r.stdout.split())
    assert 0.8 * measured < estimated < 1.5 * measured, (measured, estimated)


def run_eval(args):
    r = subprocess.run([sys.executable, "eval.py", *args], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return r.stdout


def test_eval_ppl_at_several_lengths_and_passkey_on_an_extended_checkpoint(ckpt_folder, tmp_path):
    import data
    import inference
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40 + "\n")
    out = tmp_path / "ppl.json"
    stdout = run_eval(["--task=ppl", f"--ckpt={ckpt_folder}", f"--data={text}", "--lengths=64,256",
                       "--rope_scaling=yarn", "--extend_to=256", f"--out={out}"])
    rows = json.load(open(out))["results"]
    assert list(rows) == ["64", "256"] and re.search(r"^256 +\d+ ", stdout, re.M)
    model, tok = inference.load_model(ckpt_folder)
    checkpoint.extend_context(model, "yarn", 256)
    tokens = data.token_stream(str(text), tok)
    for length in (64, 256):
        assert rows[str(length)]["ppl"] == pytest.approx(inference.perplexity(model, tokens, length)["ppl"], rel=1e-5)
    out = tmp_path / "passkey.json"
    run_eval(["--task=passkey", f"--ckpt={ckpt_folder}", "--lengths=300,", "--depths=0,1", "--trials=2",
              f"--out={out}"])
    assert set(json.load(open(out))["results"]["300"]) == {"acc@0", "acc@1", "acc_mean"}
