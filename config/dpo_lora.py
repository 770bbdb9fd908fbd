# LoRA DPO with the adapters switched off as the reference (one model in memory), for any model dpo.py loads, e.g.
# SmolLM2-135M-Instruct on the English demo pairs (data_process.py holds 10% of them out):
#   python data_process.py --format=dpo --input=../shared/data/dpo_en/dpo_en_demo --tokenizer=$GGUF \
#       --out_dir=data/dpo_en --max_len=1024
#   python dpo.py config/dpo_lora.py --init_from=$GGUF --data_dir=data/dpo_en
#   python dpo.py config/dpo_lora.py --init_from=$GGUF --data_dir=data/dpo_en --reference=cached \
#       --out_dir=out/dpo_cached
out_dir = "out/dpo_lora"
method = "lora"
lora_rank = 16
lora_alpha = 32.0
reference = "adapter_off"
beta = 0.1
learning_rate = 5e-5
min_lr = 5e-6
warmup_iters = 5
epochs = 2.0
batch_size = 4
grad_accum = 2
dtype = "auto"                # bf16 where the hardware runs it fast, else float32 (inference.resolve_dtype)
chunked_loss = True           # the (tokens x 49,152) logits would be the largest tensor of a step (model_kernels.py)
