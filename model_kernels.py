"""The fused and chunked paths the model can run on, chosen by two trainer settings (trainer.TrainConfig):

    kernels=torch         model.py as written: the default, and the reference every test compares against
    kernels=triton        Triton kernels (triton_kernels.py) for RMSNorm, LayerNorm, rotary embedding and SwiGLU,
                          forward and backward; CUDA only (on CPU the tests run them with TRITON_INTERPRET=1)
    chunked_loss=True     the loss never holds the (tokens x vocab) logits: linear + cross-entropy one chunk of
                          rows at a time, gradients computed in the same pass (Liger-Kernel's fused linear
                          cross-entropy); with kernels=triton the softmax and its gradient are one Triton kernel

    use_kernels(model, kernels="triton", chunked_loss=True)    # swaps in place; the weights do not change

Only the target rows that carry a loss are projected to the vocabulary at all (the prompt of an SFT sample and the
padding are skipped), so the chunked loss also saves the lm_head work of masked tokens.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

import model as model_lib

# Rows per chunk: the chunk's logits (rows x vocab) in fp32 stay near 32 MB, whatever the vocabulary
CHUNK_ELEMENTS = 1 << 23


def use_kernels(model, kernels="torch", chunked_loss=False):
    """Put the named kernels into a model.Transformer (or any module holding its layers), in place, and set its loss
    to the chunked one or back to the plain one. kernels="torch" swaps no layer: it is model.py as built."""
    if kernels not in ("torch", "triton"):
        raise ValueError(f"kernels={kernels!r}: expected 'torch' or 'triton'")
    ce_rows = cross_entropy_rows
    if kernels == "triton":
        tk = import_triton_kernels()
        ce_rows = tk.cross_entropy_rows
        for module in model.modules():
            if type(module) is model_lib.RMSNorm:
                module.__class__ = tk.TritonRMSNorm
            elif type(module) is nn.LayerNorm:
                module.__class__ = tk.TritonLayerNorm
            elif type(module) is model_lib.SwiGLU:
                module.__class__ = tk.TritonSwiGLU
            elif type(module) is model_lib.Attention:
                module.rotate = tk.apply_rope
    for module in model.modules():
        if isinstance(module, model_lib.Transformer):
            if chunked_loss and type(module.lm_head) is not nn.Linear:
                raise ValueError(f"chunked_loss needs the lm_head to be a plain nn.Linear, not "
                                 f"{type(module.lm_head).__name__} (leave lm_head out of the LoRA targets / "
                                 f"quantisation, or set chunked_loss=False)")
            module.linear_cross_entropy = (
                (lambda h, head, targets, rows=ce_rows: linear_cross_entropy(h, head.weight, head.bias, targets, rows))
                if chunked_loss else None)
    return model


def import_triton_kernels():
    """triton_kernels, or a SystemExit that says what is missing (never an import error at start-up)."""
    try:
        import triton
    except ImportError:
        raise SystemExit("kernels=triton needs the triton package (pip install triton); kernels=torch runs without")
    major, minor = (int(v) for v in triton.__version__.split(".")[:2])
    if (major, minor) < (3, 0):
        raise SystemExit(f"kernels=triton needs triton >= 3.0, found {triton.__version__} (pip install -U triton)")
    import triton_kernels
    return triton_kernels


# ------------------------------------------------------------------------------------ linear + cross-entropy

def cross_entropy_rows(logits, targets):
    """The torch reference for one chunk: (nll fp32 (rows,), d nll / d logits in logits' dtype). Rows whose target
    is -100 get a loss of 0 and a zero gradient."""
    lf = logits.float()
    lse = lf.logsumexp(-1)
    valid = targets != -100
    tgt = targets.clamp(min=0)
    nll = (lse - lf.gather(1, tgt[:, None]).squeeze(1)) * valid
    grad = lf.sub_(lse[:, None]).exp_()  # softmax, in the fp32 copy's place
    grad[torch.arange(len(tgt), device=grad.device), tgt] -= 1
    grad *= valid[:, None]
    return nll, grad.to(logits.dtype)


def linear_cross_entropy(h, weight, bias, targets, ce_rows=cross_entropy_rows):
    """Per-token cross-entropy of (h @ weight.T + bias) against targets, shape targets.shape, fp32, 0 where the
    target is -100 — without ever holding all the logits. h: (..., dim); the matmuls run in the autocast dtype
    when autocast is on, as the plain lm_head would."""
    shape = targets.shape
    h, targets = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    device = h.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype
    h, weight = h.to(dtype), weight.to(dtype)
    bias = bias.to(dtype) if bias is not None else None
    rows = (targets != -100).nonzero().squeeze(1)
    # without gradients (evaluation, DPO's reference pass) the chunks' gradients would be computed for nothing
    trains = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (h, weight, bias))

    def loss(h, targets):
        return _LinearCrossEntropy.apply(h, weight, bias, targets, ce_rows) if trains else \
            _chunked_nll(h, weight, bias, targets)
    if len(rows) == len(targets):  # every token carries a loss: no gather
        return loss(h, targets).view(shape)
    nll = loss(h.index_select(0, rows), targets[rows])
    return torch.zeros(len(targets), dtype=nll.dtype, device=nll.device).index_put((rows,), nll).view(shape)


class _LinearCrossEntropy(torch.autograd.Function):
    """Forward computes each chunk's logits, loss and gradient at once and keeps only the gradients it needs:
    d nll_t / d h_t per row (the size of h), and, for a trained weight, sum_t d nll_t / d W — which is the
    gradient exactly when every row's upstream gradient is the same (a mean or a sum of the losses, as in
    training). Any other upstream gradient (DPO sums per answer) recomputes the chunks for the weight's gradient."""

    @staticmethod
    def forward(ctx, h, weight, bias, targets, ce_rows):
        n, chunk = h.shape[0], _chunk_rows(weight)
        nll = torch.empty(n, dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h)
        want_w = weight.requires_grad
        want_b = bias is not None and bias.requires_grad
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if want_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=h.device) if want_b else None
        with torch.autocast(h.device.type, enabled=False):
            for s in range(0, n, chunk):
                hc = h[s:s + chunk]
                nll[s:s + chunk], g = ce_rows(_logits(hc, weight, bias), targets[s:s + chunk])
                torch.mm(g, weight, out=grad_h[s:s + chunk])
                if want_w:
                    grad_w += (g.t() @ hc).float()
                if want_b:
                    grad_b += g.float().sum(0)
        ctx.ce_rows = ce_rows
        ctx.save_for_backward(h, weight, bias, targets, grad_h, grad_w, grad_b)
        return nll

    @staticmethod
    def backward(ctx, grad_nll):
        h, weight, bias, targets, grad_h, grad_w, grad_b = ctx.saved_tensors
        dh = (grad_h * grad_nll[:, None].to(grad_h.dtype)) if ctx.needs_input_grad[0] else None
        dw = db = None
        if grad_w is not None or grad_b is not None:
            if len(grad_nll) and bool(grad_nll.min() == grad_nll.max()):  # the same for all rows: scale
                scale = grad_nll[0]
                dw = (grad_w * scale).to(weight.dtype) if grad_w is not None else None
                db = (grad_b * scale).to(bias.dtype) if grad_b is not None else None
            else:
                dw, db = _weight_grads(h, weight, bias, targets, grad_nll, ctx.ce_rows)
                dw = dw.to(weight.dtype) if grad_w is not None else None
                db = db.to(bias.dtype) if grad_b is not None else None
        return dh, dw, db, None, None


