# YaRN's recipe, small: the 256-token model of the long-context figures (config/pydocs.py pretrained with
# --block_size=256 into out/long/base) stretched to 1024 tokens, then 150 steps of continued pretraining at 1024.
#   python pretrain.py config/long_yarn.py --init_from=out/long/base/hf --data_dir=out/run/data
out_dir = "out/long/yarn"
rope_scaling = "yarn"
extend_to = 1024
block_size = 1024
batch_size = 4
max_iters = 150
learning_rate = 5e-4
min_lr = 5e-5
warmup_iters = 10
eval_interval = 50
eval_iters = 4
log_interval = 10
dtype = "auto"                # bf16 where the hardware runs it fast, else float32 (inference.resolve_dtype)
