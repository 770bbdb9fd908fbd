"""fine_tuning.py: the step's loss is the mean over every supervised token whatever the accumulation, packed rows
score like separate records, full / LoRA / QLoRA runs export what eval.py loads, tokens the data added grow the
embeddings, and a run resumes after kill -9 to the same end."""
import json
import os
import subprocess
import sys

import pytest
import torch

import checkpoint
import data
import data_process
import inference
import trainer
from conftest import kill_then_resume, run_script, char_tokenizer_folder, tiny_model_with_data, tiny_transformer
from tuning import SFTBatches
from test_pretrain import ENV, ROOT, read_metrics

ADD = [(a, b) for a in range(2, 9) for b in range(1, 8)]


def records():
    """Learnable chat records of different lengths: additions, some with a system prompt, some two turns long."""
    out = []
    for k, (a, b) in enumerate(ADD):
        msgs = [{"role": "user", "content": f"add {a} and {b}"}, {"role": "assistant", "content": f"it is {a + b}."}]
        if k % 3 == 0:
            msgs = [{"role": "system", "content": "Answer briefly."}] + msgs
        if k % 4 == 0:
            msgs += [{"role": "user", "content": "and doubled?"}, {"role": "assistant", "content": f"{2 * (a + b)}."}]
        out.append({"messages": msgs, "split": "val" if k % 7 == 3 else "train"})
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny model folder with a character tokenizer (ChatML markers included) and SFT data made for it."""
    return tiny_model_with_data(tmp_path_factory.mktemp("sft"), records(), "sft")


def fine_tune(args):
    return run_script("fine_tuning.py", args)


def val_losses(out):
    return [x["val_loss"] for x in read_metrics(out) if "val_loss" in x]


# ---------------------------------------------------------------------------------------------- the loss

def step_gradients(setup, tmp_path, batch_size, grad_accum, packing=False):
    """Loss and gradients of one optimizer step of the trainer on the SFT data (fp32, no clipping)."""
    model_dir, data_dir = setup
    import convert
    model = convert.from_pretrained(model_dir, dtype=torch.float32)
    batches = SFTBatches(data.load_sft(data_dir, "train"), 128, batch_size, 0, 7, packing)
    cfg = dict(out_dir=str(tmp_path), max_iters=1, batch_size=batch_size, grad_accum=grad_accum, dtype="float32",
               grad_clip=0.0, eval_interval=1, eval_iters=1, warmup_iters=0)
    t = trainer.Trainer(cfg, model, lambda s, m: batches.train_batch(s, m, grad_accum))
    grads = {}
    t.optimizer.step = lambda: grads.update({n: p.grad.clone() for n, p in model.named_parameters()})
    loss, *_ = t.train_step()
    return loss, grads, batches


def test_batch_8_by_1_equals_1_by_8_on_records_of_different_lengths(setup, tmp_path):
    loss_a, grads_a, batches = step_gradients(setup, tmp_path / "a", batch_size=8, grad_accum=1)
    loss_b, grads_b, _ = step_gradients(setup, tmp_path / "b", batch_size=1, grad_accum=8)
    lengths = {len(batches.train_batch(0, m, 8)[0][0]) for m in range(8)}
    assert len(lengths) > 2, "the records should differ in length for this test to mean anything"
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=1e-6, msg=name)  # float order only
    # the naive mean of per-micro-batch means differs: the weighting is what makes them equal
    x, y = batches.train_batch(0, 0, 1)
    per_record = [(y[r] != -100).sum().item() for r in range(8)]
    assert len(set(per_record)) > 1


def test_packed_rows_score_like_separate_records(setup):
    model_dir, data_dir = setup
    import convert
    model = convert.from_pretrained(model_dir, dtype=torch.float32)
    records = data.load_sft(data_dir, "train")
    plain = SFTBatches(records, 128, 64, 0, 7, packing=False)
    packed = SFTBatches(records, 128, 64, 0, 7, packing=True)
    assert len(packed) < len(plain) and sorted(i for u in packed.units for i in u) == sorted(plain.kept)
    with torch.no_grad():
        def total(batches):
            loss, n = 0.0, 0
            for i in range(-(-len(batches) // 64)):
                b = batches.val_batch(i)
                w = trainer.supervised_tokens(b).item()
                loss, n = loss + trainer.lm_loss(model, b).item() * w, n + w
            return loss, n
        (a, n_a), (b, n_b) = total(plain), total(packed)
    assert n_a == n_b and a / n_a == pytest.approx(b / n_b, rel=1e-5)


# ---------------------------------------------------------------------------------------------- runs

def test_full_sft_learns_and_exports(setup, tmp_path):
    model_dir, data_dir = setup
    out = str(tmp_path / "full")
    r = fine_tune([f"--init_from={model_dir}", f"--data_dir={data_dir}", f"--out_dir={out}", "--epochs=6",
                   "--learning_rate=3e-3", "--sample_prompts=1"])
    vals = val_losses(out)
    assert vals[-1] < 0.6 * vals[0], vals
    assert "  reply:  " in r.stdout and "  reference: 'it is" in r.stdout  # held-out answers at each evaluation
    model, tok = inference.load_model(os.path.join(out, "hf"))
    assert tok.vocab_size == inference.load_model(model_dir)[1].vocab_size


@pytest.mark.parametrize("targets", ["all", "q_proj,v_proj,lm_head"])  # the tiny model's lm_head is tied
def test_lora_exports_an_adapter_equal_to_the_merged_model(setup, tmp_path, targets):
    model_dir, data_dir = setup
    out = str(tmp_path / "lora")
    r = fine_tune([f"--init_from={model_dir}", f"--data_dir={data_dir}", f"--out_dir={out}", "--method=lora",
                   "--epochs=3", "--learning_rate=1e-2", "--lora_rank=4", "--merge_dtype=float32",
                   "--sample_prompts=0", f"--lora_targets={targets}"])
    assert ("lm_head is untied" in r.stdout) == ("lm_head" in targets)
    vals = val_losses(out)
    assert vals[-1] < vals[0] - 0.1, vals
    assert os.path.isfile(os.path.join(out, "adapter", "adapter_config.json"))
    merged, _ = inference.load_model(os.path.join(out, "hf"))
    adapted, _ = inference.load_model(os.path.join(out, "adapter"), lora_base=model_dir)
    base, _ = inference.load_model(model_dir)
    x = torch.randint(0, merged.config.vocab_size, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(adapted(x)[0], merged(x)[0], atol=1e-4, rtol=1e-4)
        assert not torch.allclose(base(x)[0], merged(x)[0], atol=1e-3)


def test_qlora_run_learns_on_cpu(setup, tmp_path):
    pytest.importorskip("bitsandbytes")
    _, data_dir = setup
    import convert
    from model import ModelConfig, Transformer
    model_dir = str(tmp_path / "model64")  # bitsandbytes' CPU kernel wants rows of at least one 64-weight block
    tok = char_tokenizer_folder(model_dir)
    torch.manual_seed(0)
    convert.save_pretrained(Transformer(ModelConfig(vocab_size=tok.vocab_size, dim=64, n_layers=2, n_heads=4,
                                                    max_seq_len=128)), model_dir)
    out = str(tmp_path / "qlora")
    fine_tune([f"--init_from={model_dir}", f"--data_dir={data_dir}", f"--out_dir={out}", "--method=qlora",
               "--epochs=3", "--learning_rate=1e-2", "--lora_rank=4", "--sample_prompts=1", "--dtype=bfloat16"])
    vals = val_losses(out)
    assert vals[-1] < vals[0] - 0.1, vals
    from safetensors.torch import load_file
    weights = load_file(os.path.join(out, "hf", "model.safetensors"))
    assert {w.dtype for w in weights.values()} == {torch.bfloat16}  # merged into the dequantised base, in bf16
    assert "layers.0.attn.q_proj.weight" in weights or any("q_proj.weight" in k for k in weights)
    inference.load_model(os.path.join(out, "hf"))  # a plain checkpoint again


def test_tokens_the_data_added_grow_the_embeddings_and_train(tmp_path):
    """A model whose tokenizer has no ChatML markers, tuned on ChatML data: data_process adds the markers, the
    embeddings grow to a multiple of 64 and the new rows move."""
    from tokenizers import decoders, models
    from tokenizers import Tokenizer as HFTokenizer
    import convert
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    chars = "<>/|_ abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ:.,?!'\n0123456789"
    hf = HFTokenizer(models.BPE(vocab={t: i for i, t in enumerate(["</s>"] + list(chars))}, merges=[]))
    hf.decoder = decoders.Fuse()
    hf.save(str(model_dir / "tokenizer.json"))
    (model_dir / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    vocab = hf.get_vocab_size()
    convert.save_pretrained(tiny_transformer(vocab, max_seq_len=128), str(model_dir))
    src = tmp_path / "records.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records()))
    data_dir = str(tmp_path / "data")
    data_process.run(data_process.config(format="sft", template="chatml", input=str(src), tokenizer=str(model_dir),
                                         out_dir=data_dir, num_workers=1))
    meta = json.load(open(os.path.join(data_dir, "meta.json")))
    assert set(meta["added_tokens"]) == {"<|im_start|>", "<|im_end|>"}
    out = str(tmp_path / "out")
    r = fine_tune([f"--init_from={model_dir}", f"--data_dir={data_dir}", f"--out_dir={out}", "--method=lora",
                   "--epochs=1", "--learning_rate=1e-2", "--lora_rank=4", "--merge_dtype=float32",
                   "--sample_prompts=0"])
    assert "embeddings resized to 128 rows" in r.stdout
    tuned, tok = inference.load_model(os.path.join(out, "hf"))
    assert tuned.config.vocab_size == 128 and tok.vocab_size == vocab + 2
    old = convert.from_pretrained(str(model_dir)).embed.weight
    new_rows = tuned.embed.weight[[meta["added_tokens"]["<|im_start|>"], meta["added_tokens"]["<|im_end|>"]]]
    assert not torch.allclose(new_rows, old.mean(0).expand_as(new_rows), atol=1e-4)  # moved from their mean start


def test_full_sft_resumes_after_kill_9_to_the_same_end(setup, tmp_path):
    model_dir, data_dir = setup
    out, reference = kill_then_resume("fine_tuning.py", [f"--init_from={model_dir}", f"--data_dir={data_dir}",
                                                         "--sample_prompts=0", "--learning_rate=3e-3"], tmp_path, steps=40)
    a = torch.load(os.path.join(out, "ckpt", "step_00000040", "state.pt"), weights_only=True)["model"]
    b = torch.load(os.path.join(reference, "ckpt", "step_00000040", "state.pt"), weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_bad_settings_are_refused_before_any_work(setup, tmp_path):
    model_dir, data_dir = setup
    for args, message in [(["--method=dora"], "method='dora': expected full, lora or qlora"),
                          (["--lora_rank=0", "--method=lora"], "need rank >= 1"),
                          (["--epochs=0"], "epochs=0"),
                          (["--max_len=1000"], "max_len=1000 exceeds the model's context of 128"),
                          ([], None)]:
        if message is None:
            continue
        cmd = [sys.executable, os.path.join(ROOT, "fine_tuning.py"), f"--init_from={model_dir}",
               f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'o'}", *args]
        r = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
        assert r.returncode != 0 and message in r.stderr, (args, r.stderr[-2000:])
    pretrain_data = tmp_path / "pre"
    from test_pretrain import make_data_dir
    make_data_dir(str(pretrain_data), n_train=2000, n_val=200)
    cmd = [sys.executable, os.path.join(ROOT, "fine_tuning.py"), f"--init_from={model_dir}",
           f"--data_dir={pretrain_data}", f"--out_dir={tmp_path / 'o2'}"]
    r = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "this is pretrain data, not sft data" in r.stderr


def test_unknown_lora_module_names_are_refused_before_any_work(setup, tmp_path):
    """lora_targets / trainable naming a module the model lacks: one line naming the key and the model's names."""
    model_dir, data_dir = setup
    for arg, message in [("--lora_targets=q_proj,qproj", "lora_targets='q_proj,qproj', trainable='': LoRA targets "
                                                         "['qproj'] name no linear layer of the model; its linear "
                                                         "layers are ['down_proj', 'gate_proj', 'k_proj', 'lm_head'"),
                         ("--trainable=wte", "trainable='wte': trainable modules ['wte'] are not in the model")]:
        out = tmp_path / "o"
        cmd = [sys.executable, os.path.join(ROOT, "fine_tuning.py"), f"--init_from={model_dir}",
               f"--data_dir={data_dir}", f"--out_dir={out}", "--method=lora", "--max_iters=1", arg]
        r = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
        assert r.returncode != 0 and message in r.stderr and "Traceback" not in r.stderr, (arg, r.stderr[-2000:])
        assert not out.exists()


