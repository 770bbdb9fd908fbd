"""pretrain.py + trainer.py on one process: learning, checkpoints, exact resume after SIGKILL and SIGTERM, the HF
export, data checks, NaN skipping, the schedule and the loss_fn / ref_model interface that SFT and DPO use.
(Multi-process backends: tests/test_distributed.py.)"""
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from model import ModelConfig, Transformer
from data import open_data_dir
from trainer import TrainConfig, Trainer, lm_loss, lr_at, make_optimizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 128


def make_data_dir(path, with_tokenizer=True, n_train=60_000, n_val=6_000):
    """A learnable stream in the data contract's format: 50 fixed 'words' of 2-5 ids drawn at random, each
    followed by EOS (id 1); plus a word-level tokenizer.json whose checksum meta.json records."""
    os.makedirs(path, exist_ok=True)
    rng = np.random.default_rng(0)
    words = [rng.integers(2, VOCAB, size=rng.integers(2, 6)) for _ in range(50)]

    def stream(n):
        out = []
        while len(out) < n:
            out.extend(words[rng.integers(0, len(words))])
            out.append(1)
        return np.array(out[:n], dtype=np.uint16)

    stream(n_train).tofile(os.path.join(path, "train.bin"))
    stream(n_val).tofile(os.path.join(path, "val.bin"))
    meta = {"dtype": "uint16", "vocab_size": VOCAB, "train_tokens": n_train, "val_tokens": n_val,
            "bos_id": None, "eos_id": 1, "sources": ["synthetic"]}
    if with_tokenizer:
        from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers
        from tokenizer import Tokenizer
        vocab = {"<unk>": 0, "</s>": 1, **{f"w{i}": i for i in range(2, VOCAB)}}
        hf = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        hf.pre_tokenizer = pre_tokenizers.Whitespace()
        hf.save(os.path.join(path, "tokenizer.json"))
        with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
            json.dump({"eos_token": "</s>", "unk_token": "<unk>"}, f)
        meta["tokenizer_sha256"] = Tokenizer.from_pretrained(path).checksum()
    with open(os.path.join(path, "meta.json"), "w") as f:
        json.dump(meta, f)
    return path


# one thread: the tiny model gains nothing from two, and loses a lot when other work shares the cores
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"}


def run_pretrain(args, timeout=240):
    """pretrain.py in a subprocess (the way users run it). Returns the CompletedProcess."""
    cmd = [sys.executable, os.path.join(ROOT, "pretrain.py"), os.path.join(ROOT, "config/tiny.py"), *args]
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def read_metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def final_state(out_dir):
    ckpts = sorted(d for d in os.listdir(os.path.join(out_dir, "ckpt")) if d.startswith("step_"))
    return torch.load(os.path.join(out_dir, "ckpt", ckpts[-1], "state.pt"), weights_only=True)


