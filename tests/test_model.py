"""model.py / convert.py against transformers (the reference) on tiny random configs, plus SmolLM2-135M from its GGUF."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

import convert  # noqa: E402
from model import ModelConfig, Transformer, process_logits, warp_logits  # noqa: E402

V = 101


def hf_llama(tie=False, **kw):
    torch.manual_seed(0)
    args = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=tie, rms_norm_eps=1e-5,
                initializer_range=0.2)  # a wide init: peaked logits, so greedy paths have no near-ties
    args.update(kw)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**args)).eval()


def hf_phi(**kw):
    torch.manual_seed(0)
    args = dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, partial_rotary_factor=0.5, initializer_range=0.2)
    args.update(kw)
    model = transformers.PhiForCausalLM(transformers.PhiConfig(**args)).eval()
    with torch.no_grad():  # transformers initialises biases and LayerNorms to 0/1: randomise them so they count
        for name, p in model.named_parameters():
            if name.endswith("bias") or "layernorm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def roundtrip(hf, tmp_path):
    """Load hf into ours through its saved folder; load ours back into transformers through save_pretrained."""
    hf.save_pretrained(tmp_path / "hf")
    ours = convert.from_pretrained(tmp_path / "hf")
    convert.save_pretrained(ours, tmp_path / "ours")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    return ours, back


def max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


def cached_logits(model, idx, prefill=8):
    """idx's logits through the KV cache (set up by the caller): `prefill` tokens at once, then one token a step."""
    parts = [model(idx[:, :prefill], input_pos=torch.arange(prefill))[0]]
    parts += [model(idx[:, t:t + 1], input_pos=torch.tensor([t]))[0] for t in range(prefill, idx.shape[1])]
    return torch.cat(parts, 1)


# ----------------------------------------------------------------------------- architecture equivalence

@pytest.mark.parametrize("tie", [True, False])
def test_llama_matches_transformers_both_ways(tmp_path, tie):
    hf = hf_llama(tie=tie)
    ours, back = roundtrip(hf, tmp_path)
    assert ours.config.n_kv_heads == 2 and ours.config.tie_embeddings == tie
    assert (ours.lm_head.weight is ours.embed.weight) == tie
    idx = torch.randint(0, V, (2, 24))
    labels = idx.clone()
    labels[0, :5] = -100  # prompt tokens without loss
    with torch.no_grad():
        ref = hf(idx, labels=labels)
        targets = torch.cat([labels[:, 1:], torch.full((2, 1), -100)], 1)  # ours takes already shifted targets
        logits, loss = ours(idx, targets)
        assert max_diff(logits, ref.logits) <= 1e-4
        assert abs(loss.item() - ref.loss.item()) <= 1e-5
        assert max_diff(back(idx).logits, logits) <= 1e-4
    saved = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert saved["architectures"] == ["LlamaForCausalLM"] and saved["tie_word_embeddings"] == tie


