"""Reinforcement learning from verifiable rewards: GRPO (Shao et al. 2024, DeepSeekMath) - full, LoRA or QLoRA - on
trainer.py's loop.

    python rl.py config/rl_compare.py --init_from=out/run/compare_sft/hf         # the embedded compare task (run.sh)
    python rl.py config/rl_smollm2_svamp.py --init_from=$GGUF                    # SVAMP word problems, LoRA
    python rl.py ... --init_from=resume                                          # continue the newest checkpoint

Each round, every prompt of the round (problems: math_tasks.load_problems, asked in the model's chat template) is
answered group_size times by the current policy through engine.py's continuous batching (one KV-cache row per
completion; temperature, top_p, max_new_tokens, stopping at the tokenizer's stop ids; a seed per completion). Each
completion is scored by the reward functions (rewards, reward_weights: math_tasks.REWARDS names or module:function),
and its advantage is its total reward minus its
group's mean, divided by the group's std (+1e-4) unless scale_rewards=False (Dr. GRPO). The round's samples are
then trained on for num_iterations optimizer steps with the clipped objective, per completion token t:

    ratio = exp(logp - logp_old)        logp_old: the rollout policy's, from a no-grad forward at rollout time
                                        (num_iterations=1: logp detached, so the ratio is 1 and the gradient is
                                        REINFORCE with the group mean as baseline)
    loss  = -min(ratio * A, clip(ratio, 1 - epsilon, 1 + epsilon) * A) + beta * KL
    KL    = exp(ref - logp) - (ref - logp) - 1     (the k3 estimator; beta=0: no reference is held)

averaged over every completion token of the step (loss_norm=token, DAPO) or per completion first, then over the
completions (loss_norm=sequence, the original GRPO). Log-probs are the model's own distribution (temperature 1).
A micro-batch holds batch_size completions (whole groups); a step holds grad_accum micro-batches, and under torchrun
each process samples its share of the round's prompts. The reference (beta > 0): copy (a frozen copy of the start)
or adapter_off (the LoRA/QLoRA policy with its adapters bypassed).

Logged (console, metrics.jsonl, wandb): reward and reward_std (total), reward/<name> and reward/<name>_std for
each function, zero_std_groups (the share of groups whose rewards are all equal: they teach nothing), kl,
clip_fraction (tokens whose ratio was clipped), entropy (of the policy at the completion tokens), completion_len,
truncated (completions that hit max_new_tokens), rollout_tokens_per_s and update_tokens_per_s; at each evaluation
eval_pass@1, greedy exact match on the held-out eval_problems (math_tasks.evaluate). out_dir/reward.png plots the
reward and eval_pass@1 against the step (loss.png the loss).

Resume (even after kill -9) is exact: the round's samples, advantages and old log-probs are saved with every
checkpoint (batches_rank<r>.pt), and the sampling generator is a pure function of (seed, round, rank). A reward
function that raises, returns a value that is not a finite number, or a list of the wrong length stops the run
naming the function and the sample; so do group_size < 2 and a problem whose prompt leaves no room in max_len.
"""
import copy
import json
import math
import os
import sys
import time
import types

import numpy as np
import torch
import torch.distributed as dist

import checkpoint
import configurator
import convert
import inference
import lora
import math_tasks
import trainer
import tuning
from engine import Engine, SamplingParams
from metrics import log, plot_rewards

# -- the training loop's settings (every field of trainer.TrainConfig) and the model/adapter ones shared with
#    fine_tuning.py (tuning.TuningConfig); GRPO's own follow
globals().update(vars(trainer.TrainConfig()))
globals().update({k: getattr(tuning.TuningConfig(), k) for k in ("init_from", "max_len") + tuning.ADAPTER_KEYS})
out_dir = "out/rl"
problems = "compare:split=train,n=2000"   # training problems: math_tasks.load_problems (GSM8K/SVAMP/{question,
                                         # answer} JSON, a folder, or the embedded compare/addition[:key=value,...])
