"""Weight-only quantisation (int8, int4 round-to-nearest, GPTQ), quantised inference, and GGUF export.

    python quant_model.py --ckpt=out/sft --mode=int8 --out=out/sft-int8
    python quant_model.py --ckpt=out/sft --mode=int4 --group_size=128 --out=out/sft-int4
    python quant_model.py --ckpt=out/sft --mode=gptq --bits=4 --group_size=128 --calib=data/train.bin --out=out/sft-gptq
    python quant_model.py --ckpt=out/sft --mode=gguf --gguf_type=q8_0 --out=out/sft-gguf   # for llama.cpp / ollama
    python quant_model.py --ckpt=SmolLM2.gguf --report=True --calib=... --eval_text=...     # the comparison table

Only the nn.Linear layers change (plus, if asked, the embedding and lm_head): each becomes a QuantLinear that
keeps integer codes and per-group scales, and runs torch's weight-only int8/int4 matmul kernels where the platform
has them (the gpt-fast recipe), or dequantises to a float weight otherwise. A quantised checkpoint is a folder:
config.json with a "quantization_config", model.safetensors with the codes, and the tokenizer; load_quantized()
reads it back, and generation and eval.py use the model as they would a float one.

Number format (shared by int4 RTN and GPTQ, so both run on one kernel): a group of `group_size` consecutive input
weights of one output row is stored as codes c in [0, 2^bits) with w = (c - 2^(bits-1)) * scale + zero, scale and
zero in bf16. The zero is a float (asymmetric, as gpt-fast) and is rounded to bf16 *before* the codes are chosen,
and the scale is then rounded *up*, so the grid still covers [min, max] of the group: every weight is within half
a step of its code. int8 is per-output-channel symmetric: w = c * scale, c in [-127, 127].
"""
import json
import math
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import configurator
from model import Transformer, swap_modules

# ----------------------------------------------------------------------------------------------------------------
ckpt = ""                 # our/HF model folder or a .gguf file
mode = "int4"             # int8 | int4 (round-to-nearest) | gptq | gguf (export for llama.cpp)
bits = 4                  # gptq: 4 or 3 (3-bit codes are stored in 4-bit containers: torch has no 3-bit kernel)
group_size = 128          # int4/gptq: weights per scale along the input dimension (32, 64, 128, ...)
act_order = False         # gptq: quantise columns by decreasing Hessian diagonal (groups stay static)
damp = 0.01               # gptq: dampening, as a fraction of the mean Hessian diagonal
calib = ""                # gptq: a .bin token stream (data_process output) or text (.txt/.jsonl[.gz], file or folder)
calib_samples = 128       # gptq: calibration sequences ...
calib_seq_len = 512       # ... of this many tokens
quant_lm_head = False     # also quantise the output projection (a tied one shares the embedding's table if
                          # quant_embed, else it is untied first)
quant_embed = False       # also quantise the embedding table (round-to-nearest, dequantised per looked-up row)
gguf_type = "q8_0"        # gguf: f32 | f16 | q8_0 | q4_0
out = "out/quant"         # output folder
report = False            # True: bf16 vs int8 vs int4 vs gptq table (size, perplexity, decode tokens/s)
eval_text = "../shared/data/pretrain_en/wiki_demo"   # report: held-out text for perplexity
eval_tokens = 32768       # report: evaluate the first this many tokens of eval_text (0 = all)
eval_block_size = 512     # report: context per window ...
eval_stride = 512         # ... and step between windows
decode_tokens = 64        # report: tokens generated for the decode speed figure
device = "cpu"
threads = 0               # CPU threads for torch (0: its default); on a shared machine 1 avoids stalls at every op
seed = 1337
# ----------------------------------------------------------------------------------------------------------------

KERNEL_TILE = 8  # code value the int4 kernels subtract: w = (c - 8) * scale + zero


# ---------------------------------------------------------------------------------------------- number formats
def _bf16_ceil(x):
    """The smallest bf16 >= x, for x > 0: a scale rounded up keeps the grid covering the group's range."""
    b = x.to(torch.bfloat16)
    return torch.where(b.float() < x, (b.view(torch.int16) + 1).view(torch.bfloat16), b)


