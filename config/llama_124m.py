# A ~124M-parameter LLaMA (GPT-2 small's size) for one or more GPUs: sequence 1024, bf16, compiled.
#   torchrun --standalone --nproc_per_node=8 pretrain.py config/llama_124m.py --data_dir=data/your_corpus
# 12 layers x 768, SwiGLU hidden 2560, vocab 32000 tied: 123.7M parameters (99.1M without the embedding).
out_dir = "out/llama_124m"
vocab_size = 32000            # must be >= the data's vocab_size (meta.json)
dim = 768
n_layers = 12
n_heads = 12
hidden_dim = 2560
block_size = 1024
batch_size = 32               # per GPU; fits an 80 GB H100 in bf16 without activation checkpointing
grad_accum = 16               # 32 * 1024 * 16 = 524k tokens per step, GPT-2's batch (divided among the GPUs)
max_iters = 20000
learning_rate = 6e-4
min_lr = 6e-5
warmup_iters = 700
weight_decay = 0.1
beta2 = 0.95
dtype = "auto"                # bf16 where the hardware runs it fast, else float32 (inference.resolve_dtype)
compile = True
eval_interval = 500
eval_iters = 50
log_interval = 10
