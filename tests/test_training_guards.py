"""What the trainers refuse or survive, each named in its message: data that does not belong to the model,
settings that cannot work, training that went wrong, files that are broken, and runs that would lose or mix work
(pretrain.py, trainer.py, checkpoint.py, data.py)."""
import errno
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import checkpoint
import trainer
from data import open_data_dir
from model import ModelConfig
from test_pretrain import ENV, ROOT, VOCAB, make_data_dir, read_metrics, run_pretrain, tiny_trainer


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_data_dir(str(tmp_path_factory.mktemp("data")), n_train=20_000, n_val=3_000)


def copy_data(src, dst):
    os.makedirs(dst)
    for name in os.listdir(src):
        with open(os.path.join(src, name), "rb") as f, open(os.path.join(dst, name), "wb") as g:
            g.write(f.read())
    return dst


def edit_meta(folder, **changes):
    path = os.path.join(folder, "meta.json")
    meta = json.load(open(path))
    meta.update(changes)
    json.dump(meta, open(path, "w"))


def refused(args, message):
    r = run_pretrain(args)
    assert r.returncode != 0 and message in r.stderr, r.stdout[-2000:] + r.stderr[-2000:]
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    return r


# ------------------------------------------------------------------------------------- data that is not the model's

def test_a_model_folder_refuses_data_of_another_tokenizer(data_dir, tmp_path):
    out = str(tmp_path / "a")
    assert run_pretrain([f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=2"]).returncode == 0
    other = make_data_dir(str(tmp_path / "other"), n_train=20_000, n_val=3_000)
    vocab = json.load(open(os.path.join(other, "tokenizer.json")))
    vocab["model"]["vocab"] = {("x" + k if k.startswith("w") else k): v for k, v in vocab["model"]["vocab"].items()}
    json.dump(vocab, open(os.path.join(other, "tokenizer.json"), "w"))
    from tokenizer import Tokenizer
    edit_meta(other, tokenizer_sha256=Tokenizer.from_pretrained(other).checksum())
    refused([f"--data_dir={other}", f"--out_dir={tmp_path / 'b'}", f"--init_from={out}/hf"],
            "was tokenized with another tokenizer")
    # the model's own data is accepted from the same folder
    r = run_pretrain([f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'c'}", f"--init_from={out}/hf",
                      "--max_iters=2"])
    assert r.returncode == 0 and "matches the model's tokenizer" in r.stdout, r.stderr[-2000:]


@pytest.mark.parametrize("fmt", ["sft", "dpo"])
def test_pretraining_refuses_chat_data(data_dir, tmp_path, fmt):
    chat = copy_data(data_dir, str(tmp_path / fmt))
    edit_meta(chat, format=fmt)
    refused([f"--data_dir={chat}", f"--out_dir={tmp_path / 'o'}"], f"this is {fmt} data, not pretrain data")


def test_token_files_that_do_not_match_meta_json_are_refused(data_dir, tmp_path):
    odd = copy_data(data_dir, str(tmp_path / "odd"))
    with open(os.path.join(odd, "train.bin"), "ab") as f:
        f.write(b"\x01")
    refused([f"--data_dir={odd}", f"--out_dir={tmp_path / 'o1'}"], "train.bin: 40001 bytes is not a whole number")
    cut = copy_data(data_dir, str(tmp_path / "cut"))
    with open(os.path.join(cut, "val.bin"), "r+b") as f:
        f.truncate(4000)
    refused([f"--data_dir={cut}", f"--out_dir={tmp_path / 'o2'}"], "val.bin: 2,000 tokens but meta.json says "
            "val_tokens=3,000")
    broken = copy_data(data_dir, str(tmp_path / "broken"))
    open(os.path.join(broken, "meta.json"), "w").write('{"dtype": "uint16",')
    refused([f"--data_dir={broken}", f"--out_dir={tmp_path / 'o3'}"], "meta.json: not valid JSON")


# ------------------------------------------------------------------------------------- settings that cannot work

@pytest.mark.parametrize("key,value,message", [
    ("grad_accum", 0, "grad_accum=0: must be at least 1"),
    ("eval_interval", 0, "eval_interval=0: must be at least 1"),
    ("batch_size", -4, "batch_size=-4: must be at least 1"),
    ("max_iters", 0, "max_iters=0: must be at least 1"),
    ("log_interval", 0, "log_interval=0: must be at least 1"),
    ("learning_rate", -1e-3, "learning_rate=-0.001: must not be negative"),
    ("warmup_iters", -1, "warmup_iters=-1: must not be negative"),
    ("keep_last", -1, "keep_last=-1: must not be negative"),
    ("beta2", 1.0, "beta2=1.0: must be in [0, 1)"),
    ("min_lr", 1.0, "min_lr=1.0 is above learning_rate"),
    ("dtype", "fp8", "dtype='fp8': expected one of auto, float32"),
    ("parallel", "tp", "parallel='tp': expected one of ddp, fsdp, deepspeed"),
])
def test_settings_that_cannot_work_are_refused_by_key(tmp_path, key, value, message):
    with pytest.raises(SystemExit, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        trainer.train_config({"out_dir": str(tmp_path), key: value})


def test_model_sizes_and_out_dir_file_are_refused_before_any_work(data_dir, tmp_path):
    refused([f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'o'}", "--n_layers=0"], "n_layers=0: must be at least 1")
    refused([f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'o'}", "--family=gpt"], "family='gpt': expected one of")
    a_file = tmp_path / "file"
    a_file.write_text("not a folder")
    refused([f"--data_dir={data_dir}", f"--out_dir={a_file}"], "is a file, not a folder")
    assert a_file.read_text() == "not a folder" and not (tmp_path / "o").exists()


def test_resume_reports_changed_settings_and_follows_the_new_schedule(data_dir, tmp_path):
    out = str(tmp_path / "o")
    common = [f"--data_dir={data_dir}", f"--out_dir={out}", "--eval_interval=10", "--log_interval=5"]
    assert run_pretrain(common + ["--max_iters=10"]).returncode == 0
    r = run_pretrain(common + ["--max_iters=30", "--learning_rate=1e-3", "--min_lr=1e-4", "--weight_decay=0.0",
                               "--init_from=resume", "--dim=128"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "learning_rate: 0.003 -> 0.001" in r.stdout and "max_iters: 10 -> 30" in r.stdout
    assert "ignored: dim=128 (checkpoint: 64)" in r.stdout
    want = trainer.TrainConfig(max_iters=30, learning_rate=1e-3, min_lr=1e-4, warmup_iters=10)
    logged = {x["step"]: x["lr"] for x in read_metrics(out) if "train_loss" in x and x["step"] > 10}
    assert logged and all(lr == pytest.approx(trainer.lr_at(s - 1, want)) for s, lr in logged.items()), logged
    state = torch.load(os.path.join(out, "ckpt", "step_00000030", "state.pt"), weights_only=True)
    assert all(g["weight_decay"] == 0.0 for g in state["optimizer"]["param_groups"])  # the new value, not the saved


# ------------------------------------------------------------------------------------- training that went wrong

def test_weights_that_hold_nan_are_never_saved(tmp_path):
    def poison_at_step_7(model, batch, ref_model):
        x, y, step = batch
        if int(step) == 7 and model.training:
            with torch.no_grad():
                next(model.parameters())[0, 0] = float("nan")
        return model(x, y)[1]

    with pytest.raises(SystemExit, match=r"step 12: the weights hold NaN or inf, so no checkpoint is saved; the last "
                                         r"good one is .*step_00000006"):
        tiny_trainer(tmp_path, poison_at_step_7).fit()
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["best.json", "step_00000006"]
    assert json.load(open(tmp_path / "ckpt" / "best.json"))["dir"] == "step_00000006"


def test_best_json_names_only_saved_checkpoints(tmp_path):
    scripted = iter([1.0] * 2 + [5.0] * 2 + [6.0] * 2 + [7.0] * 2 + [8.0] * 2)  # step 0 (never saved) is lowest

    def loss_fn(model, batch, ref_model):
        loss = model(batch[0], batch[1])[1]
        return loss if model.training else loss * 0 + next(scripted)

    tiny_trainer(tmp_path, loss_fn, eval_interval=3, keep_last=1).fit()
    best = json.load(open(tmp_path / "ckpt" / "best.json"))
    assert best["dir"] == "step_00000003" and os.path.isdir(tmp_path / "ckpt" / best["dir"])


def test_a_torn_metrics_line_does_not_stop_a_resume(data_dir, tmp_path):
    out = str(tmp_path / "o")
    common = [f"--data_dir={data_dir}", f"--out_dir={out}", "--eval_interval=10", "--log_interval=5"]
    assert run_pretrain(common + ["--max_iters=10"]).returncode == 0
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:
        f.write('{"step": 11, "train_lo')  # what a kill in the middle of a write leaves
    r = run_pretrain(common + ["--max_iters=20", "--init_from=resume"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "metrics.jsonl:" in r.stdout and "unreadable metrics line dropped" in r.stdout
    assert max(x["step"] for x in read_metrics(out)) == 20


def test_a_full_disk_says_so_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    t = tiny_trainer(tmp_path, lambda model, batch, ref: model(batch[0], batch[1])[1])
    real_save, calls = torch.save, []

    def save(obj, path, *a, **k):
        calls.append(path)
        if "step_00000012" in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(SystemExit, match=r"writing checkpoint .*step_00000012.tmp failed: No space left on device "
                                         r"\(disk full\?\); nothing was replaced, the last good checkpoint is "
                                         r".*step_00000006"):
        t.fit()
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["best.json", "step_00000006"]  # no .tmp left behind
    assert os.path.isfile(tmp_path / "ckpt" / "step_00000006" / "state.pt")


# ------------------------------------------------------------------------------------- runs that would lose or mix work

def files_of(folder):
    """Every file under folder with its size and mtime: what 'nothing was written' is checked against."""
    return {os.path.join(root, n): (os.path.getsize(os.path.join(root, n)), os.stat(os.path.join(root, n)).st_mtime_ns)
            for root, _, names in os.walk(folder) for n in names}


def plain_loss(model, batch, ref_model):  # tiny_trainer's batches carry their step third, not document ids
    return model(batch[0], batch[1])[1]


def scripted_val_loss(values):
    """A loss_fn whose evaluations return values["val"] (training is the real loss)."""
    def loss_fn(model, batch, ref_model):
        loss = model(batch[0], batch[1])[1]
        return loss if model.training else loss * 0 + values["val"]
    return loss_fn


def test_a_new_run_into_another_runs_out_dir_is_refused_unless_overwrite(tmp_path):
    tiny_trainer(tmp_path, plain_loss, max_iters=6).fit()
    (tmp_path / "notes.txt").write_text("not the run's")
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_model.safetensors").write_text("the old run's")
    (tmp_path / "ref_logps_train.npz").write_text("the old run's")
    before = files_of(tmp_path)
    with pytest.raises(SystemExit, match=r"out_dir=.* holds another run \(1 checkpoint\(s\), metrics.jsonl\): continue "
                                         r"it with --init_from=resume, start over with --overwrite=True"):
        tiny_trainer(tmp_path, plain_loss, max_iters=3, eval_interval=3)
    assert files_of(tmp_path) == before  # stopped before any write
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "metrics.jsonl").write_text('{"step": 10, "train_loss": 3.0}\n')  # killed before its first checkpoint
    with pytest.raises(SystemExit, match=r"holds another run \(metrics.jsonl\)"):
        trainer.train_config({"out_dir": str(fresh)})
    with pytest.raises(SystemExit, match="overwrite=True and init_from=resume"):
        trainer.train_config({"out_dir": str(tmp_path), "init_from": "resume", "overwrite": True})

    tiny_trainer(tmp_path, plain_loss, max_iters=3, eval_interval=3, overwrite=True).fit()
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["best.json", "step_00000003"]  # step 6 was the old run's
    assert max(x["step"] for x in read_metrics(str(tmp_path))) == 3
    assert not (tmp_path / "adapter").exists() and not (tmp_path / "ref_logps_train.npz").exists()
    assert (tmp_path / "notes.txt").read_text() == "not the run's"


def test_an_out_dir_that_holds_the_starting_model_is_refused(tmp_path):
    (tmp_path / "hf").mkdir()
    for init_from in (tmp_path / "hf", tmp_path, tmp_path / "hf" / ".." / "hf"):
        for overwrite in (False, True):
            with pytest.raises(SystemExit, match=r"out_dir=.* holds the model this run starts from \(init_from="):
                trainer.train_config({"out_dir": str(tmp_path), "init_from": str(init_from), "overwrite": overwrite})
    trainer.train_config({"out_dir": str(tmp_path / "hf" / "tuned"), "init_from": str(tmp_path / "hf")})  # in it: fine


def test_resume_of_another_kind_is_refused_and_other_data_restarts_the_best_checkpoint(data_dir, tmp_path, capsys):
    out = tmp_path / "o"
    values = {"val": 1.0}
    tiny_trainer(out, scripted_val_loss(values), data_dir=data_dir, max_iters=6).fit()
    sft = copy_data(data_dir, str(tmp_path / "sft"))
    edit_meta(sft, format="sft")
    before = files_of(out)
    with pytest.raises(SystemExit, match=r"init_from=resume: .*/o/ckpt/step_00000006 is a checkpoint of a pretrain "
                                         r"run and this run is sft \(its data's format\); start a new run from it"):
        tiny_trainer(out, plain_loss, data_dir=sft, init_from="resume", max_iters=12)
    assert files_of(out) == before

    other = copy_data(data_dir, str(tmp_path / "other"))
    with open(os.path.join(other, "train.bin"), "r+b") as f:  # same size, other tokens in the middle
        f.seek(20_000)
        f.write(b"\x05\x00" * 8)
    values["val"] = 5.0  # worse than the old data's 1.0: only a restarted bookkeeping makes step 12 the best
    t = tiny_trainer(out, scripted_val_loss(values), data_dir=other, init_from="resume", max_iters=12)
    t.fit()
    text = capsys.readouterr().out
    assert f"resume: {out}/ckpt/step_00000006 trained on other data ({data_dir}, checksum" in text, text
    assert "the best checkpoint is chosen afresh" in text
    assert t.best_step == 12 and json.load(open(out / "ckpt" / "best.json"))["dir"] == "step_00000012"
    # the same data under another name is the same data
    moved = copy_data(other, str(tmp_path / "moved"))
    tiny_trainer(out, plain_loss, data_dir=moved, init_from="resume", max_iters=18).fit()
    assert "trained on other data" not in capsys.readouterr().out


@pytest.mark.parametrize("sizes_recorded", [True, False])
def test_a_damaged_newest_checkpoint_is_named_and_resume_falls_back(tmp_path, capsys, sizes_recorded):
    tiny_trainer(tmp_path, plain_loss).fit()  # checkpoints at steps 6 and 12
    newest = tmp_path / "ckpt" / "step_00000012"
    with open(newest / "state.pt", "r+b") as f:
        f.truncate(os.path.getsize(newest / "state.pt") // 2)
    if not sizes_recorded:  # a checkpoint from before files.json: found out by reading it
        (newest / "files.json").unlink(missing_ok=True)
    checkpoint.build_model("resume", str(tmp_path), ModelConfig(vocab_size=128, dim=32, n_layers=1, n_heads=2,
                                                                 max_seq_len=16))
    t = tiny_trainer(tmp_path, plain_loss, init_from="resume", max_iters=18)
    t.fit()
    text = capsys.readouterr().out
    assert f"{newest}/state.pt" in text and f"{newest} is damaged" in text, text
    assert text.count(f"{newest} is damaged") == 1  # named once, though build_model and the trainer both looked
    assert f"resumed from {tmp_path}/ckpt/step_00000006 at step 6" in text
    assert t.step == 18


def test_a_pickle_in_a_training_checkpoint_is_refused_naming_the_file(tmp_path):
    tiny_trainer(tmp_path, plain_loss, max_iters=6).fit()
    ckpt = tmp_path / "ckpt" / "step_00000006"
    witness = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {witness}",)

    torch.save({"step": 6, "payload": Payload()}, ckpt / "state.pt")
    (ckpt / "files.json").unlink(missing_ok=True)  # as another tool would leave it: no sizes to give it away
    message = re.escape(f"{ckpt}/state.pt: holds Python objects besides tensors (posix.system)") + ".*refused"
    with pytest.raises(SystemExit, match=message):
        tiny_trainer(tmp_path, plain_loss, init_from="resume", max_iters=12).fit()
    with pytest.raises(SystemExit, match=message):
        checkpoint.build_model(str(ckpt), "unused")
    assert not witness.exists()


# ------------------------------------------------------------------------------------- both families from scratch

def test_phi_family_pretrains_and_exports_a_phi_model(data_dir, tmp_path):
    out = str(tmp_path / "phi")
    cmd = [sys.executable, os.path.join(ROOT, "pretrain.py"), os.path.join(ROOT, "config/tiny.py"),
           os.path.join(ROOT, "config/phi_tiny.py"),
           f"--data_dir={data_dir}", f"--out_dir={out}", "--dim=32", "--n_layers=2", "--block_size=32",
           "--max_iters=20", "--eval_interval=10"]
    r = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    vals = [x["val_loss"] for x in read_metrics(out) if "val_loss" in x]
    assert vals[-1] < vals[0] - 0.3  # it learns
    import transformers
    import convert
    hf = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(out, "hf")).eval()
    assert type(hf).__name__ == "PhiForCausalLM"
    ours = convert.from_pretrained(os.path.join(out, "hf")).eval()
    assert ours.config.parallel_block and ours.config.norm == "layernorm" and ours.config.rotary_dim == 4
    x = torch.randint(0, VOCAB, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ours(x)[0], atol=1e-4, rtol=1e-4)


def test_open_data_dir_checks_sft_index_against_tokens(tmp_path):
    folder = tmp_path / "sft"
    folder.mkdir()
    np.arange(10, dtype=np.uint16).tofile(folder / "train.bin")
    np.ones(10, dtype=np.uint8).tofile(folder / "train_mask.bin")
    np.save(folder / "train_idx.npy", np.array([0, 4, 9]))  # ends at 9 of 10 tokens
    json.dump({"format": "sft", "dtype": "uint16", "vocab_size": 16, "train_tokens": 10}, open(folder / "meta.json", "w"))
    with pytest.raises(SystemExit, match="train_idx.npy: its records end at token 9 but .*train.bin holds 10"):
        open_data_dir(str(folder), "sft", splits=("train",))
    np.save(folder / "train_idx.npy", np.array([0, 4, 10]))
    assert len(open_data_dir(str(folder), "sft", splits=("train",)).sft("train")) == 2


def test_heap_mb_counts_tensors_and_their_release():
    """metrics.heap_mb (bench_dpo's CPU counterpart of torch.cuda.memory_allocated) sees a 256 MB tensor come and go."""
    import metrics
    if metrics.heap_mb() is None:
        pytest.skip("no glibc mallinfo2 here")
    before = metrics.heap_mb()
    x = torch.ones(64 * 2**20)
    assert 250 < metrics.heap_mb() - before < 270
    del x
    assert abs(metrics.heap_mb() - before) < 10
