"""dpo.py: every loss and metric is its published formula, answers alone are scored in one forward, the three
references agree with what they stand for and stay frozen, a tiny run learns a held-out preference, a run
resumes after kill -9 to the same end, and pair making drops exactly the pairs above the similarity threshold."""
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import data
import dpo
import lora
import trainer
from conftest import kill_then_resume, run_script, tiny_model_with_data
from test_pretrain import ENV, ROOT, read_metrics

REFUSALS = ["no idea.", "ask someone else.", "i cannot say."]


def records():
    """A learnable preference: a sum beats a refusal; every seventh prompt held out."""
    out = []
    for k, (a, b) in enumerate((a, b) for a in range(2, 9) for b in range(1, 8)):
        out.append({"prompt": f"add {a} and {b}", "chosen": f"it is {a + b}.", "rejected": REFUSALS[k % 3],
                    "split": "val" if k % 7 == 3 else "train"})
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny model folder with a character tokenizer and DPO data made for it by data_process.py."""
    return tiny_model_with_data(tmp_path_factory.mktemp("dpo"), records(), "dpo", max_seq_len=64)


def load(model_dir):
    import convert
    return convert.from_pretrained(model_dir, dtype=torch.float32)


def run_dpo(args):
    return run_script("dpo.py", args)


def digest(model):
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode() + v.detach().cpu().numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- the losses

PC, PR, RC, RR = [-5.0, -7.0, -3.0], [-6.0, -4.0, -9.0], [-5.5, -6.0, -3.0], [-5.0, -5.0, -8.0]


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


@pytest.mark.parametrize("loss_type,eps", [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0), ("hinge", 0.0)])
def test_each_loss_and_metric_is_the_published_formula(loss_type, eps):
    beta = 0.3
    losses, rc, rr = dpo.preference_loss(*map(torch.tensor, (PC, PR, RC, RR)), beta, loss_type, eps)
    metrics = dpo.pair_metrics(rc, rr, torch.tensor(PC), torch.tensor(PR))
    for i, (pc, pr, ref_c, ref_r) in enumerate(zip(PC, PR, RC, RR)):
        h = (pc - pr) - (ref_c - ref_r)
        want = {"sigmoid": -(1 - eps) * math.log(sigmoid(beta * h)) - eps * math.log(sigmoid(-beta * h)),
                "ipo": (h - 1 / (2 * beta)) ** 2, "hinge": max(0.0, 1 - beta * h)}[loss_type]
        assert losses[i].item() == pytest.approx(want, rel=1e-6)
        assert rc[i].item() == pytest.approx(beta * (pc - ref_c)) and rr[i].item() == pytest.approx(beta * (pr - ref_r))
    chosen = [beta * (a - b) for a, b in zip(PC, RC)]
    rejected = [beta * (a - b) for a, b in zip(PR, RR)]
    want = {"rewards/chosen": np.mean(chosen), "rewards/rejected": np.mean(rejected),
            "rewards/margins": np.mean(np.subtract(chosen, rejected)),
            "rewards/accuracies": np.mean(np.greater(chosen, rejected)),  # 0.05 > -0.3, -0.3 < 0.3, 0 > -0.3: 2/3
            "logps/chosen": np.mean(PC), "logps/rejected": np.mean(PR)}
    assert want["rewards/accuracies"] == pytest.approx(2 / 3)
    assert {k: pytest.approx(v, rel=1e-6) for k, v in want.items()} == {k: v.item() for k, v in metrics.items()}


def test_at_step_0_the_sigmoid_loss_is_ln2_and_the_rewards_are_0(setup):
    model_dir, data_dir = setup
    model, ref = load(model_dir), load(model_dir)
    batches = dpo.DPOBatches(data.load_dpo(data_dir, "train"), 64, 4, 0, 7)
    loss, metrics = dpo.dpo_loss_fn(0.1, "sigmoid", 0.0, 0.0, "copy")(model, batches.train_batch(0, 0, 1), ref)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert metrics["rewards/chosen"] == 0 and metrics["rewards/rejected"] == 0 and metrics["rewards/margins"] == 0
    assert metrics["rewards/accuracies"] == 0  # no reward is above another yet


def test_the_sft_term_is_the_mean_nll_of_the_chosen_answers(setup):
    model_dir, data_dir = setup
    model = load(model_dir)
    batches = dpo.DPOBatches(data.load_dpo(data_dir, "train"), 64, 4, 0, 7)
    ids, labels = batches.train_batch(0, 0, 1)
    loss, metrics = dpo.dpo_loss_fn(0.1, "sigmoid", 0.0, 0.5, "copy")(model, (ids, labels), load(model_dir))
    nll = model(ids[:4], labels[:4])[1].item()  # the model's own mean cross-entropy over the chosen answers
    assert metrics["nll/chosen"].item() == pytest.approx(nll, rel=1e-5)
    assert loss.item() == pytest.approx(math.log(2) + 0.5 * nll, rel=1e-5)


# ---------------------------------------------------------------------------------------------- log-probs

def test_only_answer_tokens_are_scored_chosen_and_rejected_in_one_forward(setup):
    model_dir, data_dir = setup
    model, records_ = load(model_dir), data.load_dpo(data_dir, "train")
    batches = dpo.DPOBatches(records_, 64, 3, 0, 7)
    ids, labels = batches.val_batch(0)
    assert ids.shape[0] == 6  # 3 pairs: chosen rows, then rejected rows, one forward
    calls = []
    model.register_forward_hook(lambda m, i, o: calls.append(i[0].shape))
    logps, counts = dpo.answer_logps(model, ids, labels)
    assert calls == [ids.shape]
    for k in range(3):
        prompt, chosen, rejected = records_[batches.kept[k]]
        for row, answer in ((k, chosen), (3 + k, rejected)):
            seq = torch.from_numpy(np.concatenate([prompt, answer]))[None]
            logp = F.log_softmax(model(seq)[0][0, :-1].float(), -1)  # unpadded, alone
            want = sum(logp[len(prompt) - 1 + j, t].item() for j, t in enumerate(answer.tolist()))
            assert logps[row].item() == pytest.approx(want, rel=1e-5)
            assert counts[row].item() == len(answer)


def test_a_row_is_the_whole_conversation_rendered_once_no_doubled_bos_or_eos(setup):
    from tokenizer import Tokenizer
    _, data_dir = setup
    tok = Tokenizer.from_pretrained(data_dir)
    first = next(r for r in records() if r["split"] == "train")
    ids, labels = dpo.DPOBatches(data.load_dpo(data_dir, "train"), 64, 1, 0, 7).val_batch(0)
    for row, answer in ((0, first["chosen"]), (1, first["rejected"])):
        msgs = [{"role": "user", "content": first["prompt"]}, {"role": "assistant", "content": answer}]
        want = tok.encode(tok.apply_chat_template(msgs, add_generation_prompt=False))
        seq = ids[row, :len(want) - 1].tolist() + [int(labels[row, len(want) - 2])]  # inputs, then the last target
        assert seq == want and (labels[row, len(want) - 1:] == -100).all()


def test_a_pair_whose_answer_starts_past_max_len_is_left_out():
    pairs = [([1, 2], [3, 4, 5], [6]), ([1, 2, 3, 4], [5], [6, 7]), ([1, 2, 3, 4, 5], [6], [7]), ([], [1], [2])]
    tokens = np.array([t for p in pairs for part in p for t in part])
    index, o = [], 0
    for p, c, r in pairs:
        index.append((o, o + len(p), o + len(p) + len(c), o + len(p) + len(c) + len(r)))
        o = index[-1][-1]
    batches = dpo.DPOBatches(data.DPOData(tokens, np.array(index)), 4, 4, 0, 7)
    assert batches.kept == [0, 1] and batches.dropped == 2 and batches.cut == 1  # pair 1's rejected loses its 7
    ids, labels = batches.val_batch(0)
    assert ids.tolist() == [[1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 0, 0], [1, 2, 3, 4]]
    assert labels.tolist() == [[-100, 3, 4, 5], [-100, -100, -100, 5], [-100, 6, -100, -100],
                               [-100, -100, -100, 6]]  # chosen rows, then rejected; prompts are context only


# ---------------------------------------------------------------------------------------------- the reference

def test_adapter_off_equals_the_base_model(setup):
    model_dir, data_dir = setup
    base, model = load(model_dir), load(model_dir)
    lora.add_lora(model, 4, 8.0)
    with torch.no_grad():
        for layer in lora.lora_layers(model).values():
            layer.lora_B.normal_()  # a trained adapter: the model now differs from its base
    ids, labels = dpo.DPOBatches(data.load_dpo(data_dir, "train"), 64, 4, 0, 7).val_batch(0)
    want = dpo.answer_logps(base, ids, labels)[0]
    assert not torch.allclose(dpo.answer_logps(model, ids, labels)[0], want)
    with lora.adapters_off(model):
        assert torch.equal(dpo.answer_logps(model, ids, labels)[0], want)
    assert not torch.allclose(dpo.answer_logps(model, ids, labels)[0], want)  # switched back on


def tiny_dpo_trainer(setup, tmp_path, reference, steps=4):
    model_dir, data_dir = setup
    model, ref = load(model_dir), load(model_dir) if reference == "copy" else None
    if reference == "adapter_off":
        lora.add_lora(model, 4, 8.0)
    train = dpo.DPOBatches(data.load_dpo(data_dir, "train"), 64, 4, 0, 7)
    cfg = dict(out_dir=str(tmp_path), max_iters=steps, batch_size=4, dtype="float32", eval_interval=steps,
               eval_iters=1, warmup_iters=0, learning_rate=1e-2, min_lr=1e-3)
    return trainer.Trainer(cfg, model, lambda s, m: train.train_batch(s, m, 1), loss_fn=dpo.dpo_loss_fn(
        0.1, "sigmoid", 0.0, 0.0, reference), ref_model=ref, weight_fn=dpo.pairs_in, export=lambda t: None), train


@pytest.mark.parametrize("reference", ["copy", "adapter_off"])
def test_the_reference_is_unchanged_by_training(setup, tmp_path, reference):
    t, train = tiny_dpo_trainer(setup, tmp_path, reference)
    ids, labels = train.val_batch(0)
    with torch.no_grad():
        if reference == "copy":
            before, before_logps = digest(t.ref_model), dpo.answer_logps(t.ref_model, ids, labels)[0]
        else:
            base = {k: v.clone() for k, v in t.raw_model.state_dict().items() if "lora_" not in k}
            with lora.adapters_off(t.raw_model):
                before_logps = dpo.answer_logps(t.raw_model, ids, labels)[0]
    policy_before = dpo.answer_logps(t.raw_model, ids, labels)[0].detach()
    t.fit()
    with torch.no_grad():
        if reference == "copy":
            assert digest(t.ref_model) == before
            assert torch.equal(dpo.answer_logps(t.ref_model, ids, labels)[0], before_logps)
        else:
            assert all(torch.equal(t.raw_model.state_dict()[k], v) for k, v in base.items())
            with lora.adapters_off(t.raw_model):
                assert torch.equal(dpo.answer_logps(t.raw_model, ids, labels)[0], before_logps)
        assert not torch.allclose(dpo.answer_logps(t.raw_model, ids, labels)[0], policy_before)  # it trained


def cache_key(setup, t, max_len=64):
    model_dir, data_dir = setup
    return dpo.cache_key(data.open_data_dir(data_dir, "dpo"), "train", max_len, dpo.weights_digest(load(model_dir)), t)


def test_cached_reference_logps_equal_live_ones(setup, tmp_path):
    model_dir, _ = setup
    t, train = tiny_dpo_trainer(setup, tmp_path, "cached")
    path = str(tmp_path / "ref_logps_train.npz")
    cache = dpo.reference_cache(t, train, path, cache_key(setup, t))
    assert np.array_equal(np.load(path)["logps"], cache) and cache.shape == (len(train.records), 2)
    train.ref = cache
    live, batch = load(model_dir), train.train_batch(0, 0, 1)
    logps = dpo.answer_logps(live, batch[0], batch[1])[0].view(2, -1).t()
    assert torch.allclose(batch[2], logps.detach(), rtol=1e-5, atol=1e-5)
    copy_loss = dpo.dpo_loss_fn(0.1, "sigmoid", 0.0, 0.0, "copy")(live, batch[:2], load(model_dir))
    cached_loss = dpo.dpo_loss_fn(0.1, "sigmoid", 0.0, 0.0, "cached")(live, batch, None)
    assert cached_loss[0].item() == pytest.approx(copy_loss[0].item(), abs=1e-5)


def test_the_cache_key_follows_the_data_max_len_and_starting_weights(setup, tmp_path):
    model_dir, data_dir = setup
    t, _ = tiny_dpo_trainer(setup, tmp_path, "cached")
    key = cache_key(setup, t)
    assert cache_key(setup, t) == key and (key["max_len"], key["dtype"], key["device"]) == (64, "float32", "cpu")
    changed = tmp_path / "data"
    shutil.copytree(data_dir, changed)
    tokens = np.memmap(changed / "train.bin", dtype=data.read_meta(data_dir)["dtype"], mode="r+")
    tokens[-2] = next(v for v in tokens if v != tokens[-2])  # one token of one answer: same size, same pair count
    tokens.flush()
    del tokens
    other = dpo.cache_key(data.open_data_dir(str(changed), "dpo"), "train", 64, key["weights"], t)
    assert other["data"] != key["data"] and {**other, "data": key["data"]} == key
    assert cache_key(setup, t, max_len=32) == {**key, "max_len": 32}
    adapted = [load(model_dir), load(model_dir)]
    for seed, model in enumerate(adapted):  # the reference pass bypasses the adapters: their random start is no change
        torch.manual_seed(seed)
        lora.add_lora(model, 4, 8.0)
    assert dpo.weights_digest(adapted[0]) == dpo.weights_digest(adapted[1])
    assert not torch.equal(adapted[0].layers[0].attn.q_proj.lora_A, adapted[1].layers[0].attn.q_proj.lora_A)
    model = load(model_dir)
    with torch.no_grad():
        model.layers[0].attn.q_proj.weight[0, 0] += 1e-3
    assert dpo.weights_digest(model) != key["weights"]
    gone = dpo.cache_key(data.open_data_dir(data_dir, "dpo"), "train", 64, None, t)
    assert gone == {"data": key["data"], "max_len": 64}  # a resume whose starting model is gone checks these only


def stale_cache(path, logps, key):
    with open(path, "wb") as f:
        np.savez(f, logps=logps, key=np.array(json.dumps(key)))


def test_a_cache_is_reused_under_its_key_only_and_otherwise_computed_again(setup, tmp_path, capsys):
    t, train = tiny_dpo_trainer(setup, tmp_path, "cached")
    path, key = str(tmp_path / "ref_logps_train.npz"), cache_key(setup, t)
    fresh = dpo.reference_cache(t, train, path, key)
    stale_cache(path, fresh - 1, key)  # values that show whether the file was used
    assert np.array_equal(dpo.reference_cache(t, train, path, key), fresh - 1, equal_nan=True)
    for change, shown in [({"data": "0" * 64}, f"data {key['data'][:12]}... -> 000000000000..."),
                          ({"max_len": 32}, "max_len 64 -> 32"), ({"weights": "1" * 64}, "weights "),
                          ({"dtype": "bfloat16"}, "dtype float32 -> bfloat16"), ({"device": "cuda"}, "device cpu -> cuda")]:
        stale_cache(path, fresh - 1, key)
        capsys.readouterr()
        assert np.array_equal(dpo.reference_cache(t, train, path, {**key, **change}), fresh, equal_nan=True)
        assert f"{path}: made from other settings ({shown}" in capsys.readouterr().out
        assert json.loads(np.load(path)["key"].item()) == {**key, **change}  # written again under the new key


def test_a_damaged_cache_is_named_and_computed_again_or_refused_without_the_start_model(setup, tmp_path, capsys):
    model_dir, data_dir = setup
    t, train = tiny_dpo_trainer(setup, tmp_path, "cached")
    path, key = str(tmp_path / "ref_logps_train.npz"), cache_key(setup, t)
    fresh = dpo.reference_cache(t, train, path, key)
    whole = open(path, "rb").read()
    for damaged in (whole[:len(whole) // 2], whole[:200] + bytes([whole[200] ^ 1]) + whole[201:], b"", b"junk"):
        open(path, "wb").write(damaged)
        capsys.readouterr()
        assert np.array_equal(dpo.reference_cache(t, train, path, key), fresh, equal_nan=True)
        assert f"{path}: unreadable, damaged or cut short" in capsys.readouterr().out
        assert np.array_equal(np.load(path)["logps"], fresh, equal_nan=True)
    # the starting model gone (key without weights): a readable file of the same data is all there is
    gone = dpo.cache_key(data.open_data_dir(data_dir, "dpo"), "train", 64, None, t)
    stale_cache(path, fresh - 1, {**key, "weights": "1" * 64})
    assert np.array_equal(dpo.reference_cache(t, train, path, gone), fresh - 1, equal_nan=True)
    for damaged, why in [(whole[:100], "unreadable, damaged or cut short"), (None, "not found")]:
        os.remove(path) if damaged is None else open(path, "wb").write(damaged)
        with pytest.raises(SystemExit, match=f"{why}.*, and the model .* is gone: put it back"):
            dpo.reference_cache(t, train, path, gone)
    stale_cache(path, fresh, {**key, "max_len": 32})
    with pytest.raises(SystemExit, match=r"made from other settings \(max_len 32 -> 64\), and the model"):
        dpo.reference_cache(t, train, path, gone)


# ---------------------------------------------------------------------------------------------- the script

def val_accuracies(out):
    return [(r["step"], r["val_rewards/accuracies"]) for r in read_metrics(out) if "val_rewards/accuracies" in r]


@pytest.mark.parametrize("extra", [["--reference=copy"], ["--method=lora", "--reference=adapter_off",
                                                          "--lora_rank=8", "--learning_rate=1e-2"]])
def test_a_tiny_run_learns_the_held_out_preference(setup, tmp_path, extra):
    model_dir, data_dir = setup
    out = str(tmp_path / "out")
    r = run_dpo([f"--init_from={model_dir}", f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=30",
                 "--eval_interval=15", "--batch_size=8", "--learning_rate=3e-3", "--min_lr=3e-4", "--warmup_iters=0",
                 "--sample_prompts=1", "--sample_tokens=8", *extra])
    accuracies = val_accuracies(out)
    assert accuracies[0] == (0, 0.0) and accuracies[-1][0] == 30 and accuracies[-1][1] > 0.5, accuracies
    train = [r for r in read_metrics(out) if "train_loss" in r]
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
            "logps/rejected"} <= set(train[-1])
    assert "rewards/accuracies" in r.stderr + r.stdout  # in the log line
    assert os.path.isfile(os.path.join(out, "hf", "model.safetensors"))


def test_cached_run_writes_reference_logps_equal_to_the_start_model(setup, tmp_path):
    model_dir, data_dir = setup
    out = str(tmp_path / "out")
    run_dpo([f"--init_from={model_dir}", f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=2",
             "--reference=cached", "--sample_prompts=0"])
    batches = dpo.DPOBatches(data.load_dpo(data_dir, "val"), 64, 4, 0, 7)
    ids, labels = batches.val_batch(0)
    live = dpo.answer_logps(load(model_dir), ids, labels)[0].view(2, -1).t().detach().numpy()
    cached = np.load(os.path.join(out, "ref_logps_val.npz"))["logps"][[u[0] for u in batches.units[:4]]]
    assert np.allclose(cached, live, rtol=1e-5, atol=1e-5)


def test_a_dpo_run_resumes_after_kill_9_to_the_same_end(setup, tmp_path):
    model_dir, data_dir = setup
    kill_then_resume("dpo.py", [f"--init_from={model_dir}", f"--data_dir={data_dir}", "--sample_prompts=0",
                                "--learning_rate=3e-3", "--min_lr=3e-4", "--reference=cached"], tmp_path, steps=30)


def test_a_resume_computes_a_damaged_cache_again_and_without_its_start_model_refuses(setup, tmp_path):
    model_dir, data_dir = setup
    start, out = tmp_path / "start", str(tmp_path / "out")
    shutil.copytree(model_dir, start)
    args = [f"--data_dir={data_dir}", f"--out_dir={out}", "--reference=cached", "--sample_prompts=0",
            "--eval_interval=2"]
    run_dpo([f"--init_from={start}", "--max_iters=2", *args])
    train_cache, val_cache = (os.path.join(out, f"ref_logps_{split}.npz") for split in ("train", "val"))
    os.truncate(train_cache, 100)
    r = run_dpo(["--init_from=resume", "--max_iters=4", *args])
    assert f"{train_cache}: unreadable, damaged or cut short" in r.stdout
    assert f"reference log-probs: {val_cache} (cached)" in r.stdout  # the same start, data and settings: reused
    shutil.rmtree(start)
    os.truncate(val_cache, 100)
    cmd = [sys.executable, os.path.join(ROOT, "dpo.py"), "--dtype=float32", "--init_from=resume", "--max_iters=6",
           *args]
    r = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert f"{val_cache}: unreadable, damaged or cut short" in r.stderr and "is gone: put it back" in r.stderr


def test_bad_settings_are_refused_before_any_work(setup, tmp_path):
    model_dir, data_dir = setup
    for args, message in [(["--loss_type=kto"], "loss_type='kto': expected one of sigmoid, ipo, hinge"),
                          (["--reference=adapter_off"], "reference=adapter_off needs method=lora or qlora"),
                          (["--reference=adapter_off", "--method=lora", "--trainable=lm_head"],
                           "reference=adapter_off: embed, lm_head train in full"),
                          (["--loss_type=ipo", "--label_smoothing=0.1"], "applies to loss_type=sigmoid only"),
                          (["--beta=0"], "beta=0.0: must be positive"),
                          (["--method=dora"], "method='dora': expected full, lora or qlora")]:
        cmd = [sys.executable, os.path.join(ROOT, "dpo.py"), f"--init_from={model_dir}", f"--data_dir={data_dir}",
               f"--out_dir={tmp_path / 'o'}", *args]
        r = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
        assert r.returncode != 0 and message in r.stderr, (args, r.stderr[-2000:])


# ---------------------------------------------------------------------------------------------- pair making

def test_pair_making_drops_exactly_the_pairs_above_the_threshold():
    chosen = "abcdefghij"
    # SequenceMatcher ratio = 2 * matched characters / both lengths
    cases = [("abcdefghij", 1.0, "similar"), ("abcdefghijk", 20 / 21, "similar"), ("abcdefghiX", 18 / 20, "kept"),
             ("abcdeXXXXX", 10 / 20, "kept"), ("  ", 0.0, "empty")]
    for rejected, ratio, outcome in cases:
        assert dpo.similarity(chosen, rejected) == pytest.approx(ratio)
        assert dpo.keep_pair(chosen, rejected, 0.9) == outcome, rejected
    assert dpo.keep_pair(chosen, "abcdefghiX", 0.89) == "similar"


def test_make_pairs_writes_a_dpo_data_directory_of_the_kept_pairs(setup, tmp_path):
    import inference
    from tokenizer import Tokenizer
    model_dir, _ = setup
    tok, model = Tokenizer.from_pretrained(model_dir), load(model_dir)
    prompts = [[{"role": "user", "content": f"add {a} and 3"}] for a in range(2, 8)]
    # the first record's reference answer is what the model itself says: that pair must be dropped as identical
    echo = inference.stream_reply(model, tok, tok.apply_chat_template(prompts[0], add_generation_prompt=True),
                                  max_new_tokens=6, temperature=0)
    answers = [echo] + [f"it is {a + 3}." for a in range(3, 8)]
    src = tmp_path / "sft.jsonl"
    src.write_text("".join(json.dumps({"messages": p + [{"role": "assistant", "content": a}],
                                       "split": "val" if k == 5 else "train"}) + "\n"
                           for k, (p, a) in enumerate(zip(prompts, answers))))
    out = str(tmp_path / "pairs")
    r = run_dpo(["--make_pairs=True", f"--init_from={model_dir}", f"--pairs_input={src}", f"--out_dir={out}",
                 "--rejected_tokens=6"])
    assert "pairs: 5 kept, 1 dropped as more than 0.9 similar" in r.stdout + r.stderr
    train, val = data.load_dpo(out, "train"), data.load_dpo(out, "val")
    assert (len(train), len(val)) == (4, 1)
    kept = [json.loads(line) for line in open(os.path.join(out, "pairs.jsonl"))]
    assert [k["chosen"] for k in kept] == answers[1:]
    assert tok.decode(train[0][1].tolist(), skip_special=True).startswith("it is 6.")


def test_bench_dpo_runs_each_reference_and_compares_it_with_the_copy(setup):
    """bench_dpo.py, which gives BENCHMARKS.md its DPO memory figures: each reference a whole dpo.py run, every
    column filled, the ratios to the copy printed; a run that fails is reported with its log."""
    model_dir, data_dir = setup
    cmd = [sys.executable, os.path.join(ROOT, "bench_dpo.py"), f"--init_from={model_dir}", f"--data_dir={data_dir}",
           "--references=copy,cached", "--max_iters=2", "--max_len=32"]
    r = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rows = {w[0]: w[1:] for w in map(str.split, r.stdout.splitlines())
            if w[:1] in (["copy"], ["cached"]) and w[1] != "/"}  # the table's rows, not the ratio line
    assert set(rows) == {"copy", "cached"} and all(float(v) > 0 for row in rows.values() for v in row)
    assert "cached / copy: run rss" in r.stdout and "train heap" in r.stdout
    r = subprocess.run(cmd + ["--references=copy,nonsense"], cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode != 0 and "reference=nonsense failed" in r.stderr and "expected one of" in r.stderr