def test_sharded_and_bin_checkpoints_load(tmp_path):
    hf = hf_llama()
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    ours = convert.from_pretrained(tmp_path)
    # the older pickle format, read with weights_only=True
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text((tmp_path / "config.json").read_text())
    torch.save(hf.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    from_bin = convert.from_pretrained(tmp_path / "bin")
    idx = torch.randint(0, V, (1, 16))
    with torch.no_grad():
        assert max_diff(ours(idx)[0], hf(idx).logits) <= 1e-4
        assert max_diff(from_bin(idx)[0], hf(idx).logits) <= 1e-4


def test_phi_matches_transformers_both_ways(tmp_path):
    hf = hf_phi()
    ours, back = roundtrip(hf, tmp_path)
    c = ours.config
    assert (c.norm, c.mlp, c.parallel_block, c.rotary_dim, c.lm_head_bias) == ("layernorm", "gelu", True, 8, True)
    idx = torch.randint(0, V, (2, 24))
    with torch.no_grad():
        logits, _ = ours(idx)
        assert max_diff(logits, hf(idx).logits) <= 1e-4
        assert max_diff(back(idx).logits, logits) <= 1e-4
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["architectures"] == ["PhiForCausalLM"]


def test_phi2_original_naming(tmp_path):
    """microsoft/phi-2 as first published: transformer.h.N.mixer.Wqkv (q|k|v rows), out_proj, lm_head.ln/linear."""
    from safetensors.torch import save_file
    hf = hf_phi(num_key_value_heads=4)
    sd, c = hf.state_dict(), hf.config
    msft = {"transformer.embd.wte.weight": sd["model.embed_tokens.weight"],
            "lm_head.ln.weight": sd["model.final_layernorm.weight"], "lm_head.ln.bias": sd["model.final_layernorm.bias"],
            "lm_head.linear.weight": sd["lm_head.weight"], "lm_head.linear.bias": sd["lm_head.bias"]}
    for i in range(c.num_hidden_layers):
        p, q = f"model.layers.{i}.", f"transformer.h.{i}."
        for leaf in ("weight", "bias"):
            msft[q + "ln." + leaf] = sd[p + "input_layernorm." + leaf]
            msft[q + "mixer.Wqkv." + leaf] = torch.cat([sd[p + f"self_attn.{x}_proj." + leaf] for x in "qkv"])
            msft[q + "mixer.out_proj." + leaf] = sd[p + "self_attn.dense." + leaf]
            msft[q + "mixer.rotary_emb.inv_freq"] = torch.zeros(4)  # a saved buffer: must be ignored
            for fc in ("fc1", "fc2"):
                msft[q + f"mlp.{fc}." + leaf] = sd[p + f"mlp.{fc}." + leaf]
    save_file({k: v.contiguous() for k, v in msft.items()}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "phi-msft", "architectures": ["PhiForCausalLM"], "vocab_size": V, "n_embd": 64, "n_head": 4,
        "n_layer": 2, "n_inner": 128, "n_positions": 128, "rotary_dim": 8, "layer_norm_epsilon": 1e-5,
        "activation_function": "gelu_new", "tie_word_embeddings": False}))
    ours = convert.from_pretrained(tmp_path)
    idx = torch.randint(0, V, (2, 20))
    with torch.no_grad():
        assert max_diff(ours(idx)[0], hf(idx).logits) <= 1e-4


ROPE_SCALINGS = {  # original context 32 (max_position_embeddings for linear/dynamic); tested out to 96 positions
    "linear": (dict(rope_type="linear", factor=4.0), 32),
    "dynamic": (dict(rope_type="dynamic", factor=4.0), 32),
    "yarn": (dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=32), 128),
    "llama3": (dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=32), 256),
}


