"""gguf_export.py's files run by llama.cpp itself: its logits and perplexity on the exported GGUF against our model's
on the same token ids, for each GGUF type. llama.cpp is the reference the tests cannot use (it is not installed):

    python bench_gguf.py --ckpt=out/run_zh/pretrain/hf --data=out/run_zh/data/val.bin --llama_cpp=/path/llama-cpp-python

--llama_cpp names an unpacked llama-cpp-python source (`pip download llama-cpp-python --no-binary :all:`) whose
vendor/llama.cpp was built with -DBUILD_SHARED_LIBS=ON (cmake --build build --target llama): its ctypes bindings load
that libllama. --ckpt=tiny-phi runs a random tiny Phi model instead (GQA, partial rotary, every bias; scaled weights
so that mistakes show). Token ids go to llama.cpp as they are (its tokenizer is compared separately on --data's
first text), so what differs is the graph and the file's rounding. Our figures: fp32, on the float model and on the
GGUF read back by convert.py (the same rounded weights llama.cpp computes with).
"""
import json
import os
import sys
import tempfile

import numpy as np
import torch

import configurator
import convert
import gguf_export
from model import ModelConfig, Transformer
from tokenizer import Tokenizer

ckpt = "out/run_zh/pretrain/hf"  # a Phi or LLaMA model folder, or tiny-phi
data = "out/run_zh/data/val.bin"  # uint16 token stream (data_process.py) scored in windows of the model's context
windows = 8
types = "f32,f16,q8_0,q4_0"
llama_cpp = ""                   # llama-cpp-python source folder with vendor/llama.cpp/build/bin/libllama.so
threads = 2
kv_f32 = True                    # llama.cpp's KV cache in f32 (its default, f16, rounds K and V once more)


def load_llama_cpp():
    if not os.path.isfile(os.path.join(llama_cpp, "vendor/llama.cpp/build/bin/libllama.so")):
        sys.exit(f"--llama_cpp={llama_cpp!r}: no vendor/llama.cpp/build/bin/libllama.so there (see --help)")
    os.environ["LLAMA_CPP_LIB_PATH"] = os.path.join(llama_cpp, "vendor/llama.cpp/build/bin")
    sys.path.insert(0, llama_cpp)
    import llama_cpp as lc
    return lc


def tiny_phi(vocab_size):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=256,
                                    norm="layernorm", mlp="gelu", parallel_block=True, attn_bias=True, mlp_bias=True,
                                    lm_head_bias=True, tie_embeddings=False, partial_rotary_factor=0.5))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4)
    return model.eval()


def nll(logits, ids):
    """Mean next-token negative log-likelihood of rows `ids` (windows, T) under logits (windows, T, vocab)."""
    logp = torch.log_softmax(torch.as_tensor(logits, dtype=torch.float64), -1)
    return -logp[:, :-1].gather(-1, torch.as_tensor(ids)[:, 1:, None]).mean().item()


def main():
    lc = load_llama_cpp()
    tok = Tokenizer.from_pretrained(os.path.dirname(data) if ckpt == "tiny-phi" else ckpt)  # data's own tokenizer
    model = tiny_phi(tok.vocab_size) if ckpt == "tiny-phi" else convert.from_pretrained(ckpt, dtype=torch.float32)
    T = model.config.max_seq_len
    stream = np.fromfile(data, dtype=np.uint16)
    ids = stream[:windows * T].astype(np.int64).reshape(windows, T)
    with torch.no_grad():
        ours = model(torch.as_tensor(ids))[0].numpy()
    print(f"{ckpt}: {gguf_export.gguf_architecture(model.config)}, {windows} windows of {T} tokens from {data}; "
          f"ours (fp32) perplexity {np.exp(nll(ours, ids)):.4f}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in types.split(","):
            path = gguf_export.export_gguf(model, tok, os.path.join(tmp, f"m-{kind}.gguf"), kind)
            llm = lc.Llama(model_path=path, n_ctx=T, n_batch=T, n_ubatch=T, logits_all=True, n_threads=threads,
                           verbose=False, **(dict(type_k=0, type_v=0) if kv_f32 else {}))  # 0: GGML_TYPE_F32
            theirs = []
            for row in ids:
                llm.reset()
                llm.eval(row.tolist())
                theirs.append(np.array(llm.scores[:T], dtype=np.float32))
            theirs = np.stack(theirs)
            with torch.no_grad():
                back = convert.from_pretrained(path)(torch.as_tensor(ids))[0].numpy()
            scale = np.abs(ours).max()
            row = dict(type=kind, MiB=round(os.path.getsize(path) / 2 ** 20, 3),
                       ppl_llama_cpp=round(float(np.exp(nll(theirs, ids))), 4),
                       ppl_ours_read_back=round(float(np.exp(nll(back, ids))), 4),
                       max_diff_vs_read_back=float(np.abs(theirs - back).max() / scale),
                       max_diff_vs_float=float(np.abs(theirs - ours).max() / scale),
                       argmax_agree=float((theirs.argmax(-1) == back.argmax(-1)).mean()))
            if kind == types.split(",")[0] and ckpt != "tiny-phi":  # llama.cpp's tokenizer on the file's vocabulary
                text = tok.decode(ids[0].tolist())
                row["tokenizer_same_ids"] = llm.tokenize(text.encode(), add_bos=False, special=True) == tok.encode(text)
            print(json.dumps(row))
            rows.append(row)
            del llm
    return rows


if __name__ == "__main__":
    configurator.apply(globals(), sys.argv[1:])
    main()
