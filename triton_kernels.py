"""Triton kernels, forward and backward, for what model.py leaves to several PyTorch ops: RMSNorm, LayerNorm (Phi),
the rotary embedding of q and k, SwiGLU's silu(gate) * up, and the softmax + gradient of a cross-entropy chunk
(model_kernels.linear_cross_entropy does the matmuls around it). Imported only by model_kernels.use_kernels(kernels="triton").

Each kernel reads and writes its inputs' dtype and computes in fp32, as the torch path does. On CPU they run under
TRITON_INTERPRET=1 (tests/test_model_kernels.py); for training they need CUDA.
"""
import torch
import torch.nn as nn
import triton
import triton.language as tl

import model as model_lib


def _rows(x):
    """x as (rows, last dim) with a contiguous last dim, and the block that holds one row."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return x2, triton.next_power_of_2(x2.shape[-1])


# ----------------------------------------------------------------------------------------- RMSNorm, LayerNorm

@triton.jit
def _norm_fwd(X, W, B, Y, MEAN, RSTD, stride_x, stride_y, n_cols, eps,
              HAS_BIAS: tl.constexpr, CENTER: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if CENTER:
        mean = tl.sum(x, axis=0) / n_cols
    else:
        mean = 0.0
    xc = tl.where(mask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / n_cols + eps)
    y = xc * rstd * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)


@triton.jit
def _norm_bwd(X, W, DY, DX, DW, DB, MEAN, RSTD, stride_x, stride_dy, stride_dx, n_rows, n_cols, rows_per_program,
              HAS_BIAS: tl.constexpr, CENTER: tl.constexpr, BLOCK: tl.constexpr):
    """dx for a block of rows, and that block's partial sums of dw (and db), summed over blocks afterwards."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK,), dtype=tl.float32)
    db = tl.zeros((BLOCK,), dtype=tl.float32)
    for row in range(pid * rows_per_program, tl.minimum((pid + 1) * rows_per_program, n_rows)):
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        xhat = tl.where(mask, (x - tl.load(MEAN + row)) * rstd, 0.0)
        wdy = w * dy
        # d/dx of (x - mean) * rstd: project out the mean (LayerNorm only) and the xhat direction
        c = tl.sum(xhat * wdy, axis=0) / n_cols
        dx = wdy - xhat * c
        if CENTER:
            dx -= tl.sum(wdy, axis=0) / n_cols
        tl.store(DX + row * stride_dx + cols, (dx * rstd).to(DX.dtype.element_ty), mask=mask)
        dw += dy * xhat
        if HAS_BIAS:
            db += dy
    tl.store(DW + pid * n_cols + cols, dw, mask=mask)
    if HAS_BIAS:
        tl.store(DB + pid * n_cols + cols, db, mask=mask)


class _Norm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, center):
        x2, block = _rows(x)
        y = torch.empty_like(x2)
        mean = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
        rstd = torch.empty_like(mean)
        _norm_fwd[(x2.shape[0],)](x2, weight, bias if bias is not None else weight, y, mean, rstd, x2.stride(0),
                                  y.stride(0), x2.shape[1], eps, HAS_BIAS=bias is not None, CENTER=center,
                                  BLOCK=block)
        ctx.save_for_backward(x2, weight, bias, mean, rstd)
        ctx.center, ctx.shape = center, x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, bias, mean, rstd = ctx.saved_tensors
        dy2, block = _rows(dy)
        n_rows, n_cols = x2.shape
        programs = min(n_rows, 256) or 1
        per_program = triton.cdiv(n_rows, programs)
        dx = torch.empty_like(x2)
        dw = torch.zeros(programs, n_cols, dtype=torch.float32, device=x2.device)
        db = torch.zeros_like(dw) if bias is not None else dw
        _norm_bwd[(programs,)](x2, weight, dy2, dx, dw, db, mean, rstd, x2.stride(0), dy2.stride(0), dx.stride(0),
                               n_rows, n_cols, per_program, HAS_BIAS=bias is not None, CENTER=ctx.center,
                               BLOCK=block)
        return (dx.view(ctx.shape), dw.sum(0).to(weight.dtype),
                db.sum(0).to(bias.dtype) if bias is not None else None, None, None)


class TritonRMSNorm(model_lib.RMSNorm):
    def forward(self, x):
        return _Norm.apply(x, self.weight, None, self.eps, False)


class TritonLayerNorm(nn.LayerNorm):
    def forward(self, x):
        return _Norm.apply(x, self.weight, self.bias, self.eps, True)


# --------------------------------------------------------------------------------------------------- rotary

