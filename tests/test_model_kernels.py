"""model_kernels.py and triton_kernels.py against the torch path of model.py: the chunked linear + cross-entropy on CPU,
and every Triton kernel (forward and each gradient) through triton's interpreter (TRITON_INTERPRET=1, fp32 and
fp16: the interpreter has no bf16; conftest.py sets it on a machine without CUDA) on odd shapes and non-contiguous inputs; then whole models trained both ways."""
import os

import pytest
import torch
import torch.nn.functional as F

import model_kernels
import model as model_lib
from model import ModelConfig, Transformer
from trainer import Trainer

FP32 = dict(atol=1e-5, rtol=1e-5)
FP16 = dict(atol=3e-3, rtol=3e-3)


def plain_loss(h, w, b, t):
    return F.cross_entropy(F.linear(h, w, b).float(), t, ignore_index=-100, reduction="none")


def grads_of(fn, tensors, upstream):
    for p in tensors:
        p.grad = None
    nll = fn()
    (nll * upstream).sum().backward()
    return [nll.detach()] + [p.grad.clone() for p in tensors]


# ------------------------------------------------------------------------------------ chunked loss, torch

@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("upstream", ["mean", "per_row"])
def test_chunked_linear_cross_entropy_equals_the_plain_loss(monkeypatch, bias, upstream):
    """Odd sizes (vocab 123, 301 rows over chunks of 7), a third of the targets -100 and a whole chunk of them;
    the mean's uniform upstream gradient and DPO's per-row one (which recomputes the weight's gradient)."""
    monkeypatch.setattr(model_kernels, "CHUNK_ELEMENTS", 7 * 123)
    torch.manual_seed(0)
    h = torch.randn(301, 16, requires_grad=True)
    w = torch.randn(123, 16, requires_grad=True)
    b = torch.randn(123, requires_grad=True) if bias else None
    t = torch.randint(0, 123, (301,))
    t[::3] = -100
    t[7:21] = -100
    up = torch.full((301,), 1 / 301) if upstream == "mean" else torch.rand(301)
    params = [p for p in (h, w, b) if p is not None]
    ours = grads_of(lambda: model_kernels.linear_cross_entropy(h, w, b, t), params, up)
    ref = grads_of(lambda: plain_loss(h, w, b, t), params, up)
    for a, r in zip(ours, ref):
        torch.testing.assert_close(a, r, **FP32)


@pytest.mark.parametrize("bias", [False, True])
def test_chunked_loss_without_gradients_computes_none(monkeypatch, bias):
    """Under no_grad (evaluation, DPO's reference pass) the loss is the plain one, chunk by chunk, and the forward
    that also computes the gradients never runs; with frozen inputs the same holds outside no_grad."""
    monkeypatch.setattr(model_kernels, "CHUNK_ELEMENTS", 7 * 123)
    monkeypatch.setattr(model_kernels._LinearCrossEntropy, "forward", staticmethod(lambda *a: 1 / 0))
    torch.manual_seed(0)
    h, w = torch.randn(301, 16), torch.randn(123, 16)
    b = torch.randn(123) if bias else None
    t = torch.randint(0, 123, (301,))
    t[::3] = -100
    torch.testing.assert_close(model_kernels.linear_cross_entropy(h, w, b, t), plain_loss(h, w, b, t), **FP32)
    with torch.no_grad():
        h.requires_grad_()
        torch.testing.assert_close(model_kernels.linear_cross_entropy(h, w, b, t), plain_loss(h, w, b, t), **FP32)
    with pytest.raises(ZeroDivisionError):  # and with a gradient to compute, it is the gradient path
        model_kernels.linear_cross_entropy(h, w, b, t)


def test_chunked_loss_under_bf16_autocast_and_all_targets_ignored():
    torch.manual_seed(0)
    h = torch.randn(2, 40, 32, requires_grad=True)
    w = torch.randn(123, 32, requires_grad=True)
    t = torch.randint(0, 123, (2, 40))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = grads_of(lambda: model_kernels.linear_cross_entropy(h, w, None, t), [h, w], 1.0)
        ref = grads_of(lambda: plain_loss(h.flatten(0, 1), w, None, t.flatten()).view(2, 40), [h, w], 1.0)
    for a, r in zip(ours, ref):
        torch.testing.assert_close(a, r, atol=2e-2, rtol=2e-2)
    nll = model_kernels.linear_cross_entropy(h, w, None, torch.full((2, 40), -100))
    nll.sum().backward()
    assert nll.abs().sum() == 0 and nll.shape == (2, 40)