@pytest.mark.parametrize("kind", list(ROPE_SCALINGS))
def test_rope_scaling_matches_transformers(tmp_path, kind):
    scaling, max_pos = ROPE_SCALINGS[kind]
    hf = hf_llama(rope_scaling=dict(scaling), max_position_embeddings=max_pos, rope_theta=500.0)
    ours, back = roundtrip(hf, tmp_path)
    assert ours.config.rope_scaling["rope_type"] == kind
    prompt = torch.randint(3, V, (1, 40))  # no pad id (0) in prompts: transformers would mask it out
    with torch.no_grad():
        # cached decoding past the original context first: transformers' dynamic rope never shrinks its base again
        ref = hf.generate(prompt, max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert torch.equal(ours.generate(prompt, 16, temperature=0), ref)
        idx = torch.randint(0, V, (2, 96))
        logits, _ = ours(idx)
        assert max_diff(logits, hf(idx).logits) <= 1e-4
        assert max_diff(back(idx).logits, logits) <= 1e-4


# ----------------------------------------------------------------------------- KV cache and generation

@pytest.mark.parametrize("make", [hf_llama, hf_phi])
def test_kv_cache_matches_full_forward(tmp_path, make):
    make().save_pretrained(tmp_path)
    model = convert.from_pretrained(tmp_path)
    idx = torch.randint(0, V, (2, 20))
    with torch.no_grad():
        full, _ = model(idx)
        model.setup_cache(2, 32)
        assert max_diff(cached_logits(model, idx, prefill=12), full) <= 1e-4

        # left-padded batch: every row's real positions equal that row alone, unpadded
        rows = [idx[0, :20], idx[1, :13], idx[0, 5:9]]
        T = 20
        pad = [T - len(r) for r in rows]
        batch = torch.stack([torch.cat([torch.zeros(p, dtype=torch.long), r]) for p, r in zip(pad, rows)])
        model.setup_cache(3, 24, pad_lens=pad)
        prefill, _ = model(batch[:, :16], input_pos=torch.arange(16))
        steps = [model(batch[:, t:t + 1], input_pos=torch.tensor([t]))[0] for t in range(16, 20)]
        cached = torch.cat([prefill] + steps, 1)
        for b, (p, r) in enumerate(zip(pad, rows)):
            alone, _ = model(r[None])
            assert not cached[b].isnan().any()
            assert max_diff(cached[b, p:], alone[0]) <= 1e-4


def test_generate_batch_matches_transformers(tmp_path):
    """Greedy, a left-padded batch, stop on eos (transformers' default eos 2, padding finished rows)."""
    hf = hf_llama()
    hf.save_pretrained(tmp_path)
    ours = convert.from_pretrained(tmp_path)
    rows = [torch.randint(3, V, (n,)).tolist() for n in (9, 4, 7)]
    T = max(map(len, rows))
    ids = torch.tensor([[0] * (T - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    ref = hf.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=0, eos_token_id=2)
    out = ours.generate(rows, 24, temperature=0, stop_ids=[2], pad_id=0)
    assert torch.equal(out, ref)


def test_generate_penalties_match_transformers(tmp_path):
    hf = hf_llama()
    hf.save_pretrained(tmp_path)
    ours = convert.from_pretrained(tmp_path)
    prompt = torch.randint(3, V, (1, 10))
    kw = dict(repetition_penalty=1.5, no_repeat_ngram_size=2)
    ref = hf.generate(prompt, max_new_tokens=30, do_sample=False, eos_token_id=None, pad_token_id=0, **kw)
    assert torch.equal(ours.generate(prompt, 30, temperature=0, **kw), ref)
    # the same seed draws the same tokens as transformers' sampler (both: torch.multinomial over the warped softmax)
    kw = dict(temperature=0.8, top_k=20, top_p=0.9, repetition_penalty=1.2)
    torch.manual_seed(123)
    ref = hf.generate(prompt, max_new_tokens=30, do_sample=True, eos_token_id=None, pad_token_id=0, **kw)
    torch.manual_seed(123)
    assert torch.equal(ours.generate(prompt, 30, **kw), ref)


def test_logits_processing_matches_transformers():
    from transformers.generation import logits_process as lp
    torch.manual_seed(0)
    logits = torch.randn(3, 50) * 3
    ids = torch.randint(0, 50, (3, 12))
    ids[1, -3:] = ids[1, 2:5]  # a repeated 3-gram prefix
    seen = torch.zeros(3, 50, dtype=torch.bool).scatter_(1, ids, True)
    ref = lp.RepetitionPenaltyLogitsProcessor(1.3)(ids, logits.clone())
    ref = lp.NoRepeatNGramLogitsProcessor(3)(ids, ref)
    from model import _banned_ngram_tokens
    ours = process_logits(logits, seen, 1.3, [_banned_ngram_tokens(r, 3) for r in ids.tolist()])
    assert torch.equal(ours, ref) and ours[1].isinf().any()
    for t, k, p in [(0.7, None, None), (1.0, 5, None), (1.0, None, 0.8), (1.3, 10, 0.6)]:
        ref = lp.TemperatureLogitsWarper(t)(ids, logits.clone())
        ref = lp.TopKLogitsWarper(k)(ids, ref) if k else ref
        ref = lp.TopPLogitsWarper(p)(ids, ref) if p else ref
        assert torch.equal(warp_logits(logits, t, k, p), ref)


def test_generate_stops_and_streams(tmp_path):
    hf_llama().save_pretrained(tmp_path)
    model = convert.from_pretrained(tmp_path)
    prompt = [[5, 6, 7, 8]]
    free = model.generate(prompt, 12, temperature=0)[0, 4:].tolist()
    stop = free[5]
    first = free.index(stop)
    streamed = []
    out = model.generate(prompt, 12, temperature=0, stop_ids=[stop], callback=lambda ids: streamed.extend(ids))
    assert out[0, 4:].tolist() == free[:first + 1] == streamed  # the stop token is kept, nothing after it
    out = model.generate(prompt, 12, temperature=0, callback=lambda ids: len(ids) and True)
    assert out.shape[1] == 5  # a callback returning True stops after the first token
    assert torch.equal(model.generate(prompt, 12, temperature=1.0, top_k=1), model.generate(prompt, 12, temperature=0))
    with pytest.raises(ValueError, match="left padding"):
        model.generate(torch.tensor([[1, 2, 3]]), 2, attention_mask=torch.tensor([[1, 1, 0]]))


def test_decode_step_compiles_without_graph_breaks(tmp_path, monkeypatch):
    hf_phi().save_pretrained(tmp_path / "phi")
    hf_llama(rope_scaling=dict(rope_type="dynamic", factor=2.0), max_position_embeddings=8).save_pretrained(
        tmp_path / "llama")
    for name in ("phi", "llama"):
        model = convert.from_pretrained(tmp_path / name)
        model.setup_cache(2, 16, pad_lens=[0, 3])
        with torch.no_grad():
            model(torch.randint(0, V, (2, 10)), input_pos=torch.arange(10))
            torch._dynamo.reset()
            step = torch.compile(model.decode_step, backend="eager", fullgraph=True)  # fullgraph: a break raises
            idx, pos = torch.randint(0, V, (2, 1)), torch.tensor([10])
            compiled = step(idx, pos)
            # eager CPU decoding attends to the filled slots only, the compiled step to the whole cache (masked)
            assert max_diff(compiled, model.decode_step(idx, pos)) < 1e-5
    # generate(compile=True) wires the same step in and compiles it once for all steps (static shapes);
    # inductor itself is left to bench.py: compiling a model takes minutes
    from torch._dynamo.testing import CompileCounter
    counter, real_compile = CompileCounter(), torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, backend=counter, fullgraph=kw["fullgraph"]))
    prompt = [[5, 6, 7], [8, 9]]
    assert torch.equal(model.generate(prompt, 8, temperature=0, compile=True), model.generate(prompt, 8, temperature=0))
    model.generate(prompt, 8, temperature=0, compile=True)  # a second call reuses the compiled step
    assert counter.frame_count == 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_on_cpu(tmp_path, dtype):
    hf_llama().save_pretrained(tmp_path)
    ref = convert.from_pretrained(tmp_path)
    model = convert.from_pretrained(tmp_path, dtype=dtype)
    assert model.embed.weight.dtype == dtype
    idx = torch.randint(0, V, (2, 16))
    with torch.no_grad():
        logits, _ = model(idx)
        assert logits.dtype == dtype and max_diff(logits, ref(idx)[0]) < 0.05 * ref(idx)[0].abs().max()
    out = model.generate(idx, 8, temperature=0)
    assert out.shape == (2, 24)


def test_cpu_decoding_cache_and_inference_mode(tmp_path):
    """On CPU a bf16 model decodes from an fp32 cache (PyTorch's bf16 one-query attention is slow there) to its full
    forward's logits. generate runs under inference_mode yet returns a plain tensor one can train on, and a cache made
    inside a caller's inference_mode can still be written outside it."""
    hf_llama().save_pretrained(tmp_path)
    model = convert.from_pretrained(tmp_path, dtype=torch.bfloat16)
    idx = torch.randint(0, V, (1, 12))
    with torch.inference_mode():
        model.generate(idx, 4, temperature=0)
    assert model.layers[0].attn.kv_cache.k.dtype == torch.float32
    with torch.no_grad():
        full, _ = model(idx)
        model.setup_cache(1, 16)  # reuses the cache made under inference_mode
        cached = cached_logits(model, idx)
    assert max_diff(cached, full) < 0.02 * full.abs().max()

    out = model.generate(idx, 4, temperature=0)
    assert not out.is_inference()
    model.train()
    _, loss = model(out[:, :-1], out[:, 1:])
    loss.backward()
    assert model.embed.weight.grad is not None


@pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="oneDNN runs no bf16 on this CPU")
def test_cpu_decoding_onednn_layout_matches_and_follows_weight_changes():
    """cpu_decoding(onednn=True): bf16 weights run through oneDNN's own layout of them to the logits of plain F.linear
    (up to bf16 rounding), every row the same as alone; the layouts are reused by the next cpu_decoding while the
    weights are unchanged, and made anew after an in-place change (an optimizer step), which the logits follow."""
    from model import cpu_decoding
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=V, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32))
    model = model.to(torch.bfloat16).eval()
    idx = torch.randint(0, V, (3, 10))

    def logits(onednn):
        with torch.inference_mode(), cpu_decoding(model, onednn=onednn):
            both = model(idx)[0].float(), model(idx[1:2])[0].float()
        return both, model.layers[0].attn.onednn_layouts["qkv"][1] if onednn else None

    (ref, _), _ = logits(False)
    (out, row), layout = logits(True)
    assert max_diff(out, ref) < 0.02 * ref.abs().max()
    assert torch.equal(out[1:2], row)  # one kernel whatever the number of rows
    assert logits(True)[1] is layout  # reused
    assert getattr(model.lm_head, "onednn_layouts", None) and "forward" not in model.lm_head.__dict__
    with torch.no_grad():
        model.layers[0].attn.k_proj.weight.mul_(-3)
        model.layers[1].mlp.down_proj.weight.mul_(-3)
    (ref, _), _ = logits(False)
    (out, _), new_layout = logits(True)
    assert new_layout is not layout and max_diff(out, ref) < 0.02 * ref.abs().max()


