# config/phi_zh.py's recipe at a GPU's size: a ~110M-parameter Phi-2-style model (12 layers x 768, GELU MLP 3072,
# partial rotary 0.4 as Phi-2, untied lm_head) for one or more GPUs, with a 32k-id tokenizer on a corpus of a few
# billion characters:
#   ZH_PRETRAIN=corpus/ ZH_VOCAB=32000 ZH_CONFIG=config/phi_zh_gpu.py \
#     LAUNCH="torchrun --standalone --nproc_per_node=8" bash run.sh zh
# 16 x 1024 x 32 = 524k tokens per optimizer step (GPT-2's batch, divided among the processes).
out_dir = "out/phi_zh_gpu"
family = "phi"
dim = 768
n_layers = 12
n_heads = 12
partial_rotary_factor = 0.4
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
