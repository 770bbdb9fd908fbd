"""Direct preference optimisation (DPO, Rafailov et al. 2023) - full, LoRA or QLoRA - on trainer.py's loop.

    python data_process.py --format=dpo --tokenizer=out/run/sft/hf --out_dir=out/run/dpo_data
    python dpo.py --init_from=out/run/sft/hf --data_dir=out/run/dpo_data --out_dir=out/run/dpo
    python dpo.py --init_from=$GGUF --data_dir=data/dpo --method=lora --reference=adapter_off --learning_rate=5e-5
    python dpo.py ... --reference=cached     # reference log-probs computed once into out_dir: one model in memory
    python dpo.py ... --init_from=resume     # continue the newest checkpoint in out_dir

Data: a DPO directory of `data_process.py --format=dpo` (prompt / chosen / rejected in the chat template of the
data's tokenizer). Each pair becomes two rows, prompt + chosen and prompt + rejected, which go through the model in
ONE forward (chosen rows first, right-padded); only the answer tokens (the reply and its end-of-turn marker) are
scored, and a pair's log-probability is the sum over them. A pair whose answer would start past max_len is left out.

Losses, as TRL's DPOTrainer defines them, with logits = (policy chosen - policy rejected) - (reference chosen -
reference rejected) summed log-probs:
  sigmoid  -log sigmoid(beta * logits)                 (DPO; label_smoothing=eps gives conservative DPO, cDPO:
           -(1 - eps) log sigmoid(beta * logits) - eps log sigmoid(-beta * logits))
  ipo      (logits - 1 / (2 beta))^2                   (IPO, Azar et al. 2023; TRL divides the log-probs by the
                                                        answer length first, here they are sums as for the others)
  hinge    relu(1 - beta * logits)                     (SLiC)
plus sft_weight * the mean NLL of the chosen answer tokens (TRL's rpo_alpha). Rewards are beta * (policy -
reference) log-probs; logged: rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies (chosen reward
above rejected), logps/chosen, logps/rejected (and nll/chosen with sft_weight), in the log line, metrics.jsonl and
wandb, and on the held-out split at each evaluation. Dropout is switched off, as TRL does by default, so the
policy and its reference score alike at step 0 (the sigmoid loss is then ln 2).

The reference (`reference`): copy - a frozen copy of the starting model; adapter_off - the LoRA/QLoRA policy with
its adapters bypassed (no second model); cached - the reference log-probs of every pair computed once before
training into out_dir/ref_logps_{split}.npz (logps (records, 2): chosen, rejected, NaN for pairs left out; and key,
what they were computed from: the split's files' sha256, max_len, the starting weights' sha256, dtype and device),
so training holds one model. A later run (a resume) reuses the file only when its key is the run's; one made from
other data or settings, or damaged, is named and computed again. A resume whose starting model is gone reuses a
readable file of the same data and max_len as it is, and stops otherwise.

Pairs from an early checkpoint (`make_pairs=True`, as the Chinese Phi-2 project makes them): for each SFT record
(pairs_input, or the embedded default set) the reference answer of its last turn becomes `chosen` and the model of
init_from (e.g. a checkpoint half an epoch into SFT, ckpt/step_N of a full run) answers the same prompt greedily for
`rejected`; pairs whose two answers are more than max_similarity alike (difflib's SequenceMatcher ratio) or whose
generated answer is empty are dropped and counted, and out_dir becomes a DPO data directory written by
data_process.py from out_dir/pairs.jsonl (the pairs as text), in the checkpoint tokenizer's chat template:

    python dpo.py --make_pairs=True --init_from=out/run/sft/ckpt/step_00000050 --out_dir=out/run/dpo_pairs

What lands in out_dir when training is fine_tuning.py's: checkpoints, metrics.jsonl, loss.png, hf/ (and adapter/
with LoRA).
"""
import copy
import difflib
import hashlib
import json
import os
import sys
import zipfile

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import checkpoint
import configurator
import lora
import trainer
import tuning
from metrics import log, trim_heap