@pytest.mark.parametrize("family", ["llama", "phi"])
def test_cpu_decoding_layout_is_exact_costs_no_copy_and_is_undone(family, tmp_path):
    """cpu_decoding: inside it, q/k/v (and gate/up) weights are row views of one buffer each and RMSNorm runs as a
    LayerNorm of [x, -x]; full and cached forwards give the logits they give outside it. A group with a LoRA layer
    stays unpacked (its update still counts). On exit, also after an error, every weight owns its storage again with
    its values, trains, and saves through safetensors (which refuses tensors that share memory). A training step
    inside it gives every weight the gradient it gets outside."""
    import lora
    from model import cpu_decoding
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=V, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32,
                      **(PHI_SHAPE if family == "phi" else {}))
    model = Transformer(cfg).eval()
    lora.add_lora(model, targets="layers.1.attn.v_proj")
    torch.nn.init.normal_(model.layers[1].attn.v_proj.lora_B)
    model.requires_grad_(True)
    values = {n: p.detach().clone() for n, p in model.named_parameters()}
    idx = torch.randint(0, V, (2, 12))

    def logits():
        full, _ = model(idx)
        model.setup_cache(2, 16)
        return full, cached_logits(model, idx)

    with torch.no_grad():
        ref_full, ref_cached = logits()
    with torch.no_grad(), cpu_decoding(model):
        first, second = model.layers
        assert second.attn.qkv is None  # v_proj is a LoRALinear
        q, k, v = (first.attn.q_proj.weight, first.attn.k_proj.weight, first.attn.v_proj.weight)
        buffer = first.attn.qkv[0]
        assert all(w.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr() for w in (q, k, v))
        assert torch.equal(buffer, torch.cat((values["layers.0.attn.q_proj.weight"],
                                              values["layers.0.attn.k_proj.weight"],
                                              values["layers.0.attn.v_proj.weight"])))
        if family == "llama":
            assert first.mlp.gate_up is not None and first.attn_norm.doubled_weight is not None
        else:  # Phi: the biases are packed too; its GELU MLP and LayerNorms have nothing to pack
            assert first.attn.qkv[1].shape == (32 + 16 + 16,)
        full, cached = logits()
    torch.testing.assert_close(full, ref_full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cached, ref_cached, rtol=1e-5, atol=1e-5)

    with pytest.raises(RuntimeError, match="inside"), torch.inference_mode(), cpu_decoding(model):
        raise RuntimeError("an error inside")
    storages = set()
    for name, p in model.named_parameters():
        assert torch.equal(p, values[name]), name
        assert not p.is_inference(), name
        if "embed" not in name and "lm_head" not in name:
            assert p.untyped_storage().data_ptr() not in storages, name
            storages.add(p.untyped_storage().data_ptr())
    assert all(getattr(m, attr, None) is None for m in model.modules() for attr in ("qkv", "gate_up", "doubled_weight"))
    model.train()
    model(idx[:, :-1], idx[:, 1:])[1].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    with cpu_decoding(model):  # with gradients on, the layers take their usual path: every weight gets its gradient
        model(idx[:, :-1], idx[:, 1:])[1].backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], rtol=1e-5, atol=1e-6, msg=name)
    lora.merge_lora(model)
    convert.save_pretrained(model, tmp_path)


