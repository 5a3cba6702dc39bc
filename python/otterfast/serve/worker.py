"""One model, one thread: requests wait in a queue and the worker generates their replies one at a time.

The model is not shared between threads (the Generator, its tokenizer and the KV cache are used by the worker
only). Each job talks back to its request handler through an asyncio queue on the server's loop: `start`
(the prompt fits; its token count), `text` pieces, then `done` (finish reason, usage) or `error` (an ApiError).
A job whose client went away has `cancelled` set: the worker skips it if it is still queued, and the generation
stops at the next token if it has started (Generator.generate_text's `should_stop`).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import queue
import threading
import time
import traceback

from ..data import images as imgs
from .chat import Prompt
from .errors import ApiError
from .schema import ChatRequest, ServeLimits

log = logging.getLogger("otterfast.serve")


def context_length(gen) -> int:
    """The language model's positions: prompt + reply must fit."""
    cfg = gen.model.lang_encoder.config if gen.kind == "otter" else gen.model.config.text_config
    return int(cfg.max_position_embeddings)


def prompt_tokens(gen, p: Prompt) -> int:
    """The prompt's length in the language model: its text tokens and BOS, plus (OtterHD) each image's patch
    tokens at the size Generator.inputs gives it (its own, shrunk to fit 1080 x 1920). Otter's media enter
    through cross-attention: only their `<image>` tokens count."""
    n = len(gen.tok(p.text, add_special_tokens=False)["input_ids"]) + (gen.info.bos_id is not None)
    if gen.kind == "otterhd":
        n += sum(imgs.fuyu_num_tokens(im.height, im.width) for im in p.images)
    return n


class ReplyText:
    """The streamed text as the client sees it: leading and trailing whitespace dropped (as the non-streamed
    reply is stripped), cut before the first stop sequence. Text that may yet turn out to be the start of a stop
    sequence, or trailing whitespace, is held back until the next piece shows what it is."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.buf = ""
        self.sent = 0
        self.stopped = False  # a stop sequence was found

    def feed(self, piece: str) -> str:
        if self.stopped:
            return ""
        self.buf += piece
        if self.sent == 0:
            self.buf = self.buf.lstrip()
        hits = [i for i in (self.buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            self.buf = self.buf[:min(hits)].rstrip()
            return self._take(len(self.buf))
        safe = len(self.buf.rstrip())
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.buf)), 0, -1):
                if self.buf.endswith(s[:k]):
                    safe = min(safe, len(self.buf) - k)
                    break
        return self._take(len(self.buf[:safe].rstrip()))  # nor the whitespace before a held-back stop start

    def finish(self) -> str:
        return self._take(len(self.buf.rstrip()))

    def _take(self, upto: int) -> str:
        out = self.buf[self.sent:upto] if upto > self.sent else ""
        self.sent = max(self.sent, upto)
        return out

    @property
    def text(self) -> str:
        return self.buf[:self.sent]


class Job:
    def __init__(self, loop: asyncio.AbstractEventLoop, prompt: Prompt, req: ChatRequest):
        self.loop, self.prompt, self.req = loop, prompt, req
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()

    def emit(self, kind: str, value=None) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the loop has closed (server shutting down)
            self.cancelled.set()


class Worker:
    def __init__(self, gen, limits: ServeLimits):
        self.gen, self.limits = gen, limits
        self.context = context_length(gen)
        from ..generate.generator import OTTER_DECODE, OTTERHD_DECODE

        # the model's own default (Otter 512, OtterHD 256 new tokens) when a request gives no max_tokens
        self.default_max_tokens = (OTTER_DECODE if gen.kind == "otter" else OTTERHD_DECODE)["max_new_tokens"]
        self.queue: queue.Queue = queue.Queue()
        self.busy = False
        self.finished: collections.Counter = collections.Counter()  # replies by finish reason (/health)
        self.thread = threading.Thread(target=self._run, name="otterfast-serve-model", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.queue.put(None)
        self.thread.join(timeout=30)

    def submit(self, job: Job) -> None:
        if self.queue.qsize() >= self.limits.max_queue:
            raise ApiError(503, f"{self.queue.qsize()} requests are waiting for the model (limit "
                                f"{self.limits.max_queue}); try again later", code="server_overloaded")
        self.queue.put(job)

    def _run(self) -> None:
        while True:
            job = self.queue.get()
            if job is None:
                return
            if job.cancelled.is_set():
                continue
            self.busy = True
            try:
                self._serve(job)
            except ApiError as e:
                job.emit("error", e)
            except Exception as e:  # a bug or an out-of-memory: that request fails, the server goes on
                log.error("generation failed:\n%s", traceback.format_exc())
                job.emit("error", ApiError(500, f"generation failed: {type(e).__name__}: {e}", code="server_error"))
            finally:
                self.busy = False

    def decode_settings(self, req: ChatRequest, room: int) -> dict:
        """OpenAI's fields -> transformers' generate settings. Greedy unless `temperature` > 0 (then sampled,
        with `top_p`); one beam (streaming needs it; Otter's other defaults, e.g. no_repeat_ngram_size 3, stay)."""
        want = req.max_new_tokens()
        decode = {"max_new_tokens": min(self.default_max_tokens, room) if want is None else want, "num_beams": 1}
        if req.temperature:
            decode.update(do_sample=True, temperature=req.temperature)
            if req.top_p is not None:
                decode["top_p"] = req.top_p
        else:
            decode["do_sample"] = False
        if req.ignore_eos:  # transformers keeps the stop tokens' logits at -inf until min_new_tokens
            decode["min_new_tokens"] = decode["max_new_tokens"]
        return decode

    def _serve(self, job: Job) -> None:
        import torch

        n_prompt = prompt_tokens(self.gen, job.prompt)
        room = self.context - n_prompt
        if room < 1:
            raise ApiError(400, f"the prompt is {n_prompt} tokens, over the model's context of {self.context}",
                           code="context_length_exceeded", param="messages")
        want = job.req.max_new_tokens()
        if want is not None and want > room:
            raise ApiError(400, f"the prompt is {n_prompt} tokens and max_tokens {want}: more than the model's "
                                f"context of {self.context}", code="context_length_exceeded", param="max_tokens")
        decode = self.decode_settings(job.req, room)
        if job.req.seed is not None:
            torch.manual_seed(job.req.seed)
        job.emit("start", n_prompt)
        reply = ReplyText(job.req.stop or [])
        t0 = time.perf_counter()

        def on_text(piece: str) -> None:
            out = reply.feed(piece)
            if out:
                job.emit("text", out)

        try:
            self.gen.generate_text(job.prompt.text, job.prompt.images, video=job.prompt.video, on_text=on_text,
                                   should_stop=lambda: job.cancelled.is_set() or reply.stopped, **decode)
        except ValueError as e:  # the Generator's word on its inputs (e.g. an image its transforms refuse)
            raise ApiError(400, str(e), code="invalid_value") from e
        tail = reply.finish()
        if tail:
            job.emit("text", tail)
        n_new = self.gen.last_new_tokens
        if reply.stopped or self.gen.last_hit_stop_token:
            finish = "stop"
        elif n_new >= decode["max_new_tokens"]:
            finish = "length"
        else:
            finish = "cancelled"
        self.finished[finish] += 1
        log.info("reply: %d prompt + %d new tokens in %.2fs (%s)", n_prompt, n_new, time.perf_counter() - t0, finish)
        job.emit("done", {"finish_reason": finish, "content": reply.text,
                          "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_new,
                                    "total_tokens": n_prompt + n_new}})