def _chunked_nll(h, weight, bias, targets):
    """linear_cross_entropy's forward alone, chunk by chunk, for when nothing needs a gradient."""
    chunk = _chunk_rows(weight)
    nll = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
    with torch.autocast(h.device.type, enabled=False):
        for s in range(0, h.shape[0], chunk):
            logits = _logits(h[s:s + chunk], weight, bias).float()
            nll[s:s + chunk] = F.cross_entropy(logits, targets[s:s + chunk], ignore_index=-100, reduction="none")
    return nll


def _chunk_rows(weight):
    return max(1, CHUNK_ELEMENTS // weight.shape[0])


def _logits(hc, weight, bias):
    return torch.addmm(bias, hc, weight.t()) if bias is not None else hc @ weight.t()


def _weight_grads(h, weight, bias, targets, grad_nll, ce_rows):
    """sum_t grad_nll_t * d nll_t / d (W, b), recomputing the chunks' logits (fp32 sums)."""
    chunk = _chunk_rows(weight)
    dw = torch.zeros(weight.shape, dtype=torch.float32, device=h.device)
    db = torch.zeros(weight.shape[0], dtype=torch.float32, device=h.device)
    for s in range(0, h.shape[0], chunk):
        hc = h[s:s + chunk]
        _, g = ce_rows(_logits(hc, weight, bias), targets[s:s + chunk])
        g = g * grad_nll[s:s + chunk, None].to(g.dtype)
        dw += (g.t() @ hc).float()
        db += g.float().sum(0)
    return dw, db
