"""Weight-only quantised layers and checkpoints: int8 per channel, int4 (and 3/2-bit) group-wise codes, the layers
that run them (QuantLinear, QuantEmbedding), round-to-nearest quantisation of a whole model, and the quantised
checkpoint folder. GPTQ (gptq.py) makes codes in the same format; quant_model.py is the command line.

Only the nn.Linear layers change (plus, if asked, the embedding and lm_head): each becomes a QuantLinear that
keeps integer codes and per-group scales, and runs torch's weight-only int8/int4 matmul kernels where the platform
has them (the gpt-fast recipe), or dequantises to a float weight otherwise. A quantised checkpoint is a folder:
config.json with a "quantization_config", model.safetensors with the codes, and the tokenizer; load_quantized()
reads it back, and generation and evaluation use the model as they would a float one.

Number format (shared by int4 RTN and GPTQ, so both run on one kernel): a group of `group_size` consecutive input
weights of one output row is stored as codes c in [0, 2^bits) with w = (c - 2^(bits-1)) * scale + zero, scale and
zero in bf16; when group_size does not divide the input dimension the last group is short. The zero is a float
(asymmetric, as gpt-fast) and is rounded to bf16 *before* the codes are chosen, and the scale is then rounded *up*,
so the grid still covers [min, max] of the group: every weight is within half a step of its code. int8 is
per-output-channel symmetric: w = c * scale, c in [-127, 127].
"""
import json
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

import convert
from model import Transformer, swap_modules

KERNEL_TILE = 8  # code value the int4 kernels subtract: w = (c - 8) * scale + zero
KERNEL_GROUP_SIZES = (32, 64, 128, 256)  # the group sizes torch's int4 kernels take; others dequantise


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
        if g not in KERNEL_GROUP_SIZES:
            return None
        if dev == "cpu" and hasattr(torch, "_weight_int4pack_mm_for_cpu"):
            return ("int4cpu", torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1), sz, Kp)
        if dev == "cuda" and x.dtype == torch.bfloat16 and self.out_features % 8 == 0:
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
MODES = ("int8", "int4", "gptq")


def check_settings(mode, bits, group_size):
    """The bits a mode stores (int8: 8), or a ValueError naming the setting that cannot work."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: expected one of {', '.join(MODES)}")
    if mode == "int8":
        return 8
    if mode == "int4" and bits != 4:
        raise ValueError(f"bits={bits}: int4 mode stores 4 bits; round-to-nearest below 4 bits is not offered "
                         "(use mode=gptq)")
    if mode == "gptq" and bits not in (2, 3, 4):
        raise ValueError(f"bits={bits}: gptq stores 4, 3 or 2 bits")
    if not isinstance(group_size, int) or group_size < 2:
        raise ValueError(f"group_size={group_size!r}: expected a whole number >= 2 (torch's int4 kernels take "
                         f"{', '.join(map(str, KERNEL_GROUP_SIZES))})")
    return bits


def quantize_embedding(model, bits, group_size, lm_head):
    """Round-to-nearest codes for the embedding table (it has no input Hessian for GPTQ). Returns whether lm_head
    now shares the quantised table: when it was tied to the embedding and is to be quantised too."""
    emb = model.embed
    shared = lm_head and model.lm_head.weight is emb.weight
    table = QuantLinear.from_weight(emb.weight, None, bits, group_size)
    swap_modules(model, {"embed": QuantEmbedding(table, emb.weight.dtype)})
    if shared:
        swap_modules(model, {"lm_head": table})
    return shared


def quantization_config(model, mode, bits, group_size, act_order, lm_head, embed):
    """What config.json's "quantization_config" records about a model quantised in place."""
    return {"quant_method": "tinyllm", "mode": mode, "bits": bits, "group_size": None if bits == 8 else group_size,
            "act_order": act_order if mode == "gptq" else None, "lm_head": lm_head, "embed": embed,
            "modules": sorted(n for n, m in model.named_modules(remove_duplicate=False)
                              if isinstance(m, (QuantLinear, QuantEmbedding)) and not n.endswith(".table"))}


def quantize_model(model, mode, bits=4, group_size=128, lm_head=False, embed=False):
    """Round-to-nearest quantisation in place (mode: int8 | int4) of the blocks' linear layers, and of lm_head and
    the embedding if asked (a tied pair quantised together shares one table); returns the quantization_config.
    GPTQ, which needs calibration data, is gptq.quantize_model."""
    if mode == "gptq":
        raise ValueError("mode=gptq needs calibration tokens: use gptq.quantize_model")
    bits = check_settings(mode, bits, group_size)
    shared = quantize_embedding(model, bits, group_size, lm_head) if embed else False
    targets = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)
               and (n.startswith("layers.") or n == "lm_head" and lm_head and not shared)}
    swap_modules(model, {n: QuantLinear.from_weight(m.weight, m.bias, bits, group_size) for n, m in targets.items()})
    return quantization_config(model, mode, bits, group_size, None, lm_head, embed)


# ---------------------------------------------------------------------------------------------- checkpoints
def save_quantized(model, out_dir, quant_config, tok=None):
    """config.json (the model's, with "quantization_config") + model.safetensors (+ the tokenizer)."""
    from safetensors.torch import save_file
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"{out_dir}: is a file, not a folder for the quantised checkpoint")
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


def read_quantization_config(folder):
    """The "quantization_config" of a checkpoint folder's config.json: None for a float checkpoint (or a path that
    is not a folder with a config.json), a ValueError naming the file when it is unreadable or was quantised by
    another tool (only the folders save_quantized writes can be loaded)."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            q = json.load(f).get("quantization_config")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise ValueError(f"{path}: not a JSON object ({e}); the file is truncated or damaged")
    if q is not None and (not isinstance(q, dict) or q.get("quant_method") != "tinyllm"):
        method = q.get("quant_method") if isinstance(q, dict) else q
        raise ValueError(f"{path}: quantization method {method!r} is not supported (only the folders "
                         "quant_model.py writes); use the unquantised checkpoint")
    return q


def load_quantized(path, device=None):
    """The model save_quantized wrote into `path` (a folder), with its quantised layers, in eval mode."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    config_path, weights_path = os.path.join(path, "config.json"), os.path.join(path, "model.safetensors")
    q = read_quantization_config(path)
    if q is None:
        raise ValueError(f"{config_path}: no tinyllm quantization_config (not a quantised checkpoint, or missing)")
    absent = [k for k in ("bits", "group_size", "modules") if k not in q]
    if absent:
        raise ValueError(f"{config_path}: quantization_config lacks {', '.join(absent)}")
    with open(config_path, encoding="utf-8") as f:
        hf = json.load(f)
    with torch.device("meta"):  # float layers that get replaced are never allocated
        model = Transformer(convert.config_from_hf(hf, where=config_path)[0])
    try:  # fresh (aligned) storage: tensors loaded from safetensors may view into one buffer at arbitrary offsets
        state = {k: v.clone() for k, v in load_file(weights_path).items()}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{weights_path}: cannot be read ({e}); the file is missing, truncated or damaged")
    if "norm.weight" not in state:
        raise ValueError(f"{weights_path}: no norm.weight; not the weights of {config_path}")
    float_dtype = state["norm.weight"].dtype  # the dtype the float layers were saved in
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
        raise ValueError(f"{weights_path} does not match its config.json: {wrong[:3]}")
    _, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if model.config.tie_embeddings and "lm_head" not in new and "embed" not in new:
        model.lm_head.weight = model.embed.weight
    missing = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if missing or unexpected:
        raise ValueError(f"{weights_path} does not match its config.json: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    return model.to(device or "cpu").eval()


