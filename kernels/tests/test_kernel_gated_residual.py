"""gated_residual_linear (Triton) against the eager reference x + tanh(gate) * (a @ W^T).

Tolerances (stated in kernels/README.md):
* fp32: y and dx, da, dW: |fused - ref| <= 1e-4 + 1e-4 * |ref|; dgate (a sum over every element): rtol 1e-4
  relative to the largest partial magnitude, i.e. atol = 1e-4 * (1 + sum|dy * (a @ W^T)|) (fp32 summation order).
* fp16: against the fp32 reference, atol = rtol = 2e-2 (dgate: 1e-2 of the summed magnitude).
* bf16 (GPU only): the fused error against the fp32 reference is at most 2x the eager bf16 error, + 1e-2 of the
  largest value (one bf16 rounding of the output) + 1e-3.
"""

from __future__ import annotations

import pytest
import torch

import otterfast_kernels as ok
from otterfast_kernels.reference import gated_residual_linear_ref

CUDA = torch.cuda.is_available()


def inputs(lead, d_in, d_out, gate, dtype=torch.float32, device="cpu", seed=0, gate_shape=(1,)):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, d_out, generator=gen).to(device, dtype).requires_grad_()
    a = torch.randn(*lead, d_in, generator=gen).to(device, dtype).requires_grad_()
    w = (torch.randn(d_out, d_in, generator=gen) / d_in ** 0.5).to(device, dtype).requires_grad_()
    g = torch.full(gate_shape, gate, device=device).requires_grad_()
    dy = torch.randn(*lead, d_out, generator=gen).to(device, dtype)
    return x, a, w, g, dy


def run(fn, x, a, w, g, dy):
    y = fn(x, a, w, g)
    return (y.detach(),) + torch.autograd.grad(y, (x, a, w, g), dy)


def gate_atol(x, a, w, dy, rel):
    return rel * (1.0 + (dy.float() * torch.nn.functional.linear(a.float(), w.float())).abs().sum().item())


