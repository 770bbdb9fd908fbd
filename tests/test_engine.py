"""engine.py: continuous batching over one static KV cache, checked against the model's own full forward (no cache)
and model.generate (the one-request-at-a-time path, itself tested against transformers in test_model.py)."""
import threading

import numpy as np
import pytest
import torch

import quant
from conftest import tiny_transformer
from engine import Engine, QueueFull, SamplingParams
from model import ModelConfig, Transformer

V = 60
PHI = dict(norm="layernorm", mlp="gelu", parallel_block=True, attn_bias=True, mlp_bias=True, lm_head_bias=True,
           tie_embeddings=False, partial_rotary_factor=0.5)


def prompts_and_lengths(n=8, seed=1):
    """n prompts of different lengths (one longer than a prefill chunk in the tests that chunk) and answer lengths."""
    g = torch.Generator().manual_seed(seed)
    prompt_lens, answer_lens = [3, 9, 17, 5, 30, 1, 12, 8][:n], [20, 5, 13, 30, 7, 25, 2, 16][:n]
    return [torch.randint(3, V, (k,), generator=g).tolist() for k in prompt_lens], answer_lens


def reference(model, prompt, n):
    return model.generate([prompt], n, temperature=0)[0, len(prompt):].tolist()


def greedy(n, **kw):
    return SamplingParams(max_new_tokens=n, temperature=0, **kw)


@pytest.fixture
def model():
    return tiny_transformer(V, max_seq_len=64)


def phi_model():
    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=V, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64, **PHI))
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(4)
    return m.eval()


def test_per_row_cache_slots_match_the_full_forward(model):
    """model.py's part: each row at its own positions (input_pos (B, T)), and prefilling one row of the batched cache
    (cache_rows) while the others keep theirs, give the logits of each sequence's own uncached forward."""
    a, b = torch.randint(0, V, (1, 12)), torch.randint(0, V, (1, 7))
    with torch.no_grad():
        full_a, full_b = model(a)[0][0], model(b)[0][0]
        model.setup_cache(3, 32)
        model(torch.randint(0, V, (1, 20)), input_pos=torch.arange(20)[None], cache_rows=slice(1, 2))  # stale row
        got_a = [model(a[:, :8], input_pos=torch.arange(8)[None], cache_rows=slice(1, 2))[0][0]]
        got_b = [model(b[:, :5], input_pos=torch.arange(5)[None], cache_rows=slice(2, 3))[0][0]]
        for t in range(8, 12):  # row 0 is idle, row 1 decodes a at t, row 2 decodes b two slots behind
            tb = t - 3
            idx = torch.tensor([[0], [a[0, t]], [b[0, min(tb, 6)]]])
            logits, _ = model(idx, input_pos=torch.tensor([[0], [t], [tb]]))
            got_a.append(logits[1])
            if tb <= 6:
                got_b.append(logits[2])
    assert (torch.cat(got_a) - full_a).abs().max() < 1e-4
    assert (torch.cat(got_b) - full_b).abs().max() < 1e-4


@pytest.mark.parametrize("make", [lambda: tiny_transformer(V, max_seq_len=64), phi_model], ids=["llama", "phi"])
def test_batched_greedy_equals_alone_and_generate(make):
    """8 concurrent requests of different prompt and answer lengths, through 8 slots, through 3 slots (queueing and
    slot reuse) with long prompts read in chunks of 4: each gives exactly the tokens it gives alone and that
    model.generate gives."""
    model = make()
    prompts, lengths = prompts_and_lengths()
    expected = [reference(model, p, n) for p, n in zip(prompts, lengths)]
    with Engine(model, parallel=1) as engine:
        alone = [engine.generate([p], greedy(n))[0].tokens for p, n in zip(prompts, lengths)]
    assert alone == expected
    for parallel, chunk in [(8, 512), (3, 4)]:
        with Engine(model, parallel=parallel, prefill_chunk=chunk) as engine:
            done = engine.generate(prompts, [greedy(n) for n in lengths])
        assert [r.tokens for r in done] == expected
        assert all(r.finish_reason == "length" for r in done)


def test_concurrent_submits_from_threads(model):
    """Requests submitted from 8 threads at once while others decode: the same tokens as alone."""
    prompts, lengths = prompts_and_lengths()
    expected = [reference(model, p, n) for p, n in zip(prompts, lengths)]
    results = [None] * len(prompts)
    with Engine(model, parallel=4) as engine:
        def client(i):
            results[i] = engine.submit(prompts[i], greedy(lengths[i]))
            results[i].wait()
        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert engine.stats()["requests_done"] == 8
        stats = engine.stats()
        assert stats["tokens_generated"] == sum(lengths) and stats["active"] == stats["queued"] == 0
        assert 0 < stats["ttft_p50_s"] <= stats["ttft_p95_s"] and stats["tokens_per_s"] > 0
    assert [r.tokens for r in results] == expected