# -- the training loop's settings (every field of trainer.TrainConfig) and the fine-tuning ones shared with
#    fine_tuning.py (tuning.TuningConfig: the model, method, LoRA, epochs, evaluation); DPO's own defaults follow
globals().update(vars(trainer.TrainConfig()))
globals().update(vars(tuning.TuningConfig()))
out_dir = "out/dpo"
data_dir = "data/dpo"       # data_process.py --format=dpo
beta = 0.1                  # the strength of the pull towards the reference (DPO's beta)
loss_type = "sigmoid"       # sigmoid | ipo | hinge
label_smoothing = 0.0       # sigmoid only: the assumed share of flipped labels (cDPO); 0: plain DPO
sft_weight = 0.0            # > 0: adds this times the mean NLL of the chosen answers
reference = "copy"          # copy | adapter_off (LoRA/QLoRA) | cached (module docstring)
batch_size = 8              # pairs per micro-batch (two rows each)
make_pairs = False          # True: write a DPO data directory to out_dir instead of training (module docstring)
pairs_input = ""            # make_pairs: SFT records in data_process.py's chat layouts; empty: the embedded set
max_similarity = 0.9        # make_pairs: pairs whose rejected is more similar to chosen are dropped; similarity is
                            # difflib.SequenceMatcher(None, chosen, rejected).ratio() on the texts (1 = identical)
rejected_tokens = 128       # make_pairs: at most this many generated tokens per rejected answer
learning_rate = 1e-6
min_lr = 1e-7
warmup_iters = 10
weight_decay = 0.0

LOSS_TYPES = ("sigmoid", "ipo", "hinge")
REFERENCES = ("copy", "adapter_off", "cached")


# ------------------------------------------------------------------------------------------------ the losses

def preference_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, loss_type="sigmoid",
                    label_smoothing=0.0):
    """(per-pair losses, chosen rewards, rejected rewards) of summed answer log-probs (tensors of shape (pairs,));
    the formulas are the module docstring's. Rewards carry no gradient."""
    logits = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    if loss_type == "sigmoid":
        losses = (-F.logsigmoid(beta * logits) * (1 - label_smoothing)
                  - F.logsigmoid(-beta * logits) * label_smoothing)
    elif loss_type == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * logits)
    else:
        raise ValueError(f"loss_type={loss_type!r}: expected one of {', '.join(LOSS_TYPES)}")
    return losses, beta * (policy_chosen - ref_chosen).detach(), beta * (policy_rejected - ref_rejected).detach()


def pair_metrics(chosen_rewards, rejected_rewards, policy_chosen, policy_rejected):
    """TRL's logged means over the pairs of a batch."""
    return {"rewards/chosen": chosen_rewards.mean(), "rewards/rejected": rejected_rewards.mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
            "logps/chosen": policy_chosen.detach().mean(), "logps/rejected": policy_rejected.detach().mean()}


# ------------------------------------------------------------------------------------------------ log-probs

def answer_logps(model, ids, labels):
    """(summed log-probability of each row's labelled tokens, their count): labels are -100 on the prompt and the
    padding, so only the answer is scored."""
    nll = model(ids, labels, reduction="none")[1]  # through DDP/FSDP/DeepSpeed wrappers; chunked_loss applies
    return -nll.sum(-1), (labels != -100).sum(-1)


