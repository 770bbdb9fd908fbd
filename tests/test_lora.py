"""lora.py against peft (the reference): adapters move both ways between peft on transformers and our Transformer
with equal logits, merging changes nothing, only the adapters train, and eval.py takes an adapter as --ckpt."""
import json
import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
transformers.logging.set_verbosity_error()

import lora  # noqa: E402
import convert  # noqa: E402
from test_model import V, hf_llama, hf_phi  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IDS = torch.randint(0, V, (2, 24), generator=torch.Generator().manual_seed(1))


def hf_base(tmp_path, family="llama"):
    """A tiny random transformers model (test_model's), saved as the adapter's base folder."""
    model = hf_llama() if family == "llama" else hf_phi()
    path = tmp_path / "base"
    model.save_pretrained(path)
    return model, str(path)


@pytest.mark.parametrize("family,targets,rslora", [("llama", ["q_proj", "v_proj", "down_proj"], False),
                                                   ("llama", "all-linear", True),
                                                   ("phi", ["q_proj", "dense", "fc1"], False)])
def test_peft_adapter_loads_with_equal_logits(tmp_path, family, targets, rslora):
    hf, base = hf_base(tmp_path, family)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, use_rslora=rslora)
    torch.manual_seed(2)  # init_lora_weights=False: B random too, so the adapter changes the output
    peft_model = peft.get_peft_model(hf, config).eval()
    peft_model.save_pretrained(tmp_path / "adapter")
    ours, found = lora.load(str(tmp_path / "adapter"), base=base)
    assert found == base and lora.lora_layers(ours)
    with torch.no_grad():
        want = peft_model(IDS).logits
        with peft_model.disable_adapter():
            plain = peft_model(IDS).logits
        got = ours(IDS)[0]
    assert (want - plain).abs().max() > 1e-2  # the adapter matters
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    lora.merge_lora(ours)
    assert not lora.lora_layers(ours)
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS)[0], want, atol=1e-4, rtol=1e-4)


def test_our_adapter_loads_in_peft(tmp_path):
    hf, base = hf_base(tmp_path)
    ours = convert.from_pretrained(base)
    names = lora.add_lora(ours, rank=4, alpha=16, targets="q_proj,k_proj,o_proj,up_proj")
    assert len(names) == 8
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    with torch.no_grad():
        before = ours(IDS)[0]
        for m in lora.lora_layers(ours).values():
            m.lora_B.normal_(0, 0.05)
        after = ours(IDS)[0]
    torch.testing.assert_close(before, hf(IDS).logits, atol=1e-4, rtol=1e-4)  # B = 0: the base model exactly
    lora.save_adapter(ours, tmp_path / "adapter", base=base)
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["r"] == 4 and saved["lora_alpha"] == 16 and saved["base_model_name_or_path"] == base
    fresh = transformers.AutoModelForCausalLM.from_pretrained(base)
    peft_model = peft.PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(after, peft_model(IDS).logits, atol=1e-4, rtol=1e-4)


def perturbed(model, *modules):
    """Random non-zero B (and random full-module weights): an adapter that changes the output."""
    with torch.no_grad():
        for m in lora.lora_layers(model).values():
            m.lora_B.normal_(0, 0.05)
        for name in modules:
            for p in model.get_submodule(name).parameters():
                p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.mark.parametrize("tie", [False, True])
