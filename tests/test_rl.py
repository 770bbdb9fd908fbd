"""rl.py (GRPO): the objective against a hand computation, its gradient at num_iterations=1 equals REINFORCE with
the group mean as baseline, bad reward functions and settings are refused naming what is wrong, and a run resumes
after kill -9 inside a round to the same end."""
import json
import math
import os
import statistics
import subprocess
import sys

import pytest
import torch

import inference
import math_tasks
import rl
from conftest import char_tokenizer_folder, kill_then_resume, run_script, tiny_transformer
from test_pretrain import ROOT

# ---------------------------------------------------------------------------------------------- the objective

LOGPS = [[-1.0, -2.0, -0.5], [-0.3, -1.2, -2.0]]
OLD = [[-1.1, -1.5, -0.5], [-0.9, -1.2, -1.0]]
REF = [[-1.3, -2.2, -0.4], [-0.2, -1.0, -2.5]]
MASK = [[1, 1, 0], [1, 1, 1]]
ADV = [1.5, -0.7]


def hand_loss(eps, beta, norm):
    """The GRPO objective written out token by token (DeepSeekMath eq. 3, k3 KL), and the clipped-token share."""
    rows, clipped, kls = [], 0, []
    for lp, old, ref, mask, a in zip(LOGPS, OLD, REF, MASK, ADV):
        terms = []
        for t in range(3):
            if not mask[t]:
                continue
            ratio = math.exp(lp[t] - old[t])
            term = -min(ratio * a, min(max(ratio, 1 - eps), 1 + eps) * a)
            kl = math.exp(ref[t] - lp[t]) - (ref[t] - lp[t]) - 1
            kls.append(kl)
            terms.append(term + beta * kl)
            clipped += (ratio < 1 - eps and a < 0) or (ratio > 1 + eps and a > 0)
        rows.append(terms)
    tokens = sum(len(r) for r in rows)
    loss = (sum(map(sum, rows)) / tokens if norm == "token" else
            sum(sum(r) / len(r) for r in rows) / len(rows))
    return loss, clipped / tokens, sum(kls) / tokens


