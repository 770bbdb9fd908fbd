"""One decoder-only transformer for the LLaMA and Phi families.

LLaMA: pre-norm RMSNorm blocks, rotary embeddings, grouped-query attention, SwiGLU MLP, no biases.
Phi:   one LayerNorm per block feeding attention and MLP in parallel, partial rotary, GELU-tanh MLP, biases
       everywhere, a final LayerNorm and an untied lm_head with a bias.
Both are the same Transformer with different ModelConfig switches. The numerics follow transformers'
modeling_llama / modeling_phi (tests/test_model.py holds us to them); checkpoint formats live in convert.py.

Training: forward(idx, targets) takes next-token targets (-100 = no loss); doc_ids packs several samples into one
row (positions restart per sample, no attention across samples). resize_embeddings() makes room for added tokens.
Transformer.s2_groups > 1 trains with LongLoRA's shifted sparse attention (shifted_sparse_attention); evaluation
and generation (eval mode) always attend in full.

Inference: setup_cache() preallocates a static KV cache; generate() runs one prefill, then one-token decode steps
(decode_step compiles with torch.compile(fullgraph=True)). Left-padded batches carry their pad lengths in the cache.
A forward may also give each row its own cache slots (input_pos (B, T)) and touch only some rows (cache_rows):
engine.py's continuous batching, where each cache row is a request at its own position.
On CPU, eager generate() runs inside cpu_decoding(), which lays the weights out for chains of matrix-vector products.
"""
import contextlib
import functools
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")


@dataclass
class ModelConfig:
    vocab_size: int = 32000
    dim: int = 288
    n_layers: int = 6
    n_heads: int = 6
    n_kv_heads: int | None = None  # None: n_heads (MHA); 1: MQA; in between: GQA
    head_dim: int | None = None  # None: dim // n_heads
    hidden_dim: int | None = None  # None: SwiGLU: 2/3 of 4*dim rounded up to multiple_of; GELU: 4*dim
    multiple_of: int = 32
    max_seq_len: int = 256  # training context; also the "original context" dynamic rope scaling grows from
    norm: str = "rmsnorm"  # "rmsnorm" (LLaMA) or "layernorm" (Phi)
    norm_eps: float = 1e-5
    mlp: str = "swiglu"  # "swiglu" (LLaMA) or "gelu" (Phi: fc1 -> GELU-tanh -> fc2)
    parallel_block: bool = False  # Phi: x + attn(norm(x)) + mlp(norm(x)) with one shared norm
    attn_bias: bool = False  # biases on q/k/v/o (Phi: True)
    mlp_bias: bool = False  # biases on the MLP projections (Phi: True)
    lm_head_bias: bool = False  # Phi: True
    tie_embeddings: bool = True
    dropout: float = 0.0
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 1.0  # fraction of each head that is rotated (Phi-2: 0.4)
    rope_scaling: dict | None = None  # transformers' dict: {"rope_type": "linear"|"dynamic"|"yarn"|"llama3", ...}
    bos_id: int | None = None  # recorded for config.json; the tokenizer is the authority
    eos_id: int | None = None

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ValueError(f"ModelConfig: dim={self.dim} does not divide into n_heads={self.n_heads}")
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"ModelConfig: n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.norm not in ("rmsnorm", "layernorm"):
            raise ValueError(f"ModelConfig.norm={self.norm!r}: expected 'rmsnorm' or 'layernorm'")
        if self.mlp not in ("swiglu", "gelu"):
            raise ValueError(f"ModelConfig.mlp={self.mlp!r}: expected 'swiglu' or 'gelu'")
        if self.hidden_dim is None:
            if self.mlp == "gelu":
                self.hidden_dim = 4 * self.dim
            else:
                hidden = int(2 * 4 * self.dim / 3)
                self.hidden_dim = self.multiple_of * math.ceil(hidden / self.multiple_of)
        if self.rotary_dim % 2 or self.rotary_dim <= 0:
            raise ValueError(f"ModelConfig: head_dim={self.head_dim} * partial_rotary_factor="
                             f"{self.partial_rotary_factor} must give a positive even number of rotated features")
        if self.rope_scaling is not None:
            s = dict(self.rope_scaling)
            kind = s.pop("rope_type", s.pop("type", "default"))
            if kind not in ROPE_TYPES:
                raise ValueError(f"ModelConfig.rope_scaling: rope_type {kind!r} is not one of {ROPE_TYPES}")
            need = {"linear": ["factor"], "dynamic": ["factor"], "yarn": ["factor"],
                    "llama3": ["factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"]}
            missing = [k for k in need.get(kind, []) if k not in s]
            if missing:
                raise ValueError(f"ModelConfig.rope_scaling: {kind} scaling needs {missing}")
            self.rope_scaling = {"rope_type": kind, **s}  # one spelling ("type" is transformers 4.x's)

    @property
    def rotary_dim(self):
        return int(self.head_dim * self.partial_rotary_factor)


# ----------------------------------------------------------------------------- rotary embeddings

