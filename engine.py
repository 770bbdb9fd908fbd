"""Continuous batching: many generation requests at once over one model, from one engine thread.

    engine = Engine(model, parallel=4, stop_ids=tok.stop_ids).start()
    request = engine.submit(tok.encode(prompt), SamplingParams(max_new_tokens=64, temperature=0))
    request.wait()
    print(tok.decode(request.tokens))
    engine.generate([ids_a, ids_b], SamplingParams(temperature=0.8, seed=1))   # blocking: both, batched
    engine.close()

The model's static KV cache (Transformer.setup_cache(parallel, max_len)) has one row per slot, as llama.cpp's server
slots: a slot holds one request, which writes its own cache row at its own positions and attends only to what it
wrote there, so a request's greedy tokens are the same whether it runs alone or beside others (a reused row needs no
clearing: a request never sees the slots past its own position). Exactly the same in fp32; in bf16 a batch goes
through other matmul kernels than a lone row, whose rounding can part two greedy answers at a near-tie (SmolLM2-135M
on CPU: 5 of 8 answers, after 8 to 90 tokens), as in any batching server. Each engine step
1. ends cancelled requests and puts queued ones into free slots;
2. prefills: reads up to prefill_chunk prompt tokens, first come first served, into the rows of the slots still
   reading their prompts (a long prompt is read over several steps, so decoding slots wait at most one chunk); a slot
   that has read its whole prompt samples its first token from the prompt's last logits;
3. decodes: one forward of one token per row for every slot that has a token to feed, each at its own position.
A request ends after one of its stop ids ("stop"), at max_new_tokens or the end of the context ("length"), when
cancelled ("cancelled"), or when a forward failed ("error", with request.error; the engine goes on). Text
(detokenizing, stop strings) is the caller's business (serve.py): the engine deals in token ids. The engine owns
the model's KV cache while it has work: do not call model.generate meanwhile.
"""
import collections
import contextlib
import dataclasses
import numbers
import threading
import time

import torch

from model import cpu_decoding, sample

STATS_WINDOW_S = 10.0  # tokens_per_s counts the tokens of the last this many seconds
TTFT_WINDOW = 100  # ttft percentiles are over the last this many requests


@dataclasses.dataclass
class SamplingParams:
    max_new_tokens: int = 256  # capped to the room left in the context (then finish_reason "length")
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    seed: int | None = None  # a per-request generator: the same seed gives the same sample whatever else runs
    logprobs: int | None = None  # None: none recorded; 0: the chosen token's log-prob; k > 0: also the top k
    stop_ids: tuple = ()  # token ids that end the request ("stop"); () = the engine's default stop ids

    def check(self):
        """ValueError naming the setting that cannot work."""
        problems = [f"{key}={value!r} {need}" for key, value, bad, need in [
            ("max_new_tokens", self.max_new_tokens, not _is_int(self.max_new_tokens) or self.max_new_tokens < 1,
             "must be an integer >= 1"),
            ("temperature", self.temperature, not _is_number(self.temperature) or not self.temperature >= 0,
             "must be a number >= 0 (0 = greedy)"),
            ("top_k", self.top_k, not _is_int(self.top_k) or self.top_k < 0, "must be an integer >= 0 (0 = off)"),
            ("top_p", self.top_p, not _is_number(self.top_p) or not 0 < self.top_p <= 1,
             "must be a number in (0, 1] (1 = off)"),
            ("seed", self.seed, self.seed is not None and not _is_int(self.seed), "must be an integer or None"),
            ("logprobs", self.logprobs, self.logprobs is not None and (not _is_int(self.logprobs) or self.logprobs < 0),
             "must be None or an integer >= 0"),
            ("stop_ids", self.stop_ids, not all(_is_int(t) for t in self.stop_ids), "must be token ids")] if bad]
        if problems:
            raise ValueError("SamplingParams: " + "; ".join(problems))


def _is_int(x):
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)  # numpy's integers too


def _is_number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)


class QueueFull(Exception):
    """submit() while max_queue requests already wait for a slot."""