# ----------------------------------------------------------------------------- training contract and errors

def test_training_contract():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=V, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16)
    model = Transformer(cfg)
    idx = torch.randint(0, V, (2, 16))
    targets = idx.roll(-1, 1)
    targets[:, -1] = -100
    _, loss = model(idx, targets)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.gradient_checkpointing = True
    model.train()
    model(idx, targets)[1].backward()
    for g, p in zip(grads, model.parameters()):
        assert torch.allclose(g, p.grad, atol=1e-6)
    assert abs(loss.item() - torch.log(torch.tensor(float(V))).item()) < 0.1  # small init: near-uniform
    n = model.num_params(exclude_embeddings=True)
    assert model.flops_per_token(16) == 6 * (n + V * 32) + 12 * 2 * 32 * 16
    assert model.layers[0].attn.o_proj.weight.std() < 0.5 * model.layers[0].attn.q_proj.weight.std()


PHI_SHAPE = dict(norm="layernorm", mlp="gelu", parallel_block=True, attn_bias=True, mlp_bias=True, lm_head_bias=True,
                 tie_embeddings=False, partial_rotary_factor=0.5)


@pytest.mark.parametrize("family", ["llama", "phi"])
def test_packed_rows_equal_samples_run_alone(family):
    """Three samples packed in one row (padding after them) and a second row of one sample: every token's logits,
    the loss and the gradients equal those of each sample run on its own."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=V, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32,
                      **(PHI_SHAPE if family == "phi" else {}))
    model = Transformer(cfg).train()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # biases and norms off their init: they must count too
    lengths = [[5, 9, 3], [14]]
    T = 20
    samples = [[torch.randint(0, V, (n,)) for n in row] for row in lengths]
    targets_of = [[torch.randint(0, V, (n,)) for n in row] for row in lengths]
    samples[0][2][0] = samples[0][1][-1]  # a sample may start with the token that ended the last one
    idx = torch.zeros(2, T, dtype=torch.long)
    targets = torch.full((2, T), -100)
    doc_ids = torch.full((2, T), 7)  # padding: one more run after the samples
    for b, row in enumerate(samples):
        start = 0
        for i, (ids, tgt) in enumerate(zip(row, targets_of[b])):
            idx[b, start:start + len(ids)], targets[b, start:start + len(ids)] = ids, tgt
            doc_ids[b, start:start + len(ids)] = i % 2  # ids may repeat: a new run is a new sample
            start += len(ids)
    logits, loss = model(idx, targets, doc_ids=doc_ids)
    loss.backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    n_targets = sum(lengths[0]) + sum(lengths[1])
    total = 0
    for b, row in enumerate(samples):
        start = 0
        for ids, tgt in zip(row, targets_of[b]):
            alone, alone_loss = model(ids[None], tgt[None])
            torch.testing.assert_close(logits[b, start:start + len(ids)], alone[0], atol=1e-5, rtol=1e-5)
            total = total + alone_loss * len(ids) / n_targets
            start += len(ids)
    total.backward()
    torch.testing.assert_close(loss, total, atol=1e-5, rtol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(packed_grads[n], p.grad, atol=1e-5, rtol=1e-5, msg=n)
    model.zero_grad()
    model.gradient_checkpointing = True  # the mask reaches checkpointed layers too
    torch.testing.assert_close(model(idx, targets, doc_ids=doc_ids)[1], loss)


def test_masked_rows_and_batches_without_targets():
    """A row with every target -100 leaves the loss to the other rows; a batch without targets gives 0, not NaN."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=V, dim=32, n_layers=1, n_heads=4, max_seq_len=16)).train()
    idx = torch.randint(0, V, (2, 16))
    targets = idx.roll(-1, 1)
    masked = targets.clone()
    masked[1] = -100
    torch.testing.assert_close(model(idx, masked)[1], model(idx[:1], targets[:1])[1])
    loss = model(idx, torch.full_like(idx, -100))[1]
    loss.backward()
    assert loss.item() == 0
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in model.parameters())


