"""Serve a checkpoint over an OpenAI-compatible HTTP API (the `openai` client, curl, Open WebUI, LangChain) and a chat
page, with continuous batching: `parallel` requests decode together in engine.py's one thread.

    python serve.py --ckpt=out/run/sft/hf                          # http://127.0.0.1:8000: the chat page
    python serve.py --ckpt=model.gguf --parallel=8 --api_key=secret --port=8080
    python serve.py --ckpt=out/run/sft/hf --rag=out/run/rag        # chat answers from a rag.py index, with sources

Endpoints: GET / (the chat page), GET /health (503 while the model loads, then 200), GET /v1/models,
POST /v1/chat/completions and POST /v1/completions (streamed as server-sent events with "stream": true),
GET /metrics (active and queued requests, tokens/s, time to first token). The model loads after the socket is up.
Requests take OpenAI's max_tokens (or max_completion_tokens), temperature (0 = greedy), top_p, top_k, seed, stop
(text that could begin a stop string is held back, so it never leaks), n, logprobs/top_logprobs,
stream_options.include_usage, and ignore_eos (vLLM's: generate max_tokens tokens whatever the model says). A reply
without max_tokens may fill the context; with it, the prompt and max_tokens must fit the context (else 400, as
OpenAI). Bad requests get OpenAI's error body with status 400, a missing or wrong --api_key 401, a full queue 429.
A client that closes its connection cancels its requests at once. With --rag=INDEX the last user message is
answered from the rag_top_k passages BM25 finds for it (rag.py), listed in the response's "sources" (on the
streamed reply's final chunk); /v1/completions stays plain.
"""
import asyncio
import dataclasses
import hmac
import json
import os
import secrets
import socket
import sys
import threading
import time
import traceback
from contextlib import asynccontextmanager
from typing import Any, Literal

import torch
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

import configurator
import inference
from engine import Engine, QueueFull, SamplingParams
from rag import Index, rag_messages, retrieve
from tokenizer import ChatTemplateError

# ---------------------------------------------------------------------------------------------------- config
ckpt = ""             # any checkpoint inference.load_model reads (folder, .gguf, quantized folder, LoRA adapter)
lora_base = ""        # a LoRA adapter's base ("" = the one its adapter_config.json names)
device = ""           # "" = cuda when available, else cpu
dtype = "auto"        # auto: bfloat16 where the hardware runs it fast, else float32 (inference.resolve_dtype)
model_name = ""       # the model's id in /v1/models and responses ("" = the ckpt path)
# -- the server
host = "127.0.0.1"    # 0.0.0.0 answers other machines too: set api_key then
port = 8000           # 0 = any free port (the "serving ... on" line names it)
parallel = 4          # requests decoded together (slots of the engine's KV cache)
max_queue = 64        # requests that may wait for a slot; more are answered 429
api_key = ""          # clients must send "Authorization: Bearer <api_key>" ("" = anyone may ask)
cors = ""             # origins whose pages may call the API, comma-separated, or * ("" = none)
max_messages = 256    # a chat request's messages at most
max_chars = 100_000   # characters of a request's messages (or prompts) at most
# -- answers from documents
rag = ""              # a rag.py index folder: chat answers from its passages ("" = plain chat)
rag_top_k = 3         # passages per question
# -----------------------------------------------------------------------------------------------------------

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "chat_page.html")
MAX_LOGPROBS = 20  # OpenAI's top_logprobs bound


# ----------------------------------------------------------------------------- text out of tokens