def dpo_loss_fn(beta, loss_type, label_smoothing, sft_weight, reference):
    """The trainer's loss_fn(model, batch, ref_model) for batches of DPOBatches: (loss, metrics)."""
    def loss_fn(model, batch, ref_model):
        ids, labels, *cached = batch
        pairs = len(ids) // 2
        logps, counts = answer_logps(model, ids, labels)
        with torch.no_grad():
            if reference == "cached":
                ref = cached[0].t()
            elif reference == "adapter_off":
                with lora.adapters_off(getattr(model, "module", model)) as base:  # DDP/DeepSpeed: the wrapped module
                    ref = answer_logps(base, ids, labels)[0].view(2, pairs)
            else:
                ref = answer_logps(ref_model, ids, labels)[0].view(2, pairs)
        policy = logps.view(2, pairs)
        losses, chosen_rewards, rejected_rewards = preference_loss(policy[0], policy[1], ref[0], ref[1], beta,
                                                                   loss_type, label_smoothing)
        loss = losses.mean()
        metrics = pair_metrics(chosen_rewards, rejected_rewards, policy[0], policy[1])
        if sft_weight > 0:
            nll = -policy[0].sum() / counts[:pairs].sum()
            loss = loss + sft_weight * nll
            metrics["nll/chosen"] = nll.detach()
        return loss, metrics
    return loss_fn


def pairs_in(batch):
    """weight_fn: what a DPO batch's loss is a mean over, its pairs."""
    return len(batch[0]) // 2


# ------------------------------------------------------------------------------------------------ batches

class DPOBatches(tuning.SFTBatches):
    """Micro-batches of (input ids, labels[, reference log-probs (pairs, 2)]) for step and micro index, a pure
    function of both, in SFTBatches' seeded epoch order: each pair gives a prompt + chosen row and a prompt +
    rejected row, the chosen rows first, right-padded with pad_id (labels -100), cut after max_len input tokens.
    `ref` is set to the (records, 2) reference log-probs when they are cached."""

    def __init__(self, records, max_len, batch_size, pad_id, seed):
        self.records, self.max_len, self.batch_size, self.pad_id, self.seed = records, max_len, batch_size, pad_id, seed
        self.packing, self._order, self.ref = False, {}, None
        self.kept, self.cut = [], 0
        for i in range(len(records)):
            prompt, chosen, rejected = records[i]
            # the first answer token is predicted from the prompt's last one, at input position len(prompt) - 1
            if 1 <= len(prompt) <= max_len and len(chosen) and len(rejected):
                self.kept.append(i)
                self.cut += len(prompt) + max(len(chosen), len(rejected)) > max_len + 1
        self.dropped = len(records) - len(self.kept)
        self.units = [[i] for i in self.kept]

    def _row(self, prompt, answer):
        seq = np.concatenate([prompt, answer])[:self.max_len + 1]
        labels = seq[1:].copy()
        labels[:len(prompt) - 1] = -100  # tokens of the prompt are context only
        return seq[:-1], labels

    def _rows(self, units):
        index = [unit[0] for unit in units]
        recs = [self.records[i] for i in index]
        rows = [self._row(p, c) for p, c, _ in recs] + [self._row(p, r) for p, _, r in recs]
        width = max(len(x) for x, _ in rows)
        x = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        y = torch.full((len(rows), width), -100, dtype=torch.long)
        for r, (a, b) in enumerate(rows):
            x[r, :len(a)], y[r, :len(b)] = torch.from_numpy(a), torch.from_numpy(b)
        return (x, y) if self.ref is None else (x, y, torch.from_numpy(self.ref[index]))

    def all_batches(self):
        """(record indices, batch) over every kept pair once, in order: for the reference cache."""
        for s in range(0, len(self.kept), self.batch_size):
            units = self.units[s:s + self.batch_size]
            yield [u[0] for u in units], self._rows(units)


# ------------------------------------------------------------------------------------------------ the reference