@pytest.mark.parametrize("family,tie", [("llama", True), ("llama", False), ("phi", False)])
def test_resize_embeddings_for_added_tokens(tmp_path, family, tie):
    """Room for added tokens: rows rounded up to a multiple, new rows at the mean of the old ones, the old tokens'
    logits unchanged, ties kept, and the resized model saves and loads."""
    from model import resize_embeddings
    torch.manual_seed(0)
    shape = PHI_SHAPE if family == "phi" else dict(tie_embeddings=tie)
    model = Transformer(ModelConfig(vocab_size=V, dim=32, n_layers=1, n_heads=4, max_seq_len=16, **shape)).eval()
    if family == "phi":
        with torch.no_grad():
            model.lm_head.bias.normal_()
    idx = torch.randint(0, V, (1, 8))
    with torch.no_grad():
        before = model(idx)[0]
    old_embed, old_head = model.embed.weight.clone(), model.lm_head.weight.clone()
    assert resize_embeddings(model, V + 2, multiple_of=64) == 128 == model.config.vocab_size
    assert resize_embeddings(model, 120) == 128  # fits already: nothing changes
    assert (model.lm_head.weight is model.embed.weight) == tie and model.embed.weight.shape == (128, 32)
    assert model.lm_head.out_features == 128 and model.lm_head.weight.shape == (128, 32)
    torch.testing.assert_close(model.embed.weight[V:], old_embed.mean(0).expand(128 - V, -1))
    torch.testing.assert_close(model.lm_head.weight[V:], old_head.mean(0).expand(128 - V, -1))
    with torch.no_grad():
        after = model(idx)[0]
    torch.testing.assert_close(after[..., :V], before)
    if family == "phi":
        torch.testing.assert_close(model.lm_head.bias[V:], model.lm_head.bias[:V].mean().expand(128 - V))
    convert.save_pretrained(model, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(convert.from_pretrained(tmp_path)(idx)[0], after)


def test_cpu_bf16_training_attends_in_fp32(monkeypatch):
    """Under bf16 autocast, CPU training windows <= 256 reach SDPA in fp32 (a speed choice), longer ones and
    inference in bf16; the loss agrees with the all-bf16 path within bf16 rounding."""
    import torch.nn.functional as F
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=V, dim=64, n_layers=2, n_heads=4, max_seq_len=512)).train()
    seen, sdpa = [], F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda q, *a, **k: seen.append(q.dtype) or sdpa(q, *a, **k))
    idx = torch.randint(0, V, (2, 64))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(idx, idx.roll(-1, 1))[1]
        assert seen == [torch.float32] * 2
        model(torch.randint(0, V, (1, 300)))
        assert seen[2:] == [torch.bfloat16] * 2
        model.eval()
        with torch.no_grad():
            model(idx)
        assert seen[4:] == [torch.bfloat16] * 2
        monkeypatch.setattr(F, "scaled_dot_product_attention",
                            lambda q, k, v, **kw: sdpa(q.bfloat16(), k.bfloat16(), v.bfloat16(), **kw))
        model.train()
        all_bf16 = model(idx, idx.roll(-1, 1))[1]
    assert abs(loss.item() - all_bf16.item()) < 0.02
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_own_checkpoint_roundtrip(tmp_path):
    """Our folder is a transformers folder; every ModelConfig field that matters survives it."""
    cfg = ModelConfig(vocab_size=V, dim=48, n_layers=2, n_heads=6, n_kv_heads=3, head_dim=16, hidden_dim=80,
                      max_seq_len=64, norm_eps=1e-6, tie_embeddings=False, dropout=0.1, rope_theta=5e4,
                      rope_scaling={"type": "linear", "factor": 2.0}, bos_id=1, eos_id=2)
    model = Transformer(cfg).to(torch.bfloat16)
    convert.save_pretrained(model, tmp_path)
    loaded = convert.from_pretrained(tmp_path)
    assert loaded.config == cfg and loaded.embed.weight.dtype == torch.bfloat16
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    assert not loaded.training


