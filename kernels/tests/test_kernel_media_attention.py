"""masked_media_attention (Triton) against the eager OpenFlamingo-style reference.

Tolerances (stated in kernels/README.md):
* fp32, forward: |fused - ref| <= 2e-5 + 1e-5 * |ref|; gradients dq, dk, dv: <= 1e-4 + 1e-4 * |ref|.
  (Both paths compute in fp32; the kernel multiplies in IEEE fp32, not TF32, and uses exp2, hence ~1e-6 errors.)
* fp16 (CPU interpreter and GPU): compared with the fp32 reference, atol = rtol = 1e-2.
* bf16 (GPU only): the fused error against the fp32 reference is at most 2x the eager bf16 reference's error,
  + 4e-3 of the largest value (about one bf16 rounding) + 1e-3.
* Rows without media (text_time 0 or > M): output and dq exactly 0 and finite, in every dtype; media that no row
  names get exactly zero dk, dv.

Shapes cover T in {1, 37, 129}, L in {64, 13}, heads in {1, 8}, head dim in {16, 64}, M in 1..5, without the full
cartesian product (the interpreter is slow): each value appears at least twice, with several text_time patterns.
"""

from __future__ import annotations

import pytest
import torch

import otterfast_kernels as ok
from otterfast_kernels import media_attention as ma
from otterfast_kernels.reference import masked_media_attention_ref

CUDA = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not CUDA, reason="bf16 runs only on a GPU: Triton's CPU interpreter computes bf16 "
                                                "arithmetic wrongly, so a CPU result would test the interpreter")