class Request:
    """One generation: its prompt, settings and, as the engine fills them in, its tokens and how it ended.
    logprobs are the model's own log-probabilities (before temperature, top_k and top_p), fp32."""

    def __init__(self, prompt_ids, params, on_event, max_new_tokens, stop_ids):
        self.prompt_ids, self.params, self.on_event = prompt_ids, params, on_event
        self.tokens, self.logprobs, self.top_logprobs = [], [], []
        self.finish_reason = None
        self.error = None  # the exception that ended it, when the engine or on_event failed
        self.submit_time = time.monotonic()
        self.first_token_time = self.end_time = None
        self.max_new_tokens, self.stop_ids = max_new_tokens, stop_ids
        self._cancelled = False
        self._done = threading.Event()
        self._read = 0  # prompt tokens written to the cache
        self._next = None  # the sampled token the next decode step feeds
        self._generator = None

    def cancel(self):
        """End it at the engine's next step, freeing its slot (thread-safe; nothing happens once it has ended)."""
        self._cancelled = True

    def wait(self, timeout=None):
        """Block until it has ended; False when timeout (seconds) passed first."""
        return self._done.wait(timeout)

    def __repr__(self):
        return (f"Request(prompt={len(self.prompt_ids)} tokens, generated={len(self.tokens)}, "
                f"finish_reason={self.finish_reason!r})")