def test_reused_slot_leaks_nothing(model):
    """One slot: a long request fills the cache row far, then shorter ones reuse it; each gives what it gives on a
    fresh model (the stale keys past its position, or of another prompt, are never seen)."""
    g = torch.Generator().manual_seed(3)
    first, second, third = (torch.randint(3, V, (k,), generator=g).tolist() for k in (40, 4, 4))
    fresh = tiny_transformer(V, max_seq_len=64)
    with Engine(model, parallel=1) as engine:
        for prompt, n in [(first, 20), (second, 30), (third, 10)]:
            assert engine.generate([prompt], greedy(n))[0].tokens == reference(fresh, prompt, n)


def test_stop_ids_logprobs_and_events(model):
    """A stop id ends a request with it as the last token ("stop"); on_event sees every token, then None once the
    request has ended; logprobs (0: the chosen one, k: the top k too) are the model's log-softmax, as its uncached
    forward gives them."""
    prompt = [5, 6, 7, 8]
    free = reference(model, prompt, 12)
    stop = free[5]
    events = []
    with Engine(model, parallel=2, stop_ids=[stop]) as engine:
        r = engine.submit(prompt, greedy(12, logprobs=3),
                          on_event=lambda req, *e: events.append((req.finish_reason, e)))
        assert r.wait(30)
        other = engine.generate([prompt], greedy(12, stop_ids=(free[1],), logprobs=0))[0]
    assert r.tokens == free[:free.index(stop) + 1] and r.finish_reason == "stop"
    assert other.tokens == free[:2] and other.finish_reason == "stop" and other.top_logprobs == []
    assert [e[0] for _, e in events] == r.tokens + [None] and events[-1][0] == "stop"
    assert all(reason is None for reason, _ in events[:-1])
    with torch.no_grad():
        logp = model(torch.tensor([prompt + r.tokens]))[0][0, len(prompt) - 1:-1].log_softmax(-1)
    want = logp.gather(1, torch.tensor(r.tokens)[:, None])[:, 0]
    assert torch.allclose(torch.tensor(r.logprobs), want, atol=1e-4)
    top = logp.topk(3)
    assert [[i for i, _ in t] for t in r.top_logprobs] == top.indices.tolist()
    assert torch.allclose(torch.tensor([[v for _, v in t] for t in r.top_logprobs]), top.values, atol=1e-4)
    assert [e[1] for _, e in events[:-1]] == r.logprobs and [e[2] for _, e in events[:-1]] == r.top_logprobs


def test_seeded_sampling_is_independent_of_the_batch(model):
    prompts, _ = prompts_and_lengths()
    params = SamplingParams(max_new_tokens=20, temperature=1.0, top_k=20, top_p=0.9, seed=7)
    with Engine(model, parallel=1) as engine:
        alone = engine.generate([prompts[2]], params)[0].tokens
    with Engine(model, parallel=4) as engine:
        others = [SamplingParams(max_new_tokens=15, temperature=1.0) for _ in prompts]
        done = engine.generate(prompts, others[:2] + [params] + others[3:])
        again = engine.generate([prompts[2]], SamplingParams(max_new_tokens=20, temperature=1.0, seed=8))[0].tokens
        top1 = engine.generate([prompts[2]], SamplingParams(max_new_tokens=20, temperature=1.0, top_k=1))[0].tokens
    assert done[2].tokens == alone and again != alone
    # the draws of model.generate with a generator of that seed (its sampler, one row)
    g = torch.Generator().manual_seed(7)
    sampled = model.generate([prompts[2]], 20, temperature=1.0, top_k=20, top_p=0.9, generator=g)
    assert alone == sampled[0, len(prompts[2]):].tolist()
    assert top1 == reference(model, prompts[2], 20)  # top_k=1 samples the argmax


def test_cancel_frees_the_slot(model):
    """One slot: a request cancelled from its own event stops after that token and the one queued behind it runs; a
    queued request cancelled before it got a slot ends with nothing, and on_event hears of it. (All are queued before
    the engine starts, so the order of events does not depend on thread timing.)"""
    prompt = [4, 5, 6]
    ended = []

    def cancel_at_two(req, token, *_):
        if token is not None and len(req.tokens) == 2:
            req.cancel()
    engine = Engine(model, parallel=1)
    long = engine.submit(prompt, greedy(50), on_event=cancel_at_two)
    queued = engine.submit(prompt, greedy(50), on_event=lambda req, token, *_: token is None and ended.append(req))
    queued.cancel()
    after = engine.submit(prompt, greedy(5))
    engine.start()
    assert after.wait(30) and long.wait(30) and queued.wait(30)
    engine.close()
    assert long.finish_reason == "cancelled" and long.tokens == reference(model, prompt, 2)
    assert queued.finish_reason == "cancelled" and queued.tokens == [] and ended == [queued]
    assert after.tokens == reference(model, prompt, 5) and after.finish_reason == "length"


