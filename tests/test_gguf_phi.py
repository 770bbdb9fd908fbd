"""gguf_export.py's phi2 files (llama.cpp's Phi graph) and convert.py reading them back. llama.cpp is not installed
here: the files are checked against what its phi2 loader requires (src/models/phi2.cpp: tensor names, shapes and
which are required; llama-arch.cpp: metadata keys), and read back by our loader to the same logits. The comparison
with llama.cpp itself (perplexity and logits on the exported files) is recorded in BENCHMARKS.md."""
import numpy as np
import pytest
import torch

import convert
from gguf_export import export_gguf
from test_quant import CHAT, gguf_tensor, phi_config, sp_tokenizer, tiny_model  # noqa: F401 (a fixture)

# phi2.cpp's load_arch_tensors: (name, GGML shape: fastest-moving dimension first); q/k/v biases are optional there
N_LAYERS, DIM, FF = 2, 64, 256


def required(vocab, kv_dim):
    names = {"token_embd.weight": (DIM, vocab), "output_norm.weight": (DIM,), "output_norm.bias": (DIM,),
             "output.weight": (DIM, vocab), "output.bias": (vocab,)}
    for i in range(N_LAYERS):
        names.update({f"blk.{i}.attn_norm.weight": (DIM,), f"blk.{i}.attn_norm.bias": (DIM,),
                      f"blk.{i}.attn_q.weight": (DIM, DIM), f"blk.{i}.attn_k.weight": (DIM, kv_dim),
                      f"blk.{i}.attn_v.weight": (DIM, kv_dim), f"blk.{i}.attn_output.weight": (DIM, DIM),
                      f"blk.{i}.attn_output.bias": (DIM,), f"blk.{i}.ffn_up.weight": (DIM, FF),
                      f"blk.{i}.ffn_up.bias": (FF,), f"blk.{i}.ffn_down.weight": (FF, DIM),
                      f"blk.{i}.ffn_down.bias": (DIM,)})
    return names


