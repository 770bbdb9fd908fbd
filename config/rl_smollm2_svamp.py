# SmolLM2-135M-Instruct, LoRA GRPO on SVAMP (../shared/data/math_en/svamp): the first 200 problems held out for
# eval_pass@1, training on the other 800 (bench_rl.py runs it beside TRL's GRPOTrainer):
#   python rl.py config/rl_smollm2_svamp.py --init_from=$GGUF
# Measured on 2 shared CPU cores (BENCHMARKS.md): 14 steps at --learning_rate=1e-4, ~93 s a step, moved greedy pass@1
# on the 200 held out from 5.5% to 4.5% (6 questions lost, 4 gained: noise). 25 of 28 groups sampled all-zero
# rewards, so 11 of 14 steps had no gradient: this model answers right in 2-4% of its samples, so each right answer
# (the only signal) costs 25-50 samples, 5-10 min here, whatever group_size; a rise needs far more steps than that.
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