def make_text_time(B: int, T: int, M: int, pattern: str, gen: torch.Generator) -> torch.Tensor:
    """(B, T) int64 text_time of a given shape of pattern."""
    def r(n):  # random ints in [0, n)
        return int(torch.randint(0, max(n, 1), (1,), generator=gen))

    tt = torch.zeros(B, T, dtype=torch.int64)
    for b in range(B):
        if pattern == "monotone":  # text before the first image, then images 1..M in order
            pos = sorted(r(T) for _ in range(M))
            for m, p in enumerate(pos, start=1):
                tt[b, p:] = m
        elif pattern == "packed":  # several samples per row: text_time restarts at 0 per sample
            start = 0
            while start < T:
                n = 1 + r(max(T // 3, 1))
                seg = torch.zeros(n, dtype=torch.int64)
                for m in range(1, 1 + r(M + 1)):
                    seg[r(n):] = m
                tt[b, start:start + n] = seg[:T - start]
                start += n
        elif pattern == "random":  # arbitrary, including > M (a media that is not there)
            tt[b] = torch.randint(0, M + 2, (T,), generator=gen)
        elif pattern == "never":  # only odd media are named; some rows name M + 3
            tt[b] = torch.randint(0, (M + 1) // 2 + 1, (T,), generator=gen) * 2 - 1
            tt[b] = tt[b].clamp(min=0)
            tt[b, ::7] = M + 3
        elif pattern == "zeros":
            pass
        else:
            raise ValueError(pattern)
    return tt


def inputs(B, H, T, d, M, L, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, d, generator=gen).to(device, dtype).requires_grad_()
    k = torch.randn(B, H, M, L, d, generator=gen).to(device, dtype).requires_grad_()
    v = torch.randn(B, H, M, L, d, generator=gen).to(device, dtype).requires_grad_()
    do = torch.randn(B, H, T, d, generator=gen).to(device, dtype)
    return q, k, v, do, gen


def run(fn, q, k, v, tt, do, **kw):
    out = fn(q, k, v, tt, **kw)
    grads = torch.autograd.grad(out, (q, k, v), do)
    return (out.detach(),) + tuple(grads)


def check_exact_zeros(out, dq, dk, dv, tt, M):
    """Rows without media: exactly zero output and dq; media no row names: exactly zero dk, dv."""
    for t in (out, dq, dk, dv):
        assert torch.isfinite(t).all()
    none = ((tt < 1) | (tt > M)).to(out.device)  # (B, T)
    assert (out.permute(0, 2, 1, 3)[none] == 0).all()
    assert (dq.permute(0, 2, 1, 3)[none] == 0).all()
    for m in range(1, M + 1):
        named = (tt == m).any(dim=1).to(out.device)  # (B,)
        assert (dk[~named][:, :, m - 1] == 0).all() and (dv[~named][:, :, m - 1] == 0).all()


CASES = [
    # id, B, H, T, d, M, L, pattern
    ("T1-H1-d16-M1-L13", 2, 1, 1, 16, 1, 13, "monotone"),
    ("T1-H8-d64-M2-L64-nomedia", 1, 8, 1, 64, 2, 64, "zeros"),
    ("T37-H8-d16-M3-L13", 2, 8, 37, 16, 3, 13, "monotone"),
    ("T37-H8-d64-M4-L64-random", 1, 8, 37, 64, 4, 64, "random"),
    ("T37-H1-d64-M1-L13-allzero", 2, 1, 37, 64, 1, 13, "zeros"),
    ("T129-H1-d64-M5-L64", 1, 1, 129, 64, 5, 64, "monotone"),
    ("T129-H2-d16-M2-L64-packed", 2, 2, 129, 16, 2, 64, "packed"),
    ("T129-H2-d16-M5-L13-never", 1, 2, 129, 16, 5, 13, "never"),
    ("T129-H8-d64-M4-L13-packed", 1, 8, 129, 64, 4, 13, "packed"),
    ("T129-H8-d64-M5-L64-random", 3, 8, 129, 64, 5, 64, "random"),
    ("T129-H1-d16-M1-L64", 2, 1, 129, 16, 1, 64, "monotone"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_fp32_matches_reference(case, device):
    _, B, H, T, d, M, L, pattern = case
    q, k, v, do, gen = inputs(B, H, T, d, M, L, device=device)
    tt = make_text_time(B, T, M, pattern, gen).to(device)
    got = run(ok.masked_media_attention, q, k, v, tt, do)
    want = run(masked_media_attention_ref, q, k, v, tt, do)
    torch.testing.assert_close(got[0], want[0], atol=2e-5, rtol=1e-5)
    for name, g, w in zip(("dq", "dk", "dv"), got[1:], want[1:]):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    check_exact_zeros(*got, tt, M)


def test_rows_before_first_image_and_beyond_m(device):
    """The edge case that breaks naive kernels: all-masked rows (-inf -> NaN, or finite -> uniform attention)."""
    B, H, T, d, M, L = 1, 2, 40, 16, 2, 13
    q, k, v, do, _ = inputs(B, H, T, d, M, L, device=device, seed=3)
    tt = torch.tensor([[0] * 10 + [1] * 10 + [3] * 10 + [2] * 10], device=device)  # 0, then 1, then 3 > M, then 2
    out, dq, dk, dv = run(ok.masked_media_attention, q, k, v, tt, do)
    assert (out[:, :, :10] == 0).all() and (out[:, :, 20:30] == 0).all()
    assert (dq[:, :, :10] == 0).all() and (dq[:, :, 20:30] == 0).all()
    assert (out[:, :, 10:20] != 0).any() and (out[:, :, 30:] != 0).any()
    want = run(masked_media_attention_ref, q, k, v, tt, do)
    for g, w in zip((out, dq, dk, dv), want):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)


def test_no_latents_at_all(device):
    """M = 0 (a batch without any media): output and all gradients are zeros."""
    q, k, v, do, _ = inputs(2, 2, 9, 16, 0, 64, device=device)
    tt = torch.zeros(2, 9, dtype=torch.long, device=device)
    out, dq, dk, dv = run(ok.masked_media_attention, q, k, v, tt, do)
    assert out.shape == q.shape and (out == 0).all() and (dq == 0).all()
    assert dk.shape == k.shape and dv.shape == v.shape


@pytest.mark.parametrize("split", [3, 7])
def test_backward_split_into_chunks(device, monkeypatch, split):
    """The GPU splits the query blocks into chunks when B*H*M is small; the summed partials must be the same
    (7 chunks for 129 rows leaves some chunks empty)."""
    B, H, T, d, M, L = 1, 1, 129, 16, 3, 13
    q, k, v, do, gen = inputs(B, H, T, d, M, L, device=device, seed=5)
    tt = make_text_time(B, T, M, "packed", gen)
    tt[:, -3:] = M  # the last block has rows with media: a surplus chunk must not count them again
    tt = tt.to(device)
    want = run(masked_media_attention_ref, q, k, v, tt, do)
    monkeypatch.setattr(ma, "_choose_split", lambda *a: split)
    got = run(ok.masked_media_attention, q, k, v, tt, do)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)


def test_strided_layouts_as_the_model_makes_them(device):
    """q from (B, T, H, d) heads, k/v as halves of one to_kv projection, int32 text_time: no copies needed."""
    B, H, T, d, M, L = 2, 2, 37, 16, 2, 13
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(B, T, H, d, generator=gen).to(device).transpose(1, 2).requires_grad_()
    kv = torch.randn(B, M * L, 2 * H * d, generator=gen).to(device)
    k, v = (t.reshape(B, M, L, H, d).permute(0, 3, 1, 2, 4) for t in kv.chunk(2, dim=-1))
    k, v = k.detach().requires_grad_(), v.detach().requires_grad_()
    assert not q.is_contiguous() and not k.is_contiguous()
    tt = make_text_time(B, T, M, "monotone", gen).to(device, torch.int32)
    do = torch.randn(B, H, T, d, generator=gen).to(device)
    got = run(ok.masked_media_attention, q, k, v, tt, do)
    want = run(masked_media_attention_ref, q, k, v, tt.long(), do)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
    assert got[0].transpose(1, 2).is_contiguous()  # merging the heads afterwards is a view


def test_custom_scale(device):
    q, k, v, do, gen = inputs(1, 1, 37, 16, 2, 13, device=device, seed=11)
    tt = make_text_time(1, 37, 2, "monotone", gen).to(device)
    got = run(ok.masked_media_attention, q, k, v, tt, do, scale=0.37)
    want = run(masked_media_attention_ref, q, k, v, tt, do, scale=0.37)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)


def test_fp16(device):
    B, H, T, d, M, L = 1, 2, 37, 16, 3, 13
    q, k, v, do, gen = inputs(B, H, T, d, M, L, device=device, seed=13)
    tt = make_text_time(B, T, M, "random", gen).to(device)
    want = run(masked_media_attention_ref, q, k, v, tt, do)
    h = [t.detach().half().requires_grad_() for t in (q, k, v)]
    got = run(ok.masked_media_attention, *h, tt, do.half())
    for g, w in zip(got, want):
        assert g.dtype == torch.float16
        torch.testing.assert_close(g.float(), w, atol=1e-2, rtol=1e-2)
    check_exact_zeros(*got, tt, M)


BF16_CASES = [(2, 8, 129, 64, 5, 64, "monotone"), (1, 1, 37, 16, 3, 13, "random"),
              (2, 8, 1000, 64, 5, 64, "packed"), (1, 8, 2048, 64, 5, 64, "monotone")]


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("case", BF16_CASES, ids=lambda c: "-".join(map(str, c)))
def test_bf16_gpu(case):
    B, H, T, d, M, L, pattern = case
    q, k, v, do, gen = inputs(B, H, T, d, M, L, device="cuda", seed=17)
    tt = make_text_time(B, T, M, pattern, gen).to("cuda")
    exact = run(masked_media_attention_ref, q, k, v, tt, do)  # fp32 ground truth
    lo = [t.detach().bfloat16().requires_grad_() for t in (q, k, v)]
    eager = run(masked_media_attention_ref, *lo, tt, do.bfloat16())
    lo = [t.detach().bfloat16().requires_grad_() for t in (q, k, v)]
    got = run(ok.masked_media_attention, *lo, tt, do.bfloat16())
    for name, g, e, x in zip(("out", "dq", "dk", "dv"), got, eager, exact):
        err, err_eager = (g.float() - x).abs().max().item(), (e.float() - x).abs().max().item()
        assert err <= 2 * err_eager + 4e-3 * x.abs().max().item() + 1e-3, f"{name}: fused bf16 error {err:.3g} vs eager bf16 {err_eager:.3g}"
    check_exact_zeros(*got, tt, M)


def test_validation():
    q = torch.zeros(1, 2, 3, 16)
    k = torch.zeros(1, 2, 1, 4, 16)
    with pytest.raises(ValueError):
        ok.masked_media_attention(q, k, k, torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(TypeError):
        ok.masked_media_attention(q, k, k, torch.zeros(1, 3))
    with pytest.raises(NotImplementedError):
        big = torch.zeros(1, 2, 1, 129, 16)
        ok.masked_media_attention(q, big, big, torch.zeros(1, 3, dtype=torch.long))
    assert ok.media_attention_supports(128, 128) and ok.media_attention_supports(13, 16)
    assert not ok.media_attention_supports(129, 64) and not ok.media_attention_supports(64, 256)
    assert ok.media_attention_supports(64, 64, 65535) and not ok.media_attention_supports(64, 64, 65536)


def test_fused_available():
    assert ok.fused_available("cuda") == CUDA
    if not CUDA:
        assert ok.fused_available("cpu")  # the conftest turned the interpreter on
    assert not ok.fused_available("meta")


def test_fp32_dot_precision_follows_torch():
    """fp32 multiplies as torch's fp32 matmuls do: IEEE by default, TF32 once the user allows it."""
    from otterfast_kernels._common import dot_precision

    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert dot_precision(torch.float32) == "ieee" and dot_precision(torch.bfloat16) == "tf32"
        torch.set_float32_matmul_precision("high")
        assert dot_precision(torch.float32) == "tf32"
    finally:
        torch.set_float32_matmul_precision(before)


def test_autotuning_is_keyed_by_length_bucket_not_length():
    """A new sequence length must not re-run the autotuner (evaluation sees hundreds): the kernels are tuned once
    per power of two of T (attention) and of the row count (projection)."""
    from otterfast_kernels import gated_residual as gr
    from otterfast_kernels._common import size_bucket

    assert [size_bucket(n) for n in (0, 1, 2, 3, 100, 128, 129, 2048, 2049)] == [1, 1, 2, 4, 128, 128, 256, 2048, 4096]
    for kernel in (ma._fwd_kernel, ma._bwd_kernel):
        assert "T_KEY" in kernel.keys and "T" not in kernel.keys
    assert "R_KEY" in gr._mm_kernel.keys and "R" not in gr._mm_kernel.keys


def test_text_time_outside_int32_is_no_media(device):
    """int64 text_time beyond int32 (never made by the model, but an integer tensor is the contract): values
    outside 1..M mean no media, as in the reference, instead of wrapping round to a media when narrowed."""
    q, k, v, do, _ = inputs(1, 2, 6, 16, 2, 13, device=device, seed=5)
    tt = torch.tensor([[1, 2**32 + 1, 2**32 + 2, -2**32 + 1, 2, 0]], device=device)
    want = run(masked_media_attention_ref, q, k, v, tt, do)
    got = run(ok.masked_media_attention, q, k, v, tt, do)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
    assert (got[0][0, :, 1:4] == 0).all() and (got[1][0, :, 1:4] == 0).all()


def test_second_order_gradients_refuse_instead_of_lying(device):
    """The backward kernels are not differentiable: double backward raises rather than giving zeros (torch's
    once_differentiable guard, which acts when the incoming gradient itself requires grad)."""
    q, k, v, do, _ = inputs(1, 1, 5, 16, 1, 13, device=device, seed=6)
    tt = torch.tensor([[0, 1, 1, 1, 1]], device=device)
    out = ok.masked_media_attention(q, k, v, tt)
    (dq,) = torch.autograd.grad(out, (q,), do.requires_grad_(), create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        # without the guard this ran: dq's second-order part silently 0, only q.sum()'s gradient left
        (dq.sum() + q.sum()).backward()