problems_skip = 0            # leave out the first this many problems (e.g. those eval_problems holds out)
problems_limit = 0           # > 0: at most this many (after the skipped ones)
eval_problems = "compare:split=eval,n=200"   # held-out problems for eval_pass@1 at each evaluation ("": none)
eval_limit = 200             # > 0: the first this many
eval_batch_size = 16
group_size = 8               # completions per prompt (G); >= 2: the advantage compares within a group
batch_size = 16              # completions per micro-batch: whole groups (a multiple of group_size)
num_iterations = 1           # optimizer steps on each round's samples (mu)
epsilon = 0.2                # the ratio's clip range
beta = 0.0                   # the KL penalty's weight; 0: no KL and no reference model
reference = "copy"           # copy | adapter_off (LoRA/QLoRA): the KL's reference
loss_norm = "token"          # token (DAPO: mean over every completion token of the step) | sequence (original GRPO)
scale_rewards = True         # divide by the group's reward std (False: Dr. GRPO)
rewards = ("gsm8k_answer",)  # reward functions: math_tasks.REWARDS names or module:function
reward_weights = ()          # one weight per reward function; (): 1 each
temperature = 1.0            # rollout sampling
top_p = 1.0
max_new_tokens = 128         # per completion (less where a prompt leaves less room in max_len)
eval_max_new_tokens = 128
learning_rate = 1e-5
min_lr = 1e-6
warmup_iters = 0
weight_decay = 0.0
lr_schedule = "constant"
eval_interval = 50
max_iters = 200

write_sft = ""               # a .jsonl path: write `problems` as SFT records answered "#### <answer>" (a warm-up
                             # that teaches the format, for fine_tuning.py) and exit instead of training


# ------------------------------------------------------------------------------------------------ the objective

def group_advantages(rewards, group_size, scale=True):
    """Each completion's reward minus its group's mean, over the group's std (+1e-4, as TRL) when scale: rewards
    (completions,) ordered group by group. Also returns the share of groups whose rewards are all equal."""
    groups = rewards.view(-1, group_size)
    std = groups.std(dim=1, keepdim=True)  # unbiased, as TRL's GRPOTrainer
    adv = groups - groups.mean(dim=1, keepdim=True)
    if scale:
        adv = adv / (std + 1e-4)
    return adv.reshape(-1), (std.squeeze(1) == 0).float().mean()


def grpo_loss(logps, old_logps, ref_logps, advantages, mask, epsilon, beta, loss_norm="token"):
    """(loss, metrics) of the clipped GRPO objective (module docstring) on per-token log-probs (B, T) of the policy
    (with gradient), of the rollout policy (old_logps; None: logps detached) and of the reference (None when
    beta=0); advantages (B,); mask (B, T) 1 on completion tokens. metrics: kl, clip_fraction."""
    mask = mask.to(logps.dtype)
    old = logps.detach() if old_logps is None else old_logps
    ratio = torch.exp(logps - old)
    adv = advantages[:, None]
    per_token = -torch.min(ratio * adv, torch.clamp(ratio, 1 - epsilon, 1 + epsilon) * adv)
    metrics = {}
    if beta:
        diff = ref_logps - logps
        kl = torch.exp(diff) - diff - 1
        per_token = per_token + beta * kl
        metrics["kl"] = (kl.detach() * mask).sum() / mask.sum().clamp(min=1)
    clipped = ((ratio < 1 - epsilon) & (adv < 0)) | ((ratio > 1 + epsilon) & (adv > 0))
    metrics["clip_fraction"] = (clipped.float() * mask).sum() / mask.sum().clamp(min=1)
    if loss_norm == "token":
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1)
    elif loss_norm == "sequence":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    else:
        raise ValueError(f"loss_norm={loss_norm!r}: expected token or sequence")
    return loss, metrics


