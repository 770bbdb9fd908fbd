# A model small enough that 100 steps take a few seconds on 2 CPU cores: tests and quick checks.
#   python pretrain.py config/tiny.py --data_dir=... --out_dir=out/tiny
out_dir = "out/tiny"
dim = 64
n_layers = 2
n_heads = 4
n_kv_heads = 2
batch_size = 4
grad_accum = 2     # 8 sequences a step; also runs as is under torchrun with 2 processes
block_size = 64
max_iters = 100
learning_rate = 3e-3
min_lr = 3e-4
warmup_iters = 10
eval_interval = 50
eval_iters = 4
log_interval = 10
dtype = "float32"   # tiny matrices gain nothing from bf16 on CPU
