"""The LLM judge against a stub OpenAI-compatible server on 127.0.0.1: caching, retries, counted failures."""

from __future__ import annotations

import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from otterfast.eval.judge import Judge, JudgeConfig, parse_score, parse_yes_no
from otterfast.eval.score import score_files, score_lines
from otterfast.eval.synth import image_struct, png, write_parquet


class Stub:
    """A chat-completions server whose replies come from `script` (a list consumed per request) or `default`:
    (status, content) or (status, content, headers). GET requests (a followed redirect) are recorded too."""

    def __init__(self):
        self.requests: list[dict] = []
        self.script: list = []
        self.default = (200, "1.0")
        self.delay = 0.0
        stub = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):  # keep pytest output clean
                pass

            def do_GET(self):
                stub.requests.append({"method": "GET", "path": self.path, "body": None,
                                      "host": self.headers.get("Host"), "auth": self.headers.get("Authorization")})
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.requests.append({"method": "POST", "path": self.path, "body": body,
                                      "host": self.headers.get("Host"), "auth": self.headers.get("Authorization")})
                status, content, *extra = stub.script.pop(0) if stub.script else stub.default
                headers = extra[0] if extra else {}
                if callable(content):
                    content = content(body)
                if stub.delay:
                    time.sleep(stub.delay)
                if status == 200:
                    payload = {"choices": [{"message": {"role": "assistant", "content": content}}]}
                else:
                    payload = {"error": {"message": str(content)}}
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and left (the slow-endpoint test)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub():
    s = Stub()
    yield s
    s.close()


def _judge(stub, tmp_path, sleeps=None, **kw):
    cfg = JudgeConfig.from_dict({"url": stub.url, "model": "judge-1", "cache_dir": str(tmp_path / "cache"),
                                 "backoff_s": 0.5, **kw})
    return Judge(cfg, sleep=(sleeps.append if sleeps is not None else (lambda s: None)))


def test_request_shape_and_key_from_env(stub, tmp_path, monkeypatch):
    monkeypatch.setenv("STUB_KEY", "sk-test")
    j = _judge(stub, tmp_path, api_key_env="STUB_KEY", max_tokens=3)
    r = j.ask("grade this", parse_score)
    assert r.ok and r.value == 1.0 and r.model == "judge-1" and not r.cached
    req = stub.requests[0]
    assert req["path"] == "/v1/chat/completions" and req["auth"] == "Bearer sk-test"
    assert req["body"] == {"model": "judge-1", "messages": [{"role": "user", "content": "grade this"}],
                           "temperature": 0.0, "max_tokens": 3}


def test_cache_by_prompt_and_model(stub, tmp_path):
    j = _judge(stub, tmp_path)
    assert j.ask("p1", parse_score).value == 1.0
    stub.default = (200, "0.2")
    r = j.ask("p1", parse_score)
    assert r.cached and r.value == 1.0 and len(stub.requests) == 1  # no second request
    assert _judge(stub, tmp_path).ask("p1", parse_score).cached  # persisted on disk, a new Judge reads it
    files = [f for _, _, fs in os.walk(tmp_path / "cache") for f in fs]
    assert len(files) == 1 and files[0] == j.cache_key("p1") + ".json"
    other_model = Judge(JudgeConfig(url=stub.url, model="judge-2", cache_dir=str(tmp_path / "cache")))
    assert other_model.ask("p1", parse_score).value == 0.2 and len(stub.requests) == 2  # (prompt, model) key
    assert j.ask("p2", parse_score).value == 0.2 and len(stub.requests) == 3


def test_retries_with_backoff_then_success(stub, tmp_path):
    sleeps: list[float] = []
    stub.script = [(500, "boom"), (503, "busy"), (200, "0.7")]
    j = _judge(stub, tmp_path, sleeps)
    r = j.ask("p", parse_score)
    assert r.ok and r.value == 0.7 and r.attempts == 3
    assert sleeps == [0.5, 1.0]  # exponential backoff between attempts
    assert j.stats.failures == 0 and j.stats.requests == 3


def test_unusable_reply_retried_at_higher_temperature(stub, tmp_path):
    stub.script = [(200, "I think it is right"), (200, "0.3")]
    r = _judge(stub, tmp_path).ask("p", parse_score)
    assert r.ok and r.value == 0.3
    assert [q["body"]["temperature"] for q in stub.requests] == [0.0, 0.5]


