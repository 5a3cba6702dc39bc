"""Fused gated residual output projection: y = x + tanh(gate) * (a @ W^T), forward and backward.

In Otter's gated cross-attention block, after the attention core, come the output projection (`to_out`, bias-free),
the tanh gate and the residual add: eager PyTorch runs a matmul that writes `a @ W^T` (B*T x 4096 at MPT-7B), then a
multiply and an add that read and write that 4096-wide stream twice more. At Otter-MPT7B shapes the matmul is
memory-bound on that stream (a is only 512 wide), so the win is in bytes: one kernel reads a, W and x once and
writes y once, with the gate and the residual in the matmul's epilogue. (Fusing the projection into the attention
kernel instead would make each attention program compute a 4096-wide slice of every row, repeating the whole
projection per head: the residual epilogue is the fusion that removes the traffic.)

Backward, with t = tanh(gate) and G = dy^T @ a (D_out x D_in):
    dx = dy                                         (returned as is: no kernel, no copy)
    da = t * (dy @ W)                               (matmul, t in the epilogue)
    dW = t * G                                      (matmul over the B*T rows, t in the epilogue)
    dgate = (1 - t^2) * sum(dy * (a @ W^T)) = (1 - t^2) * <W, G>
The last identity is why the forward need not save `a @ W^T` (B*T x D_out) or recompute it: the dW kernel already
holds each tile of G in registers, so it also reads the matching tile of W (D_out x D_in, small) and writes one
partial sum of W * G per tile; the partials are summed afterwards (deterministic, no atomics). It is exact for
gate = 0 too (Otter's initial gate), where dividing dW by t would not be.

tanh(gate) is computed by torch on the 1-element gate (Triton's interpreter has no tanh, and one scalar is free).
"""

from __future__ import annotations

import torch

from ._common import HAS_TRITON, autotune_enabled, dot_precision, interpreting, kernel_jit, size_bucket

if HAS_TRITON:
    import triton
    import triton.language as tl

EPI_RESIDUAL = 0  # C = X + t * acc         (forward)
EPI_SCALE = 1     # C = t * acc             (da)
EPI_SCALE_GATE = 2  # C = t * acc, and GP[tile] = sum(W_tile * acc)   (dW and the gate's gradient)


