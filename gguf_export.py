"""Write one of our models as a GGUF file for llama.cpp / ollama (quant_model.py --mode=gguf): LLaMA-family models
as llama.cpp's "llama" architecture, Phi-family ones as its "phi2".

    python quant_model.py --ckpt=out/sft --mode=gguf --gguf_type=q8_0 --out=out/sft-gguf
    llama-cli -m out/sft-gguf/model-q8_0.gguf -cnv      # ollama: FROM ./model-q8_0.gguf in a Modelfile

The file holds the weights under llama.cpp's tensor names (f32, f16, q8_0 or q4_0, written with the `gguf`
package's GGUFWriter and numpy quantisers), the hyperparameters under llama.* keys, the tokenizer and the chat
template. Three llama.cpp conventions matter:
- RoPE: transformers (and model.py) rotate the two halves of each head (i, i + d/2); llama.cpp's LLaMA kernel rotates
  adjacent pairs (2i, 2i+1). llama.cpp's own converter therefore permutes the rows of q_proj/k_proj per head, and so
  do we (convert.py's unpermute_qk undoes it when reading). Its phi2 graph rotates halves ("neox" RoPE) of the first
  rope.dimension_count features, as model.py's partial rotary does: no permutation there.
- phi2 (llama.cpp's src/models/phi2.cpp) is one LayerNorm (with bias) feeding attention and a GELU MLP in parallel,
  GELU the tanh approximation (ggml_gelu), a final LayerNorm, an lm_head with a bias. Its loader requires the biases
  of attn_output, ffn_up, ffn_down and output and an output matrix of its own: a model without them gets zeros and a
  copy of the tied embedding, which computes the same. q, k and v must fill the width (n_heads * head_dim = dim).
- Tokenizer: our sentencepiece BPE becomes tokenizer.ggml.model "llama" (pieces, scores, piece types: llama.cpp's
  SPM tokenizer merges by score as sentencepiece BPE does); a byte-level BPE tokenizer.json (imported checkpoints)
  becomes "gpt2" with its merges and the pre-tokenizer name llama.cpp knows it by.
"""
import json
import os

import numpy as np
import torch

import convert
from quant import QuantEmbedding, QuantLinear
from tokenizer import CONTROL, NORMAL, UNUSED, USER_DEFINED  # sentencepiece piece types = GGUF token types

GGUF_TYPES = ("f32", "f16", "q8_0", "q4_0")


def permute_qk(w, n_heads):
    """Rows of each head from rotate-half order (i, i + d/2) to llama.cpp's adjacent pairs (2i, 2i+1)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_architecture(config):
    """llama.cpp's architecture for a model config ("llama" or "phi2"), or a ValueError saying what does not map."""
    c = config
    llama = (c.norm, c.mlp, c.parallel_block) == ("rmsnorm", "swiglu", False)
    if llama and not (c.attn_bias or c.mlp_bias or c.lm_head_bias or c.partial_rotary_factor != 1.0):
        return "llama"
    if (c.norm, c.mlp, c.parallel_block) == ("layernorm", "gelu", True):
        if c.n_heads * c.head_dim != c.dim:
            raise ValueError(f"GGUF export: llama.cpp's phi2 graph needs n_heads * head_dim = dim (its attention "
                             f"output is dim x dim); this model has {c.n_heads} x {c.head_dim} != {c.dim}")
        return "phi2"
    what = ("biases or partial rotary" if llama else
            f"norm={c.norm!r}, mlp={c.mlp!r}, parallel_block={c.parallel_block}")
    raise ValueError(f"GGUF export: no llama.cpp graph for this model ({what}): it writes LLaMA models (rmsnorm, "
                     "swiglu, sequential blocks, no biases, full rotary) as 'llama' and Phi models (layernorm, gelu, "
                     "parallel_block=True) as 'phi2'")


def float_state_dict(model):
    """(our parameter names -> float32 tensors, whether lm_head is the embedding). Quantised layers
    (quant.QuantLinear / QuantEmbedding) are dequantised; a tied lm_head is left out, as llama.cpp expects."""
    state = {}
    for name, module in model.named_modules(remove_duplicate=False):  # a shared table under both of its names
        if isinstance(module, QuantEmbedding):
            state[f"{name}.weight"] = module.table.dequantize()
        elif isinstance(module, QuantLinear) and not name.endswith(".table"):
            state[f"{name}.weight"] = module.dequantize()
            if module.bias is not None:
                state[f"{name}.bias"] = module.bias.float()
        else:  # float modules; quantised ones hold buffers only
            for pname, p in module.named_parameters(recurse=False):
                state[f"{name}.{pname}" if name else pname] = p.detach().float()
    head, emb = model.lm_head, model.embed
    tied = head is getattr(emb, "table", None) or getattr(head, "weight", None) is getattr(emb, "weight", False)
    if tied:
        del state["lm_head.weight"]
    return state, tied