def test_failures_counted_and_bounded(stub, tmp_path):
    stub.default = (500, "down")
    j = _judge(stub, tmp_path, max_attempts=3)
    r = j.ask("p", parse_score)
    assert not r.ok and r.value is None and "HTTPError" in r.error
    assert len(stub.requests) == 3 and j.stats.failures == 1  # bounded: exactly max_attempts requests
    stub.default = (200, "not a number")
    r = j.ask("q", parse_score)
    assert not r.ok and "unusable reply" in r.error and len(stub.requests) == 6 and j.stats.failures == 2
    assert not [f for _, _, fs in os.walk(tmp_path / "cache") for f in fs]  # failures are never cached


def test_auth_error_fails_at_once(stub, tmp_path):
    stub.default = (401, "bad key")
    j = _judge(stub, tmp_path)
    r = j.ask("p", parse_score)
    assert not r.ok and r.error == "HTTP 401" and len(stub.requests) == 1


def test_unreachable_and_slow_endpoints_end(tmp_path, stub):
    dead = Judge(JudgeConfig(url="http://127.0.0.1:9/v1", model="m", max_attempts=2, backoff_s=0.0))
    r = dead.ask("p", parse_score)
    assert not r.ok and dead.stats.failures == 1
    stub.delay = 0.5
    slow = _judge(stub, tmp_path, timeout_s=0.1, max_attempts=2)
    t0 = time.monotonic()
    assert not slow.ask("p", parse_score).ok
    assert time.monotonic() - t0 < 5


def test_parsers():
    assert parse_score("0.4") == 0.4 and parse_score("1.0 because") == 1.0
    assert parse_score("1.5") is None and parse_score("") is None and parse_score("zero") is None
    assert parse_yes_no("Yes.") == "yes" and parse_yes_no("no") == "no" and parse_yes_no("maybe") is None


def test_config_validation():
    with pytest.raises(ValueError, match="valid"):
        JudgeConfig.from_dict({"url": "u", "model": "m", "key": "x"})
    with pytest.raises(ValueError, match="missing"):
        JudgeConfig.from_dict({"url": "u"})


# ---------------------------------------------------------------- the key travels safely (issue 14 item 11)

@pytest.mark.parametrize("url", ["https://api.example.com/v1", "http://127.0.0.1:8000/v1", "http://localhost/v1",
                                 "http://127.0.0.9:1/v1", "http://[::1]:8080/v1", "HTTP://LOCALHOST:1/v1"])
def test_https_or_loopback_accepted(url):
    assert JudgeConfig.from_dict({"url": url, "model": "m"}).url == url


@pytest.mark.parametrize("url", ["http://api.example.com/v1", "http://10.0.0.1:8000/v1", "http://localhost.evil.com/v1",
                                 "http://127.0.0.1.nip.io/v1", "ftp://127.0.0.1/v1", "api.example.com/v1", "https:///v1"])
def test_plain_http_to_a_network_host_refused(url):
    with pytest.raises(ValueError, match="judge: url"):
        JudgeConfig.from_dict({"url": url, "model": "m"})
    with pytest.raises(ValueError, match="judge: url"):  # also when built directly, as the API allows
        JudgeConfig(url=url, model="m")


def test_redirect_to_another_host_is_not_followed(stub, tmp_path, monkeypatch):
    monkeypatch.setenv("STUB_KEY", "sk-secret")
    port = stub.server.server_address[1]
    for code in (301, 302, 303, 307, 308):
        stub.requests.clear()
        # the same server under another host name: "localhost" is not the configured "127.0.0.1"
        stub.script = [(code, "moved", {"Location": f"http://localhost:{port}/steal/chat/completions"})]
        j = _judge(stub, tmp_path, api_key_env="STUB_KEY")
        r = j.ask(f"p{code}", parse_score)
        assert not r.ok and "redirect" in r.error and r.attempts == 1, r.error
        assert len(stub.requests) == 1 and stub.requests[0]["method"] == "POST"  # nothing sent to the new host
        assert not any(q["auth"] and "steal" in q["path"] for q in stub.requests)


def test_redirect_within_the_same_host_is_not_a_leak(stub, tmp_path, monkeypatch):
    monkeypatch.setenv("STUB_KEY", "sk-secret")
    stub.script = [(302, "moved", {"Location": "/v2/chat/completions"})]
    r = _judge(stub, tmp_path, api_key_env="STUB_KEY").ask("p", parse_score)
    # urllib turns a redirected POST into a GET (no body): followed on the same host only, then a clean failure
    assert not r.ok and [q["method"] for q in stub.requests] == ["POST", "GET"]
    assert {q["host"] for q in stub.requests} == {f"127.0.0.1:{stub.server.server_address[1]}"}