def test_modules_to_save_and_dropout_round_trip_through_peft(tmp_path, tie):
    """Embeddings and lm_head trained in full (named as PEFT does) next to LoRA with dropout: only they and the
    adapters train, the folder loads in peft and back here with equal logits, and merging changes nothing."""
    hf, base = hf_base(tmp_path)
    if tie:
        hf = hf_llama(tie=True)
        hf.save_pretrained(base)
    ours = convert.from_pretrained(base)
    lora.add_lora(ours, rank=4, alpha=8, dropout=0.1, targets="q_proj,v_proj,down_proj",
                  trainable="embed_tokens,lm_head")
    assert ours.modules_to_save == ["embed", "lm_head"]
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in ours.named_parameters() if n.endswith(("lora_A", "lora_B"))} | \
        ({"embed.weight"} if tie else {"embed.weight", "lm_head.weight"})
    perturbed(ours, "embed", "lm_head").eval()
    with torch.no_grad():
        want = ours(IDS)[0]
    assert set(lora.lora_state_dict(ours)) >= {"embed.weight", "lm_head.weight"}
    lora.save_adapter(ours, tmp_path / "adapter", base=base)
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["modules_to_save"] == ["embed_tokens", "lm_head"] and saved["lora_dropout"] == 0.1
    fresh = transformers.AutoModelForCausalLM.from_pretrained(base)
    peft_model = peft.PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    back, _ = lora.load(str(tmp_path / "adapter"))
    with torch.no_grad():
        torch.testing.assert_close(peft_model(IDS).logits, want, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(back.eval()(IDS)[0], want, atol=1e-5, rtol=1e-5)
        back.train()
        assert (back(IDS)[0] - want).abs().max() > 1e-3  # dropout came back with the adapter
        lora.merge_lora(back.eval())
        torch.testing.assert_close(back(IDS)[0], want, atol=1e-5, rtol=1e-5)


def test_lora_on_a_tied_lm_head_merges_into_an_untied_one(tmp_path):
    """An adapter on a tied lm_head changes the output layer only: merging unties it (lm_head W + B @ A, the embedding
    still W), so the saved merged folder gives the adapted model's logits, here and in transformers. (The folder was
    byte-identical to the base; peft's merge_and_unload folds the update into the shared matrix, embedding too.)"""
    hf = hf_llama(tie=True)
    base = str(tmp_path / "base")
    hf.save_pretrained(base)
    ours = convert.from_pretrained(base)
    lora.add_lora(ours, rank=4, alpha=8, targets="q_proj,lm_head")
    perturbed(ours).eval()
    lora.save_adapter(ours, tmp_path / "adapter", base=base)
    with torch.no_grad():
        want = ours(IDS)[0]
        assert (want - hf(IDS).logits).abs().max() > 1e-2  # the adapter matters
    lora.merge_lora(ours)
    assert not ours.config.tie_embeddings
    convert.save_pretrained(ours, tmp_path / "merged")
    merged = convert.from_pretrained(tmp_path / "merged")
    hf_merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    peft_model = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base),
                                                tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS)[0], want, atol=1e-5, rtol=1e-5)
        assert torch.equal(merged.embed.weight, convert.from_pretrained(base).embed.weight)
        torch.testing.assert_close(hf_merged(IDS).logits, want, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(peft_model(IDS).logits, want, atol=1e-4, rtol=1e-4)  # peft reads the adapter so
        again, _ = lora.load(str(tmp_path / "adapter"), merge=True)
        torch.testing.assert_close(again(IDS)[0], want, atol=1e-5, rtol=1e-5)


def test_added_tokens_adapter_resizes_its_base(tmp_path):
    """An adapter trained after resize_embeddings carries the bigger embedding; loading it grows the base to match
    (here and, after resize_token_embeddings, in peft) with equal logits."""
    from model import resize_embeddings
    hf, base = hf_base(tmp_path)
    ours = convert.from_pretrained(base)
    assert resize_embeddings(ours, V + 3) == 128
    lora.add_lora(ours, rank=4, alpha=8, targets="q_proj", trainable="embed,lm_head")
    perturbed(ours, "embed", "lm_head")
    ids = torch.cat([IDS, torch.tensor([[V, V + 2]] * 2)], 1)  # the added tokens
    with torch.no_grad():
        want = ours(ids)[0]
    lora.save_adapter(ours, tmp_path / "adapter", base=base)
    back, _ = lora.load(str(tmp_path / "adapter"))
    assert back.config.vocab_size == 128
    fresh = transformers.AutoModelForCausalLM.from_pretrained(base)
    fresh.resize_token_embeddings(128)
    peft_model = peft.PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(ids)[0], want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(peft_model(ids).logits, want, atol=1e-4, rtol=1e-4)


def test_phi_recipe_names(tmp_path):
    """Phi-2 recipes name Wqkv, out_proj, fc1, fc2 (microsoft/phi-2's naming): they pick our q/k/v, o_proj, fc1, fc2;
    the adapter (with the biased lm_head trained in full) loads in peft on transformers' Phi with equal logits."""
    hf, base = hf_base(tmp_path, "phi")
    ours = convert.from_pretrained(base)
    names = lora.add_lora(ours, rank=4, alpha=4, targets=["Wqkv", "out_proj", "fc1", "fc2"], trainable=["lm_head"])
    assert sorted({n.rpartition(".")[2] for n in names}) == ["fc1", "fc2", "k_proj", "o_proj", "q_proj", "v_proj"]
    assert ours.lm_head.bias.requires_grad and not ours.embed.weight.requires_grad
    perturbed(ours, "lm_head").eval()
    lora.save_adapter(ours, tmp_path / "adapter", base=base)
    peft_model = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base),
                                                tmp_path / "adapter").eval()
    with torch.no_grad():
        want = ours(IDS)[0]
        torch.testing.assert_close(peft_model(IDS).logits, want, atol=1e-4, rtol=1e-4)
        lora.merge_lora(ours)
        torch.testing.assert_close(ours(IDS)[0], want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="either a LoRA target or trained in full"):
        lora.add_lora(convert.from_pretrained(base), targets="lm_head", trainable="lm_head")
    with pytest.raises(ValueError, match=r"trainable modules \['wte'\] are not in the model"):
        lora.add_lora(convert.from_pretrained(base), trainable="wte")


