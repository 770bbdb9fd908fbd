"""GPTQ (Frantar et al. 2022): 4- and 3-bit weight quantisation that spreads each column's rounding error over the
columns not yet quantised, weighted by the inverse Hessian of the layer's calibration inputs.

Used by quant_model.py (`--mode=gptq`); the codes it produces are quant.py's format (w = (c - 2^(bits-1)) *
scale + zero per group), so GPTQ and round-to-nearest checkpoints run on the same QuantLinear kernels. Blocks are
quantised in order, each on the outputs of the already-quantised blocks before it, and within a block the layers
that share an input (q/k/v; gate/up) share one Hessian (the reference code's "true-sequential").
"""
import math

import torch
import torch.nn as nn

import quant
from model import swap_modules

CALIB_BATCH = 8  # calibration windows per forward pass through a block


def gptq_inverse_hessian(H, damp_frac, act_order):
    """GPTQ's preparation of H = 2/n sum x x^T: returns (U, perm, dead) with U the upper Cholesky factor of H^-1 in
    processing order. Dead inputs (never non-zero) get H_ii = 1 and a zero weight; if H is not positive definite
    after dampening, the dampening grows tenfold (up to 3 times) before giving up."""
    H = H.clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    perm = torch.argsort(H.diagonal(), descending=True) if act_order else None
    if perm is not None:
        H = H[perm][:, perm]
    mean_diag = H.diagonal().mean()
    for attempt in range(4):
        Hd = H.clone()
        Hd.diagonal().add_(damp_frac * 10 ** attempt * mean_diag)
        L, info = torch.linalg.cholesky_ex(Hd)
        if info == 0:
            return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True), perm, dead
    raise RuntimeError(f"GPTQ: Hessian not positive definite even with damp={damp_frac * 1000}; "
                       "use more calibration data or a larger --damp")