def metadata(path):
    from gguf import GGUFReader
    reader = GGUFReader(path)
    return ({k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")},
            {t.name: tuple(int(n) for n in t.shape) for t in reader.tensors})


@pytest.mark.parametrize("gguf_type", ["f32", "f16", "q8_0", "q4_0"])
def test_phi_gguf_is_what_llama_cpp_phi2_loads_and_reads_back(tmp_path, sp_tokenizer, gguf_type):
    tok = sp_tokenizer
    model = tiny_model(phi_config(vocab_size=416, n_kv_heads=2))  # GQA; partial rotary 0.5; every bias
    path = export_gguf(model, tok, str(tmp_path / "phi.gguf"), gguf_type)
    meta, shapes = metadata(path)
    assert meta["general.architecture"] == "phi2"
    assert {k: meta[f"phi2.{k}"] for k in ("block_count", "embedding_length", "feed_forward_length",
                                           "attention.head_count", "attention.head_count_kv",
                                           "rope.dimension_count", "context_length")} == \
        {"block_count": 2, "embedding_length": DIM, "feed_forward_length": FF, "attention.head_count": 4,
         "attention.head_count_kv": 2, "rope.dimension_count": 8, "context_length": 128}  # 8 = 16 * 0.5 rotated
    assert meta["phi2.attention.layer_norm_epsilon"] == pytest.approx(1e-5)
    assert "phi2.attention.layer_norm_rms_epsilon" not in meta
    need = required(416, 32)
    biases = {f"blk.{i}.attn_{p}.bias": (n,) for i in range(N_LAYERS) for p, n in (("q", DIM), ("k", 32), ("v", 32))}
    assert shapes == {**need, **biases}

    # no q/k permutation (phi2 rotates halves, "neox"); weights within the format's rounding; read back exactly
    q = gguf_tensor(path, "blk.1.attn_q.weight")[1]
    w = model.layers[1].attn.q_proj.weight.detach()
    tol = {"f32": 0, "f16": 1e-3, "q8_0": 2e-2, "q4_0": 2e-1}[gguf_type] * w.abs().max().item()
    assert (q - w).abs().max().item() <= tol
    ours = convert.from_pretrained(path)
    assert ours.config.partial_rotary_factor == 0.5 and ours.config.parallel_block and ours.config.norm == "layernorm"
    ids = torch.tensor([tok.encode(tok.apply_chat_template(CHAT))])
    with torch.no_grad():
        back, float_logits = ours(ids)[0], model(ids)[0]
    if gguf_type == "f32":
        assert torch.allclose(back, float_logits, atol=1e-5, rtol=1e-5)
        # what convert.py makes of the file is a folder transformers runs as PhiForCausalLM to the same logits
        transformers = pytest.importorskip("transformers")
        convert.save_pretrained(ours, str(tmp_path / "hf"))
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
        assert type(hf).__name__ == "PhiForCausalLM"
        with torch.no_grad():
            assert torch.allclose(hf(ids).logits, float_logits, atol=1e-4, rtol=1e-4)
    else:
        err = (back - float_logits).abs().max().item()
        assert 0 < err < {"f16": 1e-3, "q8_0": 2e-2, "q4_0": 2e-1}[gguf_type] * float_logits.abs().max().item()


def test_phi_without_some_biases_and_tied_gets_what_phi2_requires(tmp_path, sp_tokenizer):
    """phi2 requires output.weight, output.bias and the o/fc1/fc2 biases: a tied Phi model without biases goes out
    with a copy of the embedding and zero biases, which compute the same logits."""
    model = tiny_model(phi_config(vocab_size=sp_tokenizer.vocab_size, attn_bias=False, mlp_bias=False,
                                  lm_head_bias=False, tie_embeddings=True))
    path = export_gguf(model, sp_tokenizer, str(tmp_path / "tied.gguf"), "f32")
    _, shapes = metadata(path)
    assert shapes == required(sp_tokenizer.vocab_size, DIM)  # the optional q/k/v biases are left out
    assert torch.equal(gguf_tensor(path, "output.weight")[1], model.embed.weight.detach())
    assert not gguf_tensor(path, "output.bias")[1].any() and not gguf_tensor(path, "blk.0.ffn_up.bias")[1].any()
    ids = torch.tensor([sp_tokenizer.encode("The quick brown fox 中文")])
    with torch.no_grad():
        assert torch.allclose(convert.from_pretrained(path)(ids)[0], model(ids)[0], atol=1e-5, rtol=1e-5)


def test_fused_qkv_phi2_gguf_reads(tmp_path, sp_tokenizer):
    """Older phi2 GGUFs (llama.cpp's converter for microsoft/phi-2's first naming) hold q|k|v as one attn_qkv."""
    from gguf import GGUFReader, GGUFWriter
    model = tiny_model(phi_config(vocab_size=sp_tokenizer.vocab_size))
    split = export_gguf(model, sp_tokenizer, str(tmp_path / "split.gguf"), "f32")
    reader = GGUFReader(split)
    writer = GGUFWriter(str(tmp_path / "fused.gguf"), "phi2")
    for key, f in reader.fields.items():
        if key.startswith("phi2.") or key == "tokenizer.ggml.tokens":
            writer.add_key_value(key, f.contents(), f.types[0], f.types[-1] if len(f.types) > 1 else None)
    tensors = {t.name: np.array(t.data) for t in reader.tensors}
    for i in range(N_LAYERS):
        for leaf in ("weight", "bias"):
            tensors[f"blk.{i}.attn_qkv.{leaf}"] = np.concatenate([tensors.pop(f"blk.{i}.attn_{p}.{leaf}")
                                                                   for p in "qkv"])
    for name, a in tensors.items():
        writer.add_tensor(name, a)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    ids = torch.tensor([sp_tokenizer.encode("Hello world")])
    with torch.no_grad():
        assert torch.equal(convert.from_pretrained(str(tmp_path / "fused.gguf"))(ids)[0],
                           convert.from_pretrained(split)(ids)[0])


@pytest.mark.parametrize("kw,match", [
    (dict(parallel_block=False), "parallel_block=False"),        # a second norm per block: phi2 has one
    (dict(mlp="swiglu", hidden_dim=160), "mlp='swiglu'"),        # phi2's MLP is fc1 -> GELU -> fc2
    (dict(head_dim=8), "n_heads \\* head_dim = dim"),            # phi2's attn_output is dim x dim
])
def test_phi_variants_phi2_cannot_express_are_refused(tmp_path, sp_tokenizer, kw, match):
    with pytest.raises(ValueError, match=match):
        export_gguf(tiny_model(phi_config(**kw)), sp_tokenizer, str(tmp_path / "x.gguf"))
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_llama_with_biases_is_refused(tmp_path, sp_tokenizer):
    from test_quant import llama_config
    with pytest.raises(ValueError, match="biases or partial rotary"):
        export_gguf(tiny_model(llama_config(attn_bias=True)), sp_tokenizer, str(tmp_path / "x.gguf"))
