"""serve.py: the official `openai` client (and raw HTTP where the wire format itself is the point) against real uvicorn
servers on 127.0.0.1, over engine.py and tiny models made here. Replies are checked against model.generate and the
model's own forward pass (log-probs), stop strings and UTF-8 against the full text, error bodies against OpenAI's
format; the command line runs once as users run it."""
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import torch
import uvicorn

import configurator
import convert
import inference
import rag
import serve
from conftest import ROOT, char_tokenizer_folder, tiny_transformer
from engine import Engine

pytestmark = pytest.mark.slow
NAME = "tiny"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a list?"}]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A checkpoint folder: a tiny random LLaMA with a 256-token context and a character tokenizer (ChatML)."""
    path = str(tmp_path_factory.mktemp("serve") / "model")
    tok = char_tokenizer_folder(path)
    convert.save_pretrained(tiny_transformer(tok.vocab_size, max_seq_len=256), path)
    return path


@pytest.fixture(scope="module")
def endless(tmp_path_factory):
    """A model that never says its stop tokens (their embeddings are zero: tied, they score 0, below the best random
    logit) with a 2048-token context: a reply runs as long as asked, long enough to be cut off."""
    path = str(tmp_path_factory.mktemp("endless") / "model")
    tok = char_tokenizer_folder(path)
    model = tiny_transformer(tok.vocab_size, max_seq_len=2048)
    with torch.no_grad():
        model.embed.weight[tok.stop_ids] = 0
    convert.save_pretrained(model, path)
    return path


def loader(path, parallel=4, max_queue=64, index=None, gate=None):
    def load():
        if gate is not None:
            assert gate.wait(30)
        model, tok = inference.load_model(path)
        return serve.Loaded(Engine(model, parallel, max_queue, stop_ids=tok.stop_ids).start(), tok,
                            index and rag.Index.open(index, tok))
    return load


@contextlib.contextmanager
def running(load, wait=True, **settings):
    """The base URL of serve.create_app(load, ...) under uvicorn in a thread, on a free port; stopped after."""
    app = serve.create_app(load, NAME, **settings)
    sock = serve.listen("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        deadline = time.time() + 30
        while not server.started or wait and httpx.get(url + "/health").status_code != 200:
            assert time.time() < deadline and thread.is_alive(), "the server did not come up"
            time.sleep(0.02)
        yield url
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.fixture(scope="module")
def url(folder):
    with running(loader(folder), max_messages=8, max_chars=1000) as base:
        yield base


def client(base, key="none"):
    return openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=60)


def reference(path, messages=MESSAGES, max_new_tokens=40, prompt=None):
    """(prompt ids, generated ids up to and with the stop id, reply text) by model.generate, greedy."""
    model, tok = inference.load_model(path)
    ids = tok.encode(prompt if prompt is not None else tok.apply_chat_template(messages))
    out = model.generate(torch.tensor([ids]), max_new_tokens, temperature=0, stop_ids=tok.stop_ids)[0, len(ids):]
    new = out.tolist()
    stop = next((k for k, t in enumerate(new) if t in tok.stop_ids), None)
    new = new if stop is None else new[:stop + 1]
    return ids, new, tok.decode([t for t in new if t not in tok.stop_ids], skip_special=True)


def sse_events(response):
    """The data: payloads of a server-sent-event stream, JSON decoded, [DONE] as is."""
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            events.append(line[6:] if line == "data: [DONE]" else json.loads(line[6:]))
    return events


# ----------------------------------------------------------------------------- text out of tokens

class ByteTok:
    """Stand-in: ids are UTF-8 bytes, 256 = stop; decode as a byte-level tokenizer does (a cut character: U+FFFD)."""
    def decode(self, ids, skip_special=False):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def test_text_stream_never_splits_a_character_and_never_leaks_a_stop_string():
    rnd = random.Random(0)
    alphabet = "ab好的，😀 \n"
    for trial in range(300):
        text = "".join(rnd.choice(alphabet) for _ in range(rnd.randint(0, 30)))
        stops = ["".join(rnd.choice(alphabet) for _ in range(rnd.randint(1, 4))) for _ in range(rnd.randint(0, 3))]
        hits = [text.find(s) for s in stops if s in text]
        expected = text[:min(hits)] if hits else text  # the reference: the whole text, cut at the first stop
        stream, shown = serve.TextStream(ByteTok(), stops, stop_ids=[256]), ""
        for b in list(text.encode()) + [256]:
            piece = stream.add(b)
            assert "\ufffd" not in piece, (text, stops)
            shown += piece
            assert expected.startswith(shown), (text, stops, shown)  # nothing past the cut ever shown
        shown += stream.finish()
        assert shown == expected and stream.stopped == bool(hits), (text, stops)