def test_lora_adapters_start_from_seed():
    """The adapters' random A matrices follow `seed`, as a full run's weights do: equal seeds give equal adapters
    whatever drew from torch's generator before, another seed other ones (they were drawn before the trainer seeds
    torch, so `seed` did not reach them)."""
    import types
    import lora
    import tuning

    def initial_a(seed, drawn_before):
        model = tiny_transformer(80)
        torch.rand(drawn_before)  # other work between loading and the adapters
        cfg = {**vars(tuning.TuningConfig()), "method": "lora", "seed": seed}
        tuning.add_adapters(model, cfg, types.SimpleNamespace(meta={}))
        return [m.lora_A for m in lora.lora_layers(model).values()]

    a, again, other = initial_a(1, 0), initial_a(1, 5), initial_a(2, 0)
    assert len(a) == 14 and all(torch.equal(x, y) for x, y in zip(a, again))
    assert not any(torch.equal(x, y) for x, y in zip(a, other))


def test_a_training_runs_out_dir_or_checkpoint_is_a_starting_point(tmp_path):
    from test_pretrain import tiny_trainer
    t = tiny_trainer(tmp_path / "run", lambda m, b, r: m(b[0], b[1])[1], max_iters=6, eval_interval=3)
    t.fit()
    want = {k: v.clone() for k, v in t.raw_model.state_dict().items()}
    for source in (tmp_path / "run", tmp_path / "run" / "ckpt" / "step_00000006"):
        model, tok = checkpoint.build_model(str(source), str(tmp_path / "new"))
        assert tok is None  # that run's data had no tokenizer
        assert all(torch.equal(model.state_dict()[k], v) for k, v in want.items())
    with pytest.raises(SystemExit, match="init_from=.*README.md: .*expected a checkpoint folder"):
        checkpoint.build_model(os.path.join(ROOT, "README.md"), str(tmp_path / "new"))
