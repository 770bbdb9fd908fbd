"""Supervised fine-tuning (SFT) - full, LoRA or QLoRA - of our models and imported ones, on trainer.py's loop.

    python data_process.py --format=sft --tokenizer=out/run/tokenizer --out_dir=out/run/sft_data
    python fine_tuning.py --init_from=out/run/pretrain/hf --data_dir=out/run/sft_data --out_dir=out/run/sft
    python fine_tuning.py config/sft_riddles.py --init_from=$GGUF --data_dir=data/riddles         # LoRA r=32
    python fine_tuning.py config/sft_riddles.py --init_from=$GGUF --data_dir=data/riddles --method=qlora
    python fine_tuning.py ... --init_from=resume          # continue the newest checkpoint in out_dir

Data: an SFT directory of `data_process.py --format=sft` (ChatML, the model's own template or ##Question/##Answer,
chosen there with --template); only the assistant turns and their end tokens carry labels. An epoch's records go
in a seeded order, padded to the longest of each micro-batch (pad id, labels -100), or with packing=True several
records share a row of max_len tokens (positions restart at each record, no attention across records). The loss
is the mean over every supervised token of an optimizer step, whatever the accumulation or the number of
processes (trainer.py). Tokens the data's tokenizer added to the model's (ChatML's markers on a tokenizer without
them) grow the embeddings to a multiple of 64, and their rows train (with LoRA, embed and lm_head are then trained
in full).

What lands in out_dir: checkpoints, metrics.jsonl and loss.png as in pretraining; hf/ (the model; with LoRA/QLoRA
the adapter merged in merge_dtype) and, with LoRA/QLoRA, adapter/ (PEFT format, loads with peft.PeftModel and
eval.py --ckpt). At each evaluation a few held-out prompts are answered greedily, so the answers can be watched
as they change.

A longer context: --rope_scaling=yarn --extend_to=4096 stretches the model's RoPE first (saved in its config), and
--s2_attn_groups=4 trains with LongLoRA's shifted sparse attention (evaluation attends in full; not with packing).
"""
import sys

import configurator
import trainer
import tuning
from metrics import log

# -- the training loop's settings (every field of trainer.TrainConfig) and the fine-tuning ones shared with dpo.py
#    (tuning.TuningConfig: the model, method, LoRA, epochs, evaluation) are keys of this script; SFT's defaults follow
globals().update(vars(trainer.TrainConfig()))
globals().update(vars(tuning.TuningConfig()))
out_dir = "out/sft"
data_dir = "data/sft"       # data_process.py --format=sft
packing = False             # several records per row of max_len tokens
batch_size = 8
learning_rate = 1e-4
min_lr = 1e-5
warmup_iters = 10
weight_decay = 0.0


def main():
    cfg = configurator.apply(globals(), [a for a in sys.argv[1:] if not a.startswith("--local_rank")])
    tuning.check_settings(cfg)
    trainer.train_config({**cfg, "max_iters": 1, "eval_interval": 1, "eval_iters": 1})  # the rest, before any work
    model, tok, data, length = tuning.load_for_tuning(cfg, "sft")
    train_records, val_records = data.sft("train"), data.sft("val")
    train = tuning.SFTBatches(train_records, length, batch_size, tuning.pad_id(tok), cfg["seed"], packing)
    val = (tuning.SFTBatches(val_records, length, batch_size, tuning.pad_id(tok), cfg["seed"], packing)
           if len(val_records) else None)
    log(f"data: {len(train.kept)} train records ({train.cut} cut to {length} tokens, {train.dropped} left out: no "
        f"supervised token within them) in {len(train)} {'rows' if packing else 'samples'}"
        + (f"; {len(val.kept)} val records" if val else "; no val split"))
    if not train.kept:
        raise SystemExit(f"{data_dir}: no train record keeps a supervised token within max_len={length}")
    if cfg["method"] != "full":
        tuning.add_adapters(model, cfg, data)
    tuning.resolve_schedule(cfg, train, val)
    prompts = [tuning.prompt_of(val_records, i) for i in val.kept[:cfg["sample_prompts"]]] if val else []
    t = trainer.Trainer(cfg, model, lambda s, m: train.train_batch(s, m, cfg["grad_accum"]),
                        val.val_batch if val else None, tokenizer_dir=data.tokenizer_dir,
                        on_eval=tuning.answer_prompts(tok, prompts, cfg["sample_tokens"]) if prompts else None,
                        export=tuning.lora_export(tok, cfg["merge_dtype"]) if cfg["method"] != "full" else None)
    t.fit()


if __name__ == "__main__":
    main()