def test_text_stream_ends_a_cut_character_as_a_replacement():
    stream = serve.TextStream(ByteTok())
    assert stream.add("é".encode()[0]) == "" and stream.finish() == "\ufffd"  # max_tokens cut it: said, not lost


def test_chinese_streams_in_whole_characters_as_the_full_decode(tmp_path):
    """A byte-level BPE (a Chinese character is 3 bytes, often cut between tokens), a Chinese prompt: every piece
    streamed is whole characters, and together they are the full decode of what model.generate makes."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer, hf.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    hf.train_from_iterator(["北京是中国的首都，上海是中国最大的城市。自然语言处理很有趣。 The list is mutable."] * 3,
                           trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>",
                                                                               "<|im_end|>"],
                                               initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    folder = str(tmp_path / "model")
    os.makedirs(folder)
    hf.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "<|endoftext|>"}, f)
    convert.save_pretrained(tiny_transformer(hf.get_vocab_size(), max_seq_len=128, seed=3), folder)
    prompt = "北京是中国的首都，上海是"
    ids, new, text = reference(folder, prompt=prompt, max_new_tokens=60)
    # the random model's bytes include 3-byte characters put together from byte tokens: cut between tokens
    assert any(ord(ch) > 0x7FF and ch != "\ufffd" for ch in text)
    with running(loader(folder)) as base:
        c = client(base)
        done = c.completions.create(model=NAME, prompt=prompt, max_tokens=60, temperature=0)
        pieces = [ch.choices[0].text for ch in c.completions.create(model=NAME, prompt=prompt, max_tokens=60,
                                                                    temperature=0, stream=True)]
    assert done.choices[0].text == "".join(pieces) == text and done.usage.prompt_tokens == len(ids)
    assert sum(len(p) > 0 for p in pieces) > 10  # it streamed, piece by piece


# ----------------------------------------------------------------------------- the API through the openai client

def test_streamed_equals_non_streamed_with_exact_usage_one_id_and_the_role_first(url, folder):
    ids, new, text = reference(folder)
    c = client(url)
    reply = c.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=40, temperature=0)
    assert reply.choices[0].message.content == text and reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason == ("stop" if new[-1] in (0, 2) else "length")
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(ids), len(new))
    assert reply.usage.total_tokens == len(ids) + len(new) and reply.model == NAME

    chunks = list(c.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=40, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert len({ch.id for ch in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == reply.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(new)  # usage last, when asked
    assert all(ch.usage is None for ch in chunks[:-1])

    prompt = "A list is"
    ids, new, text = reference(folder, prompt=prompt, max_new_tokens=30)
    done = c.completions.create(model=NAME, prompt=prompt, max_tokens=30, temperature=0)
    assert done.choices[0].text == text and done.usage.completion_tokens == len(new)
    assert done.usage.prompt_tokens == len(ids) == len(prompt)  # one token per character
    streamed = list(c.completions.create(model=NAME, prompt=prompt, max_tokens=30, temperature=0, stream=True))
    assert "".join(ch.choices[0].text for ch in streamed) == text and len({ch.id for ch in streamed}) == 1


def test_raw_stream_ends_with_usage_then_done(url):
    body = {"messages": MESSAGES, "max_tokens": 5, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]" and events[-2]["choices"] == [] and events[-2]["usage"]["completion_tokens"] == 5
    assert events[-3]["choices"][0]["finish_reason"] == "length"


def test_stop_strings_never_leak_even_split_across_tokens(url, folder):
    _, _, text = reference(folder, max_new_tokens=60)
    assert len(text) >= 12, text  # the tiny random model's greedy reply: the stop strings come from it
    stop = text[6:9]  # three characters: three tokens of the character tokenizer
    cut = text[:text.find(stop)]
    c = client(url)
    for stops in (stop, [stop, "never said"], [text[6:8] + "#"]):  # the last: its start is held back, then let go
        reply = c.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=60, temperature=0, stop=stops)
        streamed = c.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=60, temperature=0,
                                             stop=stops, stream=True)
        pieces = [ch.choices[0].delta.content or "" for ch in streamed if ch.choices]
        expected = text if stops == [text[6:8] + "#"] else cut
        assert reply.choices[0].message.content == expected == "".join(pieces)
        assert reply.choices[0].finish_reason == ("stop" if expected == cut else "length")
    assert reply.usage.completion_tokens == 60


def test_logprobs_are_the_models_own_log_softmax(url, folder):
    ids, new, text = reference(folder, max_new_tokens=12)
    model, tok = inference.load_model(folder)
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids + new]))
    logp = logits[0, len(ids) - 1:-1].float().log_softmax(-1)  # the distribution each new token was chosen from
    shown = [t for t in new if t not in tok.stop_ids]
    reply = client(url).chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=12, temperature=0,
                                                logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert [x.token for x in content] == [tok.decode([t]) for t in shown]
    for k, (x, t) in enumerate(zip(content, shown)):
        assert x.logprob == pytest.approx(logp[k, t].item(), abs=1e-4)
        values, top = logp[k].topk(3)
        assert [y.token for y in x.top_logprobs] == [tok.decode([i]) for i in top.tolist()]
        assert [y.logprob for y in x.top_logprobs] == pytest.approx(values.tolist(), abs=1e-4)
    done = client(url).completions.create(model=NAME, prompt="A list is", max_tokens=5, temperature=0, logprobs=2)
    lp = done.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5 and "".join(lp.tokens) == \
        done.choices[0].text and all(len(top) == 2 and max(top.values()) >= lp.token_logprobs[k] - 1e-6
                                     for k, top in enumerate(lp.top_logprobs))


def test_n_choices_each_seeded_and_batched_requests_match_alone(url, folder):
    c = client(url)
    ask = dict(model=NAME, messages=MESSAGES, max_tokens=10, temperature=1.0, seed=7, n=2,
               extra_body={"ignore_eos": True})  # exactly max_tokens each, whatever is sampled
    one, again = c.chat.completions.create(**ask), c.chat.completions.create(**ask)
    assert [ch.index for ch in one.choices] == [0, 1]
    assert [ch.message.content for ch in one.choices] == [ch.message.content for ch in again.choices]  # seeded
    assert one.choices[0].message.content != one.choices[1].message.content  # n samples, not one sample n times
    assert one.usage.completion_tokens == 20 and one.usage.prompt_tokens == len(reference(folder, max_new_tokens=1)[0])
    assert [ch.finish_reason for ch in one.choices] == ["length", "length"]
    streamed = list(c.chat.completions.create(**ask, stream=True))
    for k in (0, 1):
        mine = [ch.choices[0] for ch in streamed if ch.choices and ch.choices[0].index == k]
        assert mine[0].delta.role == "assistant" and mine[-1].finish_reason == "length"
        assert "".join(x.delta.content or "" for x in mine) == one.choices[k].message.content

    questions = [f"Question {k}: " + "why " * k for k in range(8)]  # 8 prompts of different lengths, concurrently
    alone = [reference(folder, [{"role": "user", "content": q}], 8 + k)[2] for k, q in enumerate(questions)]
    results = [None] * 8

    def ask_one(k):
        results[k] = c.chat.completions.create(model=NAME, messages=[{"role": "user", "content": questions[k]}],
                                               max_tokens=8 + k, temperature=0).choices[0].message.content
    threads = [threading.Thread(target=ask_one, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == alone


@pytest.mark.parametrize("path, body, param", [
    ("chat", {"messages": MESSAGES, "temperature": "hot"}, "temperature"),
    ("chat", {"messages": MESSAGES, "max_tokens": 0}, "max_tokens"),
    ("chat", {"messages": MESSAGES, "max_tokens": 1.5}, "max_tokens"),
    ("chat", {"messages": MESSAGES, "max_completion_tokens": 300}, "max_completion_tokens"),  # past the context
    ("chat", {"messages": MESSAGES, "n": 0}, "n"),
    ("chat", {"messages": MESSAGES, "top_p": 0}, "top_p"),
    ("chat", {"messages": MESSAGES, "temperature": -1}, "temperature"),
    ("chat", {"messages": MESSAGES, "stop": ["ok", ""]}, "stop"),
    ("chat", {"messages": MESSAGES, "stop": ["ok", 3]}, "stop[1]"),
    ("chat", {"messages": MESSAGES, "top_logprobs": 2}, "top_logprobs"),
    ("chat", {"messages": MESSAGES, "stream_options": {"include_usage": True}}, "stream_options"),
    ("chat", {"messages": MESSAGES, "presence_penalty": 1.0}, "presence_penalty"),
    ("chat", {"messages": []}, "messages"),
    ("chat", {"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
    ("chat", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages[0].content[0].type"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}] * 9}, "messages"),  # max_messages=8
    ("chat", {"messages": [{"role": "user", "content": "x" * 1001}]}, "messages"),  # max_chars=1000
    ("chat", {"messages": [{"role": "user", "content": "why " * 70}]}, "messages"),  # 280 tokens: past the context
    ("chat", {"model": "gpt-4", "messages": MESSAGES}, "model"),
    ("chat", [1, 2], None),
    ("completions", {"prompt": ""}, "prompt"),
    ("completions", {"prompt": [5, 10_000]}, "prompt"),
    ("completions", {"prompt": "hi", "logprobs": 50}, "logprobs"),
    ("completions", {"prompt": "hi", "echo": True}, "echo"),
])
def test_invalid_requests_get_an_openai_error_body(url, path, body, param):
    r = httpx.post(f"{url}/v1/{'chat/completions' if path == 'chat' else 'completions'}", json=body)
    assert r.status_code == (404 if param == "model" else 400), r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"] and error["type"] in ("invalid_request_error",
                                                                              "not_found_error")
    if param and param.split("[")[0] not in ("messages", "prompt"):
        assert param.split("[")[0] in error["message"]  # the message names the key


def test_bad_json_and_the_client_sees_400(url):
    r = httpx.post(url + "/v1/chat/completions", content=b'{"messages": [',
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="context"):
        client(url).chat.completions.create(model=NAME, messages=[{"role": "user", "content": "why " * 70}])
    assert httpx.get(url + "/nowhere").json()["error"]["type"] == "not_found_error"


def test_models_health_metrics_and_no_cors_by_default(url):
    models = client(url).models.list()
    assert [m.id for m in models.data] == [NAME]
    assert httpx.get(url + "/health").json() == {"status": "ok", "model": NAME}
    metrics = httpx.get(url + "/metrics").json()
    assert {"active", "queued", "tokens_per_s", "ttft_p50_s", "ttft_p95_s"} <= set(metrics)
    r = httpx.get(url + "/v1/models", headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in r.headers
    page = httpx.get(url + "/")  # the chat page, from the file beside serve.py
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html") and "<html" in page.text


# ----------------------------------------------------------------------------- servers of their own

def test_health_is_503_while_loading_then_200_and_the_api_key_is_required(folder):
    gate = threading.Event()
    with running(loader(folder, gate=gate), wait=False, api_key="sesame", cors="http://ok.example") as base:
        r = httpx.get(base + "/health")
        assert r.status_code == 503 and r.json() == {"status": "loading"}
        r = httpx.post(base + "/v1/completions", json={"prompt": "hi"}, headers={"Authorization": "Bearer sesame"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading"
        gate.set()
        deadline = time.time() + 30
        while httpx.get(base + "/health").status_code != 200:
            assert time.time() < deadline
            time.sleep(0.02)
        for key in ("none", "sesame2"):
            with pytest.raises(openai.AuthenticationError) as e:
                client(base, key).chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=2)
            assert e.value.body["code"] == "invalid_api_key"
        assert httpx.get(base + "/metrics").status_code == 401
        reply = client(base, "sesame").chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=2)
        assert reply.usage.completion_tokens == 2
        preflight = httpx.options(base + "/v1/chat/completions", headers={
            "Origin": "http://ok.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type"})
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "http://ok.example"
        other = httpx.get(base + "/health", headers={"Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in other.headers


def test_a_full_queue_is_429_and_a_closed_connection_frees_its_slot(endless):
    long = {"messages": MESSAGES, "max_tokens": 1900, "temperature": 0, "stream": True}
    with running(loader(endless, parallel=1, max_queue=1)) as base, httpx.Client(timeout=60) as http:
        def metrics():
            return http.get(base + "/metrics").json()

        with http.stream("POST", base + "/v1/chat/completions", json=long) as first:
            lines = first.iter_lines()
            assert next(lines).startswith("data: ")  # the role
            assert next(line for line in lines if line.startswith("data: "))  # a token: the slot is busy
            with http.stream("POST", base + "/v1/chat/completions", json=long) as second:
                assert second.status_code == 200
                deadline = time.time() + 10
                while metrics()["queued"] != 1:
                    assert time.time() < deadline
                    time.sleep(0.02)
                with pytest.raises(openai.RateLimitError) as e:
                    client(base).chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=2)
                assert e.value.status_code == 429 and e.value.body["code"] == "rate_limit_exceeded"
                assert metrics()["active"] == 1
        # both connections closed: the running reply and the queued one are cancelled, well before their 1900 tokens
        deadline = time.time() + 10
        while (m := metrics())["active"] or m["queued"]:
            assert time.time() < deadline, m
            time.sleep(0.02)
        assert m["tokens_generated"] < 1900
        reply = client(base).chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=3)
        assert reply.usage.completion_tokens == 3  # the slot serves the next request


def test_rag_answers_carry_their_sources(folder, tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "lists.txt").write_text("A list is a mutable sequence. Lists hold items in order.\n")
    (docs / "dicts.txt").write_text("A dict maps keys to values. Dicts are mappings.\n")
    index = str(tmp_path / "idx")
    _, tok = inference.load_model(folder)
    rag.build_index(index, str(docs), tok, {"chunk_tokens": 32, "overlap_tokens": 4, "text_field": "text",
                                            "txt_split": "file", "encoding": "utf-8"})
    with running(loader(folder, index=index)) as base:
        c = client(base)
        ask = dict(model=NAME, messages=[{"role": "user", "content": "What is a list?"}], max_tokens=4,
                   temperature=0)
        reply = c.chat.completions.create(**ask)
        sources = reply.model_extra["sources"]
        assert sources and sources[0]["source"].endswith("lists.txt") and "mutable sequence" in sources[0]["text"]
        plain_prompt = len(tok.encode(tok.apply_chat_template(ask["messages"])))
        assert reply.usage.prompt_tokens > plain_prompt + len("mutable sequence")  # the passage went in
        last = [ch for ch in c.chat.completions.create(**ask, stream=True) if ch.choices][-1]
        assert last.choices[0].finish_reason and last.model_extra["sources"] == sources


# ----------------------------------------------------------------------------- the command line

def test_command_line(folder, monkeypatch):
    defaults = {key: getattr(serve, key) for key in configurator.config_keys(vars(serve))}
    for key, value in defaults.items():  # main() sets serve's globals: put them back after
        monkeypatch.setattr(serve, key, value)
    for args, refusal in [([f"--ckpt={folder}/nope"], "checkpoint not found"), ([], "--ckpt=PATH is required"),
                          ([f"--ckpt={folder}", "--parallel=0"], "parallel=0 must be at least 1"),
                          ([f"--ckpt={folder}", "--rag=nowhere"], "not a rag.py index")]:
        monkeypatch.setattr(sys, "argv", ["serve.py", *args])
        vars(serve).update(defaults)
        with pytest.raises(SystemExit, match=refusal):
            serve.main()
    # as users run it: a free port named on its first lines, the key required, an answer, Ctrl-C's signal ends it
    cmd = [sys.executable, "serve.py", f"--ckpt={folder}", "--port=0", "--api_key=k", "--dtype=float32"]
    process = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        base = next(line for line in process.stdout if line.startswith("serving ")).split(" on ")[1].split()[0]
        assert base.startswith("http://127.0.0.1:")  # not every interface unless asked
        deadline = time.time() + 60
        while httpx.get(base + "/health").status_code != 200:
            assert time.time() < deadline and process.poll() is None
            time.sleep(0.05)
        assert httpx.get(base + "/v1/models").status_code == 401
        reply = client(base, "k").chat.completions.create(model=os.path.normpath(folder), messages=MESSAGES,
                                                          max_tokens=3)
        assert reply.usage.completion_tokens == 3
    finally:
        process.send_signal(signal.SIGINT)
        rest = process.communicate(timeout=30)[0]
    assert process.returncode == 0 and "Traceback" not in rest, rest
