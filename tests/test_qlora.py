"""QLoRA on CPU: frozen NF4 base linears (bitsandbytes) with fp32 adapters train, merge into the dequantised base
exactly, and without bitsandbytes only QLoRA stops, with a message that says what to install."""
import sys

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

import lora  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402

V = 96


def tiny(**kw):
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=V, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32, **kw))


def test_qlora_trains_and_merges_into_the_dequantised_base(tmp_path):
    model = tiny(tie_embeddings=False)
    lora.add_lora(model, rank=8, alpha=16, targets="all", trainable="lm_head", quantize="nf4")
    bases = [m.base for m in lora.lora_layers(model).values()]
    assert len(bases) == 14 and all(isinstance(b, bnb.nn.Linear4bit) for b in bases)
    assert all(b.compute_dtype == torch.bfloat16 and b.weight.quant_type == "nf4" for b in bases)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in dict(model.named_parameters()) if n.endswith(("lora_A", "lora_B"))} | \
        {"lm_head.weight"}
    assert all(m.lora_A.dtype == m.lora_B.dtype == torch.float32 for m in lora.lora_layers(model).values())

    # overfit a fixed batch: the adapters learn through the 4-bit base
    generator = torch.Generator().manual_seed(1)
    idx = torch.randint(0, V, (4, 32), generator=generator)
    targets = torch.randint(0, V, (4, 32), generator=generator)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(30):
        loss = model(idx, targets)[1]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses

    # the reference: the same adapters on plain fp32 layers holding the dequantised NF4 weights
    model.eval()
    reference = tiny(tie_embeddings=False).eval()
    reference.load_state_dict({k: v for k, v in model.state_dict().items() if ".base." not in k}, strict=False)
    lora.add_lora(reference, rank=8, alpha=16, targets="all")
    for name, layer in lora.lora_layers(model).items():
        ref = reference.get_submodule(name)
        with torch.no_grad():
            ref.base.weight.copy_(lora.dequantized_weight(layer.base))
            ref.lora_A.copy_(layer.lora_A)
            ref.lora_B.copy_(layer.lora_B)
            if layer.base.bias is not None:
                ref.base.bias.copy_(layer.base.bias)
    with torch.no_grad():
        want = reference(idx)[0]
        lora.merge_lora(model, dtype=torch.float32)
        got = model(idx)[0]
    assert not lora.lora_layers(model) and not any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    import convert
    convert.save_pretrained(model.to(torch.bfloat16), tmp_path)  # a plain Transformer again
    assert convert.from_pretrained(tmp_path).embed.weight.dtype == torch.bfloat16


def test_qlora_without_bitsandbytes_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes now raises ImportError
    model = tiny()
    with pytest.raises(SystemExit, match="needs bitsandbytes: pip install bitsandbytes"):
        lora.add_lora(model, quantize="nf4")
    lora.add_lora(tiny(), targets="q_proj")  # plain LoRA does not need it
    with pytest.raises(ValueError, match="quantize='int4'"):
        lora.add_lora(tiny(), quantize="int4")


@pytest.mark.parametrize("fast_bf16, expected", [("0", torch.float32), ("1", torch.bfloat16)])
def test_qlora_multiplies_in_the_dtype_the_cpu_is_fast_at(monkeypatch, fast_bf16, expected):
    """On a CPU without AMX/AVX512-BF16 a bf16 matmul is emulated: the NF4 bases follow dtype=auto, not bf16."""
    import tuning
    monkeypatch.setenv("TINYLLM_CPU_BF16", fast_bf16)
    model = tiny()
    cfg = dict(seed=0, device="cpu", dtype="auto", trainable="", lora_rank=4, lora_alpha=8.0, lora_dropout=0.0,
               lora_targets="q_proj,v_proj", use_rslora=False, method="qlora")
    tuning.add_adapters(model, cfg, type("Data", (), {"meta": {}})())
    bases = [m.base for m in lora.lora_layers(model).values()]
    assert bases and all(b.compute_dtype == expected for b in bases)
    logits = model(torch.randint(0, V, (1, 8)))[0]  # the NF4 layers run in that dtype, and give back finite logits
    assert torch.isfinite(logits).all()
