"""Quantise a checkpoint (int8, int4 round-to-nearest, GPTQ) into a folder, export GGUF, or compare them in a table.

    python quant_model.py --ckpt=out/sft --mode=int8 --out=out/sft-int8
    python quant_model.py --ckpt=out/sft --mode=int4 --group_size=128 --out=out/sft-int4
    python quant_model.py --ckpt=out/sft --mode=gptq --bits=4 --group_size=128 --calib=data --out=out/sft-gptq
    python quant_model.py --ckpt=out/sft --mode=gguf --gguf_type=q8_0 --out=out/sft-gguf   # for llama.cpp / ollama
    python quant_model.py --ckpt=SmolLM2.gguf --report=True --calib=... --eval_text=...     # the comparison table

The layers, the number format and the checkpoint folder are quant.py's; GPTQ is gptq.py, the GGUF writer
gguf_export.py. A quantised folder loads wherever a checkpoint does (inference.load_model: eval.py, chat.py).
"""
import os
import sys
import time

import numpy as np
import torch

import configurator
import convert
import data
import gguf_export
import gptq
import inference
import quant

# ----------------------------------------------------------------------------------------------------------------
ckpt = ""                 # our/HF model folder or a .gguf file
mode = "int4"             # int8 | int4 (round-to-nearest) | gptq | gguf (export for llama.cpp)
bits = 4                  # gptq: 4, 3 or 2 (stored in 4-bit containers: torch has no 3- or 2-bit kernel)
group_size = 128          # int4/gptq: weights per scale along the input dimension (32, 64, 128, ...)
act_order = False         # gptq: quantise columns by decreasing Hessian diagonal (groups stay static)
damp = 0.01               # gptq: dampening, as a fraction of the mean Hessian diagonal
calib = ""                # gptq: a data directory (its train split), a .bin in one, or text files/folders
calib_samples = 128       # gptq: calibration sequences ...
calib_seq_len = 512       # ... of this many tokens
quant_lm_head = False     # also quantise the output projection (a tied one shares the embedding's table if
                          # quant_embed, else it is untied first)
quant_embed = False       # also quantise the embedding table (round-to-nearest, dequantised per looked-up row)
gguf_type = "q8_0"        # gguf: f32 | f16 | q8_0 | q4_0
out = "out/quant"         # output folder (gguf: a folder, or a path ending in .gguf)
report = False            # True: bf16 vs int8 vs int4 vs gptq table (size, perplexity, decode tokens/s)
eval_text = "../shared/data/pretrain_en/wiki_demo"   # report: held-out text (or a data directory: val)
eval_tokens = 32768       # report: evaluate the first this many tokens of eval_text (0 = all)
eval_block_size = 512     # report: context per window ...
eval_stride = 512         # ... and step between windows
decode_tokens = 64        # report: tokens generated for the decode speed figure
device = "cpu"
threads = 0               # CPU threads for torch (0: its default); on a shared machine 1 avoids stalls at every op
seed = 1337
# ----------------------------------------------------------------------------------------------------------------


def quantize(model, mode, bits, calib_ids):
    """Quantise `model` in place as the settings above say; returns its quantization_config."""
    if mode == "gptq":
        return gptq.quantize_model(model, calib_ids, bits, group_size, act_order, damp, quant_lm_head, quant_embed)
    return quant.quantize_model(model, mode, bits, group_size, quant_lm_head, quant_embed)


def within_context(key, n_tokens, max_seq_len):
    """n_tokens, or what the model's context leaves (saying so) where `key` asks for more: the model never saw
    longer text."""
    if n_tokens <= max_seq_len:
        return n_tokens
    print(f"{key}={n_tokens}: more than the model's context allows; using {max_seq_len}")
    return max_seq_len


def calibration_tokens(path, tok, n_samples, seq_len, config, seed=0):
    """(n_samples, seq_len) windows at random offsets of data.token_stream(path) (a data directory's train split, a
    .bin in one, or text), each within the model's context and vocabulary (`config`: its ModelConfig)."""
    seq_len = within_context("calib_seq_len", seq_len, config.max_seq_len)
    stream = data.token_stream(path, tok, split="train")
    if len(stream) <= seq_len:
        raise SystemExit(f"{path}: {len(stream)} tokens, fewer than one calibration window of {seq_len}")
    if len(stream) < n_samples * seq_len:
        print(f"calibration: {path} has {len(stream)} tokens, windows of {n_samples} x {seq_len} overlap")
    starts = np.random.default_rng(seed).integers(0, len(stream) - seq_len, n_samples)
    windows = torch.from_numpy(np.stack([np.asarray(stream[s:s + seq_len], dtype=np.int64) for s in starts]))
    if int(windows.max()) >= config.vocab_size:
        raise SystemExit(f"{path}: token id {int(windows.max())} >= the model's vocab_size {config.vocab_size}")
    return windows


