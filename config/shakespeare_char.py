# tinyllm's recipe for character-level tinyshakespeare, raced against nanoGPT's own CPU recipe:
#   python bench_pretrain.py --nanogpt=../nanoGPT    # makes the char-level data (out/bench_pretrain/data), runs both
# nanoGPT's CPU recipe (GPT-2 4 layers x 128, block 64, batch 12, lr 1e-3, 2000 iters, fp32) against LLaMA's blocks
# (RoPE, RMSNorm, SwiGLU), wider and shallower (2 x 192: ~0.9M parameters, 45 us of CPU a token against 4 x 128's
# 60, and fewer tokens to a given loss), Muon for the blocks' matrices (AdamW at this shape, lr 6e-3, stays above 2.0
# after 400 steps, where Muon is at 1.77), a high learning rate for few steps, and bf16 autocast where the CPU runs it
# fast (AMX or AVX512-BF16; 1.5x faster than fp32 here). Shorter cosines end higher, and torch.compile costs more CPU
# than the whole run. Measured (BENCHMARKS.md, two runs on a shared 2-core VM): nanoGPT's final val at step 200 in
# 0.145-0.151x its CPU time (0.23x its wall time, skewed by the machine's other load); --max_iters=800: 1.63 within
# its wall time.
out_dir = "out/shakespeare_char"
data_dir = "out/bench_pretrain/data"
dim = 192
n_layers = 2
n_heads = 6
block_size = 64
batch_size = 24
optimizer = "muon"
max_iters = 220
learning_rate = 6e-3
min_lr = 1e-4
warmup_iters = 10
beta2 = 0.99
eval_interval = 25  # each evaluation (and checkpoint) costs ~2 training steps
eval_iters = 8      # 8 x 24 fixed windows of 64 tokens: 12k tokens, nanoGPT's estimate uses 15k random ones
log_interval = 50
keep_last = 1
dtype = "auto"                # bf16 where the hardware runs it fast, else float32 (inference.resolve_dtype)