def test_model_with_chunked_loss_gives_the_same_loss_and_gradients():
    """Through Transformer.forward (mean and per-token), tied embeddings (the weight gets gradient from both uses)."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=123, dim=32, n_layers=2, n_heads=4, n_kv_heads=2))
    x, y = torch.randint(0, 123, (3, 17)), torch.randint(0, 123, (3, 17))
    y[0, :9] = -100
    runs = []
    for chunked in (False, True):
        model_kernels.use_kernels(model, chunked_loss=chunked)
        model.zero_grad()
        logits, loss = model(x, y)
        loss.backward()
        assert (logits is None) == chunked
        runs.append([loss.detach(), model(x, y, reduction="none")[1].detach()]
                    + [p.grad.clone() for p in model.parameters()])
    for a, r in zip(*runs):
        torch.testing.assert_close(a, r, **FP32)


def test_use_kernels_refuses_what_it_cannot_do():
    model = Transformer(ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=4))
    with pytest.raises(ValueError, match="kernels='cuda'"):
        model_kernels.use_kernels(model, "cuda")
    model.lm_head = torch.nn.Sequential(model.lm_head)
    with pytest.raises(ValueError, match="plain nn.Linear"):
        model_kernels.use_kernels(model, chunked_loss=True)


# ------------------------------------------------------------------------------------ Triton, interpreted

@pytest.fixture(scope="module")
def tk():
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("TRITON_INTERPRET is set to something else and there is no CUDA")
    import triton_kernels
    return triton_kernels


DTYPES = [(torch.float32, FP32), (torch.float16, FP16)]


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("layer_norm", [False, True])
def test_triton_norms_match_torch(tk, dtype, tol, layer_norm):
    torch.manual_seed(0)
    for x in (torch.randn(123, 7).t(), torch.randn(2, 3, 123)):  # non-contiguous rows of 123; a 3-d batch
        x = x.to(dtype).requires_grad_()
        norm = torch.nn.LayerNorm(123) if layer_norm else model_lib.RMSNorm(123, 1e-5)
        with torch.no_grad():
            norm.weight.normal_()
            if layer_norm:
                norm.bias.normal_()
        norm.to(dtype)
        dy = torch.randn(x.shape, dtype=dtype)
        ref = grads_of(lambda: norm(x.float().to(dtype)), [x, *norm.parameters()], dy) if dtype == torch.float32 \
            else _fp32_reference(norm, x, dy)
        norm.__class__ = tk.TritonLayerNorm if layer_norm else tk.TritonRMSNorm
        ours = grads_of(lambda: norm(x), [x, *norm.parameters()], dy)
        for a, r in zip(ours, ref):
            torch.testing.assert_close(a.float(), r.float(), **(tol if dtype == torch.float32 else
                                                                dict(atol=2e-2, rtol=2e-2)))


def _fp32_reference(norm, x, dy):
    """The torch module run in fp32 on the same fp16 numbers (the kernels compute in fp32 too)."""
    import copy
    ref = copy.deepcopy(norm).float()
    xf = x.detach().float().requires_grad_()
    out = grads_of(lambda: ref(xf), [xf, *ref.parameters()], dy.float())
    return out


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("partial", [1.0, 0.4])
def test_triton_rope_matches_torch(tk, dtype, tol, partial):
    """Full and Phi's partial rotary; q as the model makes it (a transposed view); per-row positions as packed
    samples and the KV cache give them."""
    cfg = ModelConfig(dim=80, n_heads=4, n_kv_heads=2, n_layers=1, vocab_size=32, partial_rotary_factor=partial)
    torch.manual_seed(0)
    for positions in (torch.arange(13), torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4, 0, 1, 2, 3, 4], list(range(13))])):
        cos, sin = model_lib.rope_cos_sin(cfg, positions)
        cos, sin = (cos[None, None], sin[None, None]) if positions.dim() == 1 else (cos[:, None], sin[:, None])
        x = torch.randn(2, 13, 4, 20, dtype=dtype).transpose(1, 2).requires_grad_()
        dy = torch.randn(2, 4, 13, 20, dtype=dtype)
        ours = grads_of(lambda: tk.apply_rope(x, cos, sin), [x], dy)
        ref = grads_of(lambda: model_lib.apply_rope(x, cos, sin), [x], dy)
        for a, r in zip(ours, ref):
            torch.testing.assert_close(a, r, **tol)


@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_triton_silu_mul_matches_torch(tk, dtype, tol):
    torch.manual_seed(0)
    gate = (torch.randn(77, 5, dtype=dtype) * 4).t().requires_grad_()  # non-contiguous, large |gate|
    up = torch.randn(5, 77, dtype=dtype).requires_grad_()
    dy = torch.randn(5, 77, dtype=dtype)
    ours = grads_of(lambda: tk.silu_mul(gate, up), [gate, up], dy)
    ref = grads_of(lambda: (F.silu(gate.float()) * up.float()).to(dtype), [gate, up], dy)
    for a, r in zip(ours, ref):
        torch.testing.assert_close(a, r, **tol)


@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_triton_cross_entropy_rows_matches_torch(tk, dtype, tol):
    """Vocab 123 (not a power of two) and 5000 (several blocks of the online logsumexp); -100 rows."""
    torch.manual_seed(0)
    for vocab in (123, 5000):
        logits = torch.randn(9, vocab, dtype=dtype) * 3
        t = torch.randint(0, vocab, (9,))
        t[[2, 5]] = -100
        for a, r in zip(tk.cross_entropy_rows(logits.clone(), t), model_kernels.cross_entropy_rows(logits.clone(), t)):
            torch.testing.assert_close(a, r, **tol)


@pytest.mark.parametrize("family", ["llama", "phi"])
def test_training_with_triton_kernels_and_chunked_loss_ends_where_torch_does(tk, tmp_path, family):
    """The trainer's own loop, a few AdamW steps, fp32: kernels=triton + chunked_loss against kernels=torch."""
    shape = dict(vocab_size=123, dim=40, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16)
    if family == "phi":
        shape.update(norm="layernorm", mlp="gelu", parallel_block=True, attn_bias=True, mlp_bias=True,
                     lm_head_bias=True, tie_embeddings=False, partial_rotary_factor=0.4)
    data = torch.randint(0, 123, (8, 17), generator=torch.Generator().manual_seed(0))

    def batch(step, micro=0):
        rows = data[(2 * step) % 6:][:2]
        return rows[:, :-1], rows[:, 1:]

    runs = []
    for kind, chunked in (("torch", False), ("triton", True)):
        torch.manual_seed(0)
        model = Transformer(ModelConfig(**shape))
        trainer = Trainer(dict(out_dir=str(tmp_path / kind), max_iters=3, batch_size=2, eval_interval=3,
                               eval_iters=1, log_interval=1, warmup_iters=0, learning_rate=1e-2, dtype="float32",
                               device="cpu", kernels=kind, chunked_loss=chunked),
                          model, batch, batch)
        trainer.fit()
        runs.append((trainer.best_val_loss, {k: v.clone() for k, v in model.state_dict().items()}))
        if kind == "triton":
            assert any(isinstance(m, (tk.TritonRMSNorm, tk.TritonLayerNorm)) for m in model.modules())
    assert runs[1][0] == pytest.approx(runs[0][0], abs=1e-4)
    for k, v in runs[0][1].items():
        torch.testing.assert_close(runs[1][1][k], v, atol=1e-4, rtol=1e-4, msg=k)


def test_kernels_triton_on_cpu_without_the_interpreter_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    model = Transformer(ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=4))
    with pytest.raises(SystemExit, match="kernels=triton runs on CUDA"):
        Trainer(dict(out_dir=str(tmp_path), dtype="float32", device="cpu", kernels="triton"), model,
                lambda s, m=0: None, lambda s: None)


def test_missing_or_old_triton_is_a_clear_message(monkeypatch):
    import sys
    import types
    monkeypatch.setitem(sys.modules, "triton", None)  # import triton raises ImportError
    with pytest.raises(SystemExit, match="pip install triton"):
        model_kernels.import_triton_kernels()
    monkeypatch.setitem(sys.modules, "triton", types.SimpleNamespace(__version__="2.1.0"))
    with pytest.raises(SystemExit, match="triton >= 3.0, found 2.1.0"):
        model_kernels.import_triton_kernels()