def completion_logps(model, x, y):
    """(log-probs of the labelled tokens (B, T), 0 elsewhere; the logits, or None under chunked_loss)."""
    logits, nll = model(x, y, reduction="none")
    return -nll, logits


@torch.no_grad()
def mean_entropy(logits, mask, chunk=1024):
    """The policy's entropy averaged over the masked positions, in fp32 a chunk of positions at a time."""
    rows = logits.detach()[mask]
    total = torch.zeros((), dtype=torch.float32, device=logits.device)
    for s in range(0, len(rows), chunk):
        logp = rows[s:s + chunk].float().log_softmax(-1)
        total += -(logp.exp() * logp).sum()
    return total / max(len(rows), 1)


def grpo_loss_fn(epsilon, beta, loss_norm, reference):
    """The trainer's loss_fn(model, batch, ref_model) for Rollouts' batches (x, y, advantages[, old log-probs])."""
    def loss_fn(model, batch, ref_model):
        x, y, adv, *old = batch
        mask = y != -100
        logps, logits = completion_logps(model, x, y)
        ref = None
        if beta:
            with torch.no_grad():
                if reference == "adapter_off":
                    with lora.adapters_off(getattr(model, "module", model)) as base:  # DDP: the wrapped module
                        ref = completion_logps(base, x, y)[0]
                else:
                    ref = completion_logps(ref_model, x, y)[0]
        loss, metrics = grpo_loss(logps, old[0] if old else None, ref, adv, mask, epsilon, beta, loss_norm)
        if logits is not None:  # chunked_loss never holds them
            metrics["entropy"] = mean_entropy(logits, mask)
        return loss, metrics
    return loss_fn


# ------------------------------------------------------------------------------------------------ rewards

def load_rewards(names, weights):
    """[(name, function, weight)] of the config's reward names and weights, refused at start-up when unknown."""
    if not names:
        raise SystemExit("rewards=(): name at least one reward function")
    if weights and len(weights) != len(names):
        raise SystemExit(f"reward_weights={tuple(weights)} gives {len(weights)} weights for {len(names)} rewards "
                         f"{tuple(names)}")
    weights = weights or (1.0,) * len(names)
    for w in weights:
        if not isinstance(w, (int, float)) or isinstance(w, bool) or not math.isfinite(w):
            raise SystemExit(f"reward_weights={tuple(weights)}: each must be a finite number")
    try:
        return [(name, math_tasks.load_reward(name), float(w)) for name, w in zip(names, weights)]
    except (ValueError, ImportError, AttributeError) as e:
        raise SystemExit(f"rewards={tuple(names)}: {e}") from None


def score(reward_fns, questions, completions, answers, where):
    """(functions, completions) rewards; a function that raises, returns a list of another length or a value that
    is not a finite number stops the run naming it and the sample: the step is refused, not averaged away."""
    out = torch.zeros(len(reward_fns), len(completions))
    for i, (name, fn, _) in enumerate(reward_fns):
        try:
            values = fn(list(questions), list(completions), list(answers))
        except Exception as e:
            raise SystemExit(f"reward {name} raised {type(e).__name__}: {e} ({where}, {len(completions)} samples); "
                             f"the step is refused") from None
        if not isinstance(values, (list, tuple)) or len(values) != len(completions):
            got = f"{len(values)} values" if isinstance(values, (list, tuple)) else type(values).__name__
            raise SystemExit(f"reward {name} returned {got} for {len(completions)} samples ({where}); the step is "
                             f"refused")
        for j, v in enumerate(values):
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            if not ok:
                raise SystemExit(f"reward {name} gave {v!r} for sample {j} ({where}: question {questions[j]!r}, "
                                 f"completion {completions[j][:200]!r}): not a finite number; the step is refused")
            out[i, j] = float(v)
    return out


# ------------------------------------------------------------------------------------------------ rollouts

