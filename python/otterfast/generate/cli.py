"""`otterfast generate MODEL_DIR --image IMG --prompt "..."`: one reply, optionally streamed."""

from __future__ import annotations

import argparse
import json
import os

DTYPES = ("float32", "bfloat16", "float16")


def register(sub) -> None:
    g = sub.add_parser("generate", help="generate a reply from an Otter or OtterHD model folder",
                       description="Otter: one image, several (in-context examples first, one per <image>), or video "
                                   "frames (--video). OtterHD: images at their own resolution or --resolution.")
    g.add_argument("model", help="a model folder (otterfast train's export, or a local Otter/Fuyu checkpoint)")
    g.add_argument("--prompt", required=True, help="the question")
    g.add_argument("--image", action="append", default=[], help="an image file (repeat: examples first, query last)")
    g.add_argument("--example", action="append", default=[], metavar="Q=>A",
                   help="an in-context example 'question=>answer', one per leading --image (repeat)")
    g.add_argument("--video", action="store_true", help="the images are frames of one video (Otter)")
    g.add_argument("--template", help="prompt template (default: the one the model was trained with); "
                                      "otter-image, simple, llama2, otterhd, fuyu, raw")
    g.add_argument("--tokenizer", help="tokenizer folder (default: in the model folder)")
    g.add_argument("--resolution", type=int, help="OtterHD: scale the short edge to this first")
    g.add_argument("--max-new-tokens", type=int)
    g.add_argument("--num-beams", type=int)
    g.add_argument("--sample", action="store_true", help="sample (with --temperature, --top-p) instead of search")
    g.add_argument("--temperature", type=float)
    g.add_argument("--top-p", type=float)
    g.add_argument("--no-repeat-ngram-size", type=int)
    g.add_argument("--stream", action="store_true", help="print tokens as they come (one beam)")
    g.add_argument("--legacy-media-masking", action="store_true",
                   help="Otter's behaviour: generated tokens get no cross-attention with a KV cache")
    g.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    g.add_argument("--dtype", choices=DTYPES, help="weights' dtype (default: the checkpoint's)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--json", action="store_true", help="print {prompt, reply, settings} as JSON")
    g.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    """Bad arguments, images and model folders raise ValueError / FileNotFoundError with the problem named
    (otterfast.cli prints them as one line); they are checked before the model loads."""
    from PIL import Image

    from ..data import images as imgs

    examples = []
    for e in a.example:
        if "=>" not in e:
            raise ValueError(f"--example {e!r}: expected 'question=>answer'")
        q, ans = e.split("=>", 1)
        examples.append((q.strip(), ans.strip()))
    for name in ("max_new_tokens", "num_beams", "resolution"):
        v = getattr(a, name)
        if v is not None and v < 1:
            raise ValueError(f"--{name.replace('_', '-')} {v}: must be at least 1")
    images = []
    for p in a.image:
        try:
            im = Image.open(p)
            imgs.check_size(*im.size)  # from the header, before decoding: the loaders' size rule (data/images.py)
            im.load()  # decoded now: a truncated file is named here, not midway through generation
        except (FileNotFoundError, IsADirectoryError, PermissionError):
            raise
        except imgs.ImageSizeError as err:
            raise ValueError(f"--image {p}: {err}") from err
        except (OSError, Image.DecompressionBombError) as err:  # PIL's UnidentifiedImageError is an OSError
            raise ValueError(f"--image {p}: not a readable image ({err})") from err
        images.append(im)
    if not os.path.isfile(os.path.join(a.model, "config.json")):
        raise FileNotFoundError(f"{a.model}: not a model folder (no config.json)")

    import torch

    if a.device != "cpu":
        try:
            dev = torch.device(a.device)
        except RuntimeError as err:
            raise ValueError(f"--device {a.device!r}: {err}") from err
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {a.device}: no CUDA device here")

    from .generator import Generator

    torch.manual_seed(a.seed)
    try:
        gen = Generator(a.model, tokenizer=a.tokenizer, device=a.device, dtype=a.dtype, template=a.template)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError):
        raise
    except OSError as err:  # transformers: missing or unreadable weight files
        raise ValueError(f"{a.model}: cannot load the model ({err})") from err
    decode = {k: v for k, v in {"max_new_tokens": a.max_new_tokens, "num_beams": a.num_beams,
                                "temperature": a.temperature, "top_p": a.top_p,
                                "no_repeat_ngram_size": a.no_repeat_ngram_size}.items() if v is not None}
    if a.sample:
        decode["do_sample"] = True
    n_media = 1 if a.video else len(images)
    text = gen.prompt(a.prompt, examples, n_media)
    reply = gen.generate_text(text, images, video=a.video, resolution=a.resolution, stream=a.stream,
                              legacy=a.legacy_media_masking, **decode)
    if a.json:
        print(json.dumps({"prompt": text, "reply": reply, "template": a.template or gen.template, "decode": decode}))
    elif not a.stream:
        print(reply)
    return 0
