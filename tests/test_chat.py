"""chat.py and inference.py's generation path: streaming, the chat loop, history that fits the context, replies
that never run past the model's context, and the command line's refusals."""
import io
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import chat
import inference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ByteTok:
    """Stand-in: ids are UTF-8 bytes, 256 = stop."""
    stop_ids = [256]

    def encode(self, text, bos=False, eos=False):
        return list(text.encode())

    def decode(self, ids, skip_special=False):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class ScriptedModel:
    """generate() emits a fixed reply, byte by byte, then the stop id."""

    def __init__(self, reply, max_seq_len=1000):
        self.reply = list(reply.encode()) + [256]
        self.prompts = []
        self.config = SimpleNamespace(max_seq_len=max_seq_len)

    def generate(self, idx, max_new_tokens, stop_ids=None, callback=None, **kw):
        self.prompts.append(idx[0].tolist())
        for t in self.reply[:max_new_tokens]:
            if callback([t]):
                break


def test_streaming_holds_back_partial_characters():
    pieces = []
    reply = inference.stream_reply(ScriptedModel("你好, ok"), ByteTok(), "hi", on_text=pieces.append)
    assert reply == "你好, ok" and "".join(pieces) == reply
    assert all("\ufffd" not in p for p in pieces) and len(pieces) > 2


def test_chat_repl_history_system_and_commands(ckpt_folder, monkeypatch):
    model, tok = inference.load_model(ckpt_folder, "cpu", "float32")
    inputs = iter(["hello", "how are you", "/system Be brief.", "hi", "/reset", "/bogus", "again", "/exit"])
    shown = []
    prompts = []
    real_stream = inference.stream_reply

    def spy(model, tok, prompt, *args, **kw):
        prompts.append(prompt)
        return real_stream(model, tok, prompt, *args, **kw)

    monkeypatch.setattr(inference, "stream_reply", spy)
    history = chat.repl(model, tok, max_new_tokens=5, temperature=0.0, read=lambda _: next(inputs),
                        write=shown.append)
    assert len(prompts) == 4
    assert prompts[0] == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    assert prompts[1].startswith(prompts[0]) and prompts[1].endswith("user\nhow are you<|im_end|>\n"
                                                                       "<|im_start|>assistant\n")
    system = "<|im_start|>system\nBe brief.<|im_end|>\n"
    assert prompts[2] == system + "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert prompts[3] == system + "<|im_start|>user\nagain<|im_end|>\n<|im_start|>assistant\n"  # /reset keeps it
    assert [m["role"] for m in history] == ["user", "assistant"] and history[0]["content"] == "again"
    # greedy and streamed: the reply shown is what generate() returns for that prompt
    ids = tok.encode(prompts[0])
    out = model.generate(torch.tensor([ids]), 5, temperature=0.0, stop_ids=tok.stop_ids)[0, len(ids):].tolist()
    expected = tok.decode([i for i in out if i not in tok.stop_ids], skip_special=True)
    text = "".join(shown)
    assert expected in text and "unknown command /bogus" in text and "history cleared" in text


def test_chat_drops_oldest_turns_when_the_context_is_full():
    class Tok(ByteTok):
        def apply_chat_template(self, messages, add_generation_prompt=True):
            return "".join(f"[{m['role']}]{m['content']}" for m in messages) + "[assistant]"

    history = [{"role": "user", "content": "a" * 20}, {"role": "assistant", "content": "b" * 20},
               {"role": "user", "content": "c" * 20}, {"role": "assistant", "content": "d" * 20},
               {"role": "user", "content": "new"}]
    kept = inference.fit_history(Tok(), history, "", budget=80)
    assert kept == history[2:]
    assert inference.fit_history(Tok(), history, "", budget=10) == history[-1:]