def files_digest(paths):
    """sha256 over the bytes of the files, one after another."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


def weights_digest(model):
    """sha256 over the weights a reference pass runs (names, dtypes, shapes, bytes), the LoRA adapters aside: they
    are bypassed, and their random start must not make the same starting model look another."""
    h = hashlib.sha256()
    for name, v in sorted(model.state_dict().items()):
        if name.rsplit(".", 1)[-1] not in ("lora_A", "lora_B"):
            v = v.detach().cpu().contiguous()
            h.update(f"{name} {v.dtype} {tuple(v.shape)}".encode())
            h.update(v.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def cache_key(data, split, max_len, weights, t):
    """What a split's reference log-probs are computed from: its pairs as tokenized (their chat template included),
    max_len (where rows are cut, which pairs are left out), the starting weights (weights_digest), the dtype and
    the device (bf16, and CPU autocast against CUDA's, move the sums). weights None: a resume whose starting model
    is gone, which can check only the data and max_len, and compute nothing."""
    key = {"data": files_digest([data.file(f"{split}.bin"), data.file(f"{split}_idx.npy")]), "max_len": max_len}
    if weights is not None:
        key.update(weights=weights, dtype=t.dtype, device=t.device.type)
    return key


def read_cache(path, key, records):
    """(the (records, 2) log-probs of the file at `path`, None) when it was made under `key`, else (None, why not)."""
    try:
        with np.load(path) as f:  # a zip: a file cut short or a changed byte (its CRC) fails here
            made_from, logps = json.loads(f["key"].item()), f["logps"]
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
        return None, f"unreadable, damaged or cut short ({type(e).__name__}: {e})"
    if not isinstance(made_from, dict) or logps.shape != (records, 2):
        return None, f"not a reference cache of these {records} pairs: damaged or replaced"

    def show(v):  # a sha256 by its first digits
        return f"{v[:12]}..." if isinstance(v, str) and len(v) == 64 else v
    changed = [f"{k} {show(made_from.get(k))} -> {show(v)}" for k, v in key.items() if made_from.get(k) != v]
    return (None, f"made from other settings ({', '.join(changed)})") if changed else (logps, None)


@torch.no_grad()
def reference_cache(t, batches, path, key):
    """The (records, 2) reference log-probs (chosen, rejected) of every pair of `batches`, by the trainer's model
    with its adapters off (its starting weights: called before fit loads a checkpoint), in the trainer's dtype:
    read from `path` when it was made under `key` (cache_key), else computed and written there atomically with
    it, the reason logged. A key without weights (the starting model is gone) stops where the file cannot serve."""
    n = len(batches.records)
    cached, why = read_cache(path, key, n) if os.path.exists(path) else (None, "not found")
    if cached is not None:
        log(f"reference log-probs: {path} (cached" + ("" if "weights" in key else "; the starting model is gone: "
                                                       "only its data and max_len are checked") + ")")
        return cached
    if "weights" not in key:
        raise SystemExit(f"{path}: {why}, and the model to compute the reference log-probs from, the one this run "
                         f"started from, is gone: put it back and resume again, or start a new run")
    if os.path.exists(path):
        log(f"{path}: {why}: computing it again")
    out = np.full((n, 2), np.nan, dtype=np.float32)
    model = getattr(t.model, "module", t.model)  # every rank runs every forward (FSDP gathers collectively)
    model.eval()
    with lora.adapters_off(model), t.autocast, tqdm(total=len(batches.kept), desc=f"reference log-probs {path}",
                                               unit="pair", disable=not t.master) as bar:
        for index, (ids, labels) in batches.all_batches():
            logps, _ = answer_logps(model, ids.to(t.device), labels.to(t.device))
            out[index] = logps.view(2, -1).t().float().cpu().numpy()
            bar.update(len(index))
            # each batch has its own width and glibc keeps every freed size: untrimmed, SmolLM2's pass over dpo_zh
            # peaked at 1,956 MB resident and its training at 1,529; trimmed, both at 1,465 (a trim takes ~1 ms)
            trim_heap()
    model.train()
    if t.master:
        with open(path + ".tmp", "wb") as f:
            np.savez(f, logps=out, key=np.array(json.dumps(key)))
        os.replace(path + ".tmp", path)
        log(f"reference log-probs of {len(batches.kept)} pairs: {path}")
    return out


# ------------------------------------------------------------------------------------------------ pair making

def similarity(chosen, rejected):
    """What max_similarity bounds: difflib.SequenceMatcher's ratio, 2 * matched characters / both lengths."""
    return difflib.SequenceMatcher(None, chosen, rejected).ratio()


def keep_pair(chosen, rejected, max_similarity):
    """'kept', or why the pair is dropped: 'empty' (nothing generated) or 'similar' (above max_similarity)."""
    if not rejected.strip():
        return "empty"
    return "similar" if similarity(chosen, rejected) > max_similarity else "kept"


def sft_conversations(path):
    """(conversation, split or None) of the SFT records in `path` (data_process.py's chat layouts and readers), or
    of the embedded default set when `path` is empty."""
    import chat_data
    import data_process
    import readers
    if not path:
        from default_data import default_sft_records
        records = ((r, "<default>", i + 1) for i, r in enumerate(default_sft_records()))
    else:
        cfg = data_process.config(format="sft", input=path)
        files, _ = readers.expand_inputs(path, cfg["exclude"])
        records = readers.iter_records(files, cfg, readers.Issues(False), {})
    for rec, where, line in records:
        try:
            yield chat_data.to_conversation(rec), rec.get("split")
        except ValueError as e:
            raise SystemExit(f"{where}:{line}: {e}")


def generate_pairs(model, tok, conversations, max_tokens, max_similarity):
    """(kept preference records for data_process.py, counts by outcome): chosen = each conversation's last reply,
    rejected = the model's greedy reply to what comes before it."""
    import inference
    kept, counts = [], {"kept": 0, "similar": 0, "empty": 0}
    for msgs, split in tqdm(list(conversations), desc="pairs", unit="prompt"):
        prompt, chosen = msgs[:-1], msgs[-1]["content"]
        rejected = inference.stream_reply(model, tok, tok.apply_chat_template(prompt, add_generation_prompt=True),
                                          max_new_tokens=max_tokens, temperature=0)
        outcome = keep_pair(chosen, rejected, max_similarity)
        counts[outcome] += 1
        if outcome == "kept":
            split_key = {"split": split} if split else {}  # the SFT record's own split, else data_process's
            kept.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, **split_key})
    return kept, counts


