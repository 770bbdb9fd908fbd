# GRPO on the embedded one-digit sums (run.sh's stage), from the run's SFT model given a short warm-up on them:
#   python rl.py --write_sft=out/run/addition_sft.jsonl --problems=addition:split=train,n=86,digits=1
#   python data_process.py --format=sft --input=out/run/addition_sft.jsonl --tokenizer=out/run/sft/hf \
#       --out_dir=out/run/addition_data --max_len=64
#   python fine_tuning.py --init_from=out/run/sft/hf --data_dir=out/run/addition_data --out_dir=out/run/addition_sft \
#       --max_iters=100 --learning_rate=1e-3 --batch_size=16
#   python rl.py config/rl_addition.py --init_from=out/run/addition_sft/hf --out_dir=out/run/rl
# eval_pass@1 in metrics.jsonl (steps 0 and 40; the curve in out_dir/reward.png) is greedy exact match on the sums
# trained on: a model this small memorises sums and does not work out those of unseen pairs (addition:split=eval).
out_dir = "out/rl_addition"
problems = "addition:split=train,n=86,digits=1"
eval_problems = "addition:split=train,n=86,digits=1"
eval_batch_size = 86
max_new_tokens = 8
eval_max_new_tokens = 8
group_size = 8
batch_size = 64              # 8 prompts x 8 completions a step
learning_rate = 2e-4         # measured on run.sh's model: 8.1% -> 14.0% in 40 steps; at 5e-4 9.3%, and from a
                             # 200-step warm-up (75.6%) 5e-4 collapses to 14% within 20 steps
max_iters = 40
eval_interval = 20
log_interval = 5