def test_bad_checkpoints_raise_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        convert.from_pretrained(tmp_path)
    hf_llama().save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="config.json.*gpt2"):
        convert.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    with pytest.raises(ValueError, match="missing.*layers.2"):
        convert.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="mixes LLaMA and Phi"):
        convert.save_pretrained(Transformer(ModelConfig(vocab_size=V, dim=32, n_layers=1, n_heads=4, norm="layernorm")),
                                tmp_path / "x")


@pytest.mark.parametrize("size", [4, 0.5])  # shorter than the header's length field; cut in the middle of the data
def test_truncated_weights_name_the_file(tmp_path, size):
    hf_llama().save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(size if isinstance(size, int) else int(weights.stat().st_size * size))
    with pytest.raises(ValueError, match=r"model.safetensors: cannot be read .* truncated"):
        convert.from_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "pytorch_model.bin").write_bytes(b"PK\x03\x04 not a whole zip")
    with pytest.raises(ValueError, match=r"pytorch_model.bin: cannot be read"):
        convert.from_pretrained(tmp_path)


def test_convert_cli_refuses_bad_arguments_by_name(tmp_path, monkeypatch):
    import sys
    hf_llama().save_pretrained(tmp_path / "src")
    (tmp_path / "file").write_text("")
    for args, message in [([f"--src={tmp_path / 'nope'}", "--out=x"], "nope: expected a checkpoint folder"),
                          ([f"--src={tmp_path / 'src'}", f"--out={tmp_path / 'file'}"], "is a file, not a folder"),
                          ([f"--src={tmp_path / 'src'}", "--out=x", "--dtype=foo"], "--dtype=foo: expected float32")]:
        monkeypatch.setattr(sys, "argv", ["convert.py", *args])
        with pytest.raises(SystemExit, match=message):
            convert.main()