class Rollouts:
    """The trainer's train_batch(step, micro): the micro-batches of round step // num_iterations, sampled from the
    policy when the round begins (this process's share of its prompts) and kept, with their advantages and old
    log-probs, for its num_iterations steps. state_dict() is saved with each checkpoint, so a resume inside a round
    trains on the very samples it was given. Figures of the round's rollouts: metrics(step_seconds)."""

    def __init__(self, cfg, tok, prompts, questions, answers, reward_fns):
        self.cfg, self.tok, self.reward_fns = cfg, tok, reward_fns
        self.prompts, self.questions, self.answers = prompts, questions, answers
        self.group, self.per_micro = cfg["group_size"], cfg["batch_size"] // cfg["group_size"]
        self.trainer = None  # set once the Trainer exists: its model, device, autocast, rank
        self.engine = None  # engine.Engine over the trainer's model, from the first rollout on
        self.round, self.batches, self.stats, self.order = -1, [], {}, {}

    # the round's prompts: a seeded order per epoch over the problems, the same however many processes sample them
    def prompt_index(self, position):
        n = len(self.prompts)
        epoch = position // n
        if epoch not in self.order:
            self.order = {epoch: np.random.default_rng([self.cfg["seed"], 5, epoch]).permutation(n)}
        return int(self.order[epoch][position % n])

    def __call__(self, step, micro):
        t = self.trainer
        rnd = step // self.cfg["num_iterations"]
        if rnd != self.round:
            self.rollout(rnd)
        return self.batches[micro - t.rank * t.accum]

    @torch.no_grad()
    def rollout(self, rnd):
        """Sample, score and batch this process's share of round rnd: every row of every micro-batch through the
        engine at once, each row with a seed of its own (seed, round, its place in the round), so the samples do
        not depend on how rows are batched or how many processes share them."""
        t, cfg, G = self.trainer, self.cfg, self.group
        started = time.time()
        per_round, first = cfg["grad_accum"] * self.per_micro, t.rank * t.accum
        index = [[self.prompt_index(rnd * per_round + (first + k) * self.per_micro + j) for j in range(self.per_micro)]
                 for k in range(t.accum)]
        rows = [self.prompts[i] for micro in index for i in micro for _ in range(G)]
        seeds = np.random.SeedSequence([cfg["seed"], 6, rnd]).generate_state(per_round * G)[first * cfg["batch_size"]:]
        stop = tuple(self.tok.stop_ids)
        params = [SamplingParams(max_new_tokens=cfg["max_new_tokens"], temperature=cfg["temperature"],
                                 top_p=cfg["top_p"], seed=int(seed), stop_ids=stop) for seed in seeds[:len(rows)]]
        if self.engine is None:  # the KV cache: a row for each completion of the share, as long as the longest needs
            length = min(cfg["max_len"], max(map(len, self.prompts)) + cfg["max_new_tokens"])
            self.engine = Engine(t.raw_model, parallel=len(rows), max_queue=len(rows), max_len=length).start()
        requests = self.engine.generate(rows, params)
        failed = next((r for r in requests if r.finish_reason == "error"), None)
        if failed is not None:
            raise failed.error
        gen_time = time.time() - started
        completions = [r.tokens for r in requests]  # ending with the stop id: the model learns to stop
        pad = tuning.pad_id(self.tok)
        batches, all_rewards, zero_std = [], [], []
        for k, micro in enumerate(index):
            part = slice(k * cfg["batch_size"], (k + 1) * cfg["batch_size"])
            texts = [self.tok.decode([i for i in c if i not in stop], skip_special=True) for c in completions[part]]
            questions = [self.questions[i] for i in micro for _ in range(G)]
            rewards = score(self.reward_fns, questions, texts, [self.answers[i] for i in micro for _ in range(G)],
                            f"round {rnd}, micro-batch {first + k}")
            total = sum(w * rewards[i] for i, (_, _, w) in enumerate(self.reward_fns))
            adv, zero = group_advantages(total, G, cfg["scale_rewards"])
            zero_std.append(zero)
            all_rewards.append(torch.cat([total[None], rewards]))
            batches.append(self.rows(rows[part], completions[part], adv, pad))
        if cfg["num_iterations"] > 1:  # the rollout policy's log-probs, for the ratio of the later iterations
            model = t.raw_model.eval()
            for b in batches:
                x, y = (v.to(t.device) for v in b[:2])
                with t.autocast:
                    b.append(completion_logps(model, x, y)[0].float().cpu())
            model.train()
        self.round, self.batches = rnd, [tuple(b) for b in batches]
        lengths = [len(c) for c in completions]
        truncated = sum(r.finish_reason == "length" for r in requests)
        self.stats = self.round_stats(torch.cat(all_rewards, 1), torch.stack(zero_std).mean(), lengths, truncated,
                                      sum(lengths), gen_time, time.time() - started)

    def rows(self, prompts, completions, adv, pad):
        """[x, y, advantages]: prompt + completion rows right-padded, labels on the completion tokens only."""
        seqs = [p + c for p, c in zip(prompts, completions)]
        width = max(len(s) for s in seqs) - 1
        x = torch.full((len(seqs), width), pad, dtype=torch.long)
        y = torch.full((len(seqs), width), -100, dtype=torch.long)
        for r, (p, s) in enumerate(zip(prompts, seqs)):
            x[r, :len(s) - 1] = torch.tensor(s[:-1])
            y[r, len(p) - 1:len(s) - 1] = torch.tensor(s[len(p):])
        return [x, y, adv.float()]

    def round_stats(self, rewards, zero_std, lengths, truncated, generated, gen_time, rollout_time):
        """The round's figures over every process: means and stds of the rewards (the total first), etc."""
        t = self.trainer
        n = rewards.shape[1]
        sums = torch.cat([rewards.sum(1), (rewards ** 2).sum(1),
                          torch.tensor([n, zero_std * len(lengths) / self.group, len(lengths) / self.group,
                                        sum(lengths), truncated, generated])]).double()
        times = torch.tensor([gen_time, rollout_time], dtype=torch.double)
        if t.world > 1:
            sums, times = sums.to(t.device), times.to(t.device)
            dist.all_reduce(sums)
            dist.all_reduce(times, op=dist.ReduceOp.MAX)
        sums, (gen_time, rollout_time) = sums.cpu(), times.tolist()
        k = rewards.shape[0]
        count, zero_groups, groups, length, trunc, tokens = sums[2 * k:].tolist()
        mean = sums[:k] / count
        std = ((sums[k:2 * k] / count - mean ** 2).clamp(min=0) * count / max(count - 1, 1)).sqrt()
        names = ["reward"] + [f"reward/{name}" for name, _, _ in self.reward_fns]
        stats = {}
        for name, m, s in zip(names, mean.tolist(), std.tolist()):
            stats[name], stats[f"{name}_std"] = m, s
        stats.update(zero_std_groups=zero_groups / groups, completion_len=length / count, truncated=trunc / count,
                     rollout_tokens_per_s=tokens / max(gen_time, 1e-9), rollout_s=rollout_time)
        return stats

    def metrics(self, step_seconds):
        """The figures logged for a step: its round's, and the update's tokens/s (the step's time less rollouts)."""
        t = self.trainer
        rollout = self.stats["rollout_s"] if self.fresh else 0.0
        tokens = sum(int((b[1] != -100).sum()) for b in self.batches) * t.world
        out = {k: v for k, v in self.stats.items() if k != "rollout_s"}
        out["update_tokens_per_s"] = tokens / max(step_seconds - rollout, 1e-9)
        return out

    @property
    def fresh(self):
        """Whether the step just taken sampled its round (its time includes the rollouts)."""
        return self.trainer.step - 1 == self.round * self.cfg["num_iterations"]

    def state_dict(self):
        return {"round": self.round, "batches": [list(b) for b in self.batches], "stats": self.stats}

    def load_state_dict(self, state):
        self.round, self.batches, self.stats = state["round"], [tuple(b) for b in state["batches"]], state["stats"]