def test_failing_callback_cancels_only_its_request(model):
    def broken(req, token, *_):
        raise RuntimeError("client went away")
    with Engine(model, parallel=2) as engine:
        bad = engine.submit([4, 5, 6], greedy(10), on_event=broken)
        good = engine.submit([4, 5, 6], greedy(10))
        assert bad.wait(30) and good.wait(30)
    assert bad.finish_reason == "cancelled" and isinstance(bad.error, RuntimeError) and len(bad.tokens) == 1
    assert good.tokens == reference(model, [4, 5, 6], 10)


def test_failing_forward_ends_its_requests_not_the_engine(model, monkeypatch):
    real, calls = model.hidden_states, []

    def fails_once(*args, **kw):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("out of memory")
        return real(*args, **kw)
    monkeypatch.setattr(model, "hidden_states", fails_once)
    with Engine(model, parallel=2) as engine:
        failed = engine.generate([[4, 5, 6]], greedy(5))[0]
        ok = engine.generate([[4, 5, 6]], greedy(5))[0]
    assert failed.finish_reason == "error" and "out of memory" in str(failed.error)
    assert ok.finish_reason == "length" and ok.tokens == reference(model, [4, 5, 6], 5)


def test_queue_bound_and_bad_requests(model):
    engine = Engine(model, parallel=2, max_queue=3, max_len=16)  # not started: nothing leaves the queue
    waiting = [engine.submit([1, 2], greedy(4)) for _ in range(3)]
    with pytest.raises(QueueFull, match="max_queue=3"):
        engine.submit([1, 2], greedy(4))
    for prompt, message in [(list(range(16)), "no room"), ([], "nothing to continue"), ([1, V], f"{V} is not a token"),
                            ("hello", "list of token ids"), ([1.5], "list of token ids")]:
        with pytest.raises(ValueError, match=message):
            engine.submit(prompt, greedy(4))
    for bad, key in [(dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"), (dict(max_new_tokens=0),
                     "max_new_tokens"), (dict(top_k=-2), "top_k"), (dict(logprobs=-1), "logprobs")]:
        with pytest.raises(ValueError, match=key):
            engine.submit([1, 2], SamplingParams(**bad))
    with pytest.raises(ValueError, match="parallel"):
        Engine(model, parallel=0)
    engine.start()
    assert all(r.wait(30) and len(r.tokens) == 4 for r in waiting)
    as_array = engine.generate([np.array([1, 2], dtype=np.int64)], greedy(3))[0]  # numpy ids, as RL code may pass
    assert as_array.tokens == reference(model, [1, 2], 3)
    # the answer is capped to the context: 14 prompt tokens leave room for 2 in max_len=16
    capped = engine.generate([list(range(14))], greedy(100))[0]
    assert capped.finish_reason == "length" and capped.tokens == reference(model, list(range(14)), 2)
    engine.close()
    assert engine.stats()["active"] == 0 and engine.stats()["requests_done"] == 5


def test_generate_waits_for_room_instead_of_failing(model):
    prompts, lengths = prompts_and_lengths()
    with Engine(model, parallel=2, max_queue=1) as engine:
        done = engine.generate(prompts, [greedy(n) for n in lengths])
    assert [r.tokens for r in done] == [reference(model, p, n) for p, n in zip(prompts, lengths)]


def test_close_cancels_what_is_left(model):
    engine = Engine(model, parallel=1)
    left = [engine.submit([1, 2, 3], greedy(10)) for _ in range(3)]
    engine.close()
    assert [r.finish_reason for r in left] == ["cancelled"] * 3
    with pytest.raises(RuntimeError, match="closed"):
        engine.submit([1, 2, 3], greedy(10))


def test_quantized_and_low_precision_models(model):
    """int8 layers (quant.py) and a bf16 model with the CPU's fp32 cache: batched greedy equals model.generate."""
    prompts, lengths = prompts_and_lengths(4)
    quant.quantize_model(model, "int8")
    bf16 = tiny_transformer(V, max_seq_len=64).to(torch.bfloat16)
    for m in (model, bf16):
        with Engine(m, parallel=4) as engine:
            done = engine.generate(prompts, [greedy(n) for n in lengths])
        assert [r.tokens for r in done] == [reference(m, p, n) for p, n in zip(prompts, lengths)]


def test_training_mode_and_weights_are_restored(model):
    """The engine decodes in eval mode with the packed CPU layout only while it has work: afterwards the model is
    back in its mode and its weights own their storage (RL trains and saves between rollouts)."""
    model.train()
    with Engine(model, parallel=2) as engine:
        engine.generate([[1, 2, 3]], greedy(4))
        assert model.training
        assert model.layers[0].attn.qkv is None
        assert model.layers[0].attn.q_proj.weight.untyped_storage().data_ptr() != \
            model.layers[0].attn.k_proj.weight.untyped_storage().data_ptr()