def rope_frequencies(config, seq_len=None, device=None):
    """Inverse frequencies (rotary_dim/2,) and the cos/sin multiplier, as transformers' ROPE_INIT_FUNCTIONS.
    seq_len (a tensor: the largest position + 1) only matters for dynamic NTK scaling, whose base grows once the
    sequence passes max_seq_len (recomputed every step, like transformers, so no host sync in a compiled step)."""
    dim, base = config.rotary_dim, config.rope_theta
    s = config.rope_scaling or {"rope_type": "default"}
    kind = s["rope_type"]
    exponents = torch.arange(0, dim, 2, device=device, dtype=torch.float) / dim
    if kind == "dynamic" and seq_len is not None:
        seq_len = torch.clamp(seq_len.float(), min=config.max_seq_len)
        base = base * ((s["factor"] * seq_len / config.max_seq_len) - (s["factor"] - 1)) ** (dim / (dim - 2))
    inv_freq = 1.0 / base ** exponents
    scale = 1.0
    if kind == "linear":
        inv_freq = inv_freq / s["factor"]  # position interpolation: positions squeezed by factor
    elif kind == "llama3":
        # Llama 3.1: long wavelengths interpolated by factor, short ones kept, a smooth ramp in between
        old_len = s["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / s["low_freq_factor"], old_len / s["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / s["factor"], inv_freq)
        smooth = (old_len / wavelen - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
        smoothed = (1 - smooth) * scaled / s["factor"] + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = torch.where(medium, smoothed, scaled)
    elif kind == "yarn":
        inv_freq, scale = _yarn(config, s, exponents)
    return inv_freq, scale


def _yarn(config, s, exponents):
    """YaRN (arXiv:2309.00071): interpolate low frequencies, extrapolate high ones, scale attention by mscale."""
    dim, base = config.rotary_dim, config.rope_theta
    orig = s.get("original_max_position_embeddings", config.max_seq_len)
    factor = s["factor"] if s["factor"] is not None else config.max_seq_len / orig

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attn_factor = s.get("attention_factor")
    if attn_factor is None:
        if s.get("mscale") and s.get("mscale_all_dim"):
            attn_factor = mscale(factor, s["mscale"]) / mscale(factor, s["mscale_all_dim"])
        else:
            attn_factor = mscale(factor)
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def correction_dim(rotations):  # the rotary feature that turns `rotations` times over the original context
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float, device=exponents.device) - low) / (high - low), 0, 1)
    extrapolate = 1 - ramp
    pos_freqs = base ** exponents
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
    return inv_freq, attn_factor


def rope_cos_sin(config, positions):
    """cos and a signed sin, shape positions.shape + (rotary_dim,), fp32, in the rotate-half layout transformers
    uses: the sin half that multiplies -x2 is stored negated, so apply_rope needs only a roll instead of a cat."""
    dynamic = config.rope_scaling is not None and config.rope_scaling["rope_type"] == "dynamic"
    inv_freq, scale = rope_frequencies(config, positions.max() + 1 if dynamic else None, positions.device)
    freqs = positions[..., None].float() * inv_freq
    return torch.cat((freqs, freqs), dim=-1).cos() * scale, torch.cat((-freqs, freqs), dim=-1).sin() * scale


