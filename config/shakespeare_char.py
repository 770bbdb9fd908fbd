# tinyllm's recipe for character-level tinyshakespeare, raced against nanoGPT's own CPU recipe:
#   python bench_pretrain.py --nanogpt=../nanoGPT    # makes the char-level data (out/bench_pretrain/data), runs both
# nanoGPT's CPU recipe (4 layers x 128, block 64, batch 12, lr 1e-3, 2000 iters, fp32) with LLaMA's blocks
# (RoPE, RMSNorm, SwiGLU) instead of GPT-2's, Muon for the blocks' matrices (optimizers.py: ~1.4x fewer steps than
# AdamW to the same loss here, at ~30% more CPU a step at this size), a larger batch at a higher learning rate, a short
# cosine schedule and bf16 autocast where the CPU runs it fast (AMX or AVX512-BF16). Measured (BENCHMARKS.md): nanoGPT's
# final val loss at step 300 of 450 in ~0.24x its CPU time, 1.78 at the end; with --max_iters=1300, 1.56 in less time
# than nanoGPT's run.
out_dir = "out/shakespeare_char"
data_dir = "out/bench_pretrain/data"
dim = 128
n_layers = 4
n_heads = 4
block_size = 64
batch_size = 24
optimizer = "muon"
max_iters = 450
learning_rate = 2.5e-3
min_lr = 1e-4
warmup_iters = 40
beta2 = 0.99
eval_interval = 25  # each evaluation (and checkpoint) costs ~0.2 s
eval_iters = 8      # 8 x 24 fixed windows of 64 tokens: 12k tokens, nanoGPT's estimate uses 15k random ones
log_interval = 50
keep_last = 1
dtype = "auto"                # bf16 where the hardware runs it fast, else float32 (inference.resolve_dtype)