def write_pairs():
    """make_pairs=True: generate, filter and write out_dir as a DPO data directory."""
    import data_process
    if not init_from or init_from == "resume":
        raise SystemExit("make_pairs: --init_from=CHECKPOINT names the (early SFT) model that writes the rejected "
                         "answers")
    if not 0 <= max_similarity <= 1 or rejected_tokens < 1:
        raise SystemExit(f"max_similarity={max_similarity} must be in [0, 1] and rejected_tokens={rejected_tokens} "
                         f"at least 1")
    model, tok = checkpoint.build_model(init_from, out_dir)
    if tok is None:
        raise SystemExit(f"make_pairs: {init_from} brings no tokenizer to render the prompts with")
    model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    with torch.no_grad():
        records, counts = generate_pairs(model, tok, sft_conversations(pairs_input), rejected_tokens, max_similarity)
    log(f"pairs: {counts['kept']} kept, {counts['similar']} dropped as more than {max_similarity} similar to the "
        f"chosen answer (difflib.SequenceMatcher ratio), {counts['empty']} dropped with an empty generated answer")
    if not records:
        raise SystemExit("make_pairs: every pair was dropped; nothing to write")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "pairs.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    data_process.run(data_process.config(format="dpo", input=path, out_dir=out_dir, num_workers=1,
                                         max_len=max_len or model.config.max_seq_len), tok=tok)


# ------------------------------------------------------------------------------------------------ the script