def apply_rope(x, cos, sin):
    """x: (B, H, T, head_dim); cos/sin: (B or 1, 1, T, rotary_dim) from rope_cos_sin. Rotates the first rotary_dim
    features (all for LLaMA, Phi's partial_rotary_factor of them) in fp32: x*cos + rotate_half(x)*sin, where
    rotate_half(x) = cat(-x2, x1) = roll(x, d/2) with the sign folded into sin."""
    rd = cos.shape[-1]
    x_rot = x[..., :rd].float()
    out = (x_rot * cos + x_rot.roll(rd // 2, dims=-1) * sin).type_as(x)
    return out if rd == x.shape[-1] else torch.cat((out, x[..., rd:]), dim=-1)


# ----------------------------------------------------------------------------- layers

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.doubled_weight = None  # cat(weight, weight) while cpu_decoding() holds the model

    def forward(self, x):
        if self.doubled_weight is not None and not torch.is_grad_enabled():
            # PyTorch's CPU rms_norm is ~8 separate ops and its layer_norm one kernel; LayerNorm of [x, -x] (mean 0,
            # variance mean(x²)) is RMSNorm, up to a rare last bit, and ~0.7 ms less of a ~28 ms SmolLM2 decode step
            d = x.shape[-1]
            return F.layer_norm(torch.cat((x, -x), -1), (2 * d,), self.doubled_weight, None, self.eps)[..., :d]
        # F.rms_norm normalises low-precision inputs in fp32, as LLaMA does: bf16 mean-of-squares loses too many bits
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


def make_norm(config):
    if config.norm == "rmsnorm":
        return RMSNorm(config.dim, config.norm_eps)
    return nn.LayerNorm(config.dim, eps=config.norm_eps)


class KVCache(nn.Module):
    """Preallocated keys/values (B, n_kv_heads, max_len, head_dim), written in place at the slots input_pos."""

    def __init__(self, batch_size, max_len, n_kv_heads, head_dim, dtype, device):
        super().__init__()
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos, k, v, rows=None):
        """Write k/v (b, n_kv_heads, T, head_dim) at slots input_pos: (T,) the same for every row, or (b, T) one set
        per row of the cache rows `rows` (a slice of b rows; None: all). Returns those rows' keys and values."""
        # k/v come in the matmul dtype, which need not be the cache's (QLoRA's NF4 layers compute in bf16)
        k, v = k.to(self.k.dtype), v.to(self.v.dtype)
        if input_pos.dim() == 1:
            self.k.index_copy_(2, input_pos, k)
            self.v.index_copy_(2, input_pos, v)
            return self.k, self.v
        cache_k, cache_v = (self.k, self.v) if rows is None else (self.k[rows], self.v[rows])  # views
        row = torch.arange(k.shape[0], device=k.device)[:, None]
        cache_k[row, :, input_pos] = k.transpose(1, 2)  # indexed (b, T, heads, head_dim)
        cache_v[row, :, input_pos] = v.transpose(1, 2)
        return cache_k, cache_v


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        bias = config.attn_bias
        self.q_proj = nn.Linear(config.dim, config.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.dim, config.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.dim, config.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(config.n_heads * self.head_dim, config.dim, bias=bias)
        self.dropout = config.dropout
        self.kv_cache = None  # a KVCache while generating (Transformer.setup_cache)
        self.qkv = None  # (weight, bias, oneDNN layout) of q/k/v as one layer while cpu_decoding() packs them
        self.rotate = apply_rope  # model_kernels.use_kernels may put a fused kernel here
        self.s2_groups = 0  # > 1: S²-Attn in training mode (set through Transformer.s2_groups)

    def forward(self, x, cos, sin, mask=None, input_pos=None, cache_rows=None):
        B, T, _ = x.shape
        if self.qkv is not None and not torch.is_grad_enabled():  # one product, one rotation for q and k together
            qkv = decode_linear(x, *self.qkv).view(B, T, -1, self.head_dim).transpose(1, 2)
            qk = self.rotate(qkv[:, :self.n_heads + self.n_kv_heads], cos, sin)
            q, k, v = qk[:, :self.n_heads], qk[:, self.n_heads:], qkv[:, self.n_heads + self.n_kv_heads:]
        else:
            q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
            k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
            v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
            q, k = self.rotate(q, cos, sin), self.rotate(k, cos, sin)
        dtype = q.dtype
        if input_pos is not None:
            k, v = self.kv_cache.update(input_pos, k, v, cache_rows)
            filled = mask.shape[-1] if mask is not None else int(input_pos[-1]) + 1  # no mask: see hidden_states
            k, v = k[:, :, :filled], v[:, :, :filled]  # the mask may end at the last filled slot
            q = q.to(k.dtype)  # a CPU cache is fp32 (setup_cache)
        # PyTorch's CPU flash-attention backward is slower in bf16 than in fp32 at short sequences (ms, bf16 vs
        # fp32: T=64 14 vs 4, T=1024 38 vs 45; bench_pretrain.py --attention), so short CPU training windows attend
        # in fp32 (autocast would undo the cast, hence its own off switch); S²-Attn attends over its groups' lengths
        s2 = self.s2_groups > 1 and self.training and input_pos is None
        span = math.ceil(T / self.s2_groups) if s2 else T
        fp32 = self.training and q.device.type == "cpu" and dtype == torch.bfloat16 and span <= 256
        with torch.autocast("cpu", enabled=False) if fp32 else contextlib.nullcontext():
            if fp32:
                q, k, v = q.float(), k.float(), v.float()
            if s2:
                if mask is not None:
                    raise ValueError("S²-Attn (s2_groups > 1) does not combine with packed rows (doc_ids): its groups "
                                     "would cut across samples")
                y = shifted_sparse_attention(q, k, v, self.s2_groups, self.dropout)
            else:
                causal = mask is None and input_pos is None  # a cached step without a mask sees every slot it has
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                                   dropout_p=self.dropout if self.training else 0.0,
                                                   enable_gqa=self.n_kv_heads != self.n_heads)
        return self.o_proj(y.to(dtype).transpose(1, 2).reshape(B, T, -1))


def shifted_sparse_attention(q, k, v, groups, dropout_p=0.0):
    """LongLoRA's S²-Attn (arXiv:2309.12307), for training long sequences: causal attention within `groups` equal
    groups of the sequence; the second half of the heads (heads n_heads // 2 on, as LongLoRA) uses groups shifted by
    half a group, so information flows between neighbouring groups. q: (B, H, T, d); k, v: (B, H_kv, T, d).
    A length that 2 * groups does not divide is padded at the end: padding comes after every real token, so causal
    attention never lets a real token see it, and it is cut off again. With one group this is causal attention.
    LongLoRA rolls the shifted heads by half a group, which puts the first half-group after the last one in the same
    group, where it sees the future; here the two end half-groups attend only within themselves instead."""
    B, H, T, _ = q.shape
    if groups <= 1:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p,
                                              enable_gqa=k.shape[1] != H)
    if k.shape[1] != H:  # grouped-query attention: each kv head serves H / H_kv consecutive query heads
        k, v = k.repeat_interleave(H // k.shape[1], 1), v.repeat_interleave(H // v.shape[1], 1)
    pad = -T % (2 * groups)
    if pad:
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
    n = T + pad
    size, half = n // groups, n // groups // 2

    def causal_in_groups(q, k, v, size):  # (b, h, L, d) -> attention within consecutive groups of `size` tokens
        b, h, L, d = q.shape

        def grouped(x):
            return x.reshape(b, h, L // size, size, d).transpose(1, 2).reshape(-1, h, size, d)
        y = F.scaled_dot_product_attention(grouped(q), grouped(k), grouped(v), is_causal=True, dropout_p=dropout_p)
        return y.reshape(b, L // size, h, size, d).transpose(1, 2).reshape(b, h, L, d)

    h = H // 2
    parts = [causal_in_groups(q[:, :h], k[:, :h], v[:, :h], size)] if h else []
    qs, ks, vs = q[:, h:], k[:, h:], v[:, h:]
    middle = causal_in_groups(qs[:, :, half:n - half], ks[:, :, half:n - half], vs[:, :, half:n - half], size)
    ends = causal_in_groups(*(torch.cat((x[:, :, :half], x[:, :, n - half:]), 2) for x in (qs, ks, vs)), half)
    parts.append(torch.cat((ends[:, :, :half], middle, ends[:, :, half:]), 2))
    return torch.cat(parts, 1)[:, :, :T]


class SwiGLU(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.dim, config.hidden_dim, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.dim, config.hidden_dim, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.hidden_dim, config.dim, bias=config.mlp_bias)
        self.gate_up = None  # (weight, bias, oneDNN layout) of gate and up as one layer while cpu_decoding() packs them

    def forward(self, x):
        if self.gate_up is not None and not torch.is_grad_enabled():
            gate, up = decode_linear(x, *self.gate_up).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


class GeluMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.fc1 = nn.Linear(config.dim, config.hidden_dim, bias=config.mlp_bias)
        self.fc2 = nn.Linear(config.hidden_dim, config.dim, bias=config.mlp_bias)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))  # Phi's "gelu_new"


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.attn_norm = make_norm(config)
        self.attn = Attention(config)
        self.mlp_norm = None if config.parallel_block else make_norm(config)
        self.mlp = SwiGLU(config) if config.mlp == "swiglu" else GeluMLP(config)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    def forward(self, x, cos, sin, mask=None, input_pos=None, cache_rows=None):
        h = self.attn_norm(x)
        if self.mlp_norm is None:  # Phi: attention and MLP read the same normalised input
            return x + self.dropout(self.attn(h, cos, sin, mask, input_pos, cache_rows)) + self.dropout(self.mlp(h))
        x = x + self.dropout(self.attn(h, cos, sin, mask, input_pos, cache_rows))
        return x + self.dropout(self.mlp(self.mlp_norm(x)))


# ----------------------------------------------------------------------------- the model

class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = make_norm(config)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=config.lm_head_bias)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.gradient_checkpointing = False  # the trainer switches this on to trade compute for memory
        # (hidden, lm_head, targets) -> per-token loss without all (tokens x vocab) logits at once: model_kernels.py's
        # chunked or fused linear + cross-entropy, which the trainer sets; None computes the logits whole
        self.linear_cross_entropy = None
        self.register_buffer("cache_pad", None, persistent=False)  # (B,) left-pad lengths while generating
        self._compiled_decode = None
        self.apply(self._init_weights)
        # GPT-2's scaled init: each residual projection adds to the stream 2*n_layers times
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight", "fc2.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layers))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @property
    def s2_groups(self):
        """> 1: training-mode attention is S²-Attn with this many groups per sequence (LongLoRA: 4); 0: full."""
        return self.layers[0].attn.s2_groups

    @s2_groups.setter
    def s2_groups(self, groups):
        for layer in self.layers:
            layer.attn.s2_groups = groups

    # ------------------------------------------------------------------ forward

    def forward(self, idx, targets=None, input_pos=None, doc_ids=None, reduction="mean", cache_rows=None):
        """idx: (B, T) token ids. targets: (B, T) next-token ids, -100 where no loss is taken.
        input_pos: cache slots of idx when decoding with the KV cache (setup_cache), else None: (T,) the same for
        every row, or (B, T) each row its own (engine.py's slots); cache_rows: the slice of cache rows that idx's B
        rows are, with (B, T) input_pos (None: all of them).
        doc_ids: (B, T) ids of packed samples (see hidden_states), else None.
        Returns (logits (B, T, vocab), mean cross-entropy over the unmasked targets in fp32, or None). A batch without
        any target gives a loss of 0 with zero gradients, not NaN (the mean of nothing). reduction="none" returns
        each target's negative log-likelihood instead, (B, T) fp32, 0 where it is -100 (DPO sums these per answer).
        With a linear_cross_entropy set and targets given, the logits are None: they were never held whole."""
        h = self.hidden_states(idx, input_pos, doc_ids, cache_rows)
        if targets is None:
            return self.lm_head(h), None
        if self.linear_cross_entropy is not None:
            logits, nll = None, self.linear_cross_entropy(h, self.lm_head, targets)
        else:
            logits = self.lm_head(h)
            nll = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100,
                                  reduction="none").view(targets.shape)
        if reduction == "none":
            return logits, nll
        return logits, nll.sum() / (targets != -100).sum().clamp(min=1)

    def hidden_states(self, idx, input_pos=None, doc_ids=None, cache_rows=None):
        """The final-normed hidden states (B, T, dim). doc_ids (B, T): several samples packed into one row; each run
        of equal ids is a sample whose positions restart at 0 and which attends only to itself (padding after the
        last sample is just one more run)."""
        B, T = idx.shape
        if doc_ids is not None:
            if input_pos is not None:
                raise ValueError("forward: doc_ids (packed training rows) and input_pos (KV-cache decoding) exclude "
                                 "each other")
            mask, positions = packed_mask(doc_ids)
            cos, sin = rope_cos_sin(self.config, positions)
            cos, sin = cos[:, None], sin[:, None]
        elif input_pos is None:  # training / scoring: plain causal attention over idx, positions 0..T-1
            cos, sin = rope_cos_sin(self.config, torch.arange(T, device=idx.device))
            cos, sin, mask = cos[None, None], sin[None, None], None
        else:
            if self.cache_pad is None:
                raise RuntimeError("forward(input_pos=...) needs the KV cache: call setup_cache() first")
            mask, positions = self._cache_mask(input_pos, cache_rows)
            if input_pos.device.type == "cpu" and not torch.compiler.is_compiling():
                # eager CPU decoding attends to the filled slots only: the cache's empty tail costs as much as its
                # filled part (a compiled step keeps one static shape; on CUDA the length would be a host sync)
                mask = mask[..., :int(input_pos.max()) + 1]
                if T == 1 and input_pos.dim() == 1 and not self.cache_pad.any():
                    mask = None  # one query that sees every filled slot: ~0.4 ms less of a SmolLM2 step unmasked
            if mask is not None:  # additive, in the cache's dtype: attention would convert a boolean one in every layer
                dtype = self.layers[0].attn.kv_cache.k.dtype
                mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
            cos, sin = rope_cos_sin(self.config, positions)
            cos, sin = cos[:, None], sin[:, None]
        x = self.dropout(self.embed(idx))
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, input_pos, cache_rows)
        return self.norm(x)

    def _cache_mask(self, input_pos, cache_rows=None):
        """Attention mask (B, 1, T, max_len), True = visible, and rotary positions (B, T) for queries at cache slots
        input_pos ((T,) or (B, T)) of the cache rows cache_rows. Row b's first cache_pad[b] slots hold left padding:
        nobody attends to them, and its positions count from its first real token (as transformers' position_ids =
        attention_mask.cumsum(-1) - 1)."""
        max_len = self.layers[0].attn.kv_cache.k.shape[2]
        q_slot = input_pos.view(-1, input_pos.shape[-1], 1)
        k_slot = torch.arange(max_len, device=input_pos.device).view(1, 1, -1)
        pad = (self.cache_pad if cache_rows is None else self.cache_pad[cache_rows]).view(-1, 1, 1)
        # a padding query sees only itself: a fully masked row would put NaNs into the cache
        mask = (k_slot <= q_slot) & ((k_slot >= pad) | (k_slot == q_slot))
        positions = (q_slot - pad).clamp(min=0)[..., 0]
        return mask[:, None], positions

    # ------------------------------------------------------------------ inference

    def setup_cache(self, batch_size, max_len, pad_lens=None):
        """Preallocate the KV cache for batch_size rows of up to max_len tokens (reused when it already fits).
        pad_lens: (B,) number of left-padding tokens per row, or None for none."""
        p = self.embed.weight
        # PyTorch's CPU attention is slow in bf16 for one query: 4-8x the fp32 time at 64-1024 cached tokens, which
        # made it a tenth of a bf16 decode step; a CPU cache in fp32 (twice the bytes) skips it and any casting
        dtype = torch.float32 if p.device.type == "cpu" else p.dtype
        cache = self.layers[0].attn.kv_cache
        if cache is None or cache.k.shape[0] != batch_size or cache.k.shape[2] < max_len \
                or cache.k.dtype != dtype or cache.k.device != p.device:
            # plain tensors even when called under inference_mode, so forward(input_pos=...) may write them outside it
            with torch.inference_mode(False):
                for layer in self.layers:
                    layer.attn.kv_cache = KVCache(batch_size, max_len, self.config.n_kv_heads, self.config.head_dim,
                                                  dtype, p.device)
                self.cache_pad = torch.zeros(batch_size, dtype=torch.long, device=p.device)
        # copy in place: a compiled decode step keeps reading the same buffer
        self.cache_pad.copy_(torch.zeros(batch_size, dtype=torch.long) if pad_lens is None else torch.as_tensor(pad_lens))

    def decode_step(self, idx, input_pos):
        """One token per row: idx (B, 1) at cache slot input_pos (1,) -> next-token logits (B, vocab) in fp32.
        Static shapes and no host syncs, so torch.compile(fullgraph=True) takes it whole."""
        logits, _ = self(idx, input_pos=input_pos)
        return logits[:, -1].float()

    # inference_mode skips autograd's version counters and view tracking, ~8% of a bf16 CPU decode step that is
    # mostly per-op overhead
    @torch.inference_mode()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, repetition_penalty=1.0,
                 no_repeat_ngram_size=0, stop_ids=None, callback=None, attention_mask=None, pad_id=None,
                 compile=False, generator=None):
        """Continue idx by up to max_new_tokens tokens.
        idx: (B, T) long tensor (left-padded when rows differ, with attention_mask (B, T): 1 = token, 0 = padding),
        or a list of token-id lists, which are left-padded here. temperature=0 is greedy; otherwise sampling from
        softmax(logits / temperature) restricted to top_k / top_p. repetition_penalty > 1 discourages tokens already
        in the row (CTRL); no_repeat_ngram_size=n bans repeating any n-gram. A row stops after emitting one of
        stop_ids; finished rows are filled with pad_id (default: the first stop id, else 0).
        callback(list_of_B_new_ids) is called after every step (streaming); returning True stops generation.
        compile=True runs the decode step through torch.compile (CUDA graphs on GPU). Positions past
        config.max_seq_len are not refused here (dynamic/YaRN scaling exist for them); callers that must stay
        inside the trained context cap max_new_tokens (inference.stream_reply does).
        Returns (B, T + n_generated) ids: the prompt (as given) followed by the new tokens."""
        stop_ids = list(stop_ids or [])
        pad_id = pad_id if pad_id is not None else (stop_ids[0] if stop_ids else 0)
        device = self.embed.weight.device
        if not torch.is_tensor(idx):
            rows = [list(r) for r in idx]
            T = max(len(r) for r in rows)
            idx = torch.tensor([[pad_id] * (T - len(r)) + r for r in rows], dtype=torch.long)
            attention_mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
        idx = idx.to(device)
        B, T = idx.shape
        if T == 0:
            raise ValueError("generate: empty prompt")
        if attention_mask is None:
            pad_lens = torch.zeros(B, dtype=torch.long, device=device)
        else:
            attention_mask = attention_mask.to(device).bool()
            pad_lens = (~attention_mask).sum(1)
            left_padded = torch.arange(T, device=device)[None] >= pad_lens[:, None]
            if not torch.equal(left_padded, attention_mask) or (pad_lens == T).any():
                raise ValueError("generate: attention_mask must be left padding (0s then 1s) with >= 1 token per row")
        self.setup_cache(B, T + max_new_tokens, pad_lens)
        if compile and self._compiled_decode is None:
            mode = "reduce-overhead" if device.type == "cuda" else None
            self._compiled_decode = torch.compile(self.decode_step, fullgraph=True, mode=mode)
        step_fn = self._compiled_decode if compile else self.decode_step

        real = [idx[b, pad_lens[b]:].tolist() for b in range(B)] if no_repeat_ngram_size else None
        seen = None
        if repetition_penalty != 1.0:
            seen = torch.zeros(B, self.config.vocab_size, dtype=torch.bool, device=device)
            # padding is not a repetition: pad slots repeat the row's last (real) token instead
            seen.scatter_(1, idx if attention_mask is None else torch.where(attention_mask, idx, idx[:, -1:]), True)
        stop = torch.tensor(stop_ids, dtype=torch.long, device=device)
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        out = [idx]
        slots = torch.arange(T + max_new_tokens, device=device)  # sliced per step: no host-to-device copy
        was_training, onednn = self.training, torch.backends.mkldnn.enabled
        self.eval()
        # eager only: compiling already removes the per-op overhead that the layout is for
        with cpu_decoding(self) if device.type == "cpu" and not compile else contextlib.nullcontext():
            try:
                # prefill: the whole prompt at slots 0..T-1, logits of the last position only
                h = self.hidden_states(idx, slots[:T])[:, -1]
                # CPU decoding in bf16/fp16 of one or two rows is a chain of matrix-vector products, for which oneDNN
                # repacks the weight on every call; ATen's own kernel streams it instead (~1.7x faster at batch 1; at
                # batch 4 and more oneDNN wins again: 66.7 vs 45.2 tok/s at 8). Prefill keeps oneDNN's fast GEMM
                # up to its last position's logits, which are one more matrix-vector product.
                if device.type == "cpu" and self.embed.weight.dtype != torch.float32 and B <= 2:
                    torch.backends.mkldnn.enabled = False
                logits = self.lm_head(h).float()
                for step in range(max_new_tokens):
                    banned = None if real is None else [_banned_ngram_tokens(r, no_repeat_ngram_size) for r in real]
                    logits = process_logits(logits, seen, repetition_penalty, banned)
                    nxt = sample(logits, temperature, top_k, top_p, generator)
                    nxt = torch.where(finished, torch.full_like(nxt, pad_id), nxt)
                    out.append(nxt[:, None])
                    if seen is not None:
                        seen.scatter_(1, nxt[:, None], True)
                    if real is not None:
                        for r, t in zip(real, nxt.tolist()):
                            r.append(t)
                    if stop.numel():
                        finished |= torch.isin(nxt, stop)
                    if callback is not None and callback(nxt.tolist()):
                        break
                    if step == max_new_tokens - 1 or (stop.numel() and bool(finished.all())):
                        break
                    logits = step_fn(nxt[:, None], slots[T + step:T + step + 1])
            finally:
                torch.backends.mkldnn.enabled = onednn
                self.train(was_training)
        with torch.inference_mode(False):  # a plain tensor: callers may train on the ids
            return torch.cat(out, dim=1)

    # ------------------------------------------------------------------ bookkeeping

    def num_params(self, exclude_embeddings=True):
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.embed.weight.numel()
        return n

    def flops_per_token(self, seq_len):
        """Training FLOPs per token (forward + backward): 6N for the matmuls plus attention's 12*L*H*d*T (PaLM)."""
        c = self.config
        n = self.num_params(exclude_embeddings=True)
        if c.tie_embeddings:
            n += self.embed.weight.numel()  # the lm_head matmul still runs
        return 6 * n + 12 * c.n_layers * c.n_heads * c.head_dim * seq_len


