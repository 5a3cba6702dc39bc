"""Masked media attention (the core of Flamingo's gated cross-attention), fused, forward and backward.

    out[b, h, t] = softmax(q[b, h, t] . k[b, h, m-1]^T * scale) @ v[b, h, m-1]   with m = text_time[b, t]
    out[b, h, t] = 0                                                            if m == 0 or m > M

Each text row attends to exactly one media of L latents, and L is small (64 in Otter, 13 in some checkpoints),
so a whole media fits in one key block: a row's attention is ONE block softmax, with no online rescaling across
key blocks as in flash attention. What remains to organise is which media each program reads:

* forward, one program per (query block, b, h): it loops over the media named in its rows ([min, max] of the
  valid text_time values, skipping media no row names) and keeps, per row, the result for that row's media. In
  the common piecewise-constant case a block sees one or two media, so it reads one or two (L, d) tiles of K and
  V; arbitrary text_time (packed rows restart per sample) is still exact, only slower. It saves the row's
  log-sum-exp (base 2) for the backward. Nothing of size T x M*L exists anywhere.

* backward, one program per (media m, chunk of query blocks, b, h): since a row's gradient involves only its own
  media, the program that owns media m computes dq for exactly the rows with text_time == m (no other program
  writes them: no atomics), and accumulates dk, dv for media m in registers over the query blocks that name it.
  delta = rowsum(dO * O) is computed in the same loop from the O and dO tiles (no separate pre-pass). Program
  "m = 0" writes the zero dq of rows without media. When B*H*M is too small to fill the GPU, the query blocks
  are split into chunks whose dk/dv partials are summed afterwards (deterministic, no atomics).
"""

from __future__ import annotations

import math

import torch

from ._common import (HAS_TRITON, autotune_enabled, dot_precision, interpreting, kernel_jit,
                      next_pow2_at_least_16, num_sms, size_bucket)

if HAS_TRITON:
    import triton
    import triton.language as tl

# One media's latents and the head dim must fit one block (registers). Otter uses 64 x 64. Measured with
# `compile_sm90.py --resources --specialize` (ptxas, sm_90a): bf16 128 x 128 compiles in seconds with spills of
# 0.1 KB (forward) and 2.6 KB (backward) per thread; 256 x 256 ran ptxas for over 6 minutes at 9.5 GB of memory
# without finishing (the backward's fp32 dK, dV accumulators alone would be 512 KB per program). Larger shapes take
# the reference path (see `supports`).
MAX_LATENTS = 128
MAX_HEAD_DIM = 128
MAX_BATCH_HEADS = 65535  # batch x heads is a grid axis (y or z), whose CUDA limit is 65535 programs
_LOG2E = 1.4426950408889634


def supports(latents: int, head_dim: int, batch_heads: int = 1) -> bool:
    """Whether the fused kernel takes media of `latents` latents, heads of `head_dim`, and `batch_heads` (batch x
    heads) at once; else use the reference."""
    return latents <= MAX_LATENTS and head_dim <= MAX_HEAD_DIM and batch_heads <= MAX_BATCH_HEADS


def _configs(kind: str):
    if interpreting():
        # One config: the interpreter cannot autotune (and would be slow doing it).
        return [triton.Config({"BLOCK_T": 32}, num_warps=4)]
    if not autotune_enabled():
        return [triton.Config({"BLOCK_T": 64}, num_warps=4, num_stages=2)]
    if kind == "fwd":
        return [triton.Config({"BLOCK_T": bt}, num_warps=w, num_stages=s)
                for bt, w, s in [(64, 4, 2), (128, 4, 2), (128, 8, 2), (64, 4, 3), (32, 4, 2)]]
    return [triton.Config({"BLOCK_T": bt}, num_warps=w, num_stages=s)
            for bt, w, s in [(32, 4, 2), (64, 4, 2), (64, 8, 2), (128, 8, 2)]]


def _prune(configs, named_args, **kwargs):
    # Register pressure: a (BLOCK_T x 128) fp32 tile is too big for 128-row blocks.
    big = max(named_args.get("BLOCK_L", kwargs.get("BLOCK_L", 64)), named_args.get("BLOCK_D", kwargs.get("BLOCK_D", 64)))
    kept = [c for c in configs if not (big > 64 and c.kwargs["BLOCK_T"] > 64)]
    return kept or configs[:1]