def folder_size(path):
    """Bytes of the weights in a checkpoint folder (not the tokenizer)."""
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))


# ---------------------------------------------------------------------------------------------- report
def decode_tokens_per_second(model, prompt, n):
    """Steady-state greedy decode speed: tokens after the first over the time they took (prefill excluded)."""
    stamps = []
    model.generate(prompt, n, temperature=0, callback=lambda ids: stamps.append(time.perf_counter()) and False)
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def run_report():
    """bf16 vs int8 vs int4 RTN vs GPTQ: size on disk, perplexity on eval_text, decode tokens/s (a markdown table).
    Every quantised model is saved and loaded back before it is measured, so the table covers the round trip."""
    import copy
    import platform

    base, tok = inference.load_model(ckpt, device, torch.bfloat16)
    tokens = torch.from_numpy(np.asarray(data.token_stream(eval_text, tok)[:eval_tokens or None], dtype=np.int64))
    calib_ids = calibration_tokens(calib, tok, calib_samples, calib_seq_len, base.config, seed)
    context = base.config.max_seq_len
    block_size = within_context("eval_block_size", eval_block_size, context)
    stride = min(eval_stride, block_size)
    prompt = tokens[None, :min(32, context // 2)].to(device)
    n_decode = within_context("decode_tokens", decode_tokens, context - prompt.shape[1])
    variants = [("bf16", None, None, "bf16"), ("int8 (per-channel)", "int8", 8, "int8"),
                (f"int4 RTN g{group_size}", "int4", 4, f"int4-g{group_size}"),
                (f"GPTQ int{bits} g{group_size}" + (" act-order" if act_order else ""), "gptq", bits,
                 f"gptq-g{group_size}")]
    rows, models = [], []
    for name, variant_mode, variant_bits, folder_name in variants:
        folder = os.path.join(out, folder_name)
        t0 = time.time()
        if variant_mode is None:
            convert.save_pretrained(base, folder)
            model = base
        else:
            model = copy.deepcopy(base)
            quant.save_quantized(model, folder, quantize(model, variant_mode, variant_bits, calib_ids), tok)
            model = quant.load_quantized(folder, device)
        t_quant = time.time() - t0
        ppl = inference.perplexity(model, tokens.to(device), block_size, stride, 4)
        rows.append([name, folder_size(folder) / 2 ** 20, ppl["ppl"], 0.0, t_quant])
        models.append(model)
        print(f"{name}: {rows[-1][1]:.1f} MiB, ppl {ppl['ppl']:.3f} over {ppl['tokens']} tokens")
    # decode speed last, all models in turns, best of 3: on a shared machine, load changes over a long run
    # CPUs without AMX have no fast bf16 matrix-vector product: fp32 weights for reference
    models.append(copy.deepcopy(base).float())
    speeds = [[] for _ in models]
    for _ in range(3):
        for m, sp in zip(models, speeds):
            decode_tokens_per_second(m, prompt, 4)  # warm-up (kernel layouts, caches)
            sp.append(decode_tokens_per_second(m, prompt, n_decode))
    for row, sp in zip(rows, speeds):
        row[3] = max(sp)
    base_ppl = rows[0][2]
    lines = [f"model: {ckpt} | eval: {eval_text} ({len(tokens)} tokens, block {block_size}, stride "
             f"{stride}) | calibration: {calib} ({calib_samples} x {calib_ids.shape[1]} tokens) | device: "
             f"{device} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads), torch "
             f"{torch.__version__}", "",
             "| weights | size on disk (MiB) | perplexity | vs bf16 | decode tokens/s | quantise time (s) |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, size, ppl, tps, tq in rows:
        lines.append(f"| {name} | {size:.1f} | {ppl:.3f} | {100 * (ppl / base_ppl - 1):+.2f}% | {tps:.1f} | {tq:.0f} |")
    lines.append(f"\n(decode: greedy, {n_decode} tokens after a {prompt.shape[1]}-token prompt, best of 3; fp32 "
                 f"weights: {max(speeds[-1]):.1f} tokens/s)")
    print("\n".join(lines))
    return rows


# ---------------------------------------------------------------------------------------------- command line
def check_settings():
    """Refuse, before any work, settings that cannot work; warn about one that works slowly."""
    if not ckpt:
        raise SystemExit(__doc__)
    if mode == "gguf" and not report:
        if gguf_type not in gguf_export.GGUF_TYPES:
            raise SystemExit(f"--gguf_type={gguf_type}: expected one of {', '.join(gguf_export.GGUF_TYPES)}")
    else:  # the report makes int8, int4 and GPTQ checkpoints
        if quant.check_settings("gptq" if report else mode, bits, group_size) != 8 and \
                group_size not in quant.KERNEL_GROUP_SIZES:
            print(f"warning: group_size={group_size}: torch's int4 kernels take "
                  f"{', '.join(map(str, quant.KERNEL_GROUP_SIZES))}; this model will run by dequantising its weights "
                  "at every step (slower)", file=sys.stderr)
    if (mode != "gguf" or report) and os.path.isdir(ckpt) and quant.read_quantization_config(ckpt) is not None:
        raise SystemExit(f"{ckpt} is already quantised; quantise (or compare) the float checkpoint")
    if (mode == "gptq" or report) and not calib:
        raise SystemExit("--mode=gptq and --report=True need --calib: a data directory, a .bin in one, or text files")
    at_least = dict(calib_samples=1, calib_seq_len=1, damp=0, threads=0)
    if report:
        at_least.update(eval_tokens=0, eval_block_size=1, eval_stride=1, decode_tokens=2)  # a speed needs 2 tokens
    for key, low in at_least.items():
        if globals()[key] < low:
            raise SystemExit(f"--{key}={globals()[key]}: expected at least {low}")
    if report and eval_stride > eval_block_size:
        raise SystemExit(f"--eval_stride={eval_stride}: expected at most eval_block_size={eval_block_size}")
    gguf_file = mode == "gguf" and not report and out.endswith(".gguf")
    if os.path.isfile(out) and not gguf_file or gguf_file and os.path.isdir(out):
        raise SystemExit(f"--out={out}: is a {'folder' if gguf_file else 'file'}; name a "
                         f"{'.gguf file' if gguf_file else 'folder'} for the output")
    if mode != "gguf" and not report and os.path.isfile(os.path.join(out, "config.json")) and not rewritable(out):
        raise SystemExit(f"--out={out}: holds a checkpoint that is not a quantised one from this script (--ckpt "
                         "itself?); name another folder, nothing was overwritten")


def rewritable(folder):
    """Whether a folder holding a config.json is a quantised checkpoint this script wrote (a re-run replaces it)."""
    try:
        return quant.read_quantization_config(folder) is not None
    except ValueError:  # damaged, or another tool's: not ours to replace
        return False


def main():
    configurator.apply(globals(), sys.argv[1:])
    check_settings()
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    if report:
        return run_report()
    if mode == "gguf":
        model, tok = inference.load_model(ckpt, "cpu", torch.float32)
        path = out if out.endswith(".gguf") else os.path.join(out, f"model-{gguf_type}.gguf")
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        gguf_export.export_gguf(model, tok, path, gguf_type, name=os.path.basename(os.path.normpath(ckpt)))
        print(f"wrote {path} ({os.path.getsize(path) / 2 ** 20:.1f} MiB)")
        return
    model, tok = inference.load_model(ckpt, device, torch.bfloat16)
    calib_ids = None
    if mode == "gptq":
        calib_ids = calibration_tokens(calib, tok, calib_samples, calib_seq_len, model.config, seed)
        print(f"calibration: {calib_ids.shape[0]} sequences x {calib_ids.shape[1]} tokens from {calib}")
    t0 = time.time()
    qc = quantize(model, mode, bits, calib_ids)
    quant.save_quantized(model, out, qc, tok)
    print(f"{mode} ({qc['bits']}-bit{'' if qc['bits'] == 8 else f', group {group_size}'}) in {time.time() - t0:.0f}s: "
          f"{len(qc['modules'])} modules; wrote {out} ({folder_size(out) / 2 ** 20:.1f} MiB)")


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:  # bad input the library's checks found (bits/group size, a model GGUF cannot express, ...)
        raise SystemExit(f"quant_model.py: {e}")