class Engine:
    def __init__(self, model, parallel=4, max_queue=64, stop_ids=(), max_len=None, prefill_chunk=512):
        """model: a Transformer (any that inference.load_model returns). parallel: requests decoded together (KV
        cache rows); max_queue: requests that may wait for a slot before submit raises QueueFull; stop_ids: the
        default stop ids (the tokenizer's stop_ids); max_len: the context, prompt and answer together (default
        model.config.max_seq_len); prefill_chunk: most prompt tokens read per step, so that a long prompt does not
        hold the decoding requests up for longer."""
        for key, value, low in [("parallel", parallel, 1), ("max_queue", max_queue, 1),
                                ("prefill_chunk", prefill_chunk, 1), ("max_len", max_len, 2)]:
            if value is not None and (not _is_int(value) or value < low):
                raise ValueError(f"Engine: {key}={value!r} must be an integer >= {low}")
        self.model, self.parallel, self.max_queue, self.prefill_chunk = model, parallel, max_queue, prefill_chunk
        self.stop_ids = tuple(stop_ids)
        self.max_len = max_len or model.config.max_seq_len
        self.device = model.embed.weight.device
        self._slots = [None] * parallel
        self._queue = collections.deque()
        self._ended = []  # requests that ended, their waiters not yet woken (the engine thread's)
        self._cond = threading.Condition()
        self._thread = None
        self._closing = False
        self._requests_done = self._tokens_generated = 0
        self._recent_tokens = collections.deque()  # (time, tokens) per step, the last STATS_WINDOW_S
        self._recent_ttft = collections.deque(maxlen=TTFT_WINDOW)

    # ------------------------------------------------------------------ the API (any thread)

    def start(self):
        """Start the engine thread; returns self."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
            self._thread.start()
        return self

    def close(self):
        """Stop the engine thread; requests still queued or running end as "cancelled"."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
        self._end_all("cancelled")

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()

    def submit(self, prompt_ids, params=None, on_event=None):
        """Queue a request (thread-safe) and return it. on_event(request, token_id, logprob, top) is called from the
        engine thread after each new token (logprob None unless params.logprobs is set, top a list of (id, logprob)
        when params.logprobs > 0), and once more with token_id None when the request has ended. ValueError for a
        prompt that leaves no room for one token in max_len (or is no list of token ids); QueueFull when max_queue
        requests already wait."""
        request = self._request(prompt_ids, params, on_event)
        with self._cond:
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"{len(self._queue)} requests already wait for one of {self.parallel} slots "
                                f"(max_queue={self.max_queue})")
            self._enqueue(request)
        return request

    def generate(self, prompts, params=None):
        """Run every prompt (a list of token-id lists) through the engine and wait for all; params: one
        SamplingParams for all or one per prompt. Blocks for room when there are more prompts than max_queue.
        Returns the finished Requests in the prompts' order."""
        if self._thread is None or not self._thread.is_alive():
            raise RuntimeError("Engine.generate: the engine is not running (call start())")
        params = params if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"Engine.generate: {len(prompts)} prompts but {len(params)} SamplingParams")
        requests = [self._request(p, sp, None) for p, sp in zip(prompts, params)]  # all checked before any runs
        for request in requests:
            with self._cond:
                while len(self._queue) >= self.max_queue and not self._closing:
                    self._cond.wait()
                self._enqueue(request)
        for request in requests:
            request.wait()
        return requests

    def stats(self):
        """What GET /metrics shows: slots in use, requests waiting, totals, recent tokens/s and time to first
        token (p50/p95 over the last TTFT_WINDOW requests; None before any)."""
        with self._cond:
            now = time.monotonic()
            recent = [n for t, n in self._recent_tokens if now - t <= STATS_WINDOW_S]
            ttft = sorted(self._recent_ttft)
            return {"active": sum(s is not None for s in self._slots), "queued": len(self._queue),
                    "parallel": self.parallel, "requests_done": self._requests_done,
                    "tokens_generated": self._tokens_generated, "tokens_per_s": sum(recent) / STATS_WINDOW_S,
                    "ttft_p50_s": _percentile(ttft, 50), "ttft_p95_s": _percentile(ttft, 95)}

    def _request(self, prompt_ids, params, on_event):
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params: expected SamplingParams, got {type(params).__name__}")
        params.check()
        if hasattr(prompt_ids, "tolist"):  # a tensor or a numpy array
            prompt_ids = prompt_ids.tolist()
        if not isinstance(prompt_ids, (list, tuple)) or not all(_is_int(t) for t in prompt_ids):
            raise ValueError(f"prompt_ids: expected a list of token ids, got {type(prompt_ids).__name__}")
        prompt, vocab = [int(t) for t in prompt_ids], self.model.config.vocab_size
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt_ids: {bad[0]} is not a token id of this model (0..{vocab - 1})")
        room = self.max_len - len(prompt)
        if not prompt or room < 1:
            raise ValueError(f"the prompt has {len(prompt)} tokens and the context max_len={self.max_len}: "
                             f"{'no room for one token' if prompt else 'nothing to continue'}")
        stop = params.stop_ids or self.stop_ids
        request = Request(prompt, params, on_event, min(params.max_new_tokens, room), frozenset(stop))
        if params.seed is not None:
            request._generator = torch.Generator(self.device).manual_seed(params.seed)
        return request

    def _enqueue(self, request):  # under self._cond
        if self._closing:
            raise RuntimeError("the engine is closed")
        request.submit_time = time.monotonic()
        self._queue.append(request)
        self._cond.notify_all()

    # ------------------------------------------------------------------ the engine thread

    def _run(self):
        while True:
            with self._cond:
                while not (self._closing or self._queue):
                    self._cond.wait()  # idle: nothing runs, nothing waits
                if self._closing:
                    return
            try:
                with self._busy():
                    while not self._closing:
                        self._step()
                        with self._cond:
                            if not (self._queue or any(self._slots)):
                                break
                        self._release()
            except Exception as e:  # the cache could not be set up (out of memory): fail what waits, not the engine
                self._end_all("error", e)
            self._release()  # after _busy: whoever waited gets the model back as it was (RL trains next)

    @contextlib.contextmanager
    def _busy(self):
        """The model set up for decoding while there is work: eval mode, the cache's rows, and on CPU the packed
        weight layout (cpu_decoding); undone when the engine falls idle, so the model can be trained or saved in
        between (RL)."""
        model = self.model
        model.setup_cache(self.parallel, self.max_len)
        was_training = model.training
        model.eval()
        cpu = self.device.type == "cpu"
        try:
            # onednn: its layout of the weights, kept between busy spells, runs a batch of rows at ~1.4x one row's time
            with torch.inference_mode(), cpu_decoding(model, onednn=True) if cpu else contextlib.nullcontext():
                yield
        finally:
            model.train(was_training)

    def _step(self):
        """One engine step: admit, prefill, decode."""
        for slot, request in enumerate(self._slots):
            if request is not None and request._cancelled:
                self._finish(slot, "cancelled")
        with self._cond:
            cancelled = [r for r in self._queue if r._cancelled]
            for request in cancelled:
                self._queue.remove(request)
            for slot in range(self.parallel):
                if self._slots[slot] is None and self._queue:
                    self._slots[slot] = self._queue.popleft()
            self._cond.notify_all()  # generate() may be waiting for room in the queue
        for request in cancelled:
            self._end(request, "cancelled")
        if not any(self._slots):
            return
        tokens = 0
        try:
            tokens += self._prefill()
            tokens += self._decode()
        except Exception as e:  # a failing forward ends the requests it held, not the engine
            for slot, request in enumerate(self._slots):
                if request is not None:
                    request.error = e
                    self._finish(slot, "error")
        with self._cond:
            now = time.monotonic()
            self._recent_tokens.append((now, tokens))
            while self._recent_tokens and now - self._recent_tokens[0][0] > STATS_WINDOW_S:
                self._recent_tokens.popleft()

    def _prefill(self):
        """Read up to prefill_chunk prompt tokens into the rows of the slots still reading, oldest first; sample the
        first token of each slot whose prompt is complete. Returns the tokens sampled."""
        reading = sorted((r.submit_time, s) for s, r in enumerate(self._slots)
                         if r is not None and r._read < len(r.prompt_ids))
        budget, sampled = self.prefill_chunk, 0
        for _, slot in reading:
            if budget == 0:
                break
            request = self._slots[slot]
            start = request._read
            chunk = request.prompt_ids[start:start + budget]
            idx = torch.tensor([chunk], device=self.device)
            pos = torch.arange(start, start + len(chunk), device=self.device)[None]
            h = self.model.hidden_states(idx, pos, cache_rows=slice(slot, slot + 1))
            request._read += len(chunk)
            budget -= len(chunk)
            if request._read == len(request.prompt_ids):
                self._take(slot, self.model.lm_head(h[:, -1]).float()[0])
                sampled += 1
        return sampled

    def _decode(self):
        """One token for every slot that has one to feed: a forward of the cache rows from the first such slot to the
        last, each row at its own position. Rows in that range without a token (free, or still reading a prompt)
        compute a throwaway one at a slot their next write overwrites. Returns the tokens sampled."""
        decoding = [s for s, r in enumerate(self._slots) if r is not None and r._next is not None]
        if not decoding:
            return 0
        rows = range(decoding[0], decoding[-1] + 1)
        ids, pos = [0] * len(rows), [0] * len(rows)
        for i, slot in enumerate(rows):
            request = self._slots[slot]
            if request is None:
                continue
            if request._next is None:  # still reading: its next chunk overwrites this slot
                pos[i] = request._read
            else:
                ids[i], pos[i] = request._next, len(request.prompt_ids) + len(request.tokens) - 1
        idx = torch.tensor(ids, device=self.device)[:, None]
        input_pos = torch.tensor(pos, device=self.device)[:, None]
        # CPU decoding in bf16/fp16 of one or two rows: ATen's matrix-vector kernel beats oneDNN's (model.generate);
        # linears that run on cpu_decoding's oneDNN layouts are the same either way
        onednn = torch.backends.mkldnn.enabled
        if self.device.type == "cpu" and self.model.embed.weight.dtype != torch.float32 and len(rows) <= 2:
            torch.backends.mkldnn.enabled = False
        try:
            h = self.model.hidden_states(idx, input_pos, cache_rows=slice(rows.start, rows.stop))
            logits = self.model.lm_head(h[:, -1]).float()
        finally:
            torch.backends.mkldnn.enabled = onednn
        greedy = logits.argmax(-1).tolist()
        for slot in decoding:
            self._take(slot, logits[slot - rows.start], greedy[slot - rows.start])
        return len(decoding)

    def _take(self, slot, logits, greedy=None):
        """Choose slot's next token from its logits (V,), record it, tell on_event, and end the request when due."""
        request, p = self._slots[slot], self._slots[slot].params
        if p.temperature == 0:
            token = greedy if greedy is not None else int(logits.argmax())
        else:
            token = int(sample(logits[None], p.temperature, p.top_k, p.top_p, request._generator)[0])
        logprob, top = None, None
        if p.logprobs is not None:
            logp = logits.log_softmax(-1)
            logprob = float(logp[token])
            request.logprobs.append(logprob)
            if p.logprobs > 0:
                values, ids = logp.topk(min(p.logprobs, logp.numel()))
                top = list(zip(ids.tolist(), values.tolist()))
                request.top_logprobs.append(top)
        if request.first_token_time is None:
            request.first_token_time = time.monotonic()
            with self._cond:
                self._recent_ttft.append(request.first_token_time - request.submit_time)
        request.tokens.append(token)
        with self._cond:
            self._tokens_generated += 1
        self._notify(request, token, logprob, top)
        if token in request.stop_ids:
            self._finish(slot, "stop")
        elif len(request.tokens) >= request.max_new_tokens:
            self._finish(slot, "length")
        elif request._cancelled:
            self._finish(slot, "cancelled")
        else:
            request._next = token

    def _notify(self, request, *event):
        """on_event, if any; one that raises cancels its request (a client gone), never the engine."""
        if request.on_event is None:
            return
        try:
            request.on_event(request, *event)
        except Exception as e:
            request.error = request.error or e
            request._cancelled = True

    def _finish(self, slot, reason):
        request, self._slots[slot] = self._slots[slot], None
        self._end(request, reason)

    def _end(self, request, reason):
        if request.finish_reason is not None:
            return
        request.finish_reason, request.end_time = reason, time.monotonic()
        with self._cond:
            self._requests_done += 1
        self._notify(request, None, None, None)
        self._ended.append(request)

    def _release(self):
        """Wake those waiting on the requests that ended (wait(), generate())."""
        while self._ended:
            self._ended.pop()._done.set()

    def _end_all(self, reason, error=None):
        """End whatever waits or runs (close, or a failure outside any one step)."""
        with self._cond:
            left = list(self._queue) + [r for r in self._slots if r is not None]
            self._queue.clear()
            self._slots = [None] * self.parallel
        for request in left:
            request.error = request.error or error
            self._end(request, reason)
        self._release()


def _percentile(sorted_values, q):
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, round(q / 100 * (len(sorted_values) - 1)))]