def tokens_in(loss_norm):
    """weight_fn: what a micro-batch's loss is a mean over: its completion tokens (token) or completions."""
    if loss_norm == "token":
        return lambda batch: (batch[1] != -100).sum()
    return lambda batch: len(batch[0])


def heldout_pass(tok, problems_, limit_tokens, batch):
    """on_eval: greedy exact match on eval_problems (math_tasks.evaluate), logged and in metrics.jsonl."""
    def run(t):
        result = math_tasks.evaluate(t.raw_model, tok, problems_, k=1, temperature=0.0,
                                     max_new_tokens=limit_tokens, batch_size=batch)
        log(f"step {t.step}: eval pass@1 {result['pass@1']:.4f} (greedy, {len(problems_)} eval_problems)")
        t._record({"step": t.step, "eval_pass@1": result["pass@1"], **t._clocks()})
    return run


def full_export(tok):
    """export for a full run: the model and its tokenizer in out_dir/hf (one process holds the whole model)."""
    def run(t):
        if t.master:
            path = os.path.join(t.c.out_dir, "hf")
            convert.save_pretrained(t.raw_model.cpu(), path)
            tok.save_pretrained(path)
            log(f"model exported to {path}")
    return run


# ------------------------------------------------------------------------------------------------ the script

def check_settings(cfg):
    """GRPO's keys (and the adapter ones) of a resolved config, before any work, each refusal naming the key."""
    tuning.check_adapter_settings({**cfg, "rope_scaling": "", "extend_to": 0, "s2_attn_groups": 0})
    c = types.SimpleNamespace(**cfg)
    if not c.init_from:
        raise SystemExit("--init_from=MODEL is required: a folder (e.g. out/run/sft/hf) or a .gguf, or resume")
    if c.group_size < 2:
        raise SystemExit(f"group_size={c.group_size}: must be at least 2 (advantages compare the completions of a "
                         f"group)")
    if c.batch_size % c.group_size:
        raise SystemExit(f"batch_size={c.batch_size} must be a multiple of group_size={c.group_size} (whole groups "
                         f"per micro-batch)")
    for key in ("num_iterations", "max_new_tokens", "eval_max_new_tokens", "eval_batch_size"):
        if cfg[key] < 1:
            raise SystemExit(f"{key}={cfg[key]}: must be at least 1")
    for key in ("problems_skip", "problems_limit", "eval_limit", "max_len"):
        if cfg[key] < 0:
            raise SystemExit(f"{key}={cfg[key]}: must not be negative")
    if c.loss_norm not in ("token", "sequence"):
        raise SystemExit(f"loss_norm={c.loss_norm!r}: expected token or sequence")
    if c.reference not in ("copy", "adapter_off"):
        raise SystemExit(f"reference={c.reference!r}: expected copy or adapter_off")
    if c.beta and c.reference == "adapter_off" and c.method == "full":
        raise SystemExit("reference=adapter_off needs method=lora or qlora (a full run has no adapter to switch off)")
    if c.beta < 0 or c.epsilon <= 0:
        raise SystemExit(f"beta={c.beta}, epsilon={c.epsilon}: need beta >= 0 and epsilon > 0")
    if c.temperature <= 0:
        raise SystemExit(f"temperature={c.temperature}: must be positive (rollouts sample; 0 would give every "
                         f"completion of a group alike)")
    inference.check_sampling(c.max_new_tokens, c.temperature, 0, c.top_p, 1.0)
    if c.parallel != "ddp":
        raise SystemExit(f"parallel={c.parallel}: rl.py samples from the whole model on each process; use ddp "
                         f"(torchrun) or one process")


