"""Bits per byte (issue 26): data_process.py records the UTF-8 bytes behind each pretraining split, the trainer logs
val bpb beside val loss, eval.py --task=ppl reports it; checked against the decoded splits, the formula on the
trainer's own numbers, and transformers' loss on a known English and Chinese text."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

import convert
import data_process as dp
from conftest import ROOT, tiny_transformer
from test_data_process import CharTokenizer, cfg, read_bin, split_docs, write
from test_pretrain import make_data_dir, read_metrics, tiny_trainer

TEXT = ["The quick brown fox jumps over the lazy dog.", "机器学习是人工智能的一个分支，数据清洗很重要。",
        "Bits per byte compare models whose tokenizers differ."]


def test_data_process_records_the_bytes_behind_each_split(tmp_path):
    docs = [f"{TEXT[i % 3]} 第{i}号 document {i}" for i in range(60)]
    path = write(tmp_path / "d.txt", "\n".join(docs) + "\n")
    tok = CharTokenizer(vocab_size=70_000)  # every character its own id, fullwidth punctuation (U+FF0C) included
    dp.run(cfg(tmp_path, input=path, near_dedup=False), tok=tok)
    for split in ("train", "val"):
        meta, ids = read_bin(str(tmp_path / "out"), split)
        text = [tok.decode(d) for d in split_docs(ids, tok.eos_id)]  # what the split's tokens encode
        assert meta["bytes"][split] == sum(len(t.encode("utf-8")) for t in text) > sum(len(t) for t in text)


def bpb_trainer(tmp_path, data_dir):
    def loss(model, batch, ref_model):  # tiny_trainer's batches carry the step as a third tensor
        return model(batch[0], batch[1])[1]
    return tiny_trainer(tmp_path, loss, data_dir=data_dir, max_iters=6, eval_interval=3)


def test_trainer_logs_val_bpb_from_the_data_and_says_once_when_it_cannot(tmp_path, capsys):
    data_dir = make_data_dir(str(tmp_path / "data"), with_tokenizer=False)
    meta_path = os.path.join(data_dir, "meta.json")
    with open(meta_path) as f:
        meta = json.load(f)
    old = bpb_trainer(tmp_path / "old", data_dir)  # made before bytes were recorded
    old.fit()
    out = capsys.readouterr().out
    assert out.count("records no bytes per split") == 1 and "| val bpb" not in out
    assert not any("val_bpb" in r for r in read_metrics(str(tmp_path / "old")))
    with open(meta_path, "w") as f:
        json.dump({**meta, "format": "pretrain", "bytes": {"train": 150_000, "val": 13_000}}, f)
    bpb_trainer(tmp_path / "new", data_dir).fit()
    out = capsys.readouterr().out
    val = [r for r in read_metrics(str(tmp_path / "new")) if "val_loss" in r]
    assert len(val) == 3 and "records no bytes" not in out
    for r in val:
        assert r["val_bpb"] == pytest.approx(r["val_loss"] * meta["val_tokens"] / (13_000 * math.log(2)), rel=1e-12)
        assert f"step {r['step']}: val loss {r['val_loss']:.4f} | val bpb {r['val_bpb']:.4f}" in out


@pytest.fixture(scope="module")
def byte_level_ckpt(tmp_path_factory):
    """A tiny random LLaMA folder with a byte-level BPE (every UTF-8 byte encodable) trained on TEXT."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    path = str(tmp_path_factory.mktemp("ckpt"))
    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "<|endoftext|>"}, f)
    convert.save_pretrained(tiny_transformer(hf.get_vocab_size(), max_seq_len=256), path)
    return path, hf


def run_eval(*args):
    cmd = [sys.executable, "eval.py", "--task=ppl", "--dtype=float32", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_eval_ppl_bpb_on_a_known_text_matches_transformers(byte_level_ckpt, tmp_path):
    """bpb = the text's summed loss in nats (transformers' LlamaForCausalLM over the same ids: each line's bytes
    and EOS) / (its UTF-8 bytes * ln 2)."""
    import torch
    from transformers import AutoModelForCausalLM
    path, hf = byte_level_ckpt
    text = tmp_path / "known.txt"
    text.write_text("\n".join(TEXT) + "\n", encoding="utf-8")
    out = tmp_path / "r.json"
    run = run_eval(f"--ckpt={path}", f"--data={text}", f"--out={out}")
    assert run.returncode == 0, run.stderr
    got = json.loads(out.read_text())["results"]["ppl"]
    eos = hf.token_to_id("<|endoftext|>")
    ids = [i for line in TEXT for i in hf.encode(line).ids + [eos]]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        mean = model(torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
    n_bytes = sum(len(line.encode("utf-8")) for line in TEXT)
    assert got["tokens"] == len(ids) - 1
    assert got["bpb"] == pytest.approx(mean * (len(ids) - 1) / (n_bytes * math.log(2)), rel=1e-4)
    assert ["tokens", "loss", "ppl", "bpb"] in [line.split() for line in run.stdout.splitlines()]  # the table
    run = run_eval(f"--ckpt={path}", f"--data={text}", f"--out={out}", "--limit=20")
    assert "no bits per byte: --limit" in run.stdout and "bpb" not in json.loads(out.read_text())["results"]["ppl"]


def test_eval_ppl_bpb_of_a_data_folder_comes_from_its_meta(byte_level_ckpt, tmp_path):
    from tokenizer import Tokenizer
    path, _ = byte_level_ckpt
    src = write(tmp_path / "corpus.txt", "\n".join(f"{TEXT[i % 3]} {i}" for i in range(200)) + "\n")
    data = str(tmp_path / "data")
    dp.run(cfg(tmp_path, input=src, out_dir=data, near_dedup=False), tok=Tokenizer.from_pretrained(path))
    out = tmp_path / "r.json"
    run = run_eval(f"--ckpt={path}", f"--data={data}", f"--out={out}")
    assert run.returncode == 0, run.stderr
    got = json.loads(out.read_text())["results"]["ppl"]
    with open(os.path.join(data, "meta.json")) as f:
        meta = json.load(f)
    assert got["bpb"] == pytest.approx(got["loss"] * got["tokens"] / (meta["bytes"]["val"] * math.log(2)))
    del meta["bytes"]  # data made before bytes were recorded
    with open(os.path.join(data, "meta.json"), "w") as f:
        json.dump(meta, f)
    run = run_eval(f"--ckpt={path}", f"--data={data}", f"--out={out}")
    assert run.returncode == 0 and "meta.json records no bytes" in run.stdout
    assert "bpb" not in json.loads(out.read_text())["results"]["ppl"]
