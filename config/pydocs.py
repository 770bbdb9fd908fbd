# run.sh's pretraining: a ~1M-parameter LLaMA on the embedded Python-docs corpus (~0.2M tokens, vocab 4096),
# about two minutes on 2 CPU cores (one thread: see run.sh). bf16 autocast only where the CPU has AMX
# or AVX512-BF16: elsewhere its bf16 matmuls are emulated, many times slower than fp32.
out_dir = "out/pydocs"
dim = 128
n_layers = 4
n_heads = 4
n_kv_heads = 2
batch_size = 12
block_size = 128
max_iters = 600
learning_rate = 2e-3
min_lr = 2e-4
warmup_iters = 30
eval_interval = 100
eval_iters = 4
log_interval = 20
dtype = "auto"                # bf16 where the hardware runs it fast, else float32 (inference.resolve_dtype)