def encode_problems(tok, path, limit, max_len, skip=0):
    """(prompt ids, questions, answers) of the problems at `path` after the first `skip`; a prompt that leaves no
    room for one completion token in max_len is refused, naming its record."""
    try:
        records = math_tasks.load_problems(path, limit=limit and skip + limit)[skip:]
    except (OSError, ValueError) as e:
        raise SystemExit(f"problems={path!r}: {e}") from None
    if not records:
        raise SystemExit(f"problems={path!r}: no problems" + (f" after the first {skip}" if skip else ""))
    texts = [inference.render_chat(tok, math_tasks.prompt_messages(r["question"])) for r in records]
    prompts = tok.encode_batch(texts)
    for n, ids in enumerate(prompts, skip + 1):  # a JSON Lines file's record n is its line n
        if len(ids) >= max_len:
            raise SystemExit(f"{path}: problem {n}: the prompt has {len(ids)} tokens, which leaves no room for an "
                             f"answer in max_len={max_len}")
    return prompts, [r["question"] for r in records], [r["answer"] for r in records]


def write_warmup(path):
    """write_sft: the problems as SFT records in data_process.py's messages layout, the question asked as rl.py
    asks it and answered with the final line alone."""
    limit = problems_limit and problems_skip + problems_limit
    records = math_tasks.load_problems(problems, limit=limit)[problems_skip:]
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            messages = math_tasks.prompt_messages(r["question"]) + [
                {"role": "assistant", "content": f"#### {r['answer']}"}]
            f.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
    log(f"{len(records)} SFT records ({problems}): {path}")


