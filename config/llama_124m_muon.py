# config/llama_124m.py's ~124M LLaMA trained with Muon on a real corpus, on one GPU or several.
#   python train_tokenizer.py --input=../shared/data/pretrain_en --txt_split=blank --lenient=True --vocab_size=32000 \
#       --out_dir=out/tok32k
#   python data_process.py --input=../shared/data/pretrain_en --txt_split=blank --lenient=True --tokenizer=out/tok32k \
#       --out_dir=data/pretrain_en
#   python pretrain.py config/llama_124m_muon.py                        # one GPU
#   torchrun --standalone --nproc_per_node=8 pretrain.py config/llama_124m_muon.py    # DDP (Muon needs parallel=ddp)
#   python bench_pretrain.py --gpu=True                                 # tokens/s and MFU of this preset, one command
# ../shared/data/pretrain_en is ~2.7M tokens: enough to see the loss fall and to time the GPU; for a model worth keeping
# point data_dir at billions of tokens (FineWeb-Edu, data_process.py's output) and raise max_iters.
# Muon (optimizers.py) for the blocks' matrices, AdamW for embeddings and norms, one learning_rate for both
# (match_rms_adamw); modded-nanogpt's records and Moonshot's Moonlight train with Muon at about 1.5x AdamW's sample
# efficiency, which lets the batch be smaller and the schedule shorter than GPT-2's.
out_dir = "out/llama_124m_muon"
data_dir = "data/pretrain_en"
vocab_size = 32000            # must be >= the data's vocab_size (meta.json)
dim = 768
n_layers = 12
n_heads = 12
hidden_dim = 2560
block_size = 1024
batch_size = 32               # per GPU; fits an 80 GB H100 in bf16 without activation checkpointing
grad_accum = 8                # 32 * 1024 * 8 = 262k tokens per step (divided among the GPUs)
optimizer = "muon"
max_iters = 5000
learning_rate = 1.5e-3
min_lr = 1.5e-4
warmup_iters = 200
weight_decay = 0.1
beta2 = 0.95
dtype = "auto"                # bf16 where the hardware runs it fast, else float32 (inference.resolve_dtype)
compile = True
eval_interval = 250
eval_iters = 20
log_interval = 10
