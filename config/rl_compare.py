# GRPO on the embedded compare task (which of two numbers is larger), from run.sh's SFT model given a short warm-up
# on 2000 train-split questions; GRPO then samples 2000 other train-split questions, and eval_pass@1 is greedy exact
# match on 200 held-out pairs that neither saw (math_tasks._pairs):
#   python rl.py --write_sft=out/run/compare_sft.jsonl --problems=compare:split=train,n=2000
#   python data_process.py --format=sft --input=out/run/compare_sft.jsonl --tokenizer=out/run/sft/hf \
#       --out_dir=out/run/compare_data --max_len=64
#   python fine_tuning.py --init_from=out/run/sft/hf --data_dir=out/run/compare_data --out_dir=out/run/compare_sft \
#       --max_iters=200 --learning_rate=1e-3 --batch_size=16
#   python rl.py config/rl_compare.py --init_from=out/run/compare_sft/hf --out_dir=out/run/rl
# The warm-up stops while the model is learning the rule (42.5% held out after 200 steps, 77.5% after 300, 4.5% after
# 100: it first learns that the answer is a large number, then to copy the larger one); GRPO needs samples that are
# right for the right reason. Measured on run.sh's model: eval_pass@1 42.5% -> 48.0% in 40 steps (reward 0.11 ->
# 0.27); at 5e-5 46.0%; at 2e-4 and 5e-4 it falls (37%, 24.5% by step 20), as it does from the 300-step warm-up.
out_dir = "out/rl_compare"
problems = "compare:split=train,n=4000"
problems_skip = 2000         # the warm-up's 2000 (write_sft's n=2000 are the first of the same seed's order)
eval_problems = "compare:split=eval,n=200"
eval_batch_size = 200
max_new_tokens = 8           # "#### 82" and the stop token
eval_max_new_tokens = 8
group_size = 8
batch_size = 64              # 8 prompts x 8 completions a step
learning_rate = 1e-4
max_iters = 40
eval_interval = 20
log_interval = 5