def _gguf_name(ours, arch):
    table = convert.GGUF_PHI2_NAMES if arch == "phi2" else convert.GGUF_NAMES
    name = convert.rename(ours, {mine: theirs for theirs, mine in table.items()})
    if name is None:
        raise ValueError(f"GGUF export: no llama.cpp name for parameter {ours!r}")
    return name


def tensor_type(name, shape, gguf_type, tied):
    """The GGML type of one tensor: 1-D tensors stay f32 (as llama.cpp's converter keeps them); block types need
    rows that are whole blocks of 32 (else f16); in q4_0 files the output matrix (the embedding when tied) is q8_0,
    since 4 bits hurt it most and llama.cpp's own choice there (q6_K) has no quantiser in the gguf package."""
    from gguf import GGMLQuantizationType as T
    kind = {"f32": T.F32, "f16": T.F16, "q8_0": T.Q8_0, "q4_0": T.Q4_0}[gguf_type]
    if len(shape) == 1:
        return T.F32
    if kind in (T.Q8_0, T.Q4_0) and shape[-1] % 32:
        return T.F16
    if kind == T.Q4_0 and (name == "output.weight" or (tied and name == "token_embd.weight")):
        return T.Q8_0
    return kind


def export_gguf(model, tok, path, gguf_type="q8_0", name="tinyllm"):
    """Write `model` (float or quantised, LLaMA or Phi family) and tokenizer `tok` (tokenizer.Tokenizer) to `path`.
    The file appears whole or not at all: it is written beside `path` and renamed, so a failure keeps an older file."""
    import gguf
    if gguf_type not in GGUF_TYPES:
        raise ValueError(f"gguf_type={gguf_type!r}: expected one of {', '.join(GGUF_TYPES)}")
    arch = gguf_architecture(model.config)
    tmp = path + ".tmp"
    try:
        _write(gguf.GGUFWriter(tmp, arch), model, tok, gguf_type, name, arch)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    os.replace(tmp, path)
    return path


def _write(writer, model, tok, gguf_type, name, arch):
    """The metadata, tokenizer and tensors of export_gguf."""
    import gguf
    from gguf import GGMLQuantizationType as T
    c = model.config
    writer.add_name(name)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[gguf_type])
    if gguf_type in ("q8_0", "q4_0"):
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(c.vocab_size)
    writer.add_context_length(c.max_seq_len)
    writer.add_embedding_length(c.dim)
    writer.add_block_count(c.n_layers)
    writer.add_feed_forward_length(c.hidden_dim)
    writer.add_head_count(c.n_heads)
    writer.add_head_count_kv(c.n_kv_heads)
    writer.add_rope_dimension_count(c.rotary_dim)
    if c.head_dim != c.dim // c.n_heads:
        writer.add_key_length(c.head_dim)
        writer.add_value_length(c.head_dim)
    writer.add_rope_freq_base(c.rope_theta)
    if arch == "phi2":
        writer.add_layer_norm_eps(c.norm_eps)
    else:
        writer.add_layer_norm_rms_eps(c.norm_eps)
    _add_rope_scaling(writer, c.rope_scaling)
    _add_tokenizer(writer, tok, c.vocab_size)

    state, tied = float_state_dict(model)
    if arch == "phi2":
        state, tied = phi2_state_dict(state, tied, c), False
    for ours, w in state.items():
        gname = _gguf_name(ours, arch)
        if arch == "llama" and gname.endswith("attn_q.weight"):
            w = permute_qk(w, c.n_heads)
        elif arch == "llama" and gname.endswith("attn_k.weight"):
            w = permute_qk(w, c.n_kv_heads)
        arr = w.numpy()
        kind = tensor_type(gname, arr.shape, gguf_type, tied)
        if kind == T.F32:
            writer.add_tensor(gname, arr.astype(np.float32))
        elif kind == T.F16:
            writer.add_tensor(gname, arr.astype(np.float16))
        else:
            writer.add_tensor(gname, gguf.quants.quantize(arr, kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=True)
    writer.close()


def phi2_state_dict(state, tied, c):
    """The tensors llama.cpp's phi2 loader requires: an output matrix of its own (a tied embedding's copy) and zero
    biases where the model has none (attn_output, ffn_up, ffn_down, output; q/k/v biases are optional there)."""
    state = dict(state)
    if tied:
        state["lm_head.weight"] = state["embed.weight"]
    need = {"lm_head.bias": c.vocab_size, **{f"layers.{i}.{m}.bias": n for i in range(c.n_layers)
                                             for m, n in (("attn.o_proj", c.dim), ("mlp.fc1", c.hidden_dim),
                                                          ("mlp.fc2", c.dim))}}
    for key, n in need.items():
        state.setdefault(key, torch.zeros(n))
    return state


def _add_rope_scaling(writer, scaling):
    import gguf
    if not scaling or scaling["rope_type"] == "default":
        return
    kind = scaling["rope_type"]
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(scaling["factor"])
    elif kind == "yarn" and "original_max_position_embeddings" in scaling:
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(scaling["factor"])
        writer.add_rope_scaling_orig_ctx_len(scaling["original_max_position_embeddings"])
    else:
        raise ValueError(f"GGUF export: rope scaling {kind!r} is not written (supported: linear, yarn with "
                         "original_max_position_embeddings)")


def _add_tokenizer(writer, tok, vocab_size):
    """tokenizer.ggml.* and the chat template. Ids past the tokenizer (an embedding padded to a round size) get
    unused placeholder tokens, as llama.cpp's converter writes them."""
    if tok.sp is not None:
        tokens, scores, types = _sentencepiece_vocab(tok)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_add_space_prefix(_sp_add_dummy_prefix(tok))
    else:
        tokens, types, merges, pre = _byte_level_vocab(tok)
        scores = None
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_merges(merges)
    if len(tokens) > vocab_size:
        raise ValueError(f"GGUF export: the tokenizer has {len(tokens)} ids but the model's vocab_size is {vocab_size}")
    for i in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{i}]")
        types.append(UNUSED)
        if scores is not None:
            scores.append(-1e4)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if scores is not None:
        writer.add_token_scores(scores)
    for key, i in (("bos", tok.bos_id), ("eos", tok.eos_id), ("unk", tok.unk_id), ("pad", tok.pad_id)):
        if i is not None:
            getattr(writer, f"add_{key}_token_id")(i)
    # our scripts add BOS/EOS explicitly (encode(bos=False) is the default), so llama.cpp must not add them
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    if tok.chat_template:
        writer.add_chat_template(tok.chat_template)