@pytest.fixture(autouse=True)
def one_thread():
    """The in-process trainers here are tiny: one thread is faster, and much faster when the cores are shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_data_dir(str(tmp_path_factory.mktemp("data")))


# ---------------------------------------------------------------------------------------------- full runs

def test_tiny_run_learns_logs_checkpoints_and_exports(data_dir, tmp_path):
    out = str(tmp_path / "out")
    r = run_pretrain([f"--data_dir={data_dir}", f"--out_dir={out}", "--eval_interval=25", "--keep_last=2",
                      "--wandb_mode=offline"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "  learning_rate = 0.003" in r.stdout  # the resolved config, printed at start
    assert "matches the model's tokenizer" in r.stdout
    recs = read_metrics(out)
    vals = [x for x in recs if "val_loss" in x]
    assert [x["step"] for x in vals] == [0, 25, 50, 75, 100]
    # learned: uniform guessing over 128 ids is ln(128) = 4.85; the word stream is far more predictable
    assert vals[0]["val_loss"] > 4.5 and vals[-1]["val_loss"] < 0.6 * vals[0]["val_loss"], vals
    train = [x for x in recs if "train_loss" in x]
    assert [x["step"] for x in train] == list(range(10, 101, 10))
    for key in ("lr", "tokens_per_s", "elapsed_s", "grad_norm", "mfu"):
        assert all(key in x for x in train), key
    for line in ("| loss ", "| lr ", "| grad norm ", " tok/s | MFU ", "| ETA "):
        assert line in r.stdout
    assert os.path.getsize(os.path.join(out, "loss.png")) > 1000
    # the last 2 checkpoints and the best one (best.json names it) are kept
    best = json.load(open(os.path.join(out, "ckpt", "best.json")))
    assert best["best_val_loss"] == min(x["val_loss"] for x in vals)
    assert set(os.listdir(os.path.join(out, "ckpt"))) == {"best.json", "step_00000075", "step_00000100", best["dir"]}
    state = final_state(out)  # weights_only=True: everything in it is tensors and primitives
    assert state["step"] == 100 and state["config"]["learning_rate"] == 3e-3
    assert {"model", "optimizer", "model_config"} <= set(state)
    assert os.path.isfile(os.path.join(out, "ckpt", "step_00000100", "rng_rank0.pt"))
    assert any(d.startswith("offline-run") for d in os.listdir(os.path.join(out, "wandb")))

    # the HF folder: transformers loads it and computes what our model computes; the tokenizer came along
    import transformers
    hf = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(out, "hf")).eval()
    ours = Transformer(ModelConfig(**state["model_config"]))
    ours.load_state_dict(state["model"])
    ours.eval()
    x = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ours(x)[0], atol=1e-4, rtol=1e-4)
    tok = transformers.AutoTokenizer.from_pretrained(os.path.join(out, "hf"))
    assert tok.convert_tokens_to_ids("w7") == 7


@pytest.fixture(scope="module")
def uninterrupted(data_dir, tmp_path_factory):
    """The reference for the resume tests: 60 steps in one go."""
    out = str(tmp_path_factory.mktemp("full"))
    r = run_pretrain(RESUME_ARGS + [f"--data_dir={data_dir}", f"--out_dir={out}"])
    assert r.returncode == 0, r.stderr[-3000:]
    return out


RESUME_ARGS = ["--max_iters=60", "--eval_interval=10", "--log_interval=5", "--dropout=0.1"]  # dropout: RNG state


def start_and_interrupt(data_dir, out, sig):
    """Start a 60-step run, wait for its step-20 checkpoint, then send `sig`. Returns (returncode, stdout)."""
    cmd = [sys.executable, os.path.join(ROOT, "pretrain.py"), os.path.join(ROOT, "config/tiny.py"),
           *RESUME_ARGS, f"--data_dir={data_dir}", f"--out_dir={out}"]
    p = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not os.path.isdir(os.path.join(out, "ckpt", "step_00000020")):
        assert p.poll() is None and time.time() < deadline, "the run ended before its step-20 checkpoint"
        time.sleep(0.005)
    p.send_signal(sig)
    stdout, _ = p.communicate(timeout=120)
    return p.returncode, stdout


def assert_same_end(out, reference):
    a, b = final_state(out), final_state(reference)
    assert a["step"] == b["step"] == 60
    for k in b["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    final_loss = [[x["train_loss"] for x in read_metrics(d) if x["step"] == 60 and "train_loss" in x]
                  for d in (out, reference)]
    assert len(final_loss[0]) == 1 and final_loss[0] == final_loss[1]


def test_sigkill_then_resume_is_bit_exact(data_dir, uninterrupted, tmp_path):
    out = str(tmp_path / "out")
    code, stdout = start_and_interrupt(data_dir, out, signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert not os.path.isdir(os.path.join(out, "ckpt", "step_00000060")), "killed too late to test anything"
    r = run_pretrain(RESUME_ARGS + [f"--data_dir={data_dir}", f"--out_dir={out}", "--init_from=resume"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout
    assert_same_end(out, uninterrupted)
    steps = [x["step"] for x in read_metrics(out) if "train_loss" in x]
    assert steps == sorted(set(steps)), "metrics.jsonl repeats steps after the resume"


def test_sigterm_saves_a_checkpoint_and_resumes_exactly(data_dir, uninterrupted, tmp_path):
    out = str(tmp_path / "out")
    code, stdout = start_and_interrupt(data_dir, out, signal.SIGTERM)
    assert code == 128 + signal.SIGTERM, stdout[-3000:]
    assert "stopped by SIGTERM" in stdout
    state = final_state(out)
    assert 20 <= state["step"] < 60
    r = run_pretrain(RESUME_ARGS + [f"--data_dir={data_dir}", f"--out_dir={out}", "--init_from=resume"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from {out}/ckpt/step_{state['step']:08d}" in r.stdout
    assert_same_end(out, uninterrupted)


# ---------------------------------------------------------------------------------------------- data checks

def test_meta_checks_name_the_file_and_field(data_dir, tmp_path, capsys):
    data = open_data_dir(data_dir, vocab_size=VOCAB)
    assert data.tokenizer_dir == data_dir and data.meta["vocab_size"] == VOCAB
    with pytest.raises(SystemExit, match=r"meta.json: vocab_size=128 but the model has only 64"):
        open_data_dir(data_dir, vocab_size=64)

    bad = make_data_dir(str(tmp_path / "bad"))
    meta = json.load(open(os.path.join(bad, "meta.json")))
    meta["tokenizer_sha256"] = "0" * 64
    json.dump(meta, open(os.path.join(bad, "meta.json"), "w"))
    with pytest.raises(SystemExit, match=r"meta.json: tokenizer_sha256 000000000000\.\.\. does not match"):
        open_data_dir(bad, vocab_size=VOCAB)

    bare = make_data_dir(str(tmp_path / "bare"), with_tokenizer=False, n_train=1000, n_val=100)
    assert open_data_dir(bare, vocab_size=VOCAB).tokenizer_dir is None
    assert "NOT checked against the model's tokenizer" in capsys.readouterr().err
    r = run_pretrain([f"--data_dir={bare}", f"--out_dir={tmp_path / 'o'}", "--block_size=200", "--max_iters=1"])
    assert r.returncode != 0 and "val.bin: 100 tokens, fewer than block_size+1=201" in r.stderr


def test_batches_are_windows_of_the_stream_deterministic_per_step_and_micro(data_dir):
    from pretrain import PretrainData
    data = PretrainData(open_data_dir(data_dir), block_size=16, batch_size=4, seed=7)
    stream = np.fromfile(os.path.join(data_dir, "train.bin"), dtype=np.uint16).astype(np.int64)
    x, y = data.train_batch(3, 1)
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    for row in x.numpy():  # each row is a window of train.bin
        starts = np.flatnonzero(np.all(np.lib.stride_tricks.sliding_window_view(stream, 16) == row, axis=1))
        assert len(starts) > 0
    again = PretrainData(open_data_dir(data_dir), block_size=16, batch_size=4, seed=7)
    assert torch.equal(again.train_batch(3, 1)[0], x)
    assert not torch.equal(data.train_batch(3, 0)[0], x) and not torch.equal(data.train_batch(4, 1)[0], x)
    assert not torch.equal(PretrainData(open_data_dir(data_dir), 16, 4, seed=8).train_batch(3, 1)[0], x)
    assert torch.equal(data.val_batch(2)[0], again.val_batch(2)[0])


# ---------------------------------------------------------------------------------------------- optimizer, schedule

def test_cosine_schedule_matches_the_formula():
    c = TrainConfig(learning_rate=1e-3, min_lr=1e-4, warmup_iters=10, max_iters=110)
    lr = [lr_at(s, c) for s in range(130)]
    assert lr[0] == pytest.approx(1e-3 / 11) and lr[9] == pytest.approx(1e-3 * 10 / 11)  # linear warmup
    assert lr[10] == pytest.approx(1e-3)
    assert lr[60] == pytest.approx((1e-3 + 1e-4) / 2)  # half way: the cosine is at zero
    assert lr[35] == pytest.approx(1e-4 + 0.5 * (1 + math.cos(math.pi * 25 / 100)) * 9e-4)
    assert lr[110] == pytest.approx(1e-4) and lr[129] == pytest.approx(1e-4)


def test_weight_decay_only_on_matrices():
    model = Transformer(ModelConfig(vocab_size=32, dim=32, n_layers=1, n_heads=2))
    opt = make_optimizer(model, TrainConfig(weight_decay=0.1), torch.device("cpu"))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert opt.defaults.get("fused")  # the fused CPU AdamW kernel


# ---------------------------------------------------------------------------------------------- the Trainer interface

def tiny_trainer(tmp_path, loss_fn=lm_loss, ref_model=None, **overrides):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=VOCAB, dim=32, n_layers=1, n_heads=2, max_seq_len=16))
    gen = torch.Generator().manual_seed(0)
    data = torch.randint(0, VOCAB, (64, 17), generator=gen)

    def train_batch(step, micro):  # the step rides along so loss functions in these tests can see it
        rows = data[(4 * (step + micro)) % 60:][:4]
        return rows[:, :-1], rows[:, 1:], torch.tensor(step)

    cfg = dict(out_dir=str(tmp_path), max_iters=12, batch_size=4, eval_interval=6, eval_iters=2,
               log_interval=3, warmup_iters=2, learning_rate=1e-3, dtype="float32")
    cfg.update(overrides)
    return Trainer(cfg, model, train_batch, lambda i: train_batch(i, 0), loss_fn=loss_fn, ref_model=ref_model)


def test_nan_losses_skip_the_step_and_too_many_abort(tmp_path):
    seen = {}

    def loss_fn(model, batch, ref_model):
        x, y, step = batch
        seen[int(step)] = [p.detach().clone() for p in model.parameters()]
        loss = model(x, y)[1]
        return loss * float("nan") if int(step) in (4, 5) else loss

    trainer = tiny_trainer(tmp_path / "a", loss_fn)
    trainer.fit()
    assert trainer.nan_skips_total == 2
    for a, b in zip(seen[5], seen[6]):  # steps 4 and 5 changed nothing: step 6 starts from step 4's weights
        assert torch.equal(a, b)
    assert all(torch.equal(a, b) for a, b in zip(seen[4], seen[5]))
    assert not all(torch.equal(a, b) for a, b in zip(seen[6], seen[7]))  # and training goes on afterwards

    def always_nan(model, batch, ref_model):
        return model(batch[0], batch[1])[1] * (float("inf") if int(batch[2]) >= 3 else 1.0)

    with pytest.raises(SystemExit, match=r"aborting: 4 non-finite losses in a row \(max_nan_skips=4\)"):
        tiny_trainer(tmp_path / "b", always_nan, max_nan_skips=4).fit()


def test_loss_fn_gets_the_frozen_reference_model_and_may_log_metrics(tmp_path):
    """The DPO shape: loss_fn(model, batch, ref_model) -> (loss, metrics)."""
    torch.manual_seed(1)
    ref = Transformer(ModelConfig(vocab_size=VOCAB, dim=32, n_layers=1, n_heads=2, max_seq_len=16))
    ref_before = {k: v.clone() for k, v in ref.state_dict().items()}

    def loss_fn(model, batch, ref_model):
        assert ref_model is ref and not ref_model.training
        assert not any(p.requires_grad for p in ref_model.parameters())
        x, y, _ = batch
        with torch.no_grad():
            ref_loss = ref_model(x, y)[1]
        loss = model(x, y)[1]
        return loss, {"margin": (ref_loss - loss).detach()}

    trainer = tiny_trainer(tmp_path, loss_fn, ref_model=ref)
    trainer.fit()
    assert all(torch.equal(v, ref_before[k]) for k, v in ref.state_dict().items())
    recs = read_metrics(str(tmp_path))
    assert all("margin" in r for r in recs if "train_loss" in r)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_autocast_on_cpu(tmp_path, dtype):
    dtypes = []

    def loss_fn(model, batch, ref_model):
        logits, loss = model(batch[0], batch[1])
        dtypes.append(logits.dtype)
        return loss

    trainer = tiny_trainer(tmp_path, loss_fn, dtype=dtype, max_iters=6)
    trainer.fit()
    assert set(dtypes) == {getattr(torch, dtype)}
    assert (trainer.scaler is not None) == (dtype == "float16")  # fp16 needs the GradScaler, bf16 does not
    losses = [r["train_loss"] for r in read_metrics(str(tmp_path)) if "train_loss" in r]
    assert all(math.isfinite(x) for x in losses)


def test_keeps_the_last_k_and_the_best_checkpoint(tmp_path):
    scripted = iter([5.0] * 2 + [1.0] * 2 + [2.0] * 2 + [3.0] * 2 + [4.0] * 2)  # val loss at steps 0, 3, 6, 9, 12

    def loss_fn(model, batch, ref_model):
        loss = model(batch[0], batch[1])[1]
        return loss if model.training else loss * 0 + next(scripted)

    tiny_trainer(tmp_path, loss_fn, eval_interval=3, keep_last=1).fit()
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["best.json", "step_00000003", "step_00000012"]
    assert json.load(open(tmp_path / "ckpt" / "best.json")) == {"best_step": 3, "best_val_loss": 1.0,
                                                                 "dir": "step_00000003"}


def test_activation_checkpointing_trains_the_same_weights(tmp_path):
    runs = []
    for ckpt in (False, True):
        trainer = tiny_trainer(tmp_path / str(ckpt), lambda m, b, r: m(b[0], b[1])[1], max_iters=4,
                               activation_checkpointing=ckpt)
        trainer.fit()
        assert trainer.raw_model.gradient_checkpointing == ckpt
        runs.append(trainer.raw_model.state_dict())
    for k in runs[0]:
        torch.testing.assert_close(runs[1][k], runs[0][k], rtol=0, atol=1e-6, msg=k)