def test_a_broken_gguf_names_the_file(tmp_path):
    pytest.importorskip("gguf")
    (tmp_path / "x.gguf").write_bytes(b"GGUF\x03\x00\x00\x00 and then nothing")
    (tmp_path / "y.gguf").write_text("not gguf at all")
    for name in ("x.gguf", "y.gguf"):
        with pytest.raises(ValueError, match=f"{name}: not a readable GGUF file"):
            convert.from_pretrained(tmp_path / name)


# ----------------------------------------------------------------------------- a real checkpoint: SmolLM2-135M

@pytest.mark.slow
def test_smollm2_greedy_and_logits_match_transformers(smollm2):
    ours, hf, tok, _ = smollm2
    assert ours.config.tie_embeddings and ours.config.n_kv_heads == 3 and ours.config.rope_theta == 100000.0
    chat = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    prompt = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([tok(prompt)["input_ids"]])
    assert ids[0, 0].item() == tok.convert_tokens_to_ids("<|im_start|>")
    with torch.no_grad():
        # an explicit mask: <|im_end|> is also SmolLM2's pad id, which transformers would otherwise mask out
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, min_new_tokens=32,
                          do_sample=False, eos_token_id=None, pad_token_id=2)
    out = ours.generate(ids, 32, temperature=0)
    assert out[0, ids.shape[1]:].tolist() == ref[0, ids.shape[1]:].tolist()
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])

    text = ("<|im_start|>user\nWrite a short story about a robot who learns to paint, and tell me what colours it "
            "likes best and why. Keep it simple and friendly for children, please.<|im_end|>\n<|im_start|>assistant\n"
            "Once upon a time, in a quiet workshop at the edge of town, there lived a small robot named Pip. Every "
            "morning Pip watched the sun paint the sky.")
    ids = torch.tensor([tok(text)["input_ids"][:64]])
    assert ids.shape[1] == 64
    with torch.no_grad():
        assert max_diff(ours(ids)[0], hf(ids).logits) <= 1e-3