def main():
    cfg = configurator.apply(globals(), [a for a in sys.argv[1:] if not a.startswith("--local_rank")])
    if write_sft:
        return write_warmup(write_sft)
    check_settings(cfg)
    trainer.train_config(cfg)  # the rest, before any work
    reward_fns = load_rewards(rewards, reward_weights)
    model, tok = checkpoint.build_model(init_from, out_dir)
    if tok is None:
        raise SystemExit(f"init_from={init_from}: brings no tokenizer to ask the problems with")
    cfg["max_len"] = max_len or model.config.max_seq_len
    if cfg["max_len"] > model.config.max_seq_len:
        raise SystemExit(f"max_len={cfg['max_len']} exceeds the model's context of {model.config.max_seq_len}")
    prompts, questions, answers = encode_problems(tok, problems, problems_limit, cfg["max_len"], problems_skip)
    held_out = math_tasks.load_problems(eval_problems, limit=eval_limit) if eval_problems else []
    log(f"problems: {len(prompts)} for training ({problems}), {len(held_out)} held out"
        + (f" ({eval_problems})" if held_out else ""))
    ref_model = copy.deepcopy(model).requires_grad_(False) if beta and reference == "copy" else None
    if method != "full":
        tuning.add_adapters(model, cfg, types.SimpleNamespace(meta={}))  # the model's own tokenizer: none added
    tuning.disable_dropout(model)  # the rollout policy and the trained one score alike
    source = Rollouts(cfg, tok, prompts, questions, answers, reward_fns)
    t = trainer.Trainer(cfg, model, source, None, loss_fn=grpo_loss_fn(epsilon, beta, loss_norm, reference),
                        ref_model=ref_model, weight_fn=tokens_in(loss_norm),
                        on_eval=heldout_pass(tok, held_out, eval_max_new_tokens, eval_batch_size) if held_out else None,
                        export=tuning.lora_export(tok, merge_dtype) if method != "full" else full_export(tok))
    source.trainer = t
    try:
        t.fit()
    finally:
        if source.engine is not None:
            source.engine.close()
    if t.master:
        plot_rewards(t.metrics_path, os.path.join(out_dir, "reward.png"))
        log(f"reward curve: {os.path.join(out_dir, 'reward.png')}")


if __name__ == "__main__":
    main()
