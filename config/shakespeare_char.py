# tinyllm's recipe for tinyshakespeare at character level (bench_pretrain.py races it against nanoGPT's CPU recipe)
#   python bench_pretrain.py        # makes the char-level data and runs both
out_dir = "out/shakespeare_char"
data_dir = "out/bench_pretrain/data"
dim = 128
n_layers = 4
n_heads = 4
block_size = 64
batch_size = 32
max_iters = 1000
learning_rate = 2e-3
min_lr = 1e-4
warmup_iters = 50
beta2 = 0.99
eval_interval = 50
eval_iters = 16
log_interval = 50
keep_last = 1
dtype = "bfloat16"