@contextlib.contextmanager
def cpu_decoding(model, onednn=False):
    """Lay the weights out for a CPU decode step, a chain of matrix-vector products and small ops that each cost more
    in calls than in arithmetic, for the duration (eager Transformer.generate on CPU):
    - q/k/v run as one matrix product, and gate/up as another (gpt-fast's fused projections). Their weights move into
      one buffer per group, each nn.Linear's weight a view of its rows, so this costs no memory and the checkpoint
      names (converters, LoRA targets, quantisers) stay; on exit each weight gets storage of its own again (packing
      and unpacking SmolLM2-135M take ~30 ms together). A group with a layer that is not a plain nn.Linear (LoRA,
      quantised, sharded) stays as it is.
    - each RMSNorm keeps its weight twice over, for the one-kernel LayerNorm form of RMSNorm (RMSNorm.forward).
    - onednn=True (engine.py, which decodes many rows at once): bf16 weights, where oneDNN runs bf16, also get a copy
      in oneDNN's own blocked layout (decode_linear): given a plain row-major weight, oneDNN re-lays it out on every
      call, which made a SmolLM2 decode step of 8 rows ~2.5x that of one row (with the copy ~1.4x; one row as fast
      as ATen's matrix-vector kernel, which generate uses). The copies cost the weights' memory again and ~0.4 s for
      SmolLM2, so they stay on the modules (onednn_layouts) and serve the next cpu_decoding while their parameters
      are the same tensors, unchanged in place (same storage and version counter).
    For inference only: the packed tensors are not parameters, so with gradients enabled the layers run as usual.
    A SmolLM2-135M bf16 step on one thread takes ~27.5 ms instead of ~30."""
    onednn = onednn and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()

    def onednn_layout(owner, name, weight, key):  # key: (data_ptr, version) of the parameters weight is made of
        if not onednn or weight.dtype != torch.bfloat16:
            return None
        layouts = owner.__dict__.setdefault("onednn_layouts", {})
        if name not in layouts or layouts[name][0] != key:
            layouts[name] = (key, torch.ops.mkldnn._reorder_linear_weight(weight))
        return layouts[name][1]

    def state(weights):
        return [(w.data_ptr(), w._version) for w in weights]

    groups = []
    for layer in model.layers:
        groups.append((layer.attn, "qkv", (layer.attn.q_proj, layer.attn.k_proj, layer.attn.v_proj)))
        if isinstance(layer.mlp, SwiGLU):
            groups.append((layer.mlp, "gate_up", (layer.mlp.gate_proj, layer.mlp.up_proj)))
    norms = [m for m in model.modules() if isinstance(m, RMSNorm) and type(m.weight.data) is torch.Tensor]
    packed, relaid = [], []
    try:
        # plain tensors even under the caller's inference_mode: the weights must stay trainable afterwards
        with torch.no_grad(), torch.inference_mode(False):
            for owner, name, linears in groups:
                if not all(type(lin) is nn.Linear and type(lin.weight.data) is torch.Tensor for lin in linears) or \
                        len({(lin.weight.dtype, lin.weight.device, lin.bias is None) for lin in linears}) > 1:
                    continue
                weights = [lin.weight for lin in linears]
                key = state(weights)
                weight = torch.cat(weights)
                for w, rows in zip(weights, weight.split([w.shape[0] for w in weights])):
                    w.data = rows
                bias = None if linears[0].bias is None else torch.cat([lin.bias for lin in linears])
                setattr(owner, name, (weight, bias, onednn_layout(owner, name, weight, key)))
                packed.append((owner, name, weights, key))
            fused = {id(lin) for _, _, linears in groups for lin in linears}
            for lin in model.modules():  # the others (o/down projections, lm_head): their forward, for the while
                if type(lin) is nn.Linear and id(lin) not in fused and type(lin.weight.data) is torch.Tensor:
                    layout = onednn_layout(lin, "weight", lin.weight, state([lin.weight]))
                    if layout is not None:
                        lin.forward = functools.partial(decode_linear, weight=lin.weight, bias=lin.bias, layout=layout)
                        relaid.append(lin)
            for norm in norms:
                norm.doubled_weight = torch.cat((norm.weight, norm.weight))
        yield
    finally:
        with torch.no_grad(), torch.inference_mode(False):
            for lin in relaid:
                del lin.forward
            for norm in norms:
                norm.doubled_weight = None
            for owner, name, weights, key in packed:
                setattr(owner, name, None)
                unchanged = [v for _, v in state(weights)] == [v for _, v in key]
                for w in weights:
                    w.data = w.data.clone()
                if onednn and unchanged and name in owner.__dict__.get("onednn_layouts", {}):  # checked at entry
                    owner.onednn_layouts[name] = (state(weights), owner.onednn_layouts[name][1])


