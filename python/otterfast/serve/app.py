"""The HTTP app (Starlette): the OpenAI-style API, the chat page, JSON errors everywhere.

    GET  /                      the chat page (page/index.html)
    GET  /health                {"status": "ok", "model", "queued", "busy", "finished": {reason: count}}
    GET  /v1/models[/{id}]      the loaded model, with its settings and the server's limits under "otterfast"
    POST /v1/chat/completions   a reply; `stream: true` sends server-sent events, then `data: [DONE]`

Every error is `{"error": {"message", "type", "param", "code"}}` with its status: 400 for a bad request (JSON,
fields, images, too many images, too long a prompt), 404 for an unknown model or path, 405 for a wrong method,
413 for a body over the limit, 503 when the queue is full, 500 for a failure of ours (the server goes on).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid
from contextlib import asynccontextmanager
from importlib import resources

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.routing import Route

from ..data.images import MAX_ASPECT_RATIO
from .chat import decode_images, parse_chat, render
from .errors import ApiError
from .schema import ServeLimits, parse_request
from .worker import Job, Worker

log = logging.getLogger("otterfast.serve")


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes gets 413 before the app sees it. The body is read here
    (the app needs all of it anyway) and replayed to the app; the excess is drained, not kept, so that the client
    can finish sending and read the answer (up to 8x the limit; past that the connection is just closed)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            body = msg.get("body", b"")
            size += len(body)
            more = msg.get("more_body", False)
            if size <= self.limit:
                chunks.append(body)
            elif size > 8 * self.limit:
                break
        if size > self.limit:
            err = ApiError(413, f"the request body is over the limit of {self.limit} bytes (--max-body-mb)",
                           code="request_too_large")
            return await JSONResponse(err.body(), status_code=413)(scope, receive, send)
        replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def receive_replayed():
            return replay.pop() if replay else await receive()

        await self.app(scope, receive_replayed, send)


def _error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return _error_response(exc)


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return _error_response(ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=code))


async def _server_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("request failed")
    return _error_response(ApiError(500, f"internal error: {type(exc).__name__}: {exc}", code="server_error"))


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _next_event(job: Job, disconnect: asyncio.Future):
    """The job's next event, or None when the client has gone (the job is then cancelled)."""
    get = asyncio.ensure_future(job.events.get())
    done, _ = await asyncio.wait({get, disconnect}, return_when=asyncio.FIRST_COMPLETED)
    if get in done:
        return get.result()
    get.cancel()
    job.cancelled.set()
    return None