if HAS_TRITON:

    @triton.jit
    def _load_media_index(ptrs, mask, M):
        """text_time as int32, with every value outside 1..M read as 0 (no media). Compared before narrowing: an
        int64 value such as 2**32 + 1 would otherwise wrap to media 1."""
        t = tl.load(ptrs, mask=mask, other=0)
        return tl.where((t >= 1) & (t <= M), t, 0).to(tl.int32)

    @triton.autotune(configs=_configs("fwd"), key=["T_KEY", "BLOCK_L", "BLOCK_D", "PREC"],
                     prune_configs_by={"early_config_prune": _prune})
    @kernel_jit
    def _fwd_kernel(Q, K, V, TT, O, LSE,
                    sq_b, sq_h, sq_t, sq_d,
                    sk_b, sk_h, sk_m, sk_l, sk_d,
                    sv_b, sv_h, sv_m, sv_l, sv_d,
                    stt_b, stt_t,
                    so_b, so_h, so_t, so_d,
                    H, T, M, L, D, qk_scale, T_KEY,
                    BLOCK_T: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
                    PREC: tl.constexpr, UPCAST: tl.constexpr):
        pid_t = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        lat = tl.arange(0, BLOCK_L)
        dim = tl.arange(0, BLOCK_D)
        row_ok = rows < T
        lat_ok = lat < L
        dim_ok = dim < D

        tt = _load_media_index(TT + b.to(tl.int64) * stt_b + rows * stt_t, row_ok, M)
        valid = row_ok & (tt >= 1) & (tt <= M)
        # The media this block needs: [m_lo, m_hi] over rows that have one (empty range if none do).
        m_lo = tl.min(tl.where(valid, tt, M + 1), axis=0)
        m_hi = tl.max(tl.where(valid, tt, 0), axis=0)

        q_base = Q + b.to(tl.int64) * sq_b + h.to(tl.int64) * sq_h
        q = tl.load(q_base + rows[:, None] * sq_t + dim[None, :] * sq_d,
                    mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        k_base = K + b.to(tl.int64) * sk_b + h.to(tl.int64) * sk_h
        v_base = V + b.to(tl.int64) * sv_b + h.to(tl.int64) * sv_h
        kv_mask = lat_ok[:, None] & dim_ok[None, :]

        acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)  # rows without media stay exactly 0
        lse = tl.zeros([BLOCK_T], dtype=tl.float32)
        for m in range(m_lo, m_hi + 1):
            sel = valid & (tt == m)
            if tl.max(sel.to(tl.int32), axis=0) > 0:  # a media inside [m_lo, m_hi] that no row here names
                k = tl.load(k_base + tl.cast(m - 1, tl.int64) * sk_m + lat[:, None] * sk_l + dim[None, :] * sk_d,
                            mask=kv_mask, other=0.0)
                v = tl.load(v_base + tl.cast(m - 1, tl.int64) * sv_m + lat[:, None] * sv_l + dim[None, :] * sv_d,
                            mask=kv_mask, other=0.0)
                if UPCAST:
                    k = k.to(tl.float32)
                    v = v.to(tl.float32)
                # scores in base 2 (exp2 is the hardware instruction): qk_scale = scale * log2(e)
                s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
                s = tl.where(lat_ok[None, :], s, float("-inf"))
                mx = tl.max(s, axis=1)
                p = tl.exp2(s - mx[:, None])
                denom = tl.sum(p, axis=1)
                o = tl.dot(p.to(v.dtype), v, input_precision=PREC) / denom[:, None]
                acc = tl.where(sel[:, None], o, acc)
                lse = tl.where(sel, mx + tl.log2(denom), lse)

        o_base = O + b.to(tl.int64) * so_b + h.to(tl.int64) * so_h
        tl.store(o_base + rows[:, None] * so_t + dim[None, :] * so_d, acc.to(O.dtype.element_ty),
                 mask=row_ok[:, None] & dim_ok[None, :])
        tl.store(LSE + pid_bh.to(tl.int64) * T + rows, lse, mask=row_ok)

    @triton.jit
    def _owned_rows(tt_base, stt_t, row_lo, row_hi, m, M, SCAN: tl.constexpr):
        """First and last row in [row_lo, row_hi) that program m owns: text_time == m, or for m = 0 the rows
        without media (text_time < 1 or > M). (row_hi, row_lo - 1) when there are none."""
        first = row_hi
        last = row_lo - 1
        for r0 in range(row_lo, row_hi, SCAN):
            r = r0 + tl.arange(0, SCAN)
            ok = r < row_hi
            t = _load_media_index(tt_base + r * stt_t, ok, M)
            hit = ok & tl.where(m == 0, (t < 1) | (t > M), t == m)
            first = tl.minimum(first, tl.min(tl.where(hit, r, row_hi), axis=0))
            last = tl.maximum(last, tl.max(tl.where(hit, r, row_lo - 1), axis=0))
        return first, last

    @triton.autotune(configs=_configs("bwd"), key=["T_KEY", "BLOCK_L", "BLOCK_D", "PREC"],
                     prune_configs_by={"early_config_prune": _prune})
    @kernel_jit
    def _bwd_kernel(Q, K, V, TT, O, DO, LSE, DQ, DK, DV,
                    sq_b, sq_h, sq_t, sq_d,
                    sk_b, sk_h, sk_m, sk_l, sk_d,
                    sv_b, sv_h, sv_m, sv_l, sv_d,
                    stt_b, stt_t,
                    so_b, so_h, so_t, so_d,
                    sdo_b, sdo_h, sdo_t, sdo_d,
                    sdq_b, sdq_h, sdq_t, sdq_d,
                    sdk_s, sdk_b, sdk_h, sdk_m, sdk_l, sdk_d,
                    sdv_s, sdv_b, sdv_h, sdv_m, sdv_l, sdv_d,
                    H, T, M, L, D, SPLIT, sm_scale, qk_scale, T_KEY,
                    BLOCK_T: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
                    PREC: tl.constexpr, UPCAST: tl.constexpr):
        pid_m = tl.program_id(0)  # 0: zero the dq of rows without media; m >= 1: media m
        pid_s = tl.program_id(1)
        pid_bh = tl.program_id(2)
        b = pid_bh // H
        h = pid_bh % H
        lat = tl.arange(0, BLOCK_L)
        dim = tl.arange(0, BLOCK_D)
        lat_ok = lat < L
        dim_ok = dim < D
        n_qb = tl.cdiv(T, BLOCK_T)
        per_split = tl.cdiv(n_qb, SPLIT)
        row_lo = pid_s * per_split * BLOCK_T
        row_hi = tl.maximum(tl.minimum(row_lo + per_split * BLOCK_T, T), row_lo)  # empty for surplus chunks
        tt_base = TT + b.to(tl.int64) * stt_b
        dq_base = DQ + b.to(tl.int64) * sdq_b + h.to(tl.int64) * sdq_h
        # The query blocks this program needs: those between the first and the last row (of this chunk) that it
        # owns. Found by a wide vectorised scan of text_time rather than block by block, so that a media's
        # program does not pay one dependent load latency per block of the other media.
        first, last = _owned_rows(tt_base, stt_t, row_lo, row_hi, pid_m, M, SCAN=1024)
        qb_first = first // BLOCK_T
        qb_end = tl.where(last >= first, last // BLOCK_T + 1, qb_first)

        if pid_m == 0:
            for qb in range(qb_first, qb_end):
                rows = qb * BLOCK_T + tl.arange(0, BLOCK_T)
                row_ok = rows < T
                tt = _load_media_index(tt_base + rows * stt_t, row_ok, M)
                none = row_ok & ((tt < 1) | (tt > M))
                zero = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
                tl.store(dq_base + rows[:, None] * sdq_t + dim[None, :] * sdq_d, zero.to(DQ.dtype.element_ty),
                         mask=none[:, None] & dim_ok[None, :])
        else:
            m = pid_m
            kv_mask = lat_ok[:, None] & dim_ok[None, :]
            k = tl.load(K + b.to(tl.int64) * sk_b + h.to(tl.int64) * sk_h + tl.cast(m - 1, tl.int64) * sk_m
                        + lat[:, None] * sk_l + dim[None, :] * sk_d, mask=kv_mask, other=0.0)
            v = tl.load(V + b.to(tl.int64) * sv_b + h.to(tl.int64) * sv_h + tl.cast(m - 1, tl.int64) * sv_m
                        + lat[:, None] * sv_l + dim[None, :] * sv_d, mask=kv_mask, other=0.0)
            if UPCAST:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            dk = tl.zeros([BLOCK_L, BLOCK_D], dtype=tl.float32)
            dv = tl.zeros([BLOCK_L, BLOCK_D], dtype=tl.float32)
            q_base = Q + b.to(tl.int64) * sq_b + h.to(tl.int64) * sq_h
            o_base = O + b.to(tl.int64) * so_b + h.to(tl.int64) * so_h
            do_base = DO + b.to(tl.int64) * sdo_b + h.to(tl.int64) * sdo_h
            # No per-block "any row selected?" branch: with piecewise-constant text_time every block in
            # [qb_first, qb_end) has rows of m, and a branch-free body lets Triton pipeline the loads. A block
            # without such rows (non-monotone text_time) is still exact: every load is masked to the selected
            # rows, so its p is 0 and it adds exactly nothing.
            for qb in range(qb_first, qb_end):
                rows = qb * BLOCK_T + tl.arange(0, BLOCK_T)
                row_ok = rows < T
                tt = _load_media_index(tt_base + rows * stt_t, row_ok, M)
                sel = row_ok & (tt == m)
                # Only the selected rows are read: other rows belong to other programs (or to nobody).
                rmask = sel[:, None] & dim_ok[None, :]
                q = tl.load(q_base + rows[:, None] * sq_t + dim[None, :] * sq_d, mask=rmask, other=0.0)
                do = tl.load(do_base + rows[:, None] * sdo_t + dim[None, :] * sdo_d, mask=rmask, other=0.0)
                o = tl.load(o_base + rows[:, None] * so_t + dim[None, :] * so_d, mask=rmask, other=0.0)
                lse = tl.load(LSE + pid_bh.to(tl.int64) * T + rows, mask=sel, other=0.0)
                if UPCAST:
                    q = q.to(tl.float32)
                    do = do.to(tl.float32)
                delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
                s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
                p = tl.exp2(s - lse[:, None])
                p = tl.where(sel[:, None] & lat_ok[None, :], p, 0.0)  # unselected rows contribute exactly 0
                dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC)
                dp = tl.dot(do, tl.trans(v), input_precision=PREC)
                ds = p * (dp - delta[:, None])
                dq = tl.dot(ds.to(k.dtype), k, input_precision=PREC) * sm_scale
                tl.store(dq_base + rows[:, None] * sdq_t + dim[None, :] * sdq_d, dq.to(DQ.dtype.element_ty),
                         mask=rmask)
                dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC)
            dk = dk * sm_scale
            kv_off = lat[:, None] * sdk_l + dim[None, :] * sdk_d
            tl.store(DK + pid_s.to(tl.int64) * sdk_s + b.to(tl.int64) * sdk_b + h.to(tl.int64) * sdk_h
                     + tl.cast(m - 1, tl.int64) * sdk_m + kv_off, dk.to(DK.dtype.element_ty), mask=kv_mask)
            tl.store(DV + pid_s.to(tl.int64) * sdv_s + b.to(tl.int64) * sdv_b + h.to(tl.int64) * sdv_h
                     + tl.cast(m - 1, tl.int64) * sdv_m + lat[:, None] * sdv_l + dim[None, :] * sdv_d,
                     dv.to(DV.dtype.element_ty), mask=kv_mask)


