# config/phi_zh.py's recipe at a GPU's size: a Phi-2-style model (12 layers x 768, GELU MLP 3072, partial rotary,
# untied lm_head) of 85M parameters besides its two embedding tables (134M in all with a 32k-id tokenizer), for one
# or more GPUs, on a corpus of a few billion characters:
#   ZH_PRETRAIN=corpus/ ZH_VOCAB=32000 ZH_CONFIG=config/phi_zh_gpu.py \
#     LAUNCH="torchrun --standalone --nproc_per_node=8" bash run.sh zh
# 16 x 1024 x 32 = 524k tokens per optimizer step (GPT-2's batch, divided among the processes).
out_dir = "out/phi_zh_gpu"
family = "phi"
dim = 768
n_layers = 12
n_heads = 12
partial_rotary_factor = 0.5   # 32 of each head's 64 features rotated (Phi-2: 32 of 80)
tie_embeddings = False
block_size = 1024
batch_size = 16               # per GPU; fits an 80 GB H100 in bf16 without activation checkpointing
grad_accum = 32
max_iters = 20000
learning_rate = 6e-4
min_lr = 6e-5
warmup_iters = 700
weight_decay = 0.1
beta2 = 0.95
dtype = "auto"                # bf16 where the hardware runs it fast (inference.resolve_dtype)
compile = True
eval_interval = 500
eval_iters = 50
log_interval = 10
