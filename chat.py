"""Chat with a checkpoint in the terminal: streamed replies, multi-turn history, the checkpoint's chat template.

    python chat.py --ckpt=out/sft
    python chat.py --ckpt=SmolLM2-135M-Instruct.Q4_1.gguf --system="You are a pirate." --temperature=0.3

Commands: /reset clears the history, /system TEXT sets the system prompt (and clears the history), /exit or
/quit (or Ctrl-D) leaves, /help lists them. Ctrl-C while a reply streams cuts the reply short and keeps the part
shown. When the conversation no longer fits the model's context, the oldest turns are dropped.
"""
import sys

import torch

import configurator

# ---------------------------------------------------------------------------------------------------- config
ckpt = ""             # any checkpoint eval.load_model reads (folder, .gguf, quantized folder, LoRA adapter)
lora_base = ""        # a LoRA adapter's base ("" = the one its adapter_config.json names)
system = ""           # system prompt ("" = none, or the template's own default)
max_new_tokens = 256
temperature = 0.7     # 0 = greedy
top_k = 50            # 0 = off
top_p = 0.9           # 1.0 = off
repetition_penalty = 1.0
seed = 1337
device = ""           # "" = cuda when available, else cpu
dtype = "bfloat16"
# -----------------------------------------------------------------------------------------------------------

HELP = "/reset: clear the history  /system TEXT: set the system prompt  /exit: leave  /help: this list"


def render(tok, messages, system=""):
    """The prompt text for the next assistant turn, by the tokenizer's chat template."""
    if system:
        messages = [{"role": "system", "content": system}] + messages
    return tok.apply_chat_template(messages, add_generation_prompt=True)


def stream_reply(model, tok, prompt, max_new_tokens=256, temperature=0.7, top_k=50, top_p=0.9,
                 repetition_penalty=1.0, on_text=None):
    """Generate after the prompt text until a stop token; on_text(new_text) is called as text arrives (a
    multi-byte character is held back until it is complete). Returns the reply text without the stop token."""
    ids = tok.encode(prompt)
    new_ids, shown = [], [""]

    def on_token(step_ids):
        new_ids.append(step_ids[0])
        if on_text is not None:
            text = tok.decode(new_ids, skip_special=True)
            if not text.endswith("\ufffd") and text.startswith(shown[0]):
                on_text(text[len(shown[0]):])
                shown[0] = text

    try:
        model.generate(torch.tensor([ids]), max_new_tokens, temperature=temperature, top_k=top_k or None,
                       top_p=top_p, repetition_penalty=repetition_penalty, stop_ids=tok.stop_ids, callback=on_token)
    except KeyboardInterrupt:
        pass  # the reply so far stands
    return tok.decode([i for i in new_ids if i not in tok.stop_ids], skip_special=True)


def fit_history(tok, history, system, budget):
    """The most recent turns whose rendered prompt has at most `budget` tokens (the last user turn always stays;
    the caller reports when even that does not fit)."""
    history = list(history)
    while len(history) > 1 and len(tok.encode(render(tok, history, system))) > budget:
        history = history[2:] if history[0]["role"] == "user" and len(history) > 2 else history[1:]
    return history


def repl(model, tok, system="", max_new_tokens=256, temperature=0.7, top_k=50, top_p=0.9, repetition_penalty=1.0,
         read=input, write=None):
    """The interactive loop; read/write are swappable for tests."""
    write = write or (lambda s: print(s, end="", flush=True))
    budget = model.config.max_seq_len - max_new_tokens
    history = []
    write(f"chat ({HELP})\n")
    while True:
        try:
            line = read("\n>>> ")
        except (EOFError, KeyboardInterrupt):
            write("\n")
            return history
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return history
        if text == "/help":
            write(HELP + "\n")
            continue
        if text == "/reset":
            history = []
            write("(history cleared)\n")
            continue
        if text.startswith("/system"):
            system, history = text[len("/system"):].strip(), []
            write(f"(system prompt {'set' if system else 'cleared'}; history cleared)\n")
            continue
        if text.startswith("/"):
            write(f"unknown command {text.split()[0]}; {HELP}\n")
            continue
        history = fit_history(tok, history + [{"role": "user", "content": line}], system, budget)
        prompt = render(tok, history, system)
        if len(tok.encode(prompt)) > budget:
            write(f"(message too long: the prompt must leave {max_new_tokens} of the model's "
                  f"{model.config.max_seq_len} tokens for the reply)\n")
            history = history[:-1]
            continue
        reply = stream_reply(model, tok, prompt, max_new_tokens, temperature, top_k, top_p, repetition_penalty,
                             on_text=write)
        write("\n")
        history.append({"role": "assistant", "content": reply})


def main():
    configurator.apply(globals(), sys.argv[1:])
    if not ckpt:
        raise SystemExit("--ckpt=PATH is required")
    from eval import load_model
    torch.manual_seed(seed)
    model, tok = load_model(ckpt, device or ("cuda" if torch.cuda.is_available() else "cpu"), dtype, lora_base)
    repl(model, tok, system, max_new_tokens, temperature, top_k, top_p, repetition_penalty)


if __name__ == "__main__":
    main()