def test_chat_defaults_answer_a_model_with_a_short_context(ckpt_folder, monkeypatch):
    """The default max_new_tokens=256 is more than a 128-token context holds: replies get half of it."""
    model, tok = inference.load_model(ckpt_folder, "cpu", "float32")
    assert model.config.max_seq_len == 128 and chat.max_new_tokens == 256
    budgets, shown = [], []
    real_stream = inference.stream_reply

    def spy(model, tok, prompt, max_new_tokens, *args, **kw):
        budgets.append(max_new_tokens)
        return real_stream(model, tok, prompt, max_new_tokens, *args, **kw)

    monkeypatch.setattr(inference, "stream_reply", spy)
    inputs = iter(["hello", "how are you", "/exit"])
    history = chat.repl(model, tok, max_new_tokens=chat.max_new_tokens, temperature=0.0,
                        read=lambda _: next(inputs), write=shown.append)
    text = "".join(shown)
    assert "too long" not in text and "replies limited to 64 tokens" in text
    assert budgets == [64, 64]  # both messages answered (the first turn may have made room for the second)
    assert history[-2] == {"role": "user", "content": "how are you"} and history[-1]["role"] == "assistant"


def test_stream_reply_stops_at_the_context(capsys):
    model = ScriptedModel("x" * 50, max_seq_len=30)
    reply = inference.stream_reply(model, ByteTok(), "p" * 20, max_new_tokens=40)
    assert reply == "x" * 10 and "reply limited to 10 tokens" in capsys.readouterr().err
    with pytest.raises(ValueError, match="the prompt has 30 tokens, the model's whole context is 30"):
        inference.stream_reply(model, ByteTok(), "p" * 30)


def test_generation_settings_that_cannot_work_are_refused(ckpt_folder):
    for arg, message in [("--max_new_tokens=0", "max_new_tokens=0 must be at least 1"),
                         ("--temperature=-1", "temperature=-1.0 must be >= 0"),
                         ("--top_p=0", "top_p=0.0 must be in"), ("--top_k=-5", "top_k=-5 must be >= 0"),
                         ("--repetition_penalty=0", "repetition_penalty=0.0 must be > 0"),
                         ("--rag_top_k=0", "rag_top_k must be at least 1"),
                         ("--rag_rerank=-1", "rag_rerank at least 0")]:
        run = subprocess.run([sys.executable, "chat.py", f"--ckpt={ckpt_folder}", arg], cwd=ROOT,
                             capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
        assert run.returncode != 0 and message in run.stderr and "Traceback" not in run.stderr, (arg, run.stderr)
    run = subprocess.run([sys.executable, "chat.py", f"--ckpt={ckpt_folder}/nope"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert run.returncode != 0 and "checkpoint not found" in run.stderr and "Traceback" not in run.stderr


def test_chat_cli_answers_with_its_defaults(ckpt_folder):
    """python chat.py --ckpt=<a 128-token model> as a new user runs it: one message, a reply, then Ctrl-D."""
    run = subprocess.run([sys.executable, "chat.py", f"--ckpt={ckpt_folder}"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, input="hello\n")
    assert run.returncode == 0, run.stderr
    assert "too long" not in run.stdout and "replies limited to 64 tokens" in run.stdout
    assert run.stdout.startswith("dtype=") and "(auto: " in run.stdout.splitlines()[0]  # which dtype, and why


def test_line_editing_by_readline_in_a_terminal(tmp_path, monkeypatch):
    """In a terminal chat.py imports readline (arrow keys, history) and keeps the history in a file; a file that
    cannot be written, or a Python without readline (Windows), changes nothing else."""
    readline = pytest.importorskip("readline")

    class Terminal(io.StringIO):
        def isatty(self):
            return True
    monkeypatch.setattr(sys, "stdin", Terminal())
    monkeypatch.setattr(sys, "stdout", Terminal())
    history = tmp_path / "history"
    history.write_text("an earlier message\n")
    readline.clear_history()
    try:
        save = chat.line_editing(str(history))
        assert readline.get_history_item(readline.get_current_history_length()) == "an earlier message"
        readline.add_history("this session's message")
        save()
        assert history.read_text().splitlines() == ["an earlier message", "this session's message"]
        assert history.stat().st_mode & 0o777 == 0o600
        chat.line_editing(str(tmp_path / "no such folder" / "history"))()  # neither read nor written: no error
    finally:
        readline.clear_history()
    monkeypatch.setitem(sys.modules, "readline", None)  # import readline fails, as on Windows
    chat.line_editing(str(history))()