def create_app(gen, limits: ServeLimits = ServeLimits(), model_id: str | None = None, path: str | None = None,
               start_worker: bool = True) -> Starlette:
    """The app over a loaded Generator. Its worker thread starts with the app (lifespan) and stops with it."""
    worker = Worker(gen, limits)
    model_id = model_id or gen.name
    created = int(os.path.getmtime(os.path.join(path, "config.json"))) if path else int(time.time())
    page = resources.files(__package__).joinpath("page/index.html").read_text(encoding="utf-8")
    param = next(iter(gen.model.parameters()))

    def card() -> dict:
        return {"id": model_id, "object": "model", "created": created, "owned_by": "otterfast",
                "otterfast": {
                    "kind": gen.kind, "path": path, "template": gen.template, "context_length": worker.context,
                    "device": str(param.device), "dtype": str(param.dtype).replace("torch.", ""),
                    "parameters": sum(p.numel() for p in gen.model.parameters()),
                    "decode": {"max_tokens": worker.default_max_tokens, "num_beams": 1,
                               "sampling": "greedy unless temperature > 0 (then top_p applies)"},
                    "video": "one media of frames" if gen.kind == "otter" else "frames as images",
                    "limits": {"max_body_bytes": limits.max_body_bytes, "max_images": limits.max_images,
                               "max_image_pixels": limits.max_image_pixels,
                               "max_aspect_ratio": MAX_ASPECT_RATIO, "max_queue": limits.max_queue}}}

    async def index(request: Request):
        return HTMLResponse(page)

    async def health(request: Request):
        return JSONResponse({"status": "ok", "model": model_id, "queued": worker.queue.qsize(), "busy": worker.busy,
                             "finished": dict(worker.finished)})

    async def models(request: Request):
        return JSONResponse({"object": "list", "data": [card()]})

    async def model(request: Request):
        if request.path_params["model"] != model_id:
            raise _unknown_model(request.path_params["model"])
        return JSONResponse(card())

    def _unknown_model(name: str) -> ApiError:
        return ApiError(404, f"model {name!r} does not exist; this server has {model_id!r}", code="model_not_found",
                        param="model")

    async def chat_completions(request: Request):
        req = parse_request(await request.body())
        if req.model is not None and req.model != model_id:
            raise _unknown_model(req.model)
        chat = parse_chat(req, limits)
        await run_in_threadpool(decode_images, chat, limits)  # PIL off the event loop
        prompt = render(chat, gen.template, gen.kind)
        job = Job(asyncio.get_running_loop(), prompt, req)
        worker.submit(job)
        disconnect = asyncio.ensure_future(_wait_disconnect(request))
        try:
            first = await _next_event(job, disconnect)  # start or error: a bad prompt is an error status, not a stream
        except BaseException:
            job.cancelled.set()
            disconnect.cancel()
            raise
        if first is None:
            return JSONResponse({}, status_code=499)  # nobody is listening
        if first[0] == "error":
            disconnect.cancel()
            raise first[1]
        rid, now = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if req.stream:
            disconnect.cancel()  # StreamingResponse watches for the disconnect itself (and cancels the stream)
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(_sse(job, rid, now, model_id, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            while True:
                ev = await _next_event(job, disconnect)
                if ev is None:
                    return JSONResponse({}, status_code=499)
                if ev[0] == "error":
                    raise ev[1]
                if ev[0] == "done":
                    break
        finally:
            disconnect.cancel()
        done = ev[1]
        return JSONResponse({"id": rid, "object": "chat.completion", "created": now, "model": model_id,
                             "choices": [{"index": 0, "message": {"role": "assistant", "content": done["content"]},
                                          "finish_reason": done["finish_reason"]}],
                             "usage": done["usage"]})

    @asynccontextmanager
    async def lifespan(app):
        if start_worker:
            worker.start()
        yield
        if start_worker:
            await run_in_threadpool(worker.stop)

    app = Starlette(routes=[Route("/", index), Route("/health", health), Route("/v1/models", models),
                            Route("/v1/models/{model:path}", model),
                            Route("/v1/chat/completions", chat_completions, methods=["POST"])],
                    exception_handlers={ApiError: _api_error, HTTPException: _http_error, Exception: _server_error},
                    lifespan=lifespan)
    app.state.worker = worker
    app.state.model_id = model_id
    return BodyLimit(app, limits.max_body_bytes)


def _chunk(rid: str, now: int, model_id: str, delta: dict, finish=None) -> str:
    return "data: " + json.dumps({"id": rid, "object": "chat.completion.chunk", "created": now, "model": model_id,
                                  "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}) + "\n\n"


async def _sse(job: Job, rid: str, now: int, model_id: str, include_usage: bool):
    """Server-sent events: a role chunk, one chunk per text piece, the finish chunk, [usage], `data: [DONE]`."""
    try:
        yield _chunk(rid, now, model_id, {"role": "assistant", "content": ""})
        while True:
            kind, value = await job.events.get()
            if kind == "text":
                yield _chunk(rid, now, model_id, {"content": value})
            elif kind == "error":  # a failure after the stream began: OpenAI's error object as an event
                yield "data: " + json.dumps(value.body()) + "\n\n"
                break
            elif kind == "done":
                yield _chunk(rid, now, model_id, {}, value["finish_reason"])
                if include_usage:
                    yield "data: " + json.dumps({"id": rid, "object": "chat.completion.chunk", "created": now,
                                                 "model": model_id, "choices": [], "usage": value["usage"]}) + "\n\n"
                break
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled.set()  # a client that went away cancels this task: its generation stops at the next token