def _sentencepiece_vocab(tok):
    from sentencepiece import sentencepiece_model_pb2 as pb
    proto = pb.ModelProto.FromString(tok.sp_model)
    return [p.piece for p in proto.pieces], [p.score for p in proto.pieces], [int(p.type) for p in proto.pieces]


def _sp_add_dummy_prefix(tok):
    from sentencepiece import sentencepiece_model_pb2 as pb
    return bool(pb.ModelProto.FromString(tok.sp_model).normalizer_spec.add_dummy_prefix)


def _byte_level_vocab(tok):
    """(tokens, types, merges, llama.cpp pre-tokenizer name) of a byte-level BPE `tokenizers` tokenizer."""
    spec = json.loads(tok.hf.to_str())
    model = spec["model"]
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
        raise ValueError("GGUF export: the tokenizer is neither a sentencepiece model nor a byte-level BPE "
                         "tokenizer.json; llama.cpp has no equivalent for it")
    vocab = dict(model["vocab"])
    added = {t["content"]: t for t in spec.get("added_tokens", [])}
    for content, t in added.items():
        vocab[content] = t["id"]
    n = max(vocab.values()) + 1
    tokens = [None] * n
    for t, i in vocab.items():
        tokens[i] = t
    missing = [i for i, t in enumerate(tokens) if t is None]
    if missing:
        raise ValueError(f"GGUF export: tokenizer ids {missing[:5]} have no token")
    types = [(CONTROL if added[t]["special"] else USER_DEFINED) if t in added else NORMAL for t in tokens]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return tokens, types, merges, _pre_tokenizer_name(spec.get("pre_tokenizer"))


def _pre_tokenizer_name(pre):
    """The llama.cpp name (tokenizer.ggml.pre) of the pre-tokenizers our Tokenizer builds or imports."""
    if pre is None:
        raise ValueError("GGUF export: a byte-level BPE tokenizer without a pre-tokenizer")
    if pre["type"] == "ByteLevel" and pre.get("use_regex", True):
        return "gpt2"
    if pre["type"] == "Sequence":
        kinds = [p["type"] for p in pre["pretokenizers"]]
        if kinds == ["Digits", "ByteLevel"] and pre["pretokenizers"][0].get("individual_digits") \
                and pre["pretokenizers"][1].get("use_regex", True):
            return "smollm"  # digits one by one, then GPT-2's split (llama.cpp: SmolLM, StarCoder)
    raise ValueError(f"GGUF export: pre-tokenizer {json.dumps(pre)[:200]} has no llama.cpp name we know; "
                     "llama.cpp would split text differently from this tokenizer")
