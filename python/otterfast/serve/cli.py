"""`otterfast serve MODEL_DIR [--host 127.0.0.1] [--port 8000]` and `otterfast bench serve`."""

from __future__ import annotations

import argparse
import os

DTYPES = ("float32", "bfloat16", "float16")


def register(sub, bench_sub=None) -> None:
    s = sub.add_parser("serve", help="serve a model folder: an OpenAI-style HTTP API and a web chat page",
                       description="Loads an Otter or OtterHD folder once (otterfast train's export, or a local "
                                   "Otter/Fuyu checkpoint) and serves POST /v1/chat/completions, GET /v1/models, "
                                   "GET /health and a chat page at /. See docs/serve.md.")
    s.add_argument("model", help="a model folder")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--name", help="the model's id in the API (default: KIND:FOLDER, e.g. otter:export)")
    s.add_argument("--template", help="prompt template (default: the one the model was trained with)")
    s.add_argument("--tokenizer", help="tokenizer folder (default: in the model folder)")
    s.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    s.add_argument("--dtype", choices=DTYPES, help="weights' dtype (default: the checkpoint's)")
    s.add_argument("--max-body-mb", type=float, default=20, help="largest request body, MB (default 20)")
    s.add_argument("--max-images", type=int, default=16, help="images per request, video frames included (16)")
    s.add_argument("--max-image-pixels", type=int, help="pixels per image, to lower the default (PIL's "
                                                         "decompression-bomb threshold, 89478485)")
    s.add_argument("--max-queue", type=int, default=64, help="requests waiting for the model; more get 503 (64)")
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    s.set_defaults(func=run)
    if bench_sub is not None:
        b = bench_sub.add_parser("serve", help="N concurrent streaming requests to the tiny demo model on the CPU: "
                                 "time to first token, tokens/s, peak RSS (benches/serve.py); arguments go to it",
                                 add_help=False)
        b.add_argument("args", nargs=argparse.REMAINDER)
        b.set_defaults(func=cmd_bench_serve)


def cmd_bench_serve(a) -> int:
    from ..source_tree import run_bench

    return run_bench("serve.py", a.args)


def limits_from_args(a: argparse.Namespace):
    from .schema import ServeLimits

    for name in ("max_images", "max_queue", "port"):
        if getattr(a, name) < (0 if name == "port" else 1):
            raise ValueError(f"--{name.replace('_', '-')} {getattr(a, name)}: must be at least 1")
    if a.max_body_mb <= 0:
        raise ValueError(f"--max-body-mb {a.max_body_mb}: must be > 0")
    kw = {"max_body_bytes": int(a.max_body_mb * 1024 * 1024), "max_images": a.max_images,
          "max_queue": a.max_queue}
    if a.max_image_pixels is not None:
        if not 1 <= a.max_image_pixels <= ServeLimits.max_image_pixels:
            raise ValueError(f"--max-image-pixels {a.max_image_pixels}: must be between 1 and "
                             f"{ServeLimits.max_image_pixels} (the loaders' decompression-bomb limit; it can only "
                             "be lowered)")
        kw["max_image_pixels"] = a.max_image_pixels
    return ServeLimits(**kw)


def run(a: argparse.Namespace) -> int:
    limits = limits_from_args(a)
    if not os.path.isfile(os.path.join(a.model, "config.json")):
        raise FileNotFoundError(f"{a.model}: not a model folder (no config.json)")
    import logging

    import uvicorn

    from ..generate import Generator
    from .app import create_app

    try:
        gen = Generator(a.model, tokenizer=a.tokenizer, device=a.device, dtype=a.dtype, template=a.template)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError):
        raise
    except OSError as err:  # transformers: missing or unreadable weight files
        raise ValueError(f"{a.model}: cannot load the model ({err})") from err
    if gen.template == "raw":
        raise ValueError("--template raw leaves media placement to the caller; serve with a chat template")
    logging.basicConfig(level=a.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    app = create_app(gen, limits, model_id=a.name, path=os.path.abspath(a.model))
    host = f"[{a.host}]" if ":" in a.host else a.host
    print(f"otterfast serve: {gen.kind} model {a.name or gen.name} from {a.model}; chat page http://{host}:{a.port}/ "
          f"· API http://{host}:{a.port}/v1/chat/completions", flush=True)
    uvicorn.run(app, host=a.host, port=a.port, log_level=a.log_level, timeout_graceful_shutdown=5)
    return 0
