"""`otterfast serve`: the prompt a chat becomes, streamed text and stop sequences, and the HTTP API of a real
server (uvicorn in a thread, a tiny Otter / OtterHD export): replies equal `Generator.generate_text`'s, the SSE
format, every bad request's JSON error (and the next good request still answered), a client that disconnects
stopping its generation, and concurrent clients served from the queue."""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import shutil
import socket
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from PIL import Image
from test_generate import ROOT, export, photo

from otterfast.data.prompts import prompt
from otterfast.serve.chat import Chat, Turn, parse_chat, render
from otterfast.serve.errors import ApiError
from otterfast.serve.schema import ServeLimits, parse_request
from otterfast.serve.worker import ReplyText

# ------------------------------------------------------------------------------------------------ helpers


def data_url(im: Image.Image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    im.save(buf, fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def user(text: str, *urls: str) -> dict:
    return {"role": "user", "content": [image_part(u) for u in urls] + [{"type": "text", "text": text}]}


def png_header(w: int, h: int) -> bytes:
    """A PNG whose header claims w x h pixels, with a few bytes of pixel data: a decompression bomb to a
    decoder that trusts the header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


class LiveServer:
    """The app under uvicorn in a thread, on a free port of 127.0.0.1."""

    def __init__(self, app):
        import uvicorn

        self.app = app
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        t0 = time.time()
        while not self.server.started:
            assert self.thread.is_alive() and time.time() - t0 < 60, "the server did not start"
            time.sleep(0.02)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def request(self, method: str, path: str, body=None, headers=None) -> tuple[int, dict | str]:
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        if isinstance(body, dict):
            body = json.dumps(body)
        c.request(method, path, body=body, headers=headers or {"Content-Type": "application/json"})
        r = c.getresponse()
        raw = r.read().decode()
        c.close()
        try:
            return r.status, json.loads(raw)
        except json.JSONDecodeError:
            return r.status, raw

    def chat(self, body: dict):
        return self.request("POST", "/v1/chat/completions", body)

    def stream(self, body: dict) -> list:
        """The SSE events' data, parsed (the final "[DONE]" kept as a string)."""
        status, raw = self.chat({**body, "stream": True})
        assert status == 200, raw
        events = [e for e in raw.split("\n\n") if e]
        assert all(e.startswith("data: ") for e in events), raw[:500]
        return [e[6:] if e[6:] == "[DONE]" else json.loads(e[6:]) for e in events]

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def streamed_text(events: list) -> str:
    return "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1] if e["choices"])


# ---------------------------------------------------------------------------------------------- unit tests


def test_reply_text_strips_and_cuts_at_stop_sequences_across_pieces():
    r = ReplyText([])
    assert [r.feed(p) for p in ["  ", " Hello", " world", " \n"]] + [r.finish()] == ["", "Hello", " world", "", ""]
    assert r.text == "Hello world"
    r = ReplyText(["END"])
    out = [r.feed(p) for p in ["a b E", "N", "x E", "NDing"]]  # "EN" held back, then it is not the stop
    assert "".join(out) + r.finish() == "a b ENx" and r.stopped
    r = ReplyText(["\n\n", "zz"])
    assert "".join(r.feed(p) for p in ["one\n", "\ntwo"]) + r.finish() == "one" and r.stopped


def _req(messages, **kw):
    return parse_request(json.dumps({"messages": messages, **kw}).encode())


def test_chat_renders_the_training_layout_with_examples_and_system():
    chat = parse_chat(_req([{"role": "system", "content": "Answer briefly."},
                            user("What is it?", "a"), {"role": "assistant", "content": "a <image>cat"},
                            user("And these?", "b", "c")]), ServeLimits())
    chat.turns[0].images, chat.turns[1].images = ["A"], ["B", "C"]  # stand-ins for decoded images
    p = render(chat, "simple", "otter")
    assert p.text == ("Answer briefly.\n<image>User:What is it? GPT:<answer>a cat<|endofchunk|>"
                      "<image><image>User:And these? GPT:<answer>")
    assert p.images == ["A", "B", "C"] and not p.video
    hd = render(chat, "fuyu", "otterhd")  # patches go before BOS: no media text
    assert hd.text == "Answer briefly.\nUser:What is it? Assistant:\x04 a catUser:And these? Assistant:\x04"
    # one image per turn: the layout of `otterfast generate --example` (data/prompts.py's prompt)
    chat.turns[1].images = ["B"]
    for template, kind in (("simple", "otter"), ("otter-image", "otter"), ("llama2", "otter"), ("fuyu", "otterhd")):
        assert render(chat, template, kind).text == "Answer briefly.\n" + prompt(template, "And these?",
                                                                                  [("What is it?", "a cat")])
    video = Chat("", [Turn("What happens?", ["f1", "f2", "f3"], video=True)])
    assert render(video, "simple", "otter").text == "<image>User:What happens? GPT:<answer>"
    assert render(video, "simple", "otter").video
    with pytest.raises(ApiError, match="only media"):
        render(Chat("", [Turn("x", ["i"]), Turn("y", ["f1", "f2"], video=True)]), "simple", "otter")


@pytest.mark.parametrize("messages,match", [
    ([{"role": "assistant", "content": "hi"}], "expected a user message"),
    ([user("q"), user("q2")], "expected an assistant message"),
    ([user("q"), {"role": "assistant", "content": "a"}], "last message must be the user's"),
    ([{"role": "system", "content": [image_part("data:,")]}, user("q")], "only text"),
])
def test_chat_structure_errors(messages, match):
    with pytest.raises(ApiError, match=match) as e:
        parse_chat(_req(messages), ServeLimits())
    assert e.value.status == 400


# ------------------------------------------------------------------------------------------ a live server

LIMITS = ServeLimits(max_body_bytes=1_000_000, max_images=4)


def trained_otter(demo_index: str, tmp_path_factory, steps: int = 40) -> str:
    """A tiny Otter trained on the demo data (`steps` AdamW steps on packed rows of 512, in this process: about
    0.1 s a step, against ~25 s just to start `otterfast train`), saved as `otterfast train` exports it.
    Built once per session (the browser test uses it too). It answers the demo photos' questions in words
    ("It is in colour."), where a random-init model mostly stops at once."""
    out = os.path.join(str(tmp_path_factory.getbasetemp()), "serve_trained_otter")
    if os.path.exists(os.path.join(out, "otterfast.json")):
        return out
    from otterfast.data.index import PreparedIndex
    from otterfast.data.loader import NativeLoader, as_torch
    from otterfast.models.build import batch_loss, build_model, load_model_config

    idx = PreparedIndex(demo_index)
    torch.manual_seed(0)
    model = build_model(load_model_config(os.path.join(ROOT, "configs/models/otter-tiny.yaml")), idx.tok).float()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3, weight_decay=0.1)
    loader = NativeLoader(idx, batch_size=1, pack=True, capacity=512, seed=0, num_threads=1)
    model.train()
    step = 0
    while step < steps:
        for batch in loader:
            loss, n = batch_loss(model, as_torch(batch))
            (loss / max(n, 1)).backward()
            opt.step()
            opt.zero_grad()
            step += 1
            if step == steps:
                break
    model.eval().save_pretrained(out + ".tmp")
    shutil.copytree(os.path.join(demo_index, "tokenizer"), os.path.join(out + ".tmp", "tokenizer"))
    with open(os.path.join(out + ".tmp", "otterfast.json"), "w") as f:
        json.dump({"format": "simple", "image_transform": "otter", "image_size": 224}, f)
    os.rename(out + ".tmp", out)
    return out


@pytest.fixture(scope="module")
def otter_gen(demo_index, tmp_path_factory):
    from otterfast.generate import Generator

    return Generator(trained_otter(demo_index, tmp_path_factory))


@pytest.fixture(scope="module")
def server(otter_gen):
    from otterfast.serve.app import create_app

    s = LiveServer(create_app(otter_gen, LIMITS, model_id="tiny-otter"))
    yield s
    s.close()


IMG = data_url(photo(1))
_b64 = IMG.split(",")[1]
TRUNCATED = "data:image/png;base64," + _b64[:len(_b64) // 2 // 4 * 4]
GOOD = {"model": "tiny-otter", "messages": [user("What is it?", IMG)], "max_tokens": 3}


def test_models_health_and_page(server):
    status, models = server.request("GET", "/v1/models")
    assert status == 200 and [m["id"] for m in models["data"]] == ["tiny-otter"]
    info = models["data"][0]["otterfast"]
    assert info["kind"] == "otter" and info["template"] == "simple" and info["context_length"] == 4096
    assert info["limits"]["max_images"] == 4
    assert server.request("GET", "/v1/models/tiny-otter")[1]["id"] == "tiny-otter"
    assert server.request("GET", "/v1/models/other")[0] == 404
    status, health = server.request("GET", "/health")
    assert status == 200 and health["status"] == "ok" and health["model"] == "tiny-otter"
    status, page = server.request("GET", "/")
    assert status == 200 and "<title>otterfast serve</title>" in page
    assert "http://" not in page.replace("http://www.w3.org", "") and "https://" not in page  # nothing fetched


def test_reply_streamed_or_not_equals_generate_text(server, otter_gen):
    """Three formats, an in-context example with its image, two images in the question: the server's reply
    (plain and streamed) is Generator.generate_text's on the same prompt."""
    a, b, c = photo(2), photo(3, 50, 80), photo(4, 120, 60)
    messages = [user("What is this?", data_url(a, "JPEG")), {"role": "assistant", "content": "a thing"},
                user("And these two?", data_url(b, "WEBP"), data_url(c, "PNG"))]
    body = {"messages": messages, "max_tokens": 12}
    status, out = server.chat(body)
    assert status == 200, out
    assert out["object"] == "chat.completion" and out["model"] == "tiny-otter"
    text = "<image>User:What is this? GPT:<answer>a thing<|endofchunk|><image><image>User:And these two? GPT:<answer>"
    decoded = [Image.open(io.BytesIO(base64.b64decode(data_url(im, f).split(",")[1]))).convert("RGB")
               for im, f in ((a, "JPEG"), (b, "WEBP"), (c, "PNG"))]
    want = otter_gen.generate_text(text, decoded, max_new_tokens=12, num_beams=1, do_sample=False)
    assert want and out["choices"][0]["message"]["content"] == want
    assert out["choices"][0]["finish_reason"] in ("stop", "length")
    n_prompt = len(otter_gen.tok(text, add_special_tokens=False)["input_ids"]) + 1  # + BOS
    assert out["usage"]["prompt_tokens"] == n_prompt
    assert out["usage"]["total_tokens"] == n_prompt + out["usage"]["completion_tokens"]

    events = server.stream({**body, "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]"
    assert events[0]["object"] == "chat.completion.chunk" and events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert events[-2]["choices"] == [] and events[-2]["usage"] == out["usage"]
    assert events[-3]["choices"][0]["finish_reason"] == out["choices"][0]["finish_reason"]
    assert len({e["id"] for e in events[:-1]}) == 1
    assert streamed_text(events) == want
    assert sum(1 for e in events[1:-3] if e["choices"][0]["delta"].get("content")) >= 2  # piece by piece


def test_video_frames_are_one_media(server, otter_gen):
    frames = [photo(20 + i) for i in range(3)]
    body = {"messages": [{"role": "user", "content": [{"type": "video", "frames": [data_url(f) for f in frames]},
                                                      {"type": "text", "text": "What happens?"}]}],
            "max_tokens": 6, "ignore_eos": True}
    status, out = server.chat(body)
    assert status == 200, out
    want = otter_gen.generate_text("<image>User:What happens? GPT:<answer>", frames, video=True, max_new_tokens=6,
                                   min_new_tokens=6, num_beams=1, do_sample=False)
    assert out["choices"][0]["message"]["content"] == want
    mixed = {"messages": [user("q", IMG), {"role": "assistant", "content": "a"}, body["messages"][0]]}
    status, out = server.chat(mixed)
    assert status == 400 and "only media" in out["error"]["message"]


def test_stop_sequence_cuts_the_reply(server):
    body = {"messages": [user("Describe it.", IMG)], "max_tokens": 16}
    full = server.chat(body)[1]["choices"][0]["message"]["content"]
    words = full.split()
    assert len(words) >= 3, full
    stop = words[2]
    cut = full[:full.index(stop)].rstrip()
    status, out = server.chat({**body, "stop": [stop, "never appears"]})
    assert status == 200 and out["choices"][0]["message"]["content"] == cut
    assert out["choices"][0]["finish_reason"] == "stop"
    assert streamed_text(server.stream({**body, "stop": stop})) == cut


def _long_text_prompt(n_words: int) -> list:
    return [user(" ".join(["otter"] * n_words), IMG)]


BAD_REQUESTS = {
    # name: (body (dict, or raw bytes), status, code)
    "malformed json": (b'{"messages": [', 400, "invalid_json"),
    "not an object": (b'[1, 2]', 400, "invalid_json"),
    "missing messages": ({"model": "tiny-otter"}, 400, "missing_field"),
    "bad field type": ({**GOOD, "max_tokens": "many"}, 400, "invalid_value"),
    "temperature out of range": ({**GOOD, "temperature": 5}, 400, "invalid_value"),
    "unknown part type": ({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, 400, "invalid_value"),
    "unknown model": ({**GOOD, "model": "gpt-4o"}, 404, "model_not_found"),
    "not an image": ({"messages": [user("q", "data:image/png;base64," + base64.b64encode(b"hello").decode())]},
                     400, "invalid_image"),
    "truncated image": ({"messages": [user("q", TRUNCATED)]}, 400, "invalid_image"),
    "not base64": ({"messages": [user("q", "data:image/png;base64,@@@")]}, 400, "invalid_image"),
    "remote url": ({"messages": [user("q", "http://example.com/a.png")]}, 400, "invalid_image_url"),
    "gif": ({"messages": [user("q", data_url(photo(5), "GIF"))]}, 400, "invalid_image"),
    "decompression bomb": ({"messages": [user("q", "data:image/png;base64,"
                                              + base64.b64encode(png_header(20000, 20000)).decode())]},
                           400, "image_too_large"),
    "over the pixel limit": ({"messages": [user("q", "data:image/png;base64,"
                                                + base64.b64encode(png_header(10000, 9000)).decode())]},
                             400, "image_too_large"),
    "extreme aspect ratio": ({"messages": [user("q", data_url(photo(6, 1005, 5)))]}, 400, "image_aspect_ratio"),
    "too many images": ({"messages": [user("q", *[IMG] * 5)]}, 400, "too_many_images"),
    "too many video frames": ({"messages": [{"role": "user", "content": [{"type": "video", "frames": [IMG] * 5},
                                                                         {"type": "text", "text": "q"}]}]},
                              400, "too_many_images"),
    "prompt over the context": ({"messages": _long_text_prompt(4200)}, 400, "context_length_exceeded"),
    "prompt + max_tokens over the context": ({"messages": _long_text_prompt(3000), "max_tokens": 2000},
                                             400, "context_length_exceeded"),
    "body too large": ({"messages": [user("x" * 1_100_000)]}, 413, "request_too_large"),
    "n > 1": ({**GOOD, "n": 2}, 400, "invalid_value"),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_request_gets_a_json_error_and_the_server_goes_on(server, name):
    body, status, code = BAD_REQUESTS[name]
    got, out = server.chat(body)
    assert got == status, out
    assert set(out) == {"error"} and out["error"]["code"] == code and out["error"]["message"], out
    assert out["error"]["type"] == "invalid_request_error"
    ok, reply = server.chat(GOOD)  # the next good request is answered
    assert ok == 200 and reply["choices"][0]["message"]["role"] == "assistant", reply


def test_wrong_method_and_path_get_json_errors(server):
    assert server.request("GET", "/v1/chat/completions")[1]["error"]["code"] == "method_not_allowed"
    status, out = server.request("POST", "/v1/completions", {})
    assert status == 404 and out["error"]["code"] == "not_found"


def _finished(server) -> dict:
    return server.request("GET", "/health")[1]["finished"]


def test_client_disconnect_stops_its_generation(server):
    before = _finished(server).get("cancelled", 0)
    body = json.dumps({"messages": [user("Tell me everything.", IMG)], "max_tokens": 3000, "stream": True,
                       "ignore_eos": True})
    c = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    c.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
    r = c.getresponse()
    assert r.status == 200
    assert r.readline().startswith(b"data: ")  # the stream has begun
    c.sock.shutdown(socket.SHUT_RDWR)
    c.close()
    t0 = time.time()
    while _finished(server).get("cancelled", 0) == before:  # 3000 tokens would take minutes
        assert time.time() - t0 < 20, "the generation went on after its client left"
        time.sleep(0.1)
    assert server.app.app.state.worker.gen.last_new_tokens < 3000
    assert server.chat(GOOD)[0] == 200


def test_concurrent_clients_are_queued_and_each_gets_its_own_reply(server):
    """Sampled replies of fixed length, each request with its own seed: each reply depends on its request only,
    so the replies under concurrency equal those asked alone (and differ from each other)."""
    prompts = [("What is it?", photo(10)), ("Describe it.", photo(11, 64, 96)), ("Colour?", photo(12))]
    bodies = [{"messages": [user(q, data_url(im))], "max_tokens": 6, "ignore_eos": True, "temperature": 1.0,
               "seed": i} for i, (q, im) in enumerate(prompts)]
    alone = [server.chat(b)[1]["choices"][0]["message"]["content"] for b in bodies]
    assert len(set(alone)) == 3, alone
    with ThreadPoolExecutor(6) as ex:
        plain = [ex.submit(server.chat, b) for b in bodies]
        streamed = [ex.submit(server.stream, b) for b in bodies]
        got = [f.result()[1]["choices"][0]["message"]["content"] for f in plain]
        got_streamed = [streamed_text(f.result()) for f in streamed]
    assert got == alone and got_streamed == alone


def test_otterhd_server_streams_generate_texts_reply(demo_index_fuyu, tmp_path):
    from otterfast.generate import Generator
    from otterfast.serve.app import create_app

    g = Generator(export(demo_index_fuyu, "otterhd-tiny.yaml", str(tmp_path / "hd"), "fuyu"))
    s = LiveServer(create_app(g, ServeLimits()))
    try:
        im = photo(4, 70, 40)
        body = {"messages": [user("Describe.", data_url(im))], "max_tokens": 6, "ignore_eos": True}
        events = s.stream(body)
        want = g.generate_text("User:Describe. Assistant:\x04", [im], max_new_tokens=6, min_new_tokens=6,
                               num_beams=1, do_sample=False)
        assert want and streamed_text(events) == want
        status, out = s.chat(body)
        assert out["choices"][0]["message"]["content"] == want
        assert out["usage"]["completion_tokens"] == 6 and out["choices"][0]["finish_reason"] == "length"
        # 2 x 3 patches + their newline tokens, the prompt's text tokens, BOS
        n_text = len(g.tok("User:Describe. Assistant:\x04", add_special_tokens=False)["input_ids"])
        assert out["usage"]["prompt_tokens"] == 2 * 4 + n_text + 1
    finally:
        s.close()


def test_serve_cli_errors_are_one_line(tmp_path, capsys):
    from otterfast.cli import main

    assert main(["serve", str(tmp_path)]) == 2
    assert "not a model folder" in capsys.readouterr().err
    assert main(["serve", str(tmp_path), "--max-images", "0"]) == 2
    assert "--max-images 0" in capsys.readouterr().err
    assert main(["serve", str(tmp_path), "--max-image-pixels", "100000000"]) == 2  # only lowered, never raised
    assert "it can only be lowered" in capsys.readouterr().err


def test_demo_ends_with_the_serve_command_for_its_models(monkeypatch, tmp_path, capsys):
    """`otterfast demo` (its training step, the training itself stubbed out) ends by printing, for each model it
    trained, an `otterfast serve` command that the CLI accepts."""
    import argparse
    import shlex
    import subprocess

    from otterfast import demo_run
    from otterfast.cli import build_parser
    from otterfast.train import plot

    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 0))
    monkeypatch.setattr(plot, "read_metrics", lambda d: [{"loss": 1.0, "tokens_per_s": 1.0}] * 4)
    monkeypatch.setattr(plot, "plot", lambda d: os.path.join(d, "metrics.png"))
    monkeypatch.setattr(demo_run, "_ask", lambda *a: None)
    a = argparse.Namespace(train="both", max_seq_len=2048, seed=0)
    assert demo_run._train(a, str(tmp_path)) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    for line, m in zip(lines[-2:], ("otter", "otterhd")):
        cmd = shlex.split(line.split(": ", 1)[1].split("(")[0])
        assert cmd[:2] == ["otterfast", "serve"] and cmd[2] == str(tmp_path / f"train-{m}" / "export")
        args = build_parser().parse_args(cmd[1:])
        assert args.func.__module__ == "otterfast.serve.cli" and args.port == 8000