@pytest.mark.parametrize("norm", ["token", "sequence"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_grpo_loss_is_the_hand_computation(norm, beta):
    eps = 0.2
    t = [torch.tensor(v, dtype=torch.float64) for v in (LOGPS, OLD, REF, ADV)]
    loss, metrics = rl.grpo_loss(*t, torch.tensor(MASK), eps, beta, norm)
    want, clip, kl = hand_loss(eps, beta, norm)
    assert 0 < clip < 1  # the toy batch has tokens clipped on either side and tokens inside the range
    assert loss.item() == pytest.approx(want, rel=1e-6)
    assert metrics["clip_fraction"].item() == pytest.approx(clip)
    assert ("kl" in metrics) == bool(beta)
    if beta:
        assert metrics["kl"].item() == pytest.approx(kl, rel=1e-6)


def test_group_advantages_normalise_within_each_group():
    rewards = [1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 2.0, 0.0, 1.0, 1.0]
    adv, zero = rl.group_advantages(torch.tensor(rewards), 4)
    unscaled, _ = rl.group_advantages(torch.tensor(rewards), 4, scale=False)
    for g in range(3):
        group = rewards[4 * g:4 * g + 4]
        mean, std = statistics.mean(group), statistics.stdev(group)  # unbiased, as TRL
        for i, r in enumerate(group):
            assert adv[4 * g + i].item() == pytest.approx((r - mean) / (std + 1e-4), abs=1e-6)
            assert unscaled[4 * g + i].item() == pytest.approx(r - mean, abs=1e-6)
    assert zero.item() == pytest.approx(1 / 3)


@pytest.mark.parametrize("norm", ["token", "sequence"])
def test_gradient_at_one_iteration_without_kl_is_reinforce_with_group_baseline(norm):
    """mu=1, beta=0: the ratio is exp(logp - logp.detach()) = 1, so the gradient is that of
    -sum_i A_i sum_t logp_it / tokens (token) or -mean_i A_i mean_t logp_it (sequence)."""
    torch.manual_seed(0)
    model = tiny_transformer(40).train()
    x = torch.randint(3, 40, (4, 9))
    y = torch.randint(3, 40, (4, 9))
    y[:, :4] = -100  # the prompt
    y[1, 7:] = -100  # a shorter completion
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
    adv, _ = rl.group_advantages(rewards, 2)
    loss, _ = rl.grpo_loss_fn(0.2, 0.0, norm, "copy")(model, (x, y, adv), None)
    loss.backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    logps = -model(x, y, reduction="none")[1]
    mask = (y != -100).float()
    if norm == "token":
        reinforce = -(adv[:, None] * logps * mask).sum() / mask.sum()
    else:
        reinforce = -(adv * (logps * mask).sum(1) / mask.sum(1)).mean()
    reinforce.backward()
    assert any(g.abs().sum() > 0 for g in got)
    for g, p in zip(got, model.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------- bad input

def ok(prompts, completions, answers):
    return [1.0] * len(completions)


@pytest.mark.parametrize("fn,says", [
    (lambda p, c, a: 1 / 0, "reward bad raised ZeroDivisionError"),
    (lambda p, c, a: [0.0] * (len(c) - 1), "reward bad returned 2 values for 3 samples"),
    (lambda p, c, a: [0.0, float("nan"), 1.0], "reward bad gave nan for sample 1"),
    (lambda p, c, a: [0.0, 1.0, "1"], "reward bad gave '1' for sample 2"),
    (lambda p, c, a: None, "reward bad returned NoneType"),
])
def test_a_bad_reward_function_is_named_with_its_sample(fn, says):
    with pytest.raises(SystemExit) as e:
        rl.score([("ok", ok, 1.0), ("bad", fn, 1.0)], ["q1", "q2", "q3"], ["a", "b", "c"], ["1", "2", "3"], "round 0")
    assert says in str(e.value) and "refused" in str(e.value)


def rl_run(args):
    cmd = [sys.executable, os.path.join(ROOT, "rl.py"), "--dtype=float32", *args]
    return subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=120)


def word_tokenizer(path):
    """A tokenizer.Tokenizer of characters (the prompts' #, + and quotes too) and ChatML, with the prompt's fixed
    words (math_tasks.prompt_messages' instruction, "What is ") as single tokens: a prompt is ~14 tokens."""
    chars = sorted(set(" abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ:.,?!'\n0123456789#+\"<>"))
    words = ["user\n", "assistant\n", "What is ", "#### ", math_tasks.prompt_messages("")[0]["content"]]
    return char_tokenizer_folder(path, chars, words)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random model with word_tokenizer."""
    import convert
    path = str(tmp_path_factory.mktemp("rl") / "model")
    tok = word_tokenizer(path)
    convert.save_pretrained(tiny_transformer(tok.vocab_size, max_seq_len=64), path)
    return path


@pytest.fixture(scope="module")
def digit_reward(tmp_path_factory):
    """A reward with variance under a random model: the share of digits in the completion."""
    path = tmp_path_factory.mktemp("rewards") / "digits.py"
    path.write_text("def share(prompts, completions, answers):\n"
                    "    return [sum(ch.isdigit() for ch in c) / (1 + len(c)) for c in completions]\n\n"
                    "def nan_for_long(prompts, completions, answers):\n"
                    "    return [float('nan') if len(c) > 3 else 0.0 for c in completions]\n")
    return str(path)


SMALL = ["--max_new_tokens=8", "--eval_problems=", "--group_size=4", "--batch_size=8", "--log_interval=1"]


def settings(**changes):
    """rl.py's resolved config with some keys changed."""
    import configurator
    return {**{k: getattr(rl, k) for k in configurator.config_keys(vars(rl))}, "init_from": "m", **changes}


@pytest.mark.parametrize("changes,says", [
    (dict(group_size=1, batch_size=4), "group_size=1: must be at least 2"),
    (dict(batch_size=6, group_size=4), "batch_size=6 must be a multiple of group_size=4"),
    (dict(temperature=0.0), "temperature=0.0: must be positive"),
    (dict(loss_norm="mean"), "loss_norm='mean'"),
    (dict(beta=0.1, reference="adapter_off"), "reference=adapter_off needs method=lora"),
    (dict(num_iterations=0), "num_iterations=0: must be at least 1"),
    (dict(parallel="fsdp"), "parallel=fsdp"),
])
def test_settings_that_cannot_work_are_refused(changes, says):
    rl.check_settings(settings())  # the defaults pass
    with pytest.raises(SystemExit, match=says.replace("(", r"\(").replace(")", r"\)")):
        rl.check_settings(settings(**changes))


def test_unknown_rewards_and_wrong_weights_are_refused():
    assert [(n, w) for n, _, w in rl.load_rewards(("gsm8k_answer", "format"), (1.0, 0.5))] == [
        ("gsm8k_answer", 1.0), ("format", 0.5)]
    for names, weights, says in [(("gsm8k_answer", "nope"), (), "reward 'nope'"),
                                 (("gsm8k_answer",), (1.0, 2.0), "gives 2 weights for 1 rewards"),
                                 (("gsm8k_answer",), (float("nan"),), "each must be a finite number"),
                                 ((), (), "name at least one")]:
        with pytest.raises(SystemExit, match=says):
            rl.load_rewards(names, weights)


def test_a_prompt_longer_than_max_len_is_refused_with_its_record(model_dir, tmp_path):
    from tokenizer import Tokenizer
    tok = Tokenizer.from_pretrained(model_dir)
    prompts, questions, answers = rl.encode_problems(tok, "addition:split=train,n=5", 0, 64)
    assert questions[0].startswith("What is") and len(prompts) == 5 and answers[0].isdigit()
    with pytest.raises(SystemExit, match=r"addition:split=train,n=5: problem 1: the prompt has \d+ tokens"):
        rl.encode_problems(tok, "addition:split=train,n=5", 0, 12)
    long = tmp_path / "p.jsonl"
    long.write_text("".join(json.dumps({"question": q, "answer": 1}) + "\n" for q in ["1 + 0?", "1 + 0?", "x" * 80]))
    assert len(rl.encode_problems(tok, str(long), 2, 64)[0]) == 2
    with pytest.raises(SystemExit, match=f"{long}: problem 3: the prompt has"):
        rl.encode_problems(tok, str(long), 0, 64, skip=1)


def test_a_reward_that_gives_nan_stops_the_step(model_dir, digit_reward, tmp_path):
    r = rl_run([f"--init_from={model_dir}", f"--out_dir={tmp_path / 'out'}", *SMALL, "--max_iters=2",
                f"--rewards=('{digit_reward}:nan_for_long',)"])
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert f"reward {digit_reward}:nan_for_long gave nan for sample" in r.stderr + r.stdout
    assert not os.path.isdir(tmp_path / "out" / "ckpt" / "step_00000001")


def test_resume_after_kill_inside_a_round_is_exact(model_dir, digit_reward, tmp_path):
    """num_iterations=3: the step-10 checkpoint falls inside round 3 (steps 9-11), whose samples come back from
    the checkpoint; the sampling after it is seeded by the round. The last step's loss is the same to the bit."""
    out, reference = kill_then_resume("rl.py", [f"--init_from={model_dir}", *SMALL, "--num_iterations=3",
                                                "--learning_rate=3e-3", f"--rewards=('{digit_reward}:share',)"],
                                      tmp_path, steps=14)
    with open(os.path.join(reference, "metrics.jsonl")) as f:
        losses = [r["train_loss"] for r in map(json.loads, f) if "train_loss" in r]
    assert any(loss != 0 for loss in losses)  # rewards varied: the objective did move the model


# ---------------------------------------------------------------------------------------------- it learns

SFT = "compare:split=train,n=2000"  # the warm-up's questions
RL = ["--problems=compare:split=train,n=4000", "--problems_skip=2000"]  # GRPO's: 2000 others of the train split
HELD_OUT = "compare:split=eval,n=200"  # pairs neither sees (math_tasks._pairs)


def warm_up(model_dir, start=0.35, max_steps=800):
    """A tiny model (dim 64) SFT'd on the compare questions answered "#### <larger>" (rl.py's write_sft records)
    until it starts to apply the rule: greedy exact match on 100 of its questions reaches `start`, checked every 50
    steps from step 250 (the copying sets in between ~300 and ~500 steps, by the seed and the machine's arithmetic);
    stopped there, samples are right often enough for GRPO to learn from."""
    import convert
    from model import ModelConfig, Transformer
    tok = word_tokenizer(model_dir)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                    max_seq_len=64))
    problems = math_tasks.load_problems(SFT)
    rows = [(tok.encode(inference.render_chat(tok, math_tasks.prompt_messages(p["question"]))),
             tok.encode(f"#### {p['answer']}") + [tok.special_tokens["<|im_end|>"]]) for p in problems]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0)
    g = torch.Generator().manual_seed(0)
    for step in range(1, max_steps + 1):
        idx = torch.randint(len(rows), (32,), generator=g).tolist()
        width = max(len(rows[i][0]) + len(rows[i][1]) for i in idx) - 1
        x, y = torch.zeros(32, width, dtype=torch.long), torch.full((32, width), -100)
        for r, i in enumerate(idx):
            prompt, answer = rows[i]
            seq = prompt + answer
            x[r, :len(seq) - 1] = torch.tensor(seq[:-1])
            y[r, len(prompt) - 1:len(seq) - 1] = torch.tensor(answer)
        loss = model(x, y)[1]
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step >= 250 and step % 50 == 0:
            exact = math_tasks.evaluate(model.eval(), tok, problems[:100], max_new_tokens=6, batch_size=100)["pass@1"]
            model.train()
            if exact >= start:
                break
    convert.save_pretrained(model, model_dir)
    return step