@triton.jit
def _rope(X, COS, SIN, Y, n_heads, seq_len, sx_b, sx_h, sx_t, sc_b, sc_t, head_dim, rotary_dim,
          BACKWARD: tl.constexpr, BLOCK: tl.constexpr):
    """One (batch, head, position) row: y = x * cos + partner(x) * sin on the first rotary_dim features, where
    partner(i) = (i + rotary_dim / 2) % rotary_dim and sin carries the rotate-half sign (model.rope_cos_sin). The
    map is y = R x with R's transpose swapping which index reads sin: dx = dy * cos + partner(dy * sin)."""
    pid = tl.program_id(0)
    t = pid % seq_len
    h = (pid // seq_len) % n_heads
    b = pid // (seq_len * n_heads)
    cols = tl.arange(0, BLOCK)
    partner = (cols + rotary_dim // 2) % rotary_dim
    rot = cols < rotary_dim
    x_base = X + b * sx_b + h * sx_h + t * sx_t
    c_base = b * sc_b + t * sc_t
    x = tl.load(x_base + cols, mask=cols < head_dim, other=0.0).to(tl.float32)
    xp = tl.load(x_base + partner, mask=rot, other=0.0).to(tl.float32)
    cos = tl.load(COS + c_base + cols, mask=rot, other=1.0)
    if BACKWARD:
        sin_p = tl.load(SIN + c_base + partner, mask=rot, other=0.0)
        y = x * cos + xp * sin_p
    else:
        sin = tl.load(SIN + c_base + cols, mask=rot, other=0.0)
        y = x * cos + xp * sin
    out = Y + ((b * n_heads + h) * seq_len + t) * head_dim
    tl.store(out + cols, y.to(Y.dtype.element_ty), mask=cols < head_dim)


def _launch_rope(x, cos, sin, backward):
    if x.stride(-1) != 1:
        x = x.contiguous()
    B, H, T, D = x.shape
    cos, sin = cos.float().expand(-1, 1, T, -1), sin.float().expand(-1, 1, T, -1)
    cos, sin = cos.contiguous(), sin.contiguous()
    y = torch.empty(B, H, T, D, dtype=x.dtype, device=x.device)
    sc_b = cos.stride(0) if cos.shape[0] > 1 else 0
    _rope[(B * H * T,)](x, cos, sin, y, H, T, x.stride(0), x.stride(1), x.stride(2), sc_b, cos.stride(2), D,
                        cos.shape[-1], BACKWARD=backward, BLOCK=triton.next_power_of_2(D))
    return y


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _launch_rope(x, cos, sin, backward=False)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return _launch_rope(dy, cos, sin, backward=True), None, None


def apply_rope(x, cos, sin):
    """model.apply_rope as one kernel: x (B, H, T, head_dim), cos/sin (B or 1, 1, T, rotary_dim)."""
    return _Rope.apply(x, cos, sin)


# --------------------------------------------------------------------------------------------------- SwiGLU

@triton.jit
def _silu_mul_fwd(G, U, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + offs, (g * tl.sigmoid(g) * u).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _silu_mul_bwd(G, U, DY, DG, DU, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    tl.store(DU + offs, (dy * g * s).to(DU.dtype.element_ty), mask=mask)
    tl.store(DG + offs, (dy * u * s * (1 + g * (1 - s))).to(DG.dtype.element_ty), mask=mask)


class _SiluMul(torch.autograd.Function):
    BLOCK = 1024

    @staticmethod
    def forward(ctx, gate, up):
        gate, up = gate.contiguous(), up.contiguous()
        y = torch.empty_like(gate)
        _silu_mul_fwd[(triton.cdiv(gate.numel(), _SiluMul.BLOCK),)](gate, up, y, gate.numel(), BLOCK=_SiluMul.BLOCK)
        ctx.save_for_backward(gate, up)
        return y

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        dy = dy.contiguous()
        dg, du = torch.empty_like(gate), torch.empty_like(up)
        _silu_mul_bwd[(triton.cdiv(gate.numel(), _SiluMul.BLOCK),)](gate, up, dy, dg, du, gate.numel(),
                                                                     BLOCK=_SiluMul.BLOCK)
        return dg, du


def silu_mul(gate, up):
    """silu(gate) * up, fused (both of one dtype, as the projections give them)."""
    return _SiluMul.apply(gate, up)


class TritonSwiGLU(model_lib.SwiGLU):
    def forward(self, x):
        return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x)))


# ------------------------------------------------------------------------------------------- cross-entropy

@triton.jit
def _cross_entropy_rows(LOGITS, TARGETS, NLL, stride, n_cols, BLOCK: tl.constexpr):
    """One row: nll = logsumexp(logits) - logits[target], then the row overwritten with d nll / d logits =
    softmax - onehot(target) (zeros where the target is -100): two passes over the vocabulary, no fp32 copy."""
    row = tl.program_id(0)
    base = LOGITS + row * stride
    target = tl.load(TARGETS + row)
    m = -float("inf")
    s = 0.0
    for start in range(0, n_cols, BLOCK):  # online logsumexp
        cols = start + tl.arange(0, BLOCK)
        z = tl.load(base + cols, mask=cols < n_cols, other=-float("inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)
    valid = target != -100
    z_target = tl.load(base + tl.where(valid, target, 0)).to(tl.float32)
    tl.store(NLL + row, tl.where(valid, lse - z_target, 0.0))
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < n_cols
        z = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
        grad = tl.exp(z - lse) - tl.where(cols == target, 1.0, 0.0)
        grad = tl.where(valid, grad, 0.0)
        tl.store(base + cols, grad.to(LOGITS.dtype.element_ty), mask=mask)


def cross_entropy_rows(logits, targets):
    """model_kernels.cross_entropy_rows as one kernel; the logits chunk becomes its own gradient (it is not needed after)."""
    logits = logits.contiguous()
    nll = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    block = min(triton.next_power_of_2(logits.shape[1]), 4096)
    _cross_entropy_rows[(logits.shape[0],)](logits, targets.contiguous(), nll, logits.stride(0), logits.shape[1],
                                            BLOCK=block)
    return nll, logits