def test_unknown_module_names_are_refused_naming_them_and_the_real_ones(tmp_path):
    """A LoRA target or trainable module the model lacks is an error naming it and listing the model's names, also
    when another name of the list matches (it was dropped silently); the model is left as it was."""
    _, base = hf_base(tmp_path)
    model = convert.from_pretrained(base)
    linear = r"\['down_proj', 'gate_proj', 'k_proj', 'lm_head', 'o_proj', 'q_proj', 'up_proj', 'v_proj'\]"
    for targets in ("q_proj,qproj", ["q_proj", "qproj"], "q_proj,embed,qproj"):  # embed: not a linear layer
        with pytest.raises(ValueError, match=r"LoRA targets \[('embed', )?'qproj'\] name no linear layer of the "
                                             r"model; its linear layers are " + linear):
            lora.add_lora(model, targets=targets)
    with pytest.raises(ValueError, match=r"targets \['fc1', 'fc2'\] name no linear layer"):  # Phi's names on LLaMA
        lora.add_lora(model, targets="q_proj,fc1,fc2")
    with pytest.raises(ValueError, match=r"trainable modules \['wte'\] are not in the model; its modules with "
                                         r"weights are \[.*'embed', .*'lm_head', .*'q_proj'"):
        lora.add_lora(model, targets="q_proj", trainable="embed,wte")
    assert not lora.lora_layers(model) and all(p.requires_grad for p in model.parameters())


def test_only_adapters_get_gradients(tmp_path):
    _, base = hf_base(tmp_path)
    model = convert.from_pretrained(base).train()
    lora.add_lora(model, rank=2, alpha=4, dropout=0.1, targets="all")
    loss = model(IDS)[0].logsumexp(-1).mean()
    loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(n.endswith(("lora_A", "lora_B")) for n in grads)
    assert set(lora.lora_state_dict(model)) == {n for n, _ in model.named_parameters() if n.endswith(("lora_A",
                                                                                                     "lora_B"))}


def test_bad_adapters_fail_clearly(tmp_path):
    hf, base = hf_base(tmp_path)
    model = convert.from_pretrained(base)
    with pytest.raises(ValueError, match=r"LoRA targets \['query'\] name no linear layer.*its linear layers are"):
        lora.add_lora(model, targets="query")
    folder = tmp_path / "adapter"
    peft.get_peft_model(hf, peft.LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(folder)
    with pytest.raises(SystemExit, match="base model .* not found"):
        lora.load(str(folder), base=str(tmp_path / "nowhere"))
    hf_llama(hidden_size=32, intermediate_size=48).save_pretrained(tmp_path / "other")
    with pytest.raises(SystemExit, match="has shape .* is base_model_name_or_path the adapter's base"):
        lora.load(str(folder), base=str(tmp_path / "other"))
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg["use_dora"] = True
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(SystemExit, match="use_dora=True is not supported"):
        lora.load(str(folder), base=base)


def test_eval_takes_an_adapter_as_ckpt(tmp_path):
    from conftest import char_tokenizer_folder, tiny_transformer
    base = str(tmp_path / "base")
    tok = char_tokenizer_folder(base)
    convert.save_pretrained(tiny_transformer(tok.vocab_size, max_seq_len=128), base)
    model = convert.from_pretrained(base)
    lora.add_lora(model, rank=4, alpha=8, targets="q_proj,v_proj")
    with torch.no_grad():
        for m in lora.lora_layers(model).values():
            m.lora_B.normal_(0, 0.2)
    adapter = str(tmp_path / "adapter")
    lora.save_adapter(model, adapter, base=base)
    text = tmp_path / "doc.txt"
    text.write_text("the cat sat on the mat. " * 6)
    out = tmp_path / "r.json"
    cmd = [sys.executable, "eval.py", f"--ckpt={adapter}", "--task=ppl", f"--data={text}", "--dtype=float32",
           f"--out={out}", "--block_size=64"]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    import inference
    tokens = tok.encode(text.read_text()) + [tok.eos_id]
    want = inference.perplexity(model.eval(), tokens, 64)["ppl"]
    assert json.loads(out.read_text())["results"]["ppl"]["ppl"] == pytest.approx(want, rel=1e-5)
    assert want != pytest.approx(inference.perplexity(convert.from_pretrained(base), tokens, 64)["ppl"], rel=1e-3)


@pytest.mark.slow
def test_peft_adapter_on_smollm2(smollm2, tmp_path):
    """Real weights: a peft adapter on transformers' SmolLM2-135M-Instruct, loaded here onto the same GGUF."""
    _, hf, tok, gguf_path = smollm2
    torch.manual_seed(3)
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                             init_lora_weights=False)
    peft_model = peft.get_peft_model(hf, config).eval()
    try:
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.mul_(0.05)  # a fine-tune-sized update, not a random rewrite of the model
        peft_model.save_pretrained(tmp_path / "adapter")
        ids = torch.tensor([tok("<|im_start|>user\nName three primary colours.<|im_end|>\n")["input_ids"]])
        with torch.no_grad():
            want = peft_model(ids).logits
            with peft_model.disable_adapter():
                base = peft_model(ids).logits
    finally:
        peft_model.unload()  # the fixture's model is shared: take the adapters out again
    import inference
    ours, _ = inference.load_model(str(tmp_path / "adapter"), "cpu", "float32", lora_base=gguf_path)
    with torch.no_grad():
        got = ours(ids)[0]
    assert (want - base).abs().max() > 0.05
    assert (got - want).abs().max() <= 2e-3