def test_a_tiny_model_learns_the_compare_task_on_held_out_questions(tmp_path):
    """40 GRPO steps (8 prompts x 8 samples, on train-split questions the warm-up never saw) raise greedy exact
    match on 200 held-out pairs by at least 6 points (39.5% -> 50.5% when written, the warm-up stopping at step
    300; 47.0% at 1e-4, 49.5% at 2e-4; at 2e-3 the policy collapses to 0%). The gain depends on the start: from
    the warm-up of another init seed (stopped at step 450, 35.5% held out) the same 40 steps ended at 23.5-34.5%
    (lr 5e-4 to 1e-4), so the seeds here are part of what is tested."""
    model_dir = str(tmp_path / "model")
    warm_up(model_dir)
    out = tmp_path / "out"
    run_script("rl.py", [f"--init_from={model_dir}", f"--out_dir={out}", *RL, f"--eval_problems={HELD_OUT}",
                         "--max_new_tokens=8", "--eval_max_new_tokens=8", "--eval_batch_size=200", "--group_size=8",
                         "--batch_size=64", "--learning_rate=5e-4", "--max_iters=40", "--eval_interval=40"],
                timeout=120)
    with open(out / "metrics.jsonl") as f:
        recs = list(map(json.loads, f))
    exact = {r["step"]: r["eval_pass@1"] for r in recs if "eval_pass@1" in r}
    assert exact[0] >= 0.25, exact  # the warm-up's start: the rule partly learnt
    assert exact[40] >= exact[0] + 0.06, exact
    assert os.path.getsize(out / "reward.png") > 0


def test_lora_with_kl_to_the_adapter_off_policy_and_two_iterations(model_dir, digit_reward, tmp_path):
    """LoRA, beta > 0 against the policy with its adapters off, num_iterations=2 over 2 micro-batches, sequence
    normalisation: the KL is 0 at the first step (LoRA's B starts at 0, so the policy is its reference) and grows;
    the second step of a round is clipped somewhere (its ratio is no longer 1); adapter/ is exported."""
    out = tmp_path / "out"
    run_script("rl.py", [f"--init_from={model_dir}", f"--out_dir={out}", *SMALL, "--method=lora", "--beta=0.04",
                         "--reference=adapter_off", "--num_iterations=2", "--loss_norm=sequence", "--grad_accum=2",
                         "--max_iters=4", "--learning_rate=3e-2", f"--rewards=('{digit_reward}:share',)"])
    with open(out / "metrics.jsonl") as f:
        recs = {r["step"]: r for r in map(json.loads, f) if "train_loss" in r}
    assert recs[1]["kl"] == 0 and recs[4]["kl"] > 0
    assert max(recs[s]["clip_fraction"] for s in (2, 4)) > 0 and recs[1]["clip_fraction"] == 0
    assert os.path.isfile(out / "adapter" / "adapter_config.json")