def test_retry_after_is_honoured(stub, tmp_path):
    sleeps: list[float] = []
    stub.script = [(429, "slow down", {"Retry-After": "7"}), (503, "busy", {"Retry-After": "2"}), (200, "0.5")]
    r = _judge(stub, tmp_path, sleeps).ask("p", parse_score)
    assert r.ok and r.value == 0.5 and sleeps == [7.0, 2.0]  # the server's wait, not the 0.5 s backoff
    # without the header: exponential backoff as before
    sleeps.clear()
    stub.script = [(429, "slow down"), (200, "0.5")]
    assert _judge(stub, tmp_path, sleeps).ask("q", parse_score).ok and sleeps == [0.5]
    # a wait beyond max_retry_after_s fails the prompt now (counted, retried on the next run), never hangs
    sleeps.clear()
    n = len(stub.requests)
    stub.script = [(429, "slow down", {"Retry-After": "3600"})]
    j = _judge(stub, tmp_path, sleeps, max_retry_after_s=60)
    r = j.ask("z", parse_score)
    assert not r.ok and "Retry-After 3600" in r.error and sleeps == [] and len(stub.requests) == n + 1
    assert j.stats.failures == 1


def test_retry_after_http_date():
    from otterfast.eval.judge import retry_after_s

    now = 1_700_000_000.0
    date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now + 30))
    assert retry_after_s(date, now=now) == pytest.approx(30.0)
    assert retry_after_s("12", now=now) == 12.0
    assert retry_after_s(time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now - 30)), now=now) == 0.0
    assert retry_after_s("soon") is None and retry_after_s(None) is None and retry_after_s("-3") is None


