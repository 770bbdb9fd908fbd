# tinyllm's recipe for character-level tinyshakespeare: val loss 1.88 in well under half of nanoGPT's CPU time.
#   python bench_pretrain.py        # makes the char-level data (out/bench_pretrain/data) and races both recipes
# nanoGPT's CPU recipe (4 layers x 128, block 64, batch 12, lr 1e-3, 2000 iters, fp32) with LLaMA's blocks
# (RoPE, RMSNorm, SwiGLU) instead of GPT-2's, a larger batch at a higher learning rate (bigger matmuls use
# the cores better), a short cosine schedule (annealing is where the loss drops) and bf16 autocast where the
# CPU runs it fast (AMX or AVX512-BF16).
out_dir = "out/shakespeare_char"
data_dir = "out/bench_pretrain/data"
dim = 128
n_layers = 4
n_heads = 4
block_size = 64
batch_size = 24
max_iters = 450
learning_rate = 2.5e-3
min_lr = 1e-4
warmup_iters = 40
beta2 = 0.99
eval_interval = 50  # each evaluation (and checkpoint) costs ~0.4 s
eval_iters = 16
log_interval = 50
keep_last = 1
dtype = "auto"                # bf16 where the hardware runs it fast, else float32 (inference.resolve_dtype)
