# The Phi-2 riddles recipe (LoRA r=32, alpha=32, dropout 0.1 on the attention and MLP linears, embeddings and
# lm_head trained in full, a constant learning rate, evaluation twice an epoch) for any model fine_tuning.py loads:
#   python data_process.py --format=sft --template=chatml --input=../shared/data/sft_en/riddles_nkilm \
#       --rename=riddle:prompt,answer:completion --tokenizer=$GGUF --out_dir=data/riddles --max_len=256
#   python fine_tuning.py config/sft_riddles.py --init_from=$GGUF --data_dir=data/riddles
out_dir = "out/sft_riddles"
method = "lora"
lora_rank = 32
lora_alpha = 32.0
lora_dropout = 0.1
lora_targets = "all"          # q/k/v/o and the MLP (Phi-2: Wqkv,out_proj,fc1,fc2)
trainable = "embed,lm_head"
lr_schedule = "constant"
learning_rate = 2e-4
warmup_iters = 5
epochs = 2.0
batch_size = 8
max_len = 256
dtype = "auto"                # bf16 where the hardware runs it fast, else float32 (inference.resolve_dtype)
chunked_loss = True           # the (tokens x 49,152) logits would be the largest tensor of a step (model_kernels.py)