def test_inline_api_key_warns(tmp_path, capsys):
    from otterfast.cli import main
    from otterfast.eval.judge import SecretInConfigWarning
    from otterfast.eval.runner import parse_config

    cfg = {"output": str(tmp_path / "o"), "models": [{"name": "m", "kind": "replay", "predictions": "p"}],
           "datasets": [{"task": "pope", "data": "missing.parquet"}],
           "judge": {"url": "https://judge.example/v1", "model": "j", "api_key": "sk-inline"}}
    with pytest.warns(SecretInConfigWarning, match="api_key_env"):
        parse_config(cfg)
    ok = {**cfg, "judge": {"url": "https://judge.example/v1", "model": "j", "api_key_env": "JUDGE_KEY"}}
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", SecretInConfigWarning)
        parse_config(ok)  # the environment variable: no warning
    # the command says it on one line of its own (and then fails on the missing data file, as it should)
    path = tmp_path / "eval.yaml"
    path.write_text(json.dumps(cfg))
    assert main(["eval", "run", str(path), "--quiet"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("otterfast eval run: warning: judge.api_key is written in the config")
    assert "sk-inline" not in "\n".join(err)


# ---------------------------------------------------------------- judged tasks (trap 10)

@pytest.fixture
def mmvet_file(tmp_path):
    return write_parquet(str(tmp_path / "mmvet.parquet"), {
        "id": ["v1_0", "v1_1", "v1_2"], "instruction": ["What is 2+2?", "Read the sign.", "Explain."],
        "answer": ["4<OR>four", "STOP", "a joke"], "images": [[image_struct(png())]] * 3,
        "image_source": ["x"] * 3, "capability": [["math"], ["ocr"], ["ocr", "know"]]})


def _grade(body):
    prompt = body["messages"][0]["content"]
    last = prompt.rsplit("\n", 1)[-1]
    return {"What is 2+2? | 4 <OR> four | 4 | ": "1.0", "Read the sign. | STOP | stop sign | ": "0.5"}.get(last, "0.0")


def test_mmvet_score_and_blocked_on_failure(stub, tmp_path, mmvet_file):
    stub.default = (200, _grade)
    lines = {0: {"row": 0, "reply": "4"}, 1: {"row": 1, "reply": "stop sign"}, 2: {"row": 2, "reply": "no idea"}}
    res, samples = score_lines("mmvet", mmvet_file, lines, judge=_judge(stub, tmp_path))
    m = res["metrics"]
    assert m["score"] == pytest.approx(0.5) and m["judge_failures"] == 0 and m["judge_model"] == "judge-1"
    assert m["by_capability"] == {"know": 0.0, "math": 1.0, "ocr": 0.25}
    assert all(s["judge_model"] == "judge-1" for s in samples)  # the judge's model logged per sample
    # the MM-Vet prompt: few-shot table with the original `Question` header, then "q | gt | pred | "
    p = stub.requests[0]["body"]["messages"][0]["content"]
    assert "\nQuestion | Ground truth | Prediction | Correctness\n" in p and "gpt_query_prompt" not in p

    # one judge failure: the score is withheld (None), never a 0 for that sample; the failure is counted
    n_before = len(stub.requests)
    stub.script = [(500, "x")] * 4
    j = Judge(JudgeConfig(url=stub.url, model="judge-1", cache_dir=str(tmp_path / "c2"), backoff_s=0.0))
    res, samples = score_lines("mmvet", mmvet_file, lines, judge=j)
    assert res["metrics"]["score"] is None and res["metrics"]["judge_failures"] == 1
    assert "withheld" in res["metrics"] and samples[0]["judge_score"] is None
    assert len(stub.requests) - n_before == 6  # 4 bounded attempts for the first, 1 each for the others
    # rerun: the two valid judgements come from the cache, the failed one is asked again
    res, _ = score_lines("mmvet", mmvet_file, lines, judge=j)
    assert res["metrics"]["score"] == pytest.approx(0.5) and j.stats.cached == 2


def test_mmvet_without_judge_is_withheld(tmp_path, mmvet_file):
    out = score_files("mmvet", mmvet_file, _write_preds(tmp_path, ["4", "x", "y"]), str(tmp_path / "o.json"))
    assert out["metrics"]["score"] is None and out["metrics"]["withheld"] == "no judge configured"


def _write_preds(tmp_path, replies, extra=None):
    p = tmp_path / "preds.jsonl"
    with open(p, "w") as f:
        for i, r in enumerate(replies):
            f.write(json.dumps({"row": i, "reply": r, **((extra or {}).get(i, {}))}) + "\n")
    return str(p)


def test_magnifier_freeform_judged(stub, tmp_path):
    p = write_parquet(str(tmp_path / "mb.parquet"), {
        "id": ["1", "2"], "instruction": ["What colour is the flag? A. red, B. blue", "How many? A. one, B. two"],
        "answer": ["B", "A"], "images": [[image_struct(png())]] * 2})
    stub.default = (200, lambda body: "Yes" if "Model Response: blue" in body["messages"][0]["content"] else "No")
    lines = {0: {"row": 0, "reply": "B", "freeform_reply": "blue"},
             1: {"row": 1, "reply": "A", "freeform_reply": "three"}}
    res, samples = score_lines("magnifierbench", p, lines, judge=_judge(stub, tmp_path))
    m = res["metrics"]
    assert m["accuracy"] == 1.0 and m["freeform_accuracy"] == 0.5 and m["freeform"]["judge_failures"] == 0
    assert "Ground Truth: blue" in stub.requests[0]["body"]["messages"][0]["content"]  # the option's text
    stub.default = (500, "down")
    j = Judge(JudgeConfig(url=stub.url, model="m", cache_dir=None, max_attempts=2, backoff_s=0.0))
    res, _ = score_lines("magnifierbench", p, lines, judge=j)
    assert res["metrics"]["freeform_accuracy"] is None and res["metrics"]["freeform"]["judge_failures"] == 2
    assert res["metrics"]["accuracy"] == 1.0  # the multiple-choice half needs no judge


def test_mathvista_judge_extractor(stub, tmp_path):
    p = write_parquet(str(tmp_path / "mv.parquet"), {
        "pid": ["1", "2"], "question": ["How many?", "Which?"], "decoded_image": [image_struct(png())] * 2,
        "choices": [None, ["3", "4"]], "precision": [None, None], "answer": ["3", "4"],
        "question_type": ["free_form", "multi_choice"], "answer_type": ["integer", "text"]})
    stub.default = (200, lambda body: "3" if "How many?" in body["messages"][0]["content"] else "NONE")
    lines = {0: {"row": 0, "reply": "I count three, so 3"}, 1: {"row": 1, "reply": "hmm"}}
    res, samples = score_lines("mathvista", p, lines, {"extractor": "judge"}, judge=_judge(stub, tmp_path))
    # NONE is an empty extraction: wrong, never mapped to the nearest choice (trap 8)
    assert res["metrics"]["accuracy"] == 0.5 and samples[1]["pred"] is None and res["metrics"]["judge_failures"] == 0
    stub.default = (500, "down")
    j = Judge(JudgeConfig(url=stub.url, model="m", max_attempts=1))
    res, _ = score_lines("mathvista", p, lines, {"extractor": "judge"}, judge=j)
    assert res["metrics"]["accuracy"] is None and res["metrics"]["judge_failures"] == 2