def decode_linear(x, weight, bias=None, layout=None):
    """F.linear(x, weight, bias), run by oneDNN on `layout` (cpu_decoding's copy of weight in oneDNN's own layout)
    when there is one and no gradient is wanted: one kernel for any number of rows."""
    if layout is None or torch.is_grad_enabled():
        return F.linear(x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x, layout, bias, "none", [], "")


def packed_mask(doc_ids):
    """Attention mask (B, 1, T, T), True = visible, and rotary positions (B, T) of packed rows: a query sees the
    earlier tokens of its own run of equal doc_ids only, and positions count from the start of its run."""
    T = doc_ids.shape[1]
    step = torch.arange(T, device=doc_ids.device)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    run = starts.cumsum(1)  # runs, not ids: a repeated id further along the row is still another sample
    positions = step - torch.where(starts, step, 0).cummax(1).values
    mask = (run[:, :, None] == run[:, None, :]) & (step[:, None] >= step[None, :])
    return mask[:, None], positions


def resize_embeddings(model, vocab_size, multiple_of=64):
    """Grow the embeddings (and an untied lm_head) to hold vocab_size tokens, rounded up to a multiple of
    multiple_of (fast matmul shapes), for tokens added to the tokenizer. New rows start at the mean of the old ones
    (as transformers' mean_resizing), so added tokens begin as an average token, not noise. Never shrinks.
    Returns the new vocabulary size (config.vocab_size)."""
    old = model.config.vocab_size
    new = multiple_of * math.ceil(vocab_size / multiple_of)
    if new <= old:
        return old
    if not isinstance(model.lm_head, nn.Linear):
        raise ValueError(f"resize_embeddings: lm_head is a {type(model.lm_head).__name__}; resize before adding "
                         f"LoRA or quantising")

    def grown(param):
        with torch.no_grad():
            rows = param.mean(0, keepdim=True).expand(new - old, *param.shape[1:])
            return nn.Parameter(torch.cat([param, rows]), requires_grad=param.requires_grad)

    head = model.lm_head
    model.embed.weight = grown(model.embed.weight)
    model.embed.num_embeddings = new
    if model.config.tie_embeddings:
        head.weight = model.embed.weight
    else:
        head.weight = grown(head.weight)
    if head.bias is not None:
        head.bias = grown(head.bias)
    head.out_features = new
    model.config.vocab_size = new
    return new