def gptq_quantize(W, U, perm, dead, bits, group_size, block_size=128):
    """Quantise W (N, K) column by column, spreading each column's rounding error onto the columns not yet quantised
    through the inverse Hessian (Frantar et al. 2022, Alg. 1, with lazy batched updates). Returns (codes (N, K) in
    [0, 2^bits), scale (N, G), zero (N, G)). A group's scale/zero come from its weights as updated so far; with
    act-order they come from the original weights, so groups stay contiguous (AutoGPTQ's static_groups) and the
    checkpoint runs on the same kernels."""
    W = W.float().clone()
    W[:, dead] = 0
    N, K = W.shape
    G = math.ceil(K / group_size)
    mid, maxq = 2 ** (bits - 1), 2 ** bits - 1
    scale = torch.empty(N, G, dtype=torch.bfloat16, device=W.device)
    zero = torch.empty_like(scale)
    if perm is not None:
        scale, zero = quant.group_params(W, bits, group_size)
        W = W[:, perm]
        group_of = (perm // group_size).tolist()
    else:
        group_of = [c // group_size for c in range(K)]
        block_size = group_size * math.ceil(block_size / group_size)  # a group never straddles two blocks
    codes = torch.empty(N, K, dtype=torch.uint8, device=W.device)
    for i1 in range(0, K, block_size):
        i2 = min(i1 + block_size, K)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            col, gi = i1 + i, group_of[i1 + i]
            if perm is None and col % group_size == 0:
                s, z = quant.group_params(W1[:, i:i + group_size], bits, group_size)
                scale[:, gi], zero[:, gi] = s[:, 0], z[:, 0]
            s, z = scale[:, gi].float(), zero[:, gi].float()
            w = W1[:, i]
            c = (torch.round((w - z) / s) + mid).clamp(0, maxq)
            err = (w - ((c - mid) * s + z)) / U1[i, i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            Err1[:, i] = err
            codes[:, col] = c.to(torch.uint8)
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    return codes, scale, zero


class _StopForward(Exception):
    pass


def _shared_input_groups(block, captured):
    """The block's nn.Linear layers in execution order, grouped by identical input (q/k/v; gate/up): one Hessian
    serves a group, and groups are quantised in order (GPTQ's true-sequential)."""
    order = []  # (module, its input tensor): holding the tensors keeps their identities unique
    hooks = [m.register_forward_pre_hook(lambda mod, inp: order.append((mod, inp[0])))
             for m in block.modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        x, args, kwargs = captured[0]
        block(x[:1], *args, **kwargs)
    for h in hooks:
        h.remove()
    groups = []  # [(input tensor, [modules])]
    for mod, inp in order:
        if any(mod is m for _, g in groups for m in g):
            continue
        same = next((g for t, g in groups if t is inp), None)
        if same is not None:
            same.append(mod)
        else:
            groups.append((inp, [mod]))
    return [g for _, g in groups]


def block_inputs(model, tokens, batch_size):
    """[(x, args, kwargs)] that model.layers[0] receives for each batch of tokens: hidden states plus whatever else
    the model passes its blocks (rotary tables, masks), caught by a stand-in block that stops the forward there."""
    captured = []

    class Catcher(nn.Module):
        def __init__(self, block):
            super().__init__()
            self.block = block

        def forward(self, x, *args, **kwargs):
            captured.append((x, args, kwargs))
            raise _StopForward

    model.layers[0] = Catcher(model.layers[0])
    try:
        for batch in tokens.split(batch_size):
            try:
                model(batch.to(next(model.parameters()).device))
            except _StopForward:
                pass
    finally:
        model.layers[0] = model.layers[0].block
    return captured


def quantize_model(model, calib_tokens, bits=4, group_size=128, act_order=False, damp_frac=0.01, lm_head=False,
                   embed=False, progress=True):
    """GPTQ in place, on calibration windows calib_tokens (n, seq_len), of the blocks' linear layers (and lm_head
    if asked); returns the quantization_config. The embedding, if asked, is round-to-nearest (it has no input
    Hessian), and first, so that GPTQ calibrates on what the quantised model computes; a tied lm_head quantised
    with it shares its table."""
    bits = quant.check_settings("gptq", bits, group_size)
    if damp_frac < 0:
        raise ValueError(f"damp={damp_frac}: expected >= 0 (a fraction of the mean Hessian diagonal, e.g. 0.01)")
    if not torch.is_tensor(calib_tokens) or calib_tokens.dim() != 2 or calib_tokens.numel() == 0:
        raise ValueError("GPTQ needs calibration tokens: a non-empty (samples, seq_len) tensor")
    seq_len = calib_tokens.shape[1]
    if seq_len > model.config.max_seq_len:
        raise ValueError(f"calibration windows of {seq_len} tokens are longer than the model's context "
                         f"(max_seq_len {model.config.max_seq_len})")
    if int(calib_tokens.max()) >= model.config.vocab_size or int(calib_tokens.min()) < 0:
        raise ValueError(f"calibration token ids must be in [0, vocab_size {model.config.vocab_size})")
    shared = quant.quantize_embedding(model, bits, group_size, lm_head) if embed else False
    quantize_linears(model, calib_tokens, bits, group_size, act_order, damp_frac, lm_head and not shared, progress)
    return quant.quantization_config(model, "gptq", bits, group_size, act_order, lm_head, embed)


@torch.no_grad()
def quantize_linears(model, calib_tokens, bits, group_size, act_order, damp_frac, lm_head, progress):
    """GPTQ for every nn.Linear in model.layers (and lm_head if asked), block by block: the calibration inputs of
    block i are the outputs of the already-quantised blocks 0..i-1 (the paper's sequential scheme). Replaces the
    layers by QuantLinear in place."""
    from tqdm import tqdm
    names = {m: n for n, m in model.named_modules()}
    captured = block_inputs(model, calib_tokens, CALIB_BATCH)
    quantized = {}

    def quantize_group(group, H):
        U, perm, dead = gptq_inverse_hessian(H, damp_frac, act_order)
        for lin in group:
            codes, scale, zero = gptq_quantize(lin.weight, U, perm, dead, bits, group_size)
            q = quant.QuantLinear.from_codes(codes, scale, zero, bits, group_size, lin.bias)
            lin.weight.copy_(q.dequantize().to(lin.weight.dtype))  # later groups/blocks see the quantised layer
            quantized[names[lin]] = q

    def hessian(module, fn):
        """H = 2/n sum x x^T over the inputs `module` receives while fn(x, args, kwargs) runs on every captured
        batch; each run stops at the module (what follows it is not needed yet)."""
        state = {"H": None, "n": 0}

        def hook(mod, inp):
            x = inp[0].reshape(-1, inp[0].shape[-1]).float()
            if state["H"] is None:
                state["H"] = torch.zeros(x.shape[1], x.shape[1], device=x.device)
            state["H"] *= state["n"] / (state["n"] + x.shape[0])  # a running mean, as the GPTQ reference code
            state["n"] += x.shape[0]
            x = x * math.sqrt(2 / state["n"])
            state["H"] += x.T @ x
            raise _StopForward

        h = module.register_forward_pre_hook(hook)
        try:
            for x, args, kwargs in captured:
                try:
                    fn(x, args, kwargs)
                except _StopForward:
                    pass
        finally:
            h.remove()
        return state["H"]

    for block in tqdm(model.layers, desc=f"gptq int{bits} g{group_size}", disable=not progress):
        for group in _shared_input_groups(block, captured):
            H = hessian(group[0], lambda x, a, k: block(x, *a, **k))
            quantize_group(group, H)
        captured = [(block(x, *a, **k), a, k) for x, a, k in captured]
    if lm_head:
        head = model.lm_head
        if head.weight is model.embed.weight:
            head.weight = nn.Parameter(head.weight.detach().clone())  # untie: the embedding stays float
        quantize_group([head], hessian(head, lambda x, a, k: head(model.norm(x))))
    swap_modules(model, quantized)
