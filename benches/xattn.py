"""Gated cross-attention kernels: fused Triton vs eager (OpenFlamingo) vs SDPA with a dense mask vs flex_attention.

    python benches/xattn.py                      # a CUDA GPU: Otter-MPT7B shapes + a sweep over T and M
    python benches/xattn.py --out DIR --budget-s 240
    python benches/xattn.py --smoke              # no GPU: tiny shapes in Triton's CPU interpreter (proves it runs)

Needs torch and triton only (run from the source tree with PYTHONPATH=kernels, or with otterfast-kernels installed).

Three ops, each timed forward, backward and full step (forward + backward) with triton.testing.do_bench at
p20/p50/p80, with the peak memory of one step (torch.cuda.max_memory_allocated above what the inputs hold):
* core:  the attention core, q (B, H, T, d), k/v (B, H, M, L, d), text_time (B, T) -> (B, H, T, d).
         fused = otterfast_kernels.masked_media_attention; eager = reference.masked_media_attention_ref
         (OpenFlamingo's einsum + dense mask + softmax); sdpa = F.scaled_dot_product_attention with the dense
         (B, 1, T, M*L) boolean mask built from text_time each call, as the model's non-fused path does; flex =
         torch.compile(flex_attention) with mask_mod `text_time[b, q] == kv // L + 1` (its block mask is built once
         per shape, outside the timings, and its build time is reported separately).
* gate:  the output projection + tanh gate + residual, y = x + tanh(g) * (a @ W^T), a (B, T, H*d), W (d_model,
         H*d): fused = otterfast_kernels.gated_residual_linear; eager = the same in PyTorch ops.
* layer: core followed by gate (what the kernels replace in one gated cross-attention layer; the q/k/v
         projections are the same matmuls either way and are left out). fused = both fused kernels.

Bytes and FLOPs are the op's useful minimum (each row attends L latents, every tensor read or written once), so
GB/s and TFLOP/s are comparable across methods ("effective"): the formulas are printed with the results.
Writes xattn.csv and xattn.md (GPU name, versions, formulas, tables, the targets check) to --out.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import math
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))

# HBM bandwidth and dense bf16 peak by device name: the package's one table (otterfast/gpu_specs.py, which
# imports nothing, so a checkout without the package installed still runs this).
sys.path.insert(0, os.path.join(HERE, os.pardir, "python"))
from otterfast.gpu_specs import gpu_spec  # noqa: E402

TARGETS = {"speedup_vs_eager": 3.0, "speedup_vs_flex": 1.5, "memory_reduction_vs_eager": 0.5, "hbm_fraction": 0.6}

FORMULAS = """\
e = bytes per element (2 for bf16); R = B*T rows; D = d_model; I = H*d.
core fwd  bytes = e*(2*B*H*T*d + 2*B*H*M*L*d) + 4*B*H*T + 8*B*T          (q, o; k, v; lse fp32; text_time int64)
core bwd  bytes = e*(4*B*H*T*d + 4*B*H*M*L*d) + 4*B*H*T + 8*B*T          (q, o, dO, dq; k, v, dk, dv; lse; text_time)
core fwd  FLOPs = 4*B*H*T*L*d        core bwd FLOPs = 10*B*H*T*L*d      (useful: each row attends its media's L latents)
gate fwd  bytes = e*(R*I + D*I + 2*R*D)                                  (a, W, x, y)
gate bwd  bytes = e*(2*R*D + 2*R*I + 3*D*I)                              (dy twice, a, da; W twice, dW)
gate fwd  FLOPs = 2*R*I*D            gate bwd FLOPs = 4*R*I*D
layer = core + gate; step = fwd + bwd.  GB/s = bytes / p50 time; % HBM = GB/s / the GPU's HBM bandwidth.
speedup = other method's p50 / fused p50; memory reduction = 1 - fused peak / other peak (one step's peak)."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None, help="output folder (default benches/results/, smoke: a temp folder)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes in Triton's CPU interpreter (no GPU needed)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--budget-s", type=float, default=300.0,
                   help="stop starting new sweep points after this many seconds (flex compiles per shape)")
    p.add_argument("--no-sweep", action="store_true", help="only the Otter-MPT7B shape")
    p.add_argument("--no-flex", action="store_true", help="skip flex_attention (e.g. to save compile time)")
    return p.parse_args(argv)


