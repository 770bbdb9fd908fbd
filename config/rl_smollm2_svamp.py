# SmolLM2-135M-Instruct, LoRA GRPO on SVAMP (../shared/data/math_en/svamp): the first 200 problems held out for
# eval_pass@1, training on the other 800 (bench_rl.py runs it beside TRL's GRPOTrainer):
#   python rl.py config/rl_smollm2_svamp.py --init_from=$GGUF
out_dir = "out/rl_svamp"
problems = "../shared/data/math_en/svamp"
problems_skip = 200
eval_problems = "../shared/data/math_en/svamp"
eval_limit = 200
method = "lora"
lora_rank = 16
lora_alpha = 32.0
lora_dropout = 0.0
rewards = ("gsm8k_answer", "format")
reward_weights = (1.0, 0.2)
group_size = 4
batch_size = 8               # 2 prompts x 4 completions a step
temperature = 1.0
max_new_tokens = 192
eval_max_new_tokens = 256
learning_rate = 2e-5
max_iters = 100
eval_interval = 100
log_interval = 1