def _check(q, k, v, text_time):
    if q.dim() != 4 or k.dim() != 5 or v.dim() != 5:
        raise ValueError(f"expected q (B, H, T, d) and k, v (B, H, M, L, d); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    B, H, T, d = q.shape
    if k.shape != v.shape or k.shape[:2] != (B, H) or k.shape[4] != d:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must be (B, H, M, L, d) = ({B}, {H}, M, L, {d})")
    if text_time.shape != (B, T):
        raise ValueError(f"text_time must be (B, T) = ({B}, {T}); got {tuple(text_time.shape)}")
    if text_time.dtype.is_floating_point or text_time.dtype == torch.bool:
        raise TypeError(f"text_time must be an integer tensor; got {text_time.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if B * H > MAX_BATCH_HEADS:
        raise NotImplementedError(f"fused path supports batch x heads <= {MAX_BATCH_HEADS} (a CUDA grid axis); got "
                                  f"{B} x {H} (use reference.masked_media_attention_ref, or split the batch)")
    if not supports(k.shape[3], d):
        raise NotImplementedError(f"fused path supports L <= {MAX_LATENTS} latents per media and head dim <= "
                                  f"{MAX_HEAD_DIM}; got L={k.shape[3]}, d={d} (use reference.masked_media_attention_ref)")


def _empty_work(q, k) -> bool:
    B, H, T, _ = q.shape
    return B * H * T == 0 or k.shape[2] * k.shape[3] == 0


def _forward(q, k, v, text_time, scale):
    B, H, T, d = q.shape
    M, L = k.shape[2], k.shape[3]
    # O is laid out (B, T, H, d) and returned as a (B, H, T, d) view: the caller's next step,
    # out.transpose(1, 2).reshape(B, T, H * d) for the output projection, is then free (no copy).
    o = torch.empty((B, T, H, d), device=q.device, dtype=q.dtype).transpose(1, 2)
    lse = torch.empty((B, H, T), device=q.device, dtype=torch.float32)
    if _empty_work(q, k):
        o.zero_()
        lse.zero_()
        return o, lse
    BLOCK_L, BLOCK_D = next_pow2_at_least_16(L), next_pow2_at_least_16(d)
    grid = lambda meta: (triton.cdiv(T, meta["BLOCK_T"]), B * H)  # noqa: E731
    _fwd_kernel[grid](q, k, v, text_time, o, lse,
                      *q.stride(), *k.stride(), *v.stride(), *text_time.stride(), *o.stride(),
                      H, T, M, L, d, scale * _LOG2E, size_bucket(T),  # T_KEY: the autotuning key only
                      BLOCK_L=BLOCK_L, BLOCK_D=BLOCK_D, PREC=dot_precision(q.dtype), UPCAST=interpreting())
    return o, lse


def _choose_split(B: int, H: int, M: int, T: int, device: torch.device) -> int:
    """Chunks of query blocks per (media, b, h) in the backward: enough programs for ~2 waves on the GPU."""
    if device.type != "cuda":
        return 1
    programs = B * H * max(M, 1)
    target = 2 * num_sms(device)
    if programs >= target:
        return 1
    # at least 4 query blocks (of 64 rows) per chunk, or the partial-sum overhead outweighs the parallelism
    return max(1, min(-(-target // programs), T // 256))


def _backward(q, k, v, text_time, o, lse, do, scale, split=None):
    B, H, T, d = q.shape
    M, L = k.shape[2], k.shape[3]
    if _empty_work(q, k):
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    split = _choose_split(B, H, M, T, q.device) if split is None else max(1, int(split))
    dq = torch.empty_like(q)
    if split == 1:
        dk, dv = torch.empty_like(k), torch.empty_like(v)
        dk_w, dv_w = dk.unsqueeze(0), dv.unsqueeze(0)  # a leading split axis of size 1
    else:
        dk_w = torch.empty((split,) + tuple(k.shape), device=k.device, dtype=torch.float32)
        dv_w = torch.empty_like(dk_w)
    BLOCK_L, BLOCK_D = next_pow2_at_least_16(L), next_pow2_at_least_16(d)
    grid = (M + 1, split, B * H)
    _bwd_kernel[grid](q, k, v, text_time, o, do, lse, dq, dk_w, dv_w,
                      *q.stride(), *k.stride(), *v.stride(), *text_time.stride(), *o.stride(), *do.stride(),
                      *dq.stride(), *dk_w.stride(), *dv_w.stride(),
                      H, T, M, L, d, split, scale, scale * _LOG2E, size_bucket(T),
                      BLOCK_L=BLOCK_L, BLOCK_D=BLOCK_D, PREC=dot_precision(q.dtype), UPCAST=interpreting())
    if split > 1:
        dk, dv = dk_w.sum(0).to(k.dtype), dv_w.sum(0).to(v.dtype)
    return dq, dk, dv


class MaskedMediaAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, text_time, scale):
        o, lse = _forward(q, k, v, text_time, scale)
        ctx.save_for_backward(q, k, v, text_time, o, lse)
        ctx.scale = scale
        return o

    @staticmethod
    @torch.autograd.function.once_differentiable  # the backward kernels are not differentiable themselves
    def backward(ctx, do):
        q, k, v, text_time, o, lse = ctx.saved_tensors
        dq, dk, dv = _backward(q, k, v, text_time, o, lse, do, ctx.scale)
        return dq, dk, dv, None, None


def masked_media_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, text_time: torch.Tensor,
                           scale: float | None = None) -> torch.Tensor:
    """Fused masked media attention. q (B, H, T, d); k, v (B, H, M, L, d); text_time (B, T) integers.

    Row t of sample b attends to the L latents of media text_time[b, t] (1-based) only; text_time 0 (no media yet)
    or > M (a media that is not there) gives exactly 0 with exactly zero, finite gradients. `scale` defaults to
    1/sqrt(d). Returns (B, H, T, d) (memory laid out (B, T, H, d), so merging the heads afterwards is a view).
    Same semantics as `reference.masked_media_attention_ref`.
    """
    _check(q, k, v, text_time)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if text_time.device != q.device:
        text_time = text_time.to(q.device)
    return MaskedMediaAttention.apply(q, k, v, text_time, scale)