class TextStream:
    """A reply's text as its tokens arrive. Decoded incrementally over a window of recent tokens (a tokenizer may
    change how a token reads by what precedes it), a character cut between tokens is held back until complete; the
    text is cut before the first stop string, and text that could begin one is held back until it cannot."""

    def __init__(self, tok, stops=(), stop_ids=()):
        self.tok, self.stops, self.stop_ids = tok, [s for s in stops if s], set(stop_ids)
        self.ids, self.prefix, self.read = [], 0, 0  # the window ids[prefix:read] is decoded into text already
        self.text, self.sent, self.stopped = "", 0, False

    def _decode(self, ids):
        return self.tok.decode(ids, skip_special=True)

    def add(self, token_id):
        """The text this token releases ("" while held back)."""
        if token_id not in self.stop_ids:
            self.ids.append(token_id)
            before, after = self._decode(self.ids[self.prefix:self.read]), self._decode(self.ids[self.prefix:])
            if len(after) > len(before) and not after.endswith("\ufffd"):
                self.text += after[len(before):]
                self.prefix, self.read = self.read, len(self.ids)
        return self._release(final=False)

    def finish(self):
        """The text still held back when the reply ends (a character cut short by the end reads as U+FFFD)."""
        self.text += self._decode(self.ids[self.prefix:])[len(self._decode(self.ids[self.prefix:self.read])):]
        self.prefix = self.read = len(self.ids)
        return self._release(final=True)

    def _release(self, final):
        if self.stopped:
            return ""
        pending = self.text[self.sent:]
        found = [i for i in (pending.find(s) for s in self.stops) if i >= 0]
        if found:
            self.stopped = True
            out = pending[:min(found)]
        else:
            hold = 0 if final else max([k for s in self.stops for k in range(1, min(len(s), len(pending) + 1))
                                        if pending.endswith(s[:k])], default=0)
            out = pending[:len(pending) - hold]
        self.sent += len(out)
        return out


# ----------------------------------------------------------------------------- errors

