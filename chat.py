"""Chat with a checkpoint in the terminal: streamed replies, multi-turn history, the checkpoint's chat template.

    python chat.py --ckpt=out/run/pretrain/hf                 # what bash run.sh trains
    python chat.py --ckpt=model.gguf --system="You are a pirate." --temperature=0.3
    python chat.py --ckpt=out/run/sft/hf --rag=out/run/rag       # answers from the passages of a rag.py index

Commands: /reset clears the history, /system TEXT sets the system prompt (and clears the history), /exit or
/quit (or Ctrl-D) leaves, /help lists them. Ctrl-C while a reply streams cuts the reply short and keeps the part
shown. A reply gets at most half of the model's context (max_new_tokens is lowered to that, with a note); when the
conversation no longer fits the rest, the oldest turns are dropped. With --rag=INDEX each message goes to the model
with the rag_top_k passages the index finds for it (BM25, re-ranked by the model from the best rag_rerank hits when
that is set; as many as fit: rag.py), and their sources are printed after the reply; the history keeps the messages
without their passages.
In a terminal the line can be edited and the arrow keys recall earlier messages, of this session and of those
before it (kept in history_file), where Python has the readline module (not on Windows: there input() is plain).
"""
import os
import sys

import torch

import configurator
import inference
from rag import Index, rag_messages, retrieve, where

# ---------------------------------------------------------------------------------------------------- config
ckpt = ""             # any checkpoint inference.load_model reads (folder, .gguf, quantized folder, LoRA adapter)
lora_base = ""        # a LoRA adapter's base ("" = the one its adapter_config.json names)
system = ""           # system prompt ("" = none, or the template's own default)
max_new_tokens = 256  # at most half the model's context: the rest holds the conversation
temperature = 0.7     # 0 = greedy
top_k = 50            # 0 = off
top_p = 0.9           # 1.0 = off
repetition_penalty = 1.0
seed = 1337
device = ""           # "" = cuda when available, else cpu
dtype = "auto"        # auto: bfloat16 where the hardware runs it fast, else float32 (inference.resolve_dtype)
rag = ""              # a rag.py index folder: answer each message from its passages ("" = plain chat)
rag_top_k = 3         # passages per message
rag_rerank = 0        # re-rank the best this many BM25 hits by the model's likelihood (0 = BM25 order; rag.py)
history_file = "~/.tinyllm_chat_history"  # the messages the arrow keys recall in later sessions ("" = not kept)
# -----------------------------------------------------------------------------------------------------------

HELP = "/reset: clear the history  /system TEXT: set the system prompt  /exit: leave  /help: this list"


def repl(model, tok, system="", max_new_tokens=256, temperature=0.7, top_k=50, top_p=0.9, repetition_penalty=1.0,
         read=input, write=None, index=None, rag_top_k=3, rag_rerank=0):
    """The interactive loop; read/write are swappable for tests. index: a rag.Index whose rag_top_k passages (BM25,
    re-ranked from rag_rerank hits) go with each message."""
    write = write or (lambda s: print(s, end="", flush=True))
    context = model.config.max_seq_len
    if max_new_tokens > context // 2:
        write(f"(replies limited to {context // 2} tokens, half of the model's context of {context}, "
              f"instead of max_new_tokens={max_new_tokens}: the other half holds the conversation)\n")
        max_new_tokens = context // 2
    budget = context - max_new_tokens
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
        used = []
        if index is not None:
            try:
                chunks = retrieve(index, model, tok, line, rag_top_k, rag_rerank)
                messages, used = rag_messages(tok, line, chunks, budget, system, history)
                history = messages[:-1] + [{"role": "user", "content": line}]  # kept without the passages
            except ValueError:  # the message alone is too long: reported below
                messages = history = [{"role": "user", "content": line}]
        else:
            messages = history = inference.fit_history(tok, history + [{"role": "user", "content": line}], system,
                                                       budget)
        prompt = inference.render_chat(tok, messages, system)
        if len(tok.encode(prompt)) > budget:
            write(f"(message too long: the prompt must leave {max_new_tokens} of the model's "
                  f"{model.config.max_seq_len} tokens for the reply)\n")
            history = history[:-1]
            continue
        reply = inference.stream_reply(model, tok, prompt, max_new_tokens, temperature, top_k, top_p,
                                       repetition_penalty, on_text=write)
        write("\n" + ("Sources:\n" if used else "") + "".join(f"[{n}] {where(c)}\n" for n, c in enumerate(used, 1)))
        history.append({"role": "assistant", "content": reply})


def line_editing(history_file):
    """Line editing and the arrow keys for input(): the readline module, imported only where the input and output
    are a terminal (importing it can write escape codes to stdout) and Python has it (not on Windows: there input()
    stays plain), with the messages of earlier sessions read from history_file ("" = none). Returns the function
    that saves the history at the end; a history file that cannot be read or written is done without."""
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        return lambda: None
    try:
        import readline
    except ImportError:
        return lambda: None
    if not history_file:
        return lambda: None
    path = os.path.expanduser(history_file)
    try:
        readline.read_history_file(path)
    except OSError:  # none yet, or unreadable
        pass
    readline.set_history_length(1000)

    def save():
        try:
            readline.write_history_file(path)
            os.chmod(path, 0o600)  # the messages are private, as a shell's history
        except OSError:  # an unwritable home: this session's messages are not kept
            pass
    return save


def main():
    configurator.apply(globals(), sys.argv[1:])
    if not ckpt:
        raise SystemExit("--ckpt=PATH is required")
    inference.check_sampling(max_new_tokens, temperature, top_k, top_p, repetition_penalty)
    if rag_top_k < 1 or rag_rerank < 0:
        raise SystemExit(f"rag_top_k={rag_top_k}, rag_rerank={rag_rerank}: rag_top_k must be at least 1 and rag_rerank "
                         f"at least 0 (0 keeps BM25's order)")
    torch.manual_seed(seed)
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    run_dtype, why = inference.resolve_dtype(dtype, dev)
    print(f"dtype={run_dtype} ({why})")
    model, tok = inference.load_model(ckpt, dev, run_dtype, lora_base)
    index = Index.open(rag, tok) if rag else None
    save_history = line_editing(history_file)
    try:
        repl(model, tok, system, max_new_tokens, temperature, top_k, top_p, repetition_penalty, index=index,
             rag_top_k=rag_top_k, rag_rerank=rag_rerank)
    finally:
        save_history()


if __name__ == "__main__":
    main()