def check_settings(cfg):
    """The fine-tuning keys' checks (tuning.py), then DPO's own."""
    tuning.check_settings(cfg)
    if loss_type not in LOSS_TYPES:
        raise SystemExit(f"loss_type={loss_type!r}: expected one of {', '.join(LOSS_TYPES)}")
    if reference not in REFERENCES:
        raise SystemExit(f"reference={reference!r}: expected one of {', '.join(REFERENCES)}")
    if reference == "adapter_off" and method == "full":
        raise SystemExit("reference=adapter_off needs method=lora or qlora (a full run has no adapter to switch off)")
    if beta <= 0:
        raise SystemExit(f"beta={beta}: must be positive")
    if not 0 <= label_smoothing < 0.5:
        raise SystemExit(f"label_smoothing={label_smoothing}: must be in [0, 0.5)")
    if label_smoothing and loss_type != "sigmoid":
        raise SystemExit(f"label_smoothing={label_smoothing} applies to loss_type=sigmoid only (cDPO)")
    if sft_weight < 0:
        raise SystemExit(f"sft_weight={sft_weight}: must not be negative")


def main():
    cfg = configurator.apply(globals(), [a for a in sys.argv[1:] if not a.startswith("--local_rank")])
    if make_pairs:
        return write_pairs()
    check_settings(cfg)
    trainer.train_config({**cfg, "max_iters": 1, "eval_interval": 1, "eval_iters": 1})  # the rest, before any work
    start_gone = False  # a resume whose starting model, the reference, has been removed since
    if init_from == "resume":
        path = checkpoint.latest_checkpoint(out_dir)
        source = path and checkpoint.read_trainer_state(path).get("model_source", "scratch")
        start_gone = bool(source) and not os.path.exists(source)
        if start_gone and reference == "copy":
            raise SystemExit(f"reference=copy: the reference is the model the run started from, {source}, which is "
                             f"gone; resume with --reference=cached only if out_dir holds its ref_logps files")
    model, tok, data, length = tuning.load_for_tuning(cfg, "dpo")
    train_records, val_records = data.dpo("train"), data.dpo("val")
    pad = tuning.pad_id(tok)
    train = DPOBatches(train_records, length, batch_size, pad, cfg["seed"])
    val = DPOBatches(val_records, length, batch_size, pad, cfg["seed"]) if len(val_records) else None
    log(f"data: {len(train.kept)} train pairs ({train.cut} cut to {length} tokens, {train.dropped} left out: no "
        f"answer token within them)" + (f"; {len(val.kept)} val pairs" if val else "; no val split"))
    if not train.kept:
        raise SystemExit(f"{data_dir}: no train pair keeps an answer token within max_len={length}")
    ref_model = copy.deepcopy(model).requires_grad_(False) if reference == "copy" else None
    if method != "full":
        tuning.add_adapters(model, cfg, data)
    if reference == "adapter_off" and model.modules_to_save:
        raise SystemExit(f"reference=adapter_off: {', '.join(model.modules_to_save)} train in full, so switching the "
                         f"adapters off does not give the starting model back; use reference=copy or cached")
    tuning.disable_dropout(model)
    # before the Trainer moves, shards or casts them: the starting weights, which the reference cache is keyed by
    weights = weights_digest(model) if reference == "cached" and not start_gone else None
    tuning.resolve_schedule(cfg, train, val)
    loss_fn = dpo_loss_fn(beta, loss_type, label_smoothing, sft_weight, reference)
    prompts = [tuple(x.tolist() for x in val_records[i][:2]) for i in val.kept[:sample_prompts]] if val else []
    t = trainer.Trainer(cfg, model, lambda s, m: train.train_batch(s, m, cfg["grad_accum"]),
                        val.val_batch if val else None, loss_fn=loss_fn, ref_model=ref_model,
                        tokenizer_dir=data.tokenizer_dir, weight_fn=pairs_in,
                        on_eval=tuning.answer_prompts(tok, prompts, sample_tokens) if prompts else None,
                        export=tuning.lora_export(tok, merge_dtype) if method != "full" else None)
    if reference == "cached":
        for split, batches in (("train", train), ("val", val)):
            if batches is not None:
                path = os.path.join(out_dir, f"ref_logps_{split}.npz")
                batches.ref = reference_cache(t, batches, path, cache_key(data, split, length, weights, t))
    t.fit()


if __name__ == "__main__":
    main()
