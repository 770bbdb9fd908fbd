# LongLoRA, small: config/long_yarn.py's extension and steps trained with shifted sparse attention (4 groups of 256
# tokens, half the heads shifted by 128) and LoRA on every projection, embeddings and norms trained in full.
#   python pretrain.py config/long_yarn.py config/long_s2_lora.py --init_from=out/long/base/hf --data_dir=out/run/data
out_dir = "out/long/s2_lora"
s2_attn_groups = 4
method = "lora"
lora_rank = 8
lora_alpha = 16.0
lora_dropout = 0.0
trainable = "embed,norm,attn_norm,mlp_norm"
merge_dtype = "float32"
learning_rate = 2e-3
min_lr = 2e-4