class ApiError(Exception):
    """An answer in OpenAI's error format: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status, message, param=None, code=None, kind="invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self):
        headers = {"Retry-After": "1"} if self.status == 429 else None
        return JSONResponse({"error": {"message": self.message, "type": self.kind, "param": self.param,
                                       "code": self.code}}, status_code=self.status, headers=headers)


def _field_path(loc):
    """messages[0].content[1].type out of pydantic's ("body", "messages", 0, "content", "list[TextPart]", 1, "type"):
    without the names of union branches."""
    path = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part.isidentifier() and part not in ("str", "int", "float", "bool", "none"):
            path += f".{part}" if path else part
    return path or None


# ----------------------------------------------------------------------------- requests

class Strict(BaseModel):
    # no "1" for 1 or true for 1; keys OpenAI has and we do not use (user, metadata, ...) are ignored
    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(Strict):
    type: Literal["text"]
    text: str


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None


class StreamOptions(Strict):
    include_usage: bool | None = None


class Sampling(Strict):
    """What both endpoints take (None: OpenAI's default)."""
    model: str | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    ignore_eos: bool | None = None
    # OpenAI's that would change the answer but are not done here: refused unless left at their neutral value
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None


class CompletionRequest(Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool | None = None
    suffix: str | None = None


def refuse_unsupported(body):
    for key, neutral in [("frequency_penalty", body.frequency_penalty in (None, 0)),
                         ("presence_penalty", body.presence_penalty in (None, 0)),
                         ("logit_bias", not body.logit_bias), ("tools", not body.tools),
                         ("response_format", body.response_format in (None, {"type": "text"})),
                         ("echo", not getattr(body, "echo", None)), ("suffix", not getattr(body, "suffix", None))]:
        if not neutral:
            raise ApiError(400, f"{key} is not supported by this server", key, "unsupported_parameter")


def check_range(key, value, ok, need):
    if value is not None and not ok:
        raise ApiError(400, f"{key}={value!r}: {need}", key, "invalid_value")


def sampling_params(body, context, prompt_len, logprobs):
    """SamplingParams of a request whose prompt has prompt_len tokens, after checking each setting."""
    max_new = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    key = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    check_range(key, max_new, max_new is None or max_new >= 1, "must be at least 1")
    check_range("temperature", body.temperature, body.temperature is None or 0 <= body.temperature <= 2,
                "must be in [0, 2] (0 = greedy)")
    check_range("top_p", body.top_p, body.top_p is None or 0 < body.top_p <= 1, "must be in (0, 1] (1 = off)")
    check_range("top_k", body.top_k, body.top_k is None or body.top_k >= 0, "must be >= 0 (0 = off)")
    check_range("seed", body.seed, body.seed is None or -2 ** 63 <= body.seed < 2 ** 63, "must fit in 64 bits")
    if prompt_len >= context:
        raise ApiError(400, f"the prompt has {prompt_len} tokens and the model's context is {context}: no room for "
                            f"a reply", "messages" if isinstance(body, ChatRequest) else "prompt",
                       "context_length_exceeded")
    if max_new is not None and prompt_len + max_new > context:
        raise ApiError(400, f"{key}={max_new} and the prompt's {prompt_len} tokens pass the model's context of "
                            f"{context}: ask for at most {context - prompt_len}", key, "context_length_exceeded")
    return SamplingParams(max_new_tokens=max_new or context - prompt_len,
                          temperature=1.0 if body.temperature is None else body.temperature,
                          top_k=body.top_k or 0, top_p=1.0 if body.top_p is None else body.top_p, seed=body.seed,
                          logprobs=logprobs, stop_ids=(-1,) if body.ignore_eos else ())  # -1: no id ends it


def stop_strings(body):
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > 16 or any(not s for s in stops):
        raise ApiError(400, f"stop: at most 16 strings, none empty (got {len(stops)})", "stop", "invalid_value")
    return stops


# ----------------------------------------------------------------------------- the app

@dataclasses.dataclass
class Loaded:
    """What the endpoints serve, once loaded."""
    engine: Any
    tok: Any
    index: Any = None  # a rag.Index, or None


def create_app(load, name, api_key="", cors="", max_messages=256, max_chars=100_000, rag_top_k=3, on_error=None):
    """The FastAPI app. load() -> Loaded runs in a thread at start-up, so that /health answers 503 meanwhile;
    should it fail, on_error(message) is called (main() stops the server with the message)."""
    state = {"loaded": None}

    def load_in_background():
        try:
            state["loaded"] = load()
        except BaseException as e:  # SystemExit from load_model names the file
            message = str(e) if isinstance(e, SystemExit) else traceback.format_exc()
            print(f"serve.py: loading failed: {message}", file=sys.stderr, flush=True)
            if on_error is not None:
                on_error(message)

    @asynccontextmanager
    async def lifespan(app):
        threading.Thread(target=load_in_background, name="load", daemon=True).start()
        yield
        if state["loaded"] is not None:  # (a load still under way is not waited for: Ctrl-C stops at once)
            state["loaded"].engine.close()

    app = FastAPI(title="tinyllm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    if cors:
        from fastapi.middleware.cors import CORSMiddleware
        app.add_middleware(CORSMiddleware, allow_origins=[o.strip() for o in cors.split(",") if o.strip()],
                           allow_methods=["GET", "POST"], allow_headers=["Authorization", "Content-Type"])

    @app.exception_handler(ApiError)
    async def api_error(request, e):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e):  # OpenAI's 400, not FastAPI's 422
        # the deepest problem: of a union's alternatives (a string, or a list of parts), the one that got furthest
        error = max(e.errors(), key=lambda err: len(err["loc"]), default={"loc": (), "msg": "invalid request"})
        if error.get("type") == "json_invalid":
            return ApiError(400, f"the body is not valid JSON: {error.get('ctx', {}).get('error', '')}").response()
        path = _field_path(error["loc"])
        return ApiError(400, f"{path or 'the body'}: {error['msg']}", path, "invalid_type").response()

    @app.exception_handler(HTTPException)
    async def http_error(request, e):
        return ApiError(e.status_code, str(e.detail), kind="not_found_error" if e.status_code == 404
                        else "invalid_request_error").response()

    @app.exception_handler(Exception)
    async def failed(request, e):  # a bug, or a request while the server stops: still OpenAI's body (traceback logged)
        return ApiError(500, f"internal error: {e!r}", kind="server_error").response()

    async def authorized(request: Request):
        if api_key:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                raise ApiError(401, "a valid API key is required: send the header 'Authorization: Bearer <key>'",
                               code="invalid_api_key")

    def ready():
        if state["loaded"] is None:
            raise ApiError(503, "the model is still loading: try again when GET /health answers 200",
                           code="model_loading", kind="server_error")
        return state["loaded"]

    def check_model(body):
        if body.model not in (None, name):
            raise ApiError(404, f"model {body.model!r} is not served here; this server serves {name!r} "
                                f"(GET /v1/models)", "model", "model_not_found", "not_found_error")

    @app.get("/", response_class=HTMLResponse)
    async def page():
        if not os.path.isfile(PAGE):
            raise ApiError(404, f"{PAGE} is missing: the chat page ships beside serve.py", kind="not_found_error")
        with open(PAGE, encoding="utf-8") as f:
            return f.read()

    @app.get("/health")
    async def health():
        if state["loaded"] is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        return {"status": "ok", "model": name}

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": int(time.time()),
                                            "owned_by": "tinyllm"}]}

    @app.get("/metrics", dependencies=[Depends(authorized)])
    async def metrics():
        return {"model": name, **ready().engine.stats()}

    def chat_prompt(loaded, body):
        """(prompt ids, sources) of a chat request: its messages by the tokenizer's chat template, with the
        passages of the rag index when there is one."""
        tok = loaded.tok
        if len(body.messages) > max_messages:
            raise ApiError(400, f"{len(body.messages)} messages; at most {max_messages}", "messages", "too_many")
        messages = []
        for k, m in enumerate(body.messages):
            text = m.content if isinstance(m.content, str) or m.content is None else "".join(p.text for p in m.content)
            if text is None and m.role != "assistant":
                raise ApiError(400, f"messages[{k}].content: required for role {m.role!r}", f"messages[{k}].content")
            messages.append({"role": "system" if m.role == "developer" else m.role, "content": text or ""})
        chars = sum(len(m["content"]) for m in messages)
        if chars > max_chars:
            raise ApiError(400, f"the messages have {chars} characters; at most {max_chars}", "messages", "too_long")
        sources = None
        if loaded.index is not None:
            if messages[-1]["role"] != "user":
                raise ApiError(400, "with --rag the last message must be the user's question", "messages")
            system = "\n".join(m["content"] for m in messages if m["role"] == "system")
            history = [m for m in messages[:-1] if m["role"] != "system"]
            question, context = messages[-1]["content"], loaded.engine.max_len
            max_new = body.max_completion_tokens or body.max_tokens or context // 2  # as chat.py: half the context
            if max_new >= context:
                raise ApiError(400, f"max_tokens={max_new} leaves no room for the question in the model's context of "
                                    f"{context}", "max_tokens", "context_length_exceeded")
            chunks = retrieve(loaded.index, None, tok, question, rag_top_k, 0)  # BM25 only: the model is the engine's
            try:
                messages, used = rag_messages(tok, question, chunks, max(context - max_new, 0), system, history)
            except ValueError as e:
                raise ApiError(400, f"the question is too long: {e}", "messages", "context_length_exceeded") from None
            messages = ([{"role": "system", "content": system}] if system else []) + messages
            sources = [{k: c[k] for k in ("source", "line", "start", "end", "text")} for c in used]
        try:  # as inference.render_chat, but a template's refusal is this request's 400, not the server's exit
            text = tok.apply_chat_template(messages, add_generation_prompt=True)
        except ChatTemplateError as e:  # e.g. a template that wants user and assistant turns to alternate
            raise ApiError(400, str(e), "messages", "chat_template_error") from None
        return tok.encode(text), sources

    def completion_prompts(loaded, body):
        prompts = body.prompt if isinstance(body.prompt, list) and body.prompt and not isinstance(body.prompt[0], int)\
            else [body.prompt]
        if not prompts:
            raise ApiError(400, "prompt: empty list", "prompt", "invalid_value")
        chars = sum(len(p) for p in prompts if isinstance(p, str))
        if chars > max_chars:
            raise ApiError(400, f"the prompts have {chars} characters; at most {max_chars}", "prompt", "too_long")
        vocab = loaded.tok.vocab_size
        ids = [loaded.tok.encode(p) if isinstance(p, str) else p for p in prompts]
        for k, p in enumerate(ids):
            if not p:
                raise ApiError(400, f"prompt {k} is empty", "prompt", "invalid_value")
            bad = [i for i in p if not 0 <= i < vocab]
            if bad:
                raise ApiError(400, f"prompt {k}: token id {bad[0]} is not in the vocabulary (0..{vocab - 1})",
                               "prompt", "invalid_value")
        return ids

    async def answer(request, body, chat):
        check_model(body)
        refuse_unsupported(body)
        loaded = ready()
        if chat:
            prompt_ids, sources = await run_in_threadpool(chat_prompt, loaded, body)
            prompts = [prompt_ids]
            check_range("top_logprobs", body.top_logprobs, 0 <= (body.top_logprobs or 0) <= MAX_LOGPROBS,
                        f"must be in 0..{MAX_LOGPROBS}")
            if body.top_logprobs and not body.logprobs:
                raise ApiError(400, "top_logprobs needs logprobs=true", "top_logprobs", "invalid_value")
            logprobs = (body.top_logprobs or 0) if body.logprobs else None
        else:
            prompts, sources = await run_in_threadpool(completion_prompts, loaded, body), None
            check_range("logprobs", body.logprobs, 0 <= (body.logprobs or 0) <= MAX_LOGPROBS,
                        f"must be in 0..{MAX_LOGPROBS}")
            logprobs = body.logprobs
        n = 1 if body.n is None else body.n
        check_range("n", n, 1 <= n and n * len(prompts) <= loaded.engine.max_queue,
                    f"must be at least 1, and n times the prompts at most the server's max_queue "
                    f"({loaded.engine.max_queue})")
        if body.stream_options is not None and not body.stream:
            raise ApiError(400, "stream_options needs stream=true", "stream_options", "invalid_value")
        stops = stop_strings(body)
        params = [sampling_params(body, loaded.engine.max_len, len(p), logprobs) for p in prompts]
        runs = [(p, dataclasses.replace(prm, seed=prm.seed + j) if j and prm.seed is not None else prm)  # n samples
                for p, prm in zip(prompts, params) for j in range(n)]
        reply = Reply(loaded, runs, stops, request)
        reply.submit()
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{secrets.token_hex(12)}",
                "object": "chat.completion" if chat else "text_completion", "created": int(time.time()), "model": name}
        prompt_tokens = sum(len(p) for p in prompts)  # each prompt once, however many choices it has (as OpenAI)

        def usage():
            return {"prompt_tokens": prompt_tokens, "completion_tokens": reply.completion_tokens,
                    "total_tokens": prompt_tokens + reply.completion_tokens}
        extra = {"sources": sources} if sources is not None else {}
        if not body.stream:
            async for _ in reply.events():
                pass
            failed = [r.error for r in reply.requests if r.finish_reason == "error"]
            if failed:
                raise ApiError(500, f"generation failed: {failed[0]!r}", kind="server_error")
            return {**head, "choices": [c.choice(chat, k) for k, c in enumerate(reply.choices)], "usage": usage(),
                    **extra}

        with_usage = bool(body.stream_options and body.stream_options.include_usage)
        chunk_head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}

        def sse(choices, **more):
            data = {**chunk_head, "choices": choices, **({"usage": None} if with_usage else {}), **more}
            return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

        async def stream():
            try:
                for k in range(len(runs) if chat else 0):  # each choice's first delta carries the role
                    yield sse([{"index": k, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                "finish_reason": None}])
                async for k, text, entries, finish in reply.events():
                    c = reply.choices[k]
                    if finish == "error":  # as OpenAI's streams report one, and the stream ends
                        message = f"generation failed: {reply.requests[k].error!r}"
                        yield f"data: {json.dumps({'error': {'message': message, 'type': 'server_error'}})}\n\n"
                        return
                    if text or entries:
                        piece = {"delta": {"content": text}} if chat else {"text": text}
                        yield sse([{"index": k, **piece, "logprobs": c.logprobs_of(entries, chat),
                                    "finish_reason": None}])
                    if finish:
                        piece = {"delta": {}} if chat else {"text": ""}
                        yield sse([{"index": k, **piece, "logprobs": None, "finish_reason": finish}], **extra)
                if with_usage:
                    yield sse([], usage=usage())
                yield "data: [DONE]\n\n"
            finally:
                reply.cancel()

        return CancellingStream(stream(), reply, media_type="text/event-stream",
                                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat_completions(body: ChatRequest, request: Request):
        return await answer(request, body, chat=True)

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def completions(body: CompletionRequest, request: Request):
        return await answer(request, body, chat=False)

    return app


class CancellingStream(StreamingResponse):
    """A stream whose engine requests are cancelled however it ends (starlette stops iterating a stream whose client
    has gone, which need not reach the generator's own finally for a while)."""

    def __init__(self, content, reply, **kwargs):
        super().__init__(content, **kwargs)
        self.reply = reply

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.reply.cancel()


class ChoiceState:
    """One engine request of a reply: its text, token count and log-probs as they arrive."""

    def __init__(self, tok, stops, stop_ids):
        self.tok, self.stop_ids = tok, set(stop_ids)
        self.stream = TextStream(tok, stops, stop_ids)
        self.text, self.tokens, self.entries, self.pending = "", 0, [], []
        self.finish_reason = None

    def token_entry(self, token_id, logprob, top):
        """(token text, log-prob, [(text, log-prob)] of the top ones, offset of its text in the reply)."""
        word = self.tok.decode([token_id])  # a special token by its name, as OpenAI shows <|endoftext|>
        return word, logprob, [(self.tok.decode([i]), lp) for i, lp in top or []], len(self.text)

    def logprobs_of(self, entries, chat):
        """entries in the endpoint's format: chat's {"content": [...]}, or completions' four lists; None when none."""
        if not entries:
            return None
        if chat:
            def item(word, lp):
                return {"token": word, "logprob": lp, "bytes": list(word.encode())}
            return {"content": [{**item(w, lp), "top_logprobs": [item(tw, tlp) for tw, tlp in top]}
                                for w, lp, top, _ in entries]}
        return {"tokens": [w for w, *_ in entries], "token_logprobs": [lp for _, lp, _, _ in entries],
                "top_logprobs": [{tw: tlp for tw, tlp in top} for _, _, top, _ in entries],
                "text_offset": [offset for *_, offset in entries]}

    def choice(self, chat, index=None):
        logprobs = self.logprobs_of(self.entries, chat)
        if chat:
            return {"index": index, "message": {"role": "assistant", "content": self.text}, "logprobs": logprobs,
                    "finish_reason": self.finish_reason}
        return {"index": index, "text": self.text, "logprobs": logprobs, "finish_reason": self.finish_reason}


class Reply:
    """The engine requests of one HTTP request (n per prompt), their events brought from the engine thread to the
    event loop, and a watch on the connection: a client that goes away cancels them."""

    def __init__(self, loaded, runs, stops, request):
        self.loaded, self.runs, self.request = loaded, runs, request
        stop_ids = loaded.engine.stop_ids
        self.choices = [ChoiceState(loaded.tok, stops, prm.stop_ids if prm.stop_ids else stop_ids)
                        for _, prm in runs]
        self.requests = []
        self.completion_tokens = 0

    def cancel(self):
        for r in self.requests:
            r.cancel()

    def submit(self):
        """Queue the engine requests (all or none: a full queue is a 429). In the event loop's thread."""
        loop, self.queue = asyncio.get_running_loop(), asyncio.Queue()

        def on_event(k, request, token_id, logprob, top):  # in the engine's thread
            loop.call_soon_threadsafe(self.queue.put_nowait, (k, token_id, logprob, top, request.finish_reason))

        try:
            for k, (prompt, params) in enumerate(self.runs):
                self.requests.append(self.loaded.engine.submit(prompt, params, lambda *a, k=k: on_event(k, *a)))
        except QueueFull:
            self.cancel()
            raise ApiError(429, f"the server is busy: {self.loaded.engine.max_queue} requests already wait for a "
                                f"slot; try again shortly", code="rate_limit_exceeded", kind="rate_limit_error")

    async def events(self):
        """(choice index, text released, its log-prob entries, finish reason or None) as tokens arrive."""
        watch = asyncio.create_task(self._until_disconnected())
        try:
            running = set(range(len(self.runs)))
            while running:
                k, token_id, logprob, top, reason = await self.queue.get()
                if k not in running:
                    continue  # after a stop string: what the engine made before it saw the cancel
                c = self.choices[k]
                if token_id is None:
                    text, entries, c.finish_reason = c.stream.finish(), c.pending, reason
                    c.pending = []
                else:
                    c.tokens += 1
                    self.completion_tokens += 1
                    if logprob is not None and token_id not in c.stop_ids:
                        c.pending.append(c.token_entry(token_id, logprob, top))
                    text, entries = c.stream.add(token_id), []
                    if text:
                        entries, c.pending = c.pending, []
                    if c.stream.stopped:  # a stop string: the engine may stop too
                        self.requests[k].cancel()
                        c.finish_reason, c.pending = "stop", []
                c.text += text
                c.entries += entries
                if c.finish_reason is not None:
                    running.discard(k)
                yield k, text, entries, c.finish_reason
        finally:
            watch.cancel()
            self.cancel()

    async def _until_disconnected(self):
        """Cancels the requests when the client closes the connection (the body is read: the next message is the
        disconnect)."""
        while (await self.request.receive())["type"] != "http.disconnect":
            pass
        self.cancel()


# ----------------------------------------------------------------------------- the command line

def listen(host, port):
    """A listening socket on host:port (port 0: a free one), or a one-line exit saying why not."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)  # connections wait from now on, rather than being refused until uvicorn is up
    except OSError as e:
        raise SystemExit(f"cannot listen on host={host!r} port={port}: {e.strerror or e}") from None
    return sock


def main():
    configurator.apply(globals(), sys.argv[1:])
    if not ckpt:
        raise SystemExit("--ckpt=PATH is required")
    if not os.path.exists(ckpt):
        raise SystemExit(f"checkpoint not found: {ckpt!r}")
    if rag and not os.path.isfile(os.path.join(rag, "index.json")):
        raise SystemExit(f"--rag={rag}: not a rag.py index (no index.json): build one with python rag.py index")
    problems = [f"{key}={value} must be at least {least}" for key, value, least in [
        ("parallel", parallel, 1), ("max_queue", max_queue, 1), ("max_messages", max_messages, 1),
        ("max_chars", max_chars, 1), ("rag_top_k", rag_top_k, 1), ("port", port, 0)] if value < least]
    if problems or port > 65535:
        raise SystemExit("; ".join(problems or [f"port={port} must be at most 65535"]))
    sock = listen(host, port)  # before loading anything: a port in use is said at once
    import uvicorn
    name = model_name or os.path.normpath(ckpt)
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    run_dtype, why = inference.resolve_dtype(dtype, dev)
    print(f"dtype={run_dtype} ({why})")

    def load():
        model, tok = inference.load_model(ckpt, dev, run_dtype, lora_base or None)
        index = Index.open(rag, tok) if rag else None
        engine = Engine(model, parallel=parallel, max_queue=max_queue, stop_ids=tok.stop_ids).start()
        print(f"ready: {name} ({model.config.max_seq_len} tokens of context, {parallel} at a time)", flush=True)
        return Loaded(engine, tok, index)

    failed = []

    def on_error(message):
        failed.append(message)
        server.should_exit = True

    app = create_app(load, name, api_key, cors, max_messages, max_chars, rag_top_k, on_error)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=3))
    where = f"[{host}]" if ":" in host else host
    print(f"serving {name} on http://{where}:{sock.getsockname()[1]} (loading the model; GET /health answers 200 "
          f"when ready)", flush=True)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn shuts down gracefully on Ctrl-C, then raises the signal again
        pass
    if failed:
        raise SystemExit(failed[0])


if __name__ == "__main__":
    main()