def int8_quantize(w):
    """Per-output-channel symmetric int8: (codes int8 (N, K), scale bf16 (N,)) with |w - c*scale| <= scale/2."""
    w = w.float()
    scale = _bf16_ceil(w.abs().amax(dim=1).clamp(min=1e-8) / 127)
    codes = torch.round(w / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return codes, scale


def group_params(w, bits, group_size):
    """Asymmetric per-group (scale, zero), each (N, ceil(K / group_size)) in bf16. The last group may be short."""
    N, K = w.shape
    G = math.ceil(K / group_size)
    # a short last group is padded with copies of its last weight, which change neither its min nor its max
    wg = F.pad(w.float()[None], (0, G * group_size - K), mode="replicate")[0].view(N, G, group_size)
    lo, hi = wg.amin(-1), wg.amax(-1)
    mid, maxq = 2 ** (bits - 1), 2 ** bits - 1
    zero = (lo + mid * (hi - lo) / maxq).to(torch.bfloat16)
    z = zero.float()
    # codes reach mid steps below the zero and mid-1 above it: make the step big enough for both ends
    step = torch.maximum((z - lo) / mid, (hi - z) / (mid - 1)).clamp(min=1e-8)
    return _bf16_ceil(step), zero


def _per_column(t, group_size, K):
    return t.float().repeat_interleave(group_size, dim=1)[:, :K]


def group_quantize(w, scale, zero, bits, group_size):
    """Codes in [0, 2^bits) of w (N, K) for per-group (scale, zero), each (N, ceil(K / group_size))."""
    s, z = _per_column(scale, group_size, w.shape[1]), _per_column(zero, group_size, w.shape[1])
    return (torch.round((w.float() - z) / s) + 2 ** (bits - 1)).clamp(0, 2 ** bits - 1).to(torch.uint8)


def group_dequantize(codes, scale, zero, bits, group_size):
    """Float32 weights (N, K) from codes (N, K) and per-group (scale, zero)."""
    K = codes.shape[1]
    return (codes.float() - 2 ** (bits - 1)) * _per_column(scale, group_size, K) + _per_column(zero, group_size, K)


def pack_int4(codes):
    """(N, K) codes in [0, 16) -> (N, K/2) uint8, even column in the high nibble (the CUDA kernel's input order)."""
    codes = codes.to(torch.uint8)
    return (codes[:, 0::2] << 4) | codes[:, 1::2]


def unpack_int4(packed):
    return torch.stack((packed >> 4, packed & 15), dim=-1).view(packed.shape[0], -1)


# ---------------------------------------------------------------------------------------------- quantised modules
class QuantLinear(nn.Module):
    """A weight-only quantised nn.Linear. bits == 8: per-channel int8; bits <= 4: group-wise codes in 4-bit containers.

    Buffers (what is saved): `weight` int8 (N, K) or `qweight` uint8 (N, K/2) packed codes, `scales` (and `zeros`)
    in bf16, optional float `bias`. Kernel layouts are made from them on first use on a device and not saved, so
    checkpoints stay portable between CPU and CUDA."""

    use_kernel = True  # class switch: False forces the dequantise path everywhere (tests compare the two)

    def __init__(self, in_features, out_features, bias, bits, group_size, dtype=torch.bfloat16):
        super().__init__()
        if bits != 8 and not 2 <= bits <= 4:
            raise ValueError(f"bits={bits}: supported are 8 (per-channel) and 2..4 (group-wise)")
        if bits != 8 and in_features % 2:
            raise ValueError(f"in_features={in_features}: int4 packing needs an even input dimension")
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.group_size = in_features if bits == 8 else group_size
        N, K = out_features, in_features
        if bits == 8:
            self.register_buffer("weight", torch.zeros(N, K, dtype=torch.int8))
            self.register_buffer("scales", torch.ones(N, dtype=torch.bfloat16))
        else:
            G = math.ceil(K / group_size)
            self.register_buffer("qweight", torch.zeros(N, K // 2, dtype=torch.uint8))
            self.register_buffer("scales", torch.ones(N, G, dtype=torch.bfloat16))
            self.register_buffer("zeros", torch.zeros(N, G, dtype=torch.bfloat16))
        self.register_buffer("bias", torch.zeros(N, dtype=dtype) if bias else None)
        self._kernel_cache = None  # (device, dtype, tensors) of the kernel layout

    @classmethod
    def from_codes(cls, codes, scales, zeros, bits, group_size, bias=None):
        """From int8_quantize's (codes, scales) with zeros None, or group codes in [0, 2^bits) with scales/zeros."""
        N, K = codes.shape
        m = cls(K, N, bias is not None, bits, group_size, dtype=bias.dtype if bias is not None else torch.bfloat16)
        if bits == 8:
            m.weight.copy_(codes)
        else:
            # shift b-bit codes into the 4-bit container so that the kernel's "- 8" is the format's "- 2^(b-1)"
            m.qweight.copy_(pack_int4(codes.to(torch.int16) + KERNEL_TILE - 2 ** (bits - 1)))
            m.zeros.copy_(zeros)
        m.scales.copy_(scales)
        if bias is not None:
            m.bias.copy_(bias.detach())
        return m.to(codes.device)

    @classmethod
    def from_weight(cls, w, bias, bits, group_size):
        """Round-to-nearest quantisation of a weight (N, K) (and its bias, kept in float)."""
        w = w.detach()
        if bits == 8:
            return cls.from_codes(*int8_quantize(w), None, 8, None, bias)
        scales, zeros = group_params(w, bits, group_size)
        return cls.from_codes(group_quantize(w, scales, zeros, bits, group_size), scales, zeros, bits, group_size,
                              bias)

    def dequantize(self):
        """The float32 weight (N, K) these codes stand for."""
        if self.bits == 8:
            return self.weight.float() * self.scales.float()[:, None]
        return group_dequantize(unpack_int4(self.qweight), self.scales, self.zeros, 4, self.group_size)

    def _kernel(self, x):
        """The kernel layout for x's device/dtype, or None where torch has no kernel for it."""
        if self._kernel_cache is None or self._kernel_cache[0] != (x.device, x.dtype):
            self._kernel_cache = ((x.device, x.dtype), self._make_kernel_layout(x))
        return self._kernel_cache[1]

    def _make_kernel_layout(self, x):
        dev = x.device.type
        if self.bits == 8:
            # CPU has a fused int8 kernel; elsewhere gpt-fast's x @ int8.to(dtype) * scale, which compilers fuse
            if dev == "cpu" and hasattr(torch, "_weight_int8pack_mm"):
                # the kernel's vector loads crash on a weight that is not 64-byte aligned (a tensor viewing into a
                # safetensors buffer can be anywhere): give it an aligned copy then
                w = self.weight if self.weight.data_ptr() % 64 == 0 else self.weight.clone()
                return ("int8pack", self.scales.to(x.dtype), w)
            return ("int8mul", self.scales.to(x.dtype))
        g, K = self.group_size, self.in_features
        Kp = math.ceil(K / g) * g  # the kernels want whole groups: pad the input dimension with zero-input columns
        codes = unpack_int4(self.qweight)
        if Kp > K:
            codes = F.pad(codes, (0, Kp - K), value=KERNEL_TILE)
        sz = torch.stack((self.scales, self.zeros), dim=-1).transpose(0, 1).contiguous().to(x.dtype)  # (G, N, 2)
        if dev == "cpu" and hasattr(torch, "_weight_int4pack_mm_for_cpu"):
            return ("int4cpu", torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1), sz, Kp)
        if dev == "cuda" and x.dtype == torch.bfloat16 and g in (32, 64, 128, 256) and self.out_features % 8 == 0:
            # tinygemm: K must be a multiple of innerKTiles * 16
            tiles = next((t for t in (8, 4, 2) if Kp % (t * 16) == 0), None)
            if tiles is not None and torch.cuda.get_device_capability(x.device) >= (8, 0):
                return ("int4cuda", torch._convert_weight_to_int4pack(pack_int4(codes), tiles), sz, Kp)
        return None

    def forward(self, x):
        layout = self._kernel(x) if QuantLinear.use_kernel else None
        if layout is None:
            return F.linear(x, self.dequantize().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        kind = layout[0]
        if kind == "int8pack":
            y = torch._weight_int8pack_mm(x2.contiguous(), layout[2], layout[1])
        elif kind == "int8mul":
            y = F.linear(x2, self.weight.to(x.dtype)) * layout[1]
        else:
            _, packed, sz, Kp = layout
            if Kp > shape[-1]:
                x2 = F.pad(x2, (0, Kp - shape[-1]))
            mm = torch._weight_int4pack_mm_for_cpu if kind == "int4cpu" else torch._weight_int4pack_mm
            y = mm(x2.contiguous(), packed, self.group_size, sz)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*shape[:-1], self.out_features)

    def extra_repr(self):
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group_size={self.group_size}"


class QuantEmbedding(nn.Module):
    """An embedding table in QuantLinear's format; a lookup dequantises only the rows it reads."""

    def __init__(self, table: QuantLinear, dtype=torch.bfloat16):
        super().__init__()
        self.table = table  # (vocab, dim) as a QuantLinear's weight; shared with a quantised tied lm_head
        # An empty stand-in for nn.Embedding.weight: model.py reads embed.weight.dtype/.device for the KV cache, and
        # .to(dtype) moves it like any float tensor, so it also names the dtype lookups return.
        self.register_buffer("weight", torch.empty(0, dtype=dtype), persistent=False)

    def forward(self, idx):
        t = self.table
        if t.bits == 8:
            return (t.weight[idx].float() * t.scales[idx].float()[..., None]).to(self.weight.dtype)
        rows = unpack_int4(t.qweight[idx].view(-1, t.in_features // 2))
        w = group_dequantize(rows, t.scales[idx].view(rows.shape[0], -1), t.zeros[idx].view(rows.shape[0], -1), 4,
                             t.group_size)
        return w.view(*idx.shape, -1).to(self.weight.dtype)


# ---------------------------------------------------------------------------------------------- whole models
def quantize_model(model, mode, bits=4, group_size=128, calib_tokens=None, act_order=False, damp_frac=0.01,
                   lm_head=False, embed=False, progress=True):
    """Quantise `model` in place (mode: int8 | int4 | gptq); returns its quantization_config (saved in config.json).
    The embedding, if asked, is round-to-nearest at the same bits (it has no input Hessian); a tied lm_head and
    embedding quantised together share one table."""
    if mode not in ("int8", "int4", "gptq"):
        raise ValueError(f"mode={mode!r}: expected int8, int4 or gptq")
    bits = 8 if mode == "int8" else bits
    if mode == "int4" and bits != 4:
        raise ValueError(f"int4 mode: bits={bits}; round-to-nearest below 4 bits is not offered (use gptq)")
    if mode == "gptq" and bits not in (2, 3, 4):
        raise ValueError(f"gptq: bits={bits}: expected 4, 3 or 2")
    if bits != 8 and group_size < 2:
        raise ValueError(f"group_size={group_size}: expected >= 2 (e.g. 32, 64, 128)")
    emb = model.embed
    shared = embed and lm_head and model.lm_head.weight is emb.weight  # tied: one quantised table serves both
    if embed:  # first, so that GPTQ calibrates on what the quantised model computes
        table = QuantLinear.from_weight(emb.weight, None, bits, group_size)
        swap_modules(model, {"embed": QuantEmbedding(table, emb.weight.dtype)})
        if shared:
            swap_modules(model, {"lm_head": table})
    if mode == "gptq":
        if calib_tokens is None:
            raise ValueError("gptq needs calibration tokens (--calib)")
        import gptq
        gptq.gptq_quantize_model(model, calib_tokens, bits, group_size, act_order, damp_frac,
                            lm_head=lm_head and not shared, progress=progress)
    else:
        targets = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)
                   and (n.startswith("layers.") or n == "lm_head" and lm_head and not shared)}
        swap_modules(model, {n: QuantLinear.from_weight(m.weight, m.bias, bits, group_size)
                              for n, m in targets.items()})
    return {"quant_method": "tinyllm", "mode": mode, "bits": bits, "group_size": None if bits == 8 else group_size,
            "act_order": act_order if mode == "gptq" else None, "lm_head": lm_head, "embed": embed,
            "modules": sorted(n for n, m in model.named_modules(remove_duplicate=False)
                              if isinstance(m, (QuantLinear, QuantEmbedding)) and not n.endswith(".table"))}


def calibration_tokens(path, tok, n_samples, seq_len, vocab_size, seed=0):
    """(n_samples, seq_len) windows at random offsets of a token stream: a .bin of data_process.py (or a folder
    holding train.bin), or text (see text_tokens) tokenised with `tok`."""
    import numpy as np
    bin_path = path if path.endswith(".bin") else os.path.join(path, "train.bin")
    if os.path.isfile(bin_path):
        meta_path = os.path.join(os.path.dirname(bin_path), "meta.json")
        meta = json.load(open(meta_path)) if os.path.isfile(meta_path) else {"dtype": "uint16"}
        if tok is not None and meta.get("tokenizer_sha256") not in (None, tok.checksum()):
            raise SystemExit(f"{meta_path}: tokenizer_sha256 differs from the model's tokenizer: this data was "
                             "tokenised with another tokenizer")
        stream = np.memmap(bin_path, dtype=meta["dtype"], mode="r")
        where = bin_path
    else:
        if tok is None:
            raise SystemExit(f"--calib={path}: text calibration needs the model's tokenizer, and the model has none")
        stream, where = text_tokens(path, tok, 2 * n_samples * seq_len).numpy(), path
    if len(stream) <= seq_len:
        raise SystemExit(f"{where}: {len(stream)} tokens, fewer than one calibration window of {seq_len}")
    if len(stream) < n_samples * seq_len:
        print(f"calibration: {where} has {len(stream)} tokens, windows of {n_samples} x {seq_len} overlap")
    starts = np.random.default_rng(seed).integers(0, len(stream) - seq_len, n_samples)
    windows = torch.from_numpy(np.stack([np.asarray(stream[s:s + seq_len], dtype=np.int64) for s in starts]))
    if int(windows.max()) >= vocab_size:
        raise SystemExit(f"{where}: token id {int(windows.max())} >= the model's vocab_size {vocab_size}")
    return windows


# ---------------------------------------------------------------------------------------------- checkpoints
def save_quantized(model, out_dir, quant_config, tok=None):
    """config.json (the model's, with "quantization_config") + model.safetensors (+ the tokenizer)."""
    import convert
    from safetensors.torch import save_file
    os.makedirs(out_dir, exist_ok=True)
    config = convert.hf_config(model.config, str(model.norm.weight.dtype).removeprefix("torch."))
    config["quantization_config"] = quant_config
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    state, seen = {}, set()
    for name, t in model.state_dict().items():  # a tied / shared tensor is stored once
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            state[name] = t.detach().cpu().contiguous()
    save_file(state, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt", "quant_method": "tinyllm"})
    if tok is not None:
        tok.save_pretrained(out_dir)


def load_quantized(path, device=None):
    """The model save_quantized wrote into `path` (a folder), with its quantised layers, in eval mode."""
    import convert
    from safetensors.torch import load_file
    config_path = os.path.join(path, "config.json")
    with open(config_path) as f:
        hf = json.load(f)
    q = hf.get("quantization_config")
    if not q or q.get("quant_method") != "tinyllm":
        raise ValueError(f"{config_path}: no tinyllm quantization_config; load it with Transformer.from_pretrained")
    with torch.device("meta"):  # float layers that get replaced are never allocated
        model = Transformer(convert.config_from_hf(hf, where=config_path)[0])
    # fresh (aligned) storage: tensors loaded from safetensors may view into one buffer at arbitrary offsets
    state = {k: v.clone() for k, v in load_file(os.path.join(path, "model.safetensors")).items()}
    float_dtype = state["norm.weight"].dtype
    new = {}
    for name in sorted(q["modules"]):
        old = model.get_submodule(name)
        if name == "embed":
            V, D = old.weight.shape
            new[name] = QuantEmbedding(QuantLinear(D, V, False, q["bits"], q["group_size"]), float_dtype)
        elif name == "lm_head" and "embed" in new and model.config.tie_embeddings:
            new[name] = new["embed"].table  # one table serves both
        else:
            new[name] = QuantLinear(old.in_features, old.out_features, old.bias is not None, q["bits"],
                                    q["group_size"])
    swap_modules(model, new)
    expected = model.state_dict()
    wrong = [f"{k} {tuple(v.shape)} {v.dtype} (expected {tuple(expected[k].shape)} {expected[k].dtype})"
             for k, v in state.items() if k in expected and (v.shape != expected[k].shape or
                                                             v.is_floating_point() != expected[k].is_floating_point())]
    if wrong:
        raise ValueError(f"{path}/model.safetensors does not match its config.json: {wrong[:3]}")
    _, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if model.config.tie_embeddings and "lm_head" not in new and "embed" not in new:
        model.lm_head.weight = model.embed.weight
    missing = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if missing or unexpected:
        raise ValueError(f"{path}/model.safetensors does not match its config.json: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    return model.to(device or "cpu").eval()


def folder_size(path):
    """Bytes of the weights in a checkpoint folder (not the tokenizer)."""
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))


# ---------------------------------------------------------------------------------------------- report
def text_tokens(path, tok, limit):
    """The first `limit` tokens (0: all) of the documents in `path` (files, folders, globs: data_process.py's
    readers; .txt: a document per line, .jsonl/.json: the "text" field, .gz allowed), EOS after each."""
    import data_process
    files, _ = data_process.expand_inputs(path)
    ids = []
    docs = data_process.iter_documents(files, data_process.config(), data_process.Issues(False), {})
    for batch in iter(lambda: [d for _, d in zip(range(64), docs)], []):
        for doc in tok.encode_batch(batch, eos=tok.eos_id is not None):
            ids.extend(doc)
        if limit and len(ids) >= limit:
            break
    return torch.tensor(ids[:limit] if limit else ids, dtype=torch.long)


def decode_tokens_per_second(model, prompt, n):
    """Steady-state greedy decode speed: tokens after the first over the time they took (prefill excluded)."""
    stamps = []
    model.generate(prompt, n, temperature=0, callback=lambda ids: stamps.append(time.perf_counter()) and False)
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def run_report():
    """bf16 vs int8 vs int4 RTN vs GPTQ: size on disk, perplexity on eval_text, decode tokens/s (a markdown table).
    Every quantised model is saved and loaded back before it is measured, so the table covers the round trip."""
    import copy
    import platform

    import eval as evaluation  # eval.py: the project's perplexity
    if not calib:
        raise SystemExit("--report=True needs --calib (GPTQ calibration text, not the evaluation text)")
    base, tok = evaluation.load_model(ckpt, device, torch.bfloat16)
    tokens = text_tokens(eval_text, tok, eval_tokens)
    calib_ids = calibration_tokens(calib, tok, calib_samples, calib_seq_len, base.config.vocab_size, seed)
    prompt = tokens[None, :32].to(device)
    variants = [("bf16", None), ("int8 (per-channel)", dict(mode="int8")),
                (f"int4 RTN g{group_size}", dict(mode="int4", bits=4, group_size=group_size)),
                (f"GPTQ int{bits} g{group_size}" + (" act-order" if act_order else ""),
                 dict(mode="gptq", bits=bits, group_size=group_size, calib_tokens=calib_ids, act_order=act_order,
                      damp_frac=damp))]
    rows, models = [], []
    for name, kwargs in variants:
        folder = os.path.join(out, name.split()[0].lower() if kwargs is None else
                              f"{kwargs['mode']}{'' if kwargs['mode'] == 'int8' else '-g' + str(group_size)}")
        t0 = time.time()
        if kwargs is None:
            base.save_pretrained(folder)
            model = base
        else:
            model = copy.deepcopy(base)
            qc = quantize_model(model, lm_head=quant_lm_head, embed=quant_embed, **kwargs)
            save_quantized(model, folder, qc, tok)
            model = load_quantized(folder, device)
        t_quant = time.time() - t0
        ppl = evaluation.perplexity(model, tokens.to(device), eval_block_size, eval_stride, 4)
        rows.append([name, folder_size(folder) / 2 ** 20, ppl["ppl"], 0.0, t_quant])
        models.append(model)
        print(f"{name}: {rows[-1][1]:.1f} MiB, ppl {ppl['ppl']:.3f} over {ppl['tokens']} tokens")
    # decode speed last, all models in turns, best of 3: on a shared machine, load changes over a long run
    models.append(copy.deepcopy(base).float())  # CPUs without AMX have no fast bf16 matrix-vector product: fp32 for reference
    speeds = [[] for _ in models]
    for _ in range(3):
        for m, sp in zip(models, speeds):
            decode_tokens_per_second(m, prompt, 4)  # warm-up (kernel layouts, caches)
            sp.append(decode_tokens_per_second(m, prompt, decode_tokens))
    for row, sp in zip(rows, speeds):
        row[3] = max(sp)
    base_ppl = rows[0][2]
    lines = [f"model: {ckpt} | eval: {eval_text} ({len(tokens)} tokens, block {eval_block_size}, stride "
             f"{eval_stride}) | calibration: {calib} ({calib_samples} x {calib_seq_len} tokens) | device: {device} "
             f"({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads), torch "
             f"{torch.__version__}", "",
             "| weights | size on disk (MiB) | perplexity | vs bf16 | decode tokens/s | quantise time (s) |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, size, ppl, tps, tq in rows:
        lines.append(f"| {name} | {size:.1f} | {ppl:.3f} | {100 * (ppl / base_ppl - 1):+.2f}% | {tps:.1f} | {tq:.0f} |")
    lines.append(f"\n(decode: greedy, {decode_tokens} tokens after a 32-token prompt, best of 3; fp32 weights: "
                 f"{max(speeds[-1]):.1f} tokens/s)")
    print("\n".join(lines))
    return rows


# ---------------------------------------------------------------------------------------------- command line
def main():
    configurator.apply(globals(), sys.argv[1:])
    if threads:
        torch.set_num_threads(threads)
    if not ckpt:
        raise SystemExit(__doc__)
    if mode not in ("int8", "int4", "gptq", "gguf"):
        raise SystemExit(f"--mode={mode}: expected int8, int4, gptq or gguf")
    torch.manual_seed(seed)
    if report:
        return run_report()
    from eval import load_model  # any checkpoint (folder, .gguf, quantised folder) with its tokenizer
    if mode == "gguf":
        from gguf_export import export_gguf
        model, tok = load_model(ckpt, "cpu", torch.float32)
        path = out if out.endswith(".gguf") else os.path.join(out, f"model-{gguf_type}.gguf")
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        export_gguf(model, tok, path, gguf_type, name=os.path.basename(os.path.normpath(ckpt)))
        print(f"wrote {path} ({os.path.getsize(path) / 2 ** 20:.1f} MiB)")
        return
    config_path = os.path.join(ckpt, "config.json")
    if os.path.isfile(config_path) and "quantization_config" in json.load(open(config_path)):
        raise SystemExit(f"{ckpt} is already quantised; quantise the float checkpoint")
    model, tok = load_model(ckpt, device, torch.bfloat16)
    calib_ids = None
    if mode == "gptq":
        if not calib:
            raise SystemExit("--mode=gptq needs --calib: a .bin token stream or text files")
        calib_ids = calibration_tokens(calib, tok, calib_samples, calib_seq_len, model.config.vocab_size, seed)
        print(f"calibration: {calib_ids.shape[0]} sequences x {calib_ids.shape[1]} tokens from {calib}")
    t0 = time.time()
    qc = quantize_model(model, mode, bits, group_size, calib_ids, act_order, damp, quant_lm_head, quant_embed)
    save_quantized(model, out, qc, tok)
    print(f"{mode} ({qc['bits']}-bit{'' if qc['bits'] == 8 else f', group {group_size}'}) in {time.time() - t0:.0f}s: "
          f"{len(qc['modules'])} modules; wrote {out} ({folder_size(out) / 2 ** 20:.1f} MiB)")


if __name__ == "__main__":
    # run as the module `quant_model`, not `__main__`: gptq.py and gguf_export.py import it, and a second copy of
    # this file would have its own QuantLinear class that isinstance checks here would not recognise
    import quant_model
    try:
        quant_model.main()
    except ValueError as e:  # bad input our own checks found (mode/bits/group size, a Phi model for GGUF, ...)
        raise SystemExit(f"quant_model.py: {e}")