def swap_modules(model, new_modules):
    """Replace the modules named in new_modules ({dotted name: module}) inside model (quantisation, LoRA)."""
    for name, new in new_modules.items():
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, new)


# ----------------------------------------------------------------------------- sampling (transformers' semantics)

def _banned_ngram_tokens(tokens, n):
    """Tokens that would complete an n-gram already present in tokens."""
    if n <= 0 or len(tokens) < n:
        return []
    prefix = tuple(tokens[len(tokens) - n + 1:])
    return [tokens[i + n - 1] for i in range(len(tokens) - n + 1) if tuple(tokens[i:i + n - 1]) == prefix]


def process_logits(logits, seen=None, repetition_penalty=1.0, banned=None):
    """Repetition penalty (CTRL: divide positive logits, multiply negative ones, for tokens in `seen` (B, V) bool)
    and no-repeat-ngram bans (banned: one list of token ids per row)."""
    if seen is not None and repetition_penalty != 1.0:
        penalised = torch.where(logits < 0, logits * repetition_penalty, logits / repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if banned is not None and any(banned):
        logits = logits.clone()
        for b, toks in enumerate(banned):
            logits[b, toks] = -float("inf")
    return logits


def warp_logits(logits, temperature=1.0, top_k=None, top_p=None):
    """Temperature, then keep the top_k logits, then the smallest set whose probability reaches top_p."""
    logits = logits / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum <= 1 - top_p
        drop[..., -1] = False  # always keep the most likely token
        logits = logits.masked_fill(drop.scatter(-1, order, drop), -float("inf"))
    return logits


def sample(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """Next token per row (B,) from logits (B, V): argmax when temperature == 0, else a draw."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = warp_logits(logits, temperature, top_k, top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