def _configs():
    if interpreting():
        return [triton.Config({"BLOCK_R": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_R": 4}, num_warps=4)]
    if not autotune_enabled():
        return [triton.Config({"BLOCK_R": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_R": 8}, num_warps=8,
                              num_stages=2)]
    return [triton.Config({"BLOCK_R": br, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_R": 8}, num_warps=w, num_stages=s)
            for br, bn, bk, w, s in [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 128, 64, 4, 4),
                                     (128, 64, 64, 4, 4), (128, 128, 32, 4, 4)]]


if HAS_TRITON:

    # reset_to_zero: GP holds one partial per tile, and configs differ in tile count; without it a larger config
    # benchmarked first leaves partials that the chosen config never overwrites, and the gate gradient (their sum)
    # is wrong. Triton zeroes GP before each benchmark run and once more before the real launch.
    # R_KEY, K_KEY: power-of-two buckets of R and K, not their exact values: rows are batch x length, which varies
    # per call, and so is K in the weight-gradient matmul (it sums over the rows).
    @triton.autotune(configs=_configs(), key=["R_KEY", "N", "K_KEY", "EPI", "PREC"], reset_to_zero=["GP"])
    @kernel_jit
    def _mm_kernel(A, B, X, C, TG, W, GP,
                   R, N, K, R_KEY, K_KEY,
                   sa_r, sa_k, sb_k, sb_n, sx_r, sx_n, sc_r, sc_n, sw_r, sw_n,
                   EPI: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
                   BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_R: tl.constexpr):
        """C[R, N] = epilogue(A[R, K] @ B[K, N]); every operand by strides, so transposes are free."""
        pid = tl.program_id(0)
        n_r = tl.cdiv(R, BLOCK_R)
        n_n = tl.cdiv(N, BLOCK_N)
        # Grouped order: GROUP_R row tiles sweep the column tiles together, so their B tiles stay in L2.
        per_group = GROUP_R * n_n
        group = pid // per_group
        first_r = group * GROUP_R
        group_size = tl.minimum(n_r - first_r, GROUP_R)
        pid_r = first_r + (pid % per_group) % group_size
        pid_n = (pid % per_group) // group_size

        rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        nn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        kk = tl.arange(0, BLOCK_K)
        r_ok = rr < R
        n_ok = nn < N
        a_ptr = A + rr[:, None].to(tl.int64) * sa_r + kk[None, :] * sa_k
        b_ptr = B + kk[:, None].to(tl.int64) * sb_k + nn[None, :] * sb_n
        acc = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_ok = (k0 + kk) < K
            a = tl.load(a_ptr, mask=r_ok[:, None] & k_ok[None, :], other=0.0)
            bt = tl.load(b_ptr, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                bt = bt.to(tl.float32)
            acc = tl.dot(a, bt, acc, input_precision=PREC)
            a_ptr += BLOCK_K * sa_k
            b_ptr += BLOCK_K * sb_k

        t = tl.load(TG).to(tl.float32)
        out_mask = r_ok[:, None] & n_ok[None, :]
        if EPI == 0:
            x = tl.load(X + rr[:, None].to(tl.int64) * sx_r + nn[None, :] * sx_n, mask=out_mask, other=0.0)
            res = x.to(tl.float32) + t * acc
        else:
            res = t * acc
        tl.store(C + rr[:, None].to(tl.int64) * sc_r + nn[None, :] * sc_n, res.to(C.dtype.element_ty), mask=out_mask)
        if EPI == 2:
            w = tl.load(W + rr[:, None].to(tl.int64) * sw_r + nn[None, :] * sw_n, mask=out_mask, other=0.0)
            tl.store(GP + pid, tl.sum(tl.sum(w.to(tl.float32) * acc, axis=1), axis=0))


def _matmul(a2, b2, out, tg, epi, x2=None, w=None):
    """out[R, N] = epilogue(a2[R, K] @ b2[K, N]); returns the per-tile gate partials for EPI_SCALE_GATE."""
    R, K = a2.shape
    N = b2.shape[1]
    if R == 0 or N == 0:  # nothing to launch; empty G contributes nothing to the gate
        if epi == EPI_RESIDUAL:
            out.copy_(x2)
        elif R * N:
            out.zero_()
        return torch.zeros(1, device=out.device, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(R, meta["BLOCK_R"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    # Partials: one per tile of the smallest config (the real grid never has more tiles).
    n_tiles = triton.cdiv(R, 32) * triton.cdiv(N, 32)
    gp = torch.zeros(n_tiles if epi == EPI_SCALE_GATE else 1, device=out.device, dtype=torch.float32)
    x_ = x2 if x2 is not None else out
    w_ = w if w is not None else out
    _mm_kernel[grid](a2, b2, x_, out, tg, w_, gp, R, N, K, size_bucket(R), size_bucket(K),
                     *a2.stride(), *b2.stride(), *x_.stride(), *out.stride(), *w_.stride(),
                     EPI=epi, PREC=dot_precision(a2.dtype), UPCAST=interpreting())
    return gp


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(..., n) -> (rows, n), a view whenever the leading dims can be merged."""
    return t.reshape(-1, t.shape[-1])


class GatedResidualLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, a, weight, gate):
        tg = gate.detach().reshape(1).float().tanh()
        a2, x2 = _rows(a), _rows(x)
        # eager semantics: x + (lower-precision projection) promotes, e.g. an fp32 residual stream with bf16 a
        y = torch.empty(x.shape, device=x.device, dtype=torch.promote_types(x.dtype, a.dtype))
        # a @ W^T: W^T is W with its strides swapped
        _matmul(a2, weight.t(), _rows(y), tg, EPI_RESIDUAL, x2=x2)
        ctx.save_for_backward(a, weight, gate, tg)
        ctx.x_dtype = x.dtype
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable  # the backward kernels are not differentiable themselves
    def backward(ctx, dy):
        a, weight, gate, tg = ctx.saved_tensors
        need_x, need_a, need_w, need_g = ctx.needs_input_grad
        dx = dy.to(ctx.x_dtype) if need_x else None  # no copy when the dtypes agree
        dy2 = _rows(dy.to(a.dtype))  # the projection's backward runs in its own precision, as under autocast
        da = dw = dgate = None
        if need_a:
            da = torch.empty(a.shape, device=a.device, dtype=a.dtype)
            _matmul(dy2, weight, _rows(da), tg, EPI_SCALE)
        if need_w or need_g:
            dw = torch.empty(weight.shape, device=weight.device, dtype=weight.dtype)
            # G = dy^T @ a over all rows; the epilogue writes t * G and the per-tile sums of W * G
            gp = _matmul(dy2.t(), _rows(a), dw, tg, EPI_SCALE_GATE, w=weight)
            if need_g:
                dgate = ((1.0 - tg * tg) * gp.sum()).to(gate.dtype).reshape(gate.shape)
            if not need_w:
                dw = None
        return dx, da, dw, dgate


def gated_residual_linear(x: torch.Tensor, a: torch.Tensor, weight: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """y = x + tanh(gate) * (a @ weight.T), fused (one kernel forward, two backward).

    x (..., D_out), a (..., D_in) with the same leading dims, weight (D_out, D_in), gate a 1-element tensor.
    a and weight are multiplied in a's dtype (weight is cast to it, as autocast would) with fp32 accumulation; x
    may be wider (an fp32 residual stream): y has x's and a's promoted dtype, as in eager PyTorch.
    Same semantics as `reference.gated_residual_linear_ref`.
    """
    if weight.dim() != 2 or x.shape[-1] != weight.shape[0] or a.shape[-1] != weight.shape[1] \
            or x.shape[:-1] != a.shape[:-1]:
        raise ValueError(f"expected x (..., D_out), a (..., D_in), weight (D_out, D_in); got {tuple(x.shape)}, "
                         f"{tuple(a.shape)}, {tuple(weight.shape)}")
    if gate.numel() != 1:
        raise ValueError(f"gate must have one element; got shape {tuple(gate.shape)}")
    for t in (x, a, weight):
        if not t.dtype.is_floating_point or t.dtype == torch.float64:
            raise TypeError(f"x, a, weight must be fp32, fp16 or bf16; got {x.dtype}, {a.dtype}, {weight.dtype}")
    if weight.dtype != a.dtype:
        weight = weight.to(a.dtype)  # differentiable: dW comes back in the parameter's dtype
    return GatedResidualLinear.apply(x, a, weight, gate)