CASES = [
    # id, leading dims, D_in, D_out, gate value, gate shape
    ("T1-gate0", (1, 1), 64, 16, 0.0, (1,)),  # Otter's initial gate: dgate must still be exact
    ("B2-T37", (2, 37), 48, 40, 0.3, (1,)),
    ("T129-scalar-gate", (129,), 16, 64, -2.0, ()),
    ("B3-T37-odd-dims", (3, 37), 100, 70, 1.1, (1,)),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_fp32_matches_reference(case, device):
    _, lead, d_in, d_out, gate, gshape = case
    x, a, w, g, dy = inputs(lead, d_in, d_out, gate, device=device, gate_shape=gshape)
    got = run(ok.gated_residual_linear, x, a, w, g, dy)
    want = run(gated_residual_linear_ref, x, a, w, g, dy)
    for name, gt, wt in zip(("y", "dx", "da", "dW"), got[:4], want[:4]):
        torch.testing.assert_close(gt, wt, atol=1e-4, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    assert got[4].shape == g.shape
    torch.testing.assert_close(got[4], want[4], atol=gate_atol(x, a, w, dy, 1e-4), rtol=1e-4)


def test_strided_and_partial_grads(device):
    """a as a transposed view, dy expanded (stride 0, from y.sum()), a frozen weight: only what is asked for."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(37, 40, generator=gen).to(device).requires_grad_()
    a = torch.randn(24, 37, generator=gen).to(device).t().requires_grad_()  # (37, 24), not contiguous
    w = torch.randn(40, 24, generator=gen).to(device)  # frozen
    g = torch.tensor([0.7], device=device, requires_grad=True)
    y = ok.gated_residual_linear(x, a, w, g)
    ga = torch.autograd.grad(y.sum(), (x, a, g))
    yr = gated_residual_linear_ref(x, a, w, g)
    gr = torch.autograd.grad(yr.sum(), (x, a, g))
    torch.testing.assert_close(y, yr, atol=1e-4, rtol=1e-4)
    for gt, wt in zip(ga, gr):
        torch.testing.assert_close(gt, wt, atol=1e-3, rtol=1e-4)


def test_empty_rows(device):
    x, a, w, g, dy = inputs((0,), 16, 16, 0.5, device=device)
    y, dx, da, dw, dg = run(ok.gated_residual_linear, x, a, w, g, dy)
    assert y.shape == (0, 16) and (dw == 0).all() and (dg == 0).all()


def test_fp16(device):
    x, a, w, g, dy = inputs((2, 37), 48, 40, 0.4, device=device, seed=9)
    want = run(gated_residual_linear_ref, x, a, w, g, dy)
    h = [t.detach().half().requires_grad_() for t in (x, a, w)]
    got = run(ok.gated_residual_linear, *h, g, dy.half())
    for gt, wt in zip(got[:4], want[:4]):
        assert gt.dtype == torch.float16
        torch.testing.assert_close(gt.float(), wt, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got[4], want[4], atol=gate_atol(x, a, w, dy, 1e-2), rtol=1e-2)


def test_mixed_precision_like_autocast(device):
    """fp32 residual stream and weight, fp16 activations: the projection runs in fp16, y and dx stay fp32."""
    x, a, w, g, dy = inputs((2, 37), 48, 40, 0.4, device=device, seed=4)
    want = run(gated_residual_linear_ref, x, a, w, g, dy)
    a16 = a.detach().half().requires_grad_()
    y = ok.gated_residual_linear(x, a16, w, g)
    assert y.dtype == torch.float32
    dx, da, dw, dg = torch.autograd.grad(y, (x, a16, w, g), dy)
    assert (dx.dtype, da.dtype, dw.dtype) == (torch.float32, torch.float16, torch.float32)
    for gt, wt in zip((y, dx, da, dw), want[:4]):
        torch.testing.assert_close(gt.float(), wt, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(dg, want[4], atol=gate_atol(x, a, w, dy, 1e-2), rtol=1e-2)


@pytest.mark.skipif(not CUDA, reason="bf16 runs only on a GPU: Triton's CPU interpreter computes bf16 arithmetic "
                                     "wrongly, so a CPU result would test the interpreter")
@pytest.mark.gpu
@pytest.mark.parametrize("shape", [((2, 37), 48, 40), ((2, 2048), 512, 4096), ((1000,), 512, 4096)],
                         ids=["odd", "otter-mpt7b-slice", "1000-rows"])
def test_bf16_gpu(shape):
    lead, d_in, d_out = shape
    x, a, w, g, dy = inputs(lead, d_in, d_out, 0.4, device="cuda", seed=21)
    exact = run(gated_residual_linear_ref, x, a, w, g, dy)
    lo = lambda: [t.detach().bfloat16().requires_grad_() for t in (x, a, w)]  # noqa: E731
    eager = run(gated_residual_linear_ref, *lo(), g, dy.bfloat16())
    got = run(ok.gated_residual_linear, *lo(), g, dy.bfloat16())
    for name, gt, e, xt in zip(("y", "dx", "da", "dW", "dgate"), got, eager, exact):
        err, err_eager = (gt.float() - xt).abs().max().item(), (e.float() - xt).abs().max().item()
        # + one bf16 rounding of the largest value: the fused op stores y in bf16, eager promotes it to fp32
        tol = 2 * err_eager + 1e-2 * xt.abs().max().item() + 1e-3
        assert err <= tol, f"{name}: fused bf16 error {err:.3g} vs eager bf16 {err_eager:.3g}"


def test_validation():
    with pytest.raises(ValueError):
        ok.gated_residual_linear(torch.zeros(3, 4), torch.zeros(3, 5), torch.zeros(4, 6), torch.zeros(1))
    with pytest.raises(ValueError):
        ok.gated_residual_linear(torch.zeros(3, 4), torch.zeros(3, 5), torch.zeros(4, 5), torch.zeros(2))
    with pytest.raises(TypeError):
        ok.gated_residual_linear(torch.zeros(3, 4), torch.zeros(3, 5).double(), torch.zeros(4, 5), torch.zeros(1))
    with pytest.raises(TypeError):
        ok.gated_residual_linear(torch.zeros(3, 4), torch.zeros(3, 5, dtype=torch.long), torch.zeros(4, 5),
                                 torch.zeros(1))


def test_second_order_gradients_refuse_instead_of_lying(device):
    """The backward kernels are not differentiable: double backward raises rather than giving zeros (torch's
    once_differentiable guard, which acts when the incoming gradient itself requires grad)."""
    x, a, w, g, dy = inputs((2, 5), 16, 16, 0.3, device=device, seed=3)
    y = ok.gated_residual_linear(x, a, w, g)
    (da,) = torch.autograd.grad(y, (a,), dy.requires_grad_(), create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        # without the guard this ran: da's second-order part silently 0, only a.sum()'s gradient left
        (da.sum() + a.sum()).backward()