# ---- shapes --------------------------------------------------------------------------------------------------
OTTER = dict(B=8, T=2048, M=5, L=64, H=8, d=64, D=4096)  # Otter on MPT-7B: d_model 4096, 8 heads x 64, 64 latents
SWEEP = ([dict(OTTER, T=t) for t in (512, 1024, 4096, 8192)]
         + [dict(OTTER, M=m) for m in (1, 2, 10, 20)])
SMOKE = dict(B=1, T=48, M=2, L=16, H=2, d=16, D=32)


def make_text_time(B, T, M, torch, device):
    """Each sample: 10% text before its first image, then images 1..M at evenly spaced positions (Otter's
    interleaved documents: text_time piecewise constant and non-decreasing)."""
    t = torch.arange(T, device=device)
    first = T // 10
    span = max((T - first) // max(M, 1), 1)
    tt = torch.where(t < first, torch.zeros_like(t), ((t - first) // span + 1).clamp(max=M))
    return tt.expand(B, T).contiguous()


# ---- timing --------------------------------------------------------------------------------------------------
def bench(fn, cuda: bool):
    """(p20, p50, p80) in ms."""
    if cuda:
        import triton.testing

        return tuple(triton.testing.do_bench(fn, quantiles=[0.2, 0.5, 0.8]))
    fn()  # warm-up (the interpreter's first run also traces)
    ts = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    ts.sort()
    return ts[0], statistics.median(ts), ts[-1]


def peak_step_mib(step, torch, cuda: bool) -> float:
    if not cuda:
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


# ---- the methods ---------------------------------------------------------------------------------------------
def core_methods(s, tt, torch, ok, use_flex: bool, cuda: bool):
    """name -> f(q, k, v) for the attention core; plus notes (e.g. flex block-mask build time)."""
    import torch.nn.functional as F

    B, T, M, L = s["B"], s["T"], s["M"], s["L"]
    notes = {}

    def sdpa(q, k, v):
        # the model's non-fused path: dense mask from text_time, rows without media attend anywhere, then zeroed
        key_media = torch.arange(M * L, device=q.device) // L + 1
        allowed = tt[:, :, None] == key_media[None, None, :]
        has = (tt >= 1) & (tt <= M)
        allowed = allowed | ~has[:, :, None]
        o = F.scaled_dot_product_attention(q, k.flatten(2, 3), v.flatten(2, 3), attn_mask=allowed[:, None])
        return o * has[:, None, :, None].to(o.dtype)

    methods = {"fused": lambda q, k, v: ok.masked_media_attention(q, k, v, tt),
               "eager": lambda q, k, v: ok.reference.masked_media_attention_ref(q, k, v, tt), "sdpa": sdpa}
    if use_flex:
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention

            def mask_mod(b, h, q_idx, kv_idx):
                return tt[b, q_idx] == kv_idx // L + 1

            dev = "cuda" if cuda else "cpu"
            t0 = time.perf_counter()
            block_mask = create_block_mask(mask_mod, B, None, T, M * L, device=dev)
            if cuda:
                torch.cuda.synchronize()
            notes["flex_block_mask_ms"] = (time.perf_counter() - t0) * 1e3
            flex = torch.compile(flex_attention, dynamic=False) if cuda else flex_attention

            def flex_fn(q, k, v):
                # rows whose mask is empty come out 0 from flex (lse = -inf); text_time > M rows are empty too
                return flex(q, k.flatten(2, 3), v.flatten(2, 3), block_mask=block_mask)

            methods["flex"] = flex_fn
        except Exception as e:  # noqa: BLE001 - a missing/old flex is a note, not a failure
            notes["flex_error"] = f"{type(e).__name__}: {e}"[:200]
    return methods, notes


def gate_methods(ok):
    def eager(x, a, w, g):
        return x + g.tanh() * torch_mod.nn.functional.linear(a, w)

    return {"fused": ok.gated_residual_linear, "eager": eager}


torch_mod = None  # set in main (imported after TRITON_INTERPRET is decided)


# ---- bytes and flops -----------------------------------------------------------------------------------------
def core_cost(s, e):
    B, T, M, L, H, d = s["B"], s["T"], s["M"], s["L"], s["H"], s["d"]
    fwd_b = e * (2 * B * H * T * d + 2 * B * H * M * L * d) + 4 * B * H * T + 8 * B * T
    bwd_b = e * (4 * B * H * T * d + 4 * B * H * M * L * d) + 4 * B * H * T + 8 * B * T
    return {"fwd": (fwd_b, 4 * B * H * T * L * d), "bwd": (bwd_b, 10 * B * H * T * L * d)}


def gate_cost(s, e):
    R, D, I = s["B"] * s["T"], s["D"], s["H"] * s["d"]
    return {"fwd": (e * (R * I + D * I + 2 * R * D), 2 * R * I * D),
            "bwd": (e * (2 * R * D + 2 * R * I + 3 * D * I), 4 * R * I * D)}


def with_step(c):
    c = dict(c)
    c["step"] = (c["fwd"][0] + c["bwd"][0], c["fwd"][1] + c["bwd"][1])
    return c


# ---- running one (op, shape) ---------------------------------------------------------------------------------
def run_op(op, s, dtype, device, ok, use_flex, cuda, hbm, log):
    torch = torch_mod
    B, T, M, L, H, d, D = (s[k] for k in ("B", "T", "M", "L", "H", "d", "D"))
    e = torch.finfo(dtype).bits // 8
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device, dtype).requires_grad_()

    tt = make_text_time(B, T, M, torch, device)
    notes = {}
    if op == "core":
        q, k, v = rnd(B, H, T, d), rnd(B, H, M, L, d), rnd(B, H, M, L, d)
        inputs = (q, k, v)
        methods, notes = core_methods(s, tt, torch, ok, use_flex, cuda)
        calls = {n: (lambda f: (lambda: f(q, k, v)))(f) for n, f in methods.items()}
        cost = with_step(core_cost(s, e))
        grad_out = torch.randn(B, H, T, d, generator=gen).to(device, dtype)
    else:
        x, a = rnd(B, T, D), rnd(B, T, H * d)
        w = rnd(D, H * d, scale=1 / math.sqrt(H * d))
        g = torch.tensor([0.5], device=device, dtype=dtype, requires_grad=True)  # a model-dtype parameter
        inputs = (x, a, w, g)
        gm = gate_methods(ok)
        grad_out = torch.randn(B, T, D, generator=gen).to(device, dtype)
        if op == "gate":
            calls = {n: (lambda f: (lambda: f(x, a, w, g)))(f) for n, f in gm.items()}
            cost = with_step(gate_cost(s, e))
        else:  # layer: the core's output, heads merged, is the gate's `a`
            q, k, v = rnd(B, H, T, d), rnd(B, H, M, L, d), rnd(B, H, M, L, d)
            inputs = (q, k, v, x, w, g)
            cm, notes = core_methods(s, tt, torch, ok, use_flex, cuda)

            def layer(core, gate):
                return lambda: gate(x, core(q, k, v).transpose(1, 2).reshape(B, T, H * d), w, g)

            calls = {"fused": layer(cm["fused"], gm["fused"])}
            for n in ("eager", "sdpa", "flex"):
                if n in cm:
                    calls[n] = layer(cm[n], gm["eager"])
            cc, gc = core_cost(s, e), gate_cost(s, e)
            cost = with_step({p: (cc[p][0] + gc[p][0], cc[p][1] + gc[p][1]) for p in ("fwd", "bwd")})

    rows = []
    ref_out = None
    for name, call in calls.items():
        if not cuda and name == "flex":
            # flex has no CPU backward; the smoke run checks its mask_mod's output (incl. empty rows) once
            if op == "core" and ref_out is not None:
                with torch.no_grad():
                    err = (methods["flex"](q.detach(), k.detach(), v.detach()).float() - ref_out).abs().max().item()
                log(f"  {op:5s} {name:6s} forward only (no CPU backward), |out - fused| {err:.2e}")
            continue
        try:
            with torch.no_grad():
                out = call().float()
            if name == "fused":
                ref_out = out
            err = (out - ref_out).abs().max().item() if ref_out is not None else float("nan")
            del out
            t_fwd = bench(lambda: call(), cuda)
            step_out = call()

            def bwd():
                torch.autograd.grad(step_out, inputs, grad_out, retain_graph=True)
            try:
                t_bwd, derived = bench(bwd, cuda), False
            except RuntimeError:  # a backward that cannot be replayed (retain_graph): step - fwd below
                t_bwd, derived = None, True
            del step_out

            def step():
                torch.autograd.grad(call(), inputs, grad_out)
            t_step = bench(step, cuda)
            if derived:
                t_bwd = tuple(max(s_ - f_, 0.0) for s_, f_ in zip(t_step, t_fwd))
            peak = peak_step_mib(step, torch, cuda)
        except Exception as ex:  # noqa: BLE001 - one method failing (OOM, compile) must not stop the run
            log(f"  {op} {name}: FAILED {type(ex).__name__}: {str(ex)[:300]}")
            if cuda:
                torch.cuda.empty_cache()
            continue
        for phase, t in (("fwd", t_fwd), ("bwd", t_bwd), ("step", t_step)):
            nbytes, flops = cost[phase]
            gbps = nbytes / (t[1] * 1e-3) / 1e9
            rows.append(dict(op=op, method=name, B=B, T=T, M=M, L=L, H=H, d=d, d_model=D, dtype=str(dtype).split(".")[-1],
                             phase=phase, p20_ms=t[0], p50_ms=t[1], p80_ms=t[2],
                             peak_step_mib=peak, bytes=nbytes, flops=flops, gbps=gbps,
                             pct_hbm=(100 * gbps * 1e9 / hbm) if hbm else float("nan"),
                             tflops=flops / (t[1] * 1e-3) / 1e12, max_abs_diff_vs_fused=err,
                             bwd_derived=(phase == "bwd" and derived)))
        log(f"  {op:5s} {name:6s} fwd {t_fwd[1]:8.3f} ms  bwd {t_bwd[1]:8.3f} ms  step {t_step[1]:8.3f} ms  "
            f"peak {peak:8.1f} MiB  step {rows[-1]['gbps']:7.1f} GB/s  |out - fused| {err:.2e}")
    if cuda:
        del inputs
        torch.cuda.empty_cache()
    return rows, notes


# ---- accuracy with the configs autotuning chose ----------------------------------------------------------------
def accuracy_check(s, dtype, device, ok, log):
    """The fused ops at shape s, with whatever configs autotuning picked for it (the GPU tests run one fixed
    config), against the fp32 reference from the same rounded inputs: outputs and every gradient. Rule, as in
    the bf16 tests: fused error <= 2 x the eager reference's error in the same dtype + 1e-2 x max|ref| + 1e-3.
    Returns (lines, all_ok)."""
    torch = torch_mod
    B, T, M, L, H, d, D = (s[k] for k in ("B", "T", "M", "L", "H", "d", "D"))
    gen = torch.Generator(device="cpu").manual_seed(1)
    tt = make_text_time(B, T, M, torch, device)

    def lowp(*shape, scale=1.0):  # rounded to the benchmark dtype once, so every path sees the same numbers
        return (torch.randn(*shape, generator=gen) * scale).to(device, dtype)

    def grads(fn, xs, dy):
        xs = [x.detach().clone().requires_grad_() for x in xs]
        out = fn(*xs)
        return [out.detach()] + list(torch.autograd.grad(out, xs, dy))

    cases = {
        "core": (("out", "dq", "dk", "dv"), [lowp(B, H, T, d), lowp(B, H, M, L, d), lowp(B, H, M, L, d)],
                 lowp(B, H, T, d), lambda q, k, v: ok.masked_media_attention(q, k, v, tt),
                 lambda q, k, v: ok.reference.masked_media_attention_ref(q, k, v, tt)),
        "gate": (("y", "dx", "da", "dW", "dgate"),
                 [lowp(B, T, D), lowp(B, T, H * d), lowp(D, H * d, scale=1 / math.sqrt(H * d)),
                  torch.tensor([0.5], device=device, dtype=dtype)],
                 lowp(B, T, D), ok.gated_residual_linear, ok.reference.gated_residual_linear_ref),
    }
    lines, all_ok = [], True
    for op, (names, xs, dy, fused, ref) in cases.items():
        exact = grads(ref, [x.float() for x in xs], dy.float())
        eager = grads(ref, xs, dy)
        got = grads(fused, xs, dy)
        for name, g_, e_, x_ in zip(names, got, eager, exact):
            err, err_eager = (g_.float() - x_).abs().max().item(), (e_.float() - x_).abs().max().item()
            tol = 2 * err_eager + 1e-2 * x_.abs().max().item() + 1e-3
            good = err <= tol and bool(torch.isfinite(g_).all())
            all_ok &= good
            lines.append(f"{op} {name}: |fused - fp32 ref| {err:.3g}, |eager - fp32 ref| {err_eager:.3g}, "
                         f"allowed {tol:.3g}: {'ok' if good else 'TOO LARGE'}")
        del exact, eager, got
    for line in lines:
        log("  " + line)
    return lines, all_ok


# ---- report --------------------------------------------------------------------------------------------------
def p50(rows, op, method, phase, s):
    for r in rows:
        if (r["op"], r["method"], r["phase"], r["B"], r["T"], r["M"]) == (op, method, phase, s["B"], s["T"], s["M"]):
            return r
    return None


def targets(rows, s, hbm):
    """Lines comparing the fused path with the issue's targets at shape s."""
    out = []

    def ratio(op, other, phase="step"):
        f, o = p50(rows, op, "fused", phase, s), p50(rows, op, other, phase, s)
        return (o["p50_ms"] / f["p50_ms"], f, o) if f and o else (None, f, o)

    for op in ("core", "layer"):
        sp, f, o = ratio(op, "eager")
        if sp is not None:
            out.append(f"{op} fwd+bwd speedup vs eager: {sp:.2f}x (target >= {TARGETS['speedup_vs_eager']}x) "
                       f"{'MET' if sp >= TARGETS['speedup_vs_eager'] else 'MISSED'}")
            red = 1 - f["peak_step_mib"] / o["peak_step_mib"] if o["peak_step_mib"] else float("nan")
            out.append(f"{op} peak memory reduction vs eager: {100 * red:.0f}% (target >= "
                       f"{100 * TARGETS['memory_reduction_vs_eager']:.0f}%) "
                       f"{'MET' if red >= TARGETS['memory_reduction_vs_eager'] else 'MISSED'}")
        sp, f, o = ratio(op, "flex")
        if sp is not None:
            out.append(f"{op} fwd+bwd speedup vs flex_attention: {sp:.2f}x (target >= {TARGETS['speedup_vs_flex']}x) "
                       f"{'MET' if sp >= TARGETS['speedup_vs_flex'] else 'MISSED'}")
        sp, f, o = ratio(op, "sdpa")
        if sp is not None:
            out.append(f"{op} fwd+bwd speedup vs SDPA with a dense mask: {sp:.2f}x")
    for phase in ("fwd", "bwd", "step"):
        f = p50(rows, "core", "fused", phase, s)
        if f and hbm:
            frac = f["gbps"] * 1e9 / hbm
            out.append(f"core {phase} fused: {f['gbps']:.0f} GB/s = {100 * frac:.0f}% of HBM "
                       f"(target >= {100 * TARGETS['hbm_fraction']:.0f}%) {'MET' if frac >= TARGETS['hbm_fraction'] else 'MISSED'}")
    return out


def md_table(rows, cols):
    head = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
    body = ""
    for r in rows:
        cells = []
        for c in cols:
            v = r[c]
            cells.append(f"{v:.3f}" if isinstance(v, float) and c.endswith("_ms") else
                         f"{v:.1f}" if isinstance(v, float) else str(v))
        body += "| " + " | ".join(cells) + " |\n"
    return head + body


CSV_COLS = ["op", "method", "B", "T", "M", "L", "H", "d", "d_model", "dtype", "phase", "p20_ms", "p50_ms", "p80_ms",
            "peak_step_mib", "bytes", "flops", "gbps", "pct_hbm", "tflops", "max_abs_diff_vs_fused", "bwd_derived"]
MD_COLS = ["op", "method", "T", "M", "phase", "p20_ms", "p50_ms", "p80_ms", "peak_step_mib", "gbps", "pct_hbm", "tflops"]


def write_reports(out_dir, rows, notes, checks, skipped, env, main_shape, cmd, smoke, accuracy=()):
    with open(os.path.join(out_dir, "xattn.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLS)
        w.writeheader()
        w.writerows(rows)
    is_main = lambda r: (r["T"], r["M"]) == (main_shape["T"], main_shape["M"])  # noqa: E731
    md = [f"# xattn benchmark ({'smoke, ' if smoke else ''}{env['date']})\n",
          "\n".join(f"- {k}: {v}" for k, v in env.items()) + "\n",
          f"Command: `{cmd}`\n",
          "## Formulas\n\n```\n" + FORMULAS + "\n```\n",
          f"## Main shape {main_shape}\n", md_table([r for r in rows if is_main(r)], MD_COLS),
          "## Targets (main shape)\n\n" + "\n".join(f"- {c}" for c in checks) + "\n",
          "## Accuracy at the main shape, autotuned configs\n\n" + "\n".join(f"- {a}" for a in accuracy) + "\n",
          "## Sweep over T and M (core)\n",
          md_table([r for r in rows if r["op"] == "core" and not is_main(r)], MD_COLS)]
    if notes:
        md.append("## Notes\n\n" + "\n".join(f"- {k}: {v if isinstance(v, str) else f'{v:.2f}'}"
                                             for k, v in notes.items()) + "\n")
    if skipped:
        md.append(f"Skipped for the time budget: {[(s['T'], s['M']) for s in skipped]}\n")
    with open(os.path.join(out_dir, "xattn.md"), "w") as f:
        f.write("\n".join(md))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: kernels are defined interpreted
    global torch_mod
    import torch

    torch_mod = torch
    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        print("xattn: this benchmark needs a CUDA GPU (the kernels are Triton GPU kernels). "
              "Run `python benches/xattn.py --smoke` to check that it runs, in Triton's CPU interpreter.")
        return 2
    try:
        import otterfast_kernels as ok
    except ImportError:
        sys.path.insert(0, os.path.join(HERE, os.pardir, "kernels"))
        import otterfast_kernels as ok
    import triton

    if hasattr(torch._dynamo.config, "recompile_limit"):  # flex is compiled once per swept shape
        torch._dynamo.config.recompile_limit = 64
    if hasattr(torch._dynamo.config, "cache_size_limit"):
        torch._dynamo.config.cache_size_limit = 64
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    if args.smoke:
        dtype = torch.float32  # the interpreter's bf16 is wrong; fp32 proves the plumbing
    device = "cuda" if cuda else "cpu"
    out_dir = args.out or (os.path.join(HERE, "results") if cuda else os.path.join("/tmp", "xattn-smoke"))
    os.makedirs(out_dir, exist_ok=True)

    gpu = torch.cuda.get_device_name() if cuda else "CPU (Triton interpreter, smoke)"
    spec = gpu_spec(gpu) if cuda else None
    hbm, peak_flops = (spec[1], spec[0] * 1e12) if spec else (None, None)
    env = {"gpu": gpu, "torch": torch.__version__, "triton": triton.__version__,
           "cuda": torch.version.cuda, "python": sys.version.split()[0],
           "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "hbm_bytes_per_s": hbm, "bf16_dense_flops": peak_flops, "dtype": str(dtype).split(".")[-1]}
    lines = []

    def log(msg):
        print(msg, flush=True)
        lines.append(msg)

    log(f"xattn benchmark on {gpu}; torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}; dtype {env['dtype']}")
    log(f"HBM bandwidth used for % HBM: {hbm / 1e12 if hbm else float('nan'):.2f} TB/s")
    log("formulas:\n" + FORMULAS)

    t_start = time.perf_counter()
    main_shape = SMOKE if args.smoke else OTTER
    rows, notes, skipped, accuracy = [], {}, [], []
    cmd = "python benches/xattn.py " + " ".join(argv if argv is not None else sys.argv[1:])

    def report(final: bool):
        # written after every shape, so a run cut short by a time limit still leaves its results
        checks = targets(rows, main_shape, hbm)
        if args.smoke:
            checks.insert(0, "smoke run: interpreter timings mean nothing; this only proves the benchmark runs")
        write_reports(out_dir, rows, notes, checks, skipped, env, main_shape, cmd, args.smoke, accuracy)
        return checks

    log(f"\nmain shape {main_shape}")
    for op in ("core", "gate", "layer"):
        r, n = run_op(op, main_shape, dtype, device, ok, not args.no_flex, cuda, hbm, log)
        rows += r
        notes.update({f"main {op} {k}": v for k, v in n.items()})
        report(False)
    log("\naccuracy at the main shape with the autotuned configs (fused and eager vs the fp32 reference):")
    acc_lines, acc_ok = accuracy_check(main_shape, dtype, device, ok, log)
    accuracy.extend(acc_lines)
    report(False)
    sweep = [] if args.no_sweep else ([dict(SMOKE, T=96), dict(SMOKE, M=3)] if args.smoke else SWEEP)
    for s in sweep:
        if time.perf_counter() - t_start > args.budget_s:
            skipped.append(s)
            continue
        log(f"\nsweep shape {s}")
        r, n = run_op("core", s, dtype, device, ok, not args.no_flex, cuda, hbm, log)
        rows += r
        notes.update({f"T={s['T']} M={s['M']} {k}": v for k, v in n.items()})
        report(False)
    if skipped:
        log(f"budget {args.budget_s:.0f} s spent: skipped sweep shapes {[(s['T'], s['M']) for s in skipped]}")
    checks = report(True)
    log("\ntargets at the main shape:")
    for c in checks:
        log("  " + c)
    for k, v in notes.items():
        log(f"note: {k}: {v if isinstance(v, str) else f'{v:.2f}'}")
    log(f"  accuracy with the autotuned configs: {'ok' if acc_ok else 'FAILED'}")
    csv_path, md_path = os.path.join(out_dir, "xattn.csv"), os.path.join(out_dir, "xattn.md")
    log(f"\nwrote {csv_path} and {md_path} ({time.perf_counter() - t_start:.0f} s)")
    return 0 if acc_ok else 1


if __name__ == "__main__":
    sys.exit(main())
