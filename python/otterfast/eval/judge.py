"""An LLM judge on any OpenAI-compatible chat-completions endpoint (stdlib urllib only).

- replies are cached on disk by a hash of (model, prompt); a cached reply is re-parsed, so only valid ones count;
- attempts are bounded; transport errors back off exponentially, an unusable reply is retried at a higher
  temperature (as Otter's MM-Vet grader does), a 4xx other than 408/409/429 fails at once (a bad key stays bad);
- a failure is returned as a failure (ok=False, with the error) for the caller to count: never a score of 0
  (eval-reference 1.3 trap 10);
- the key travels safely: the URL must be https unless its host is loopback (a local stub or proxy), a redirect to
  another origin (scheme, host, port) is not followed (the Authorization header never leaves the configured
  host), a Retry-After on a 429/503 is honoured (up to max_retry_after_s; longer fails the prompt now), and a key
  written inline in a config is warned about (name an environment variable with api_key_env instead).
"""

from __future__ import annotations

import email.utils
import hashlib
import ipaddress
import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Callable

from ..config import check_keys

JUDGE_KEYS = ("url", "model", "api_key", "api_key_env", "cache_dir", "max_attempts", "backoff_s", "max_backoff_s",
              "max_retry_after_s", "timeout_s", "temperature", "temperature_step", "max_tokens")


class SecretInConfigWarning(UserWarning):
    """An API key written in a config file (which gets copied, committed and logged)."""


def check_url(url: str) -> None:
    """https, or http to a loopback host only: the prompts and the API key never cross a network in clear text."""
    u = urllib.parse.urlsplit(str(url))
    if u.scheme not in ("http", "https") or not u.hostname:
        raise ValueError(f"judge: url {url!r} is not an http(s) URL")
    if u.scheme == "http" and not is_loopback(u.hostname):
        raise ValueError(f"judge: url {url!r} uses http to a non-loopback host: use https (http is allowed only "
                         "for localhost / 127.0.0.1 / ::1)")


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _origin(url: str) -> tuple[str, str, int | None]:
    u = urllib.parse.urlsplit(url)
    return u.scheme.lower(), (u.hostname or "").lower(), u.port or {"http": 80, "https": 443}.get(u.scheme.lower())


def retry_after_s(value: str | None, now: float | None = None) -> float | None:
    """A Retry-After header in seconds: delta-seconds or an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    v = value.strip()
    if v.isdigit():
        return float(v)
    try:
        when = email.utils.parsedate_to_datetime(v)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class _SameOriginRedirects(urllib.request.HTTPRedirectHandler):
    """Follow a redirect only within the endpoint's own origin: the Authorization header never goes elsewhere."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        target = urllib.parse.urljoin(req.full_url, newurl)
        if _origin(target) != _origin(req.full_url):
            raise _Fatal(f"HTTP {code} redirect to another host ({_origin(target)[1] or target}): not followed, the "
                         "API key stays with the configured host")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


@dataclass
class JudgeConfig:
    url: str
    model: str
    api_key: str | None = None
    api_key_env: str | None = None  # name of an environment variable holding the key (keeps keys out of configs)
    cache_dir: str | None = None
    max_attempts: int = 4
    backoff_s: float = 1.0
    max_backoff_s: float = 30.0
    max_retry_after_s: float = 120.0  # a server's Retry-After is honoured up to this; a longer one fails the prompt
    timeout_s: float = 60.0
    temperature: float = 0.0
    temperature_step: float = 0.5
    max_tokens: int | None = None

    @classmethod
    def from_dict(cls, d: dict) -> "JudgeConfig":
        check_keys(d, JUDGE_KEYS, "judge")
        miss = [k for k in ("url", "model") if not d.get(k)]
        if miss:
            raise ValueError(f"judge: missing {miss}")
        cfg = cls(**d)
        if cfg.max_attempts < 1:
            raise ValueError("judge: max_attempts must be at least 1")
        return cfg

    def __post_init__(self) -> None:
        check_url(self.url)

    def key(self) -> str | None:
        if self.api_key:
            return self.api_key
        if self.api_key_env:
            return os.environ.get(self.api_key_env)
        return None


@dataclass
class JudgeResult:
    ok: bool
    value: Any = None
    reply: str | None = None
    error: str | None = None
    model: str = ""
    cached: bool = False
    attempts: int = 0


@dataclass
class JudgeStats:
    asked: int = 0
    cached: int = 0
    requests: int = 0
    failures: int = 0
    errors: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"asked": self.asked, "cached": self.cached, "requests": self.requests, "failures": self.failures,
                "errors": dict(self.errors)}


class _Fatal(Exception):
    pass


class _RetryAfter(Exception):
    """A retryable HTTP status whose server said how long to wait."""

    def __init__(self, code: int, seconds: float):
        super().__init__(f"HTTP {code}: Retry-After {seconds:g}s")
        self.code, self.seconds = code, seconds


class Judge:
    def __init__(self, cfg: JudgeConfig, sleep: Callable[[float], None] = time.sleep):
        self.cfg = cfg
        self.sleep = sleep
        self.stats = JudgeStats()
        u = cfg.url.rstrip("/")
        self.endpoint = u if u.endswith("/chat/completions") else u + "/chat/completions"
        self._opener = urllib.request.build_opener(_SameOriginRedirects)

    # ------------------------------------------------------------ cache
    def cache_key(self, prompt: str) -> str:
        return hashlib.sha256(json.dumps([self.cfg.model, prompt], ensure_ascii=False).encode()).hexdigest()

    def _cache_path(self, key: str) -> str | None:
        if not self.cfg.cache_dir:
            return None
        return os.path.join(self.cfg.cache_dir, key[:2], key + ".json")

    def _cache_get(self, key: str) -> str | None:
        p = self._cache_path(key)
        if p and os.path.exists(p):
            try:
                with open(p, encoding="utf-8") as f:
                    return json.load(f)["reply"]
            except (OSError, ValueError, KeyError):
                return None  # a torn or foreign file is a miss, not a crash
        return None

    def _cache_put(self, key: str, prompt: str, reply: str) -> None:
        p = self._cache_path(key)
        if not p:
            return
        os.makedirs(os.path.dirname(p), exist_ok=True)
        tmp = f"{p}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"model": self.cfg.model, "prompt": prompt, "reply": reply}, f, ensure_ascii=False)
        os.replace(tmp, p)  # atomic: concurrent runs never read half a file

    # ------------------------------------------------------------ transport
    def _post(self, prompt: str, temperature: float, max_tokens: int | None) -> str:
        body: dict[str, Any] = {"model": self.cfg.model, "messages": [{"role": "user", "content": prompt}],
                                "temperature": temperature}
        mt = max_tokens if max_tokens is not None else self.cfg.max_tokens
        if mt is not None:
            body["max_tokens"] = mt
        headers = {"Content-Type": "application/json"}
        key = self.cfg.key()
        if key:
            headers["Authorization"] = f"Bearer {key}"
        req = urllib.request.Request(self.endpoint, data=json.dumps(body).encode(), headers=headers, method="POST")
        self.stats.requests += 1
        try:
            with self._opener.open(req, timeout=self.cfg.timeout_s) as r:
                data = json.loads(r.read().decode("utf-8"))
        except urllib.error.HTTPError as e:
            if 300 <= e.code < 400:
                raise _Fatal(f"HTTP {e.code} redirect not followed") from e
            if 400 <= e.code < 500 and e.code not in (408, 409, 429):
                raise _Fatal(f"HTTP {e.code}") from e
            wait = retry_after_s(e.headers.get("Retry-After") if e.headers else None)
            if wait is not None:
                raise _RetryAfter(e.code, wait) from e
            raise
        try:
            content = data["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError) as e:
            raise ValueError("response has no choices[0].message.content") from e
        return content if isinstance(content, str) else ""

    # ------------------------------------------------------------ the one entry point
    def ask(self, prompt: str, parse: Callable[[str], Any], max_tokens: int | None = None) -> JudgeResult:
        """Ask once (or read the cache); `parse` maps a reply to a value or None when unusable."""
        self.stats.asked += 1
        key = self.cache_key(prompt)
        cached = self._cache_get(key)
        if cached is not None:
            v = parse(cached)
            if v is not None:
                self.stats.cached += 1
                return JudgeResult(True, v, cached, model=self.cfg.model, cached=True)
        temperature, last_err = self.cfg.temperature, "no attempt"
        for attempt in range(1, self.cfg.max_attempts + 1):
            try:
                reply = self._post(prompt, temperature, max_tokens)
            except _Fatal as e:
                last_err = str(e)
                return self._fail(last_err, attempt)
            except _RetryAfter as e:
                last_err = str(e)
                if e.seconds > self.cfg.max_retry_after_s:
                    return self._fail(f"HTTP {e.code}: Retry-After {e.seconds:g}s is over max_retry_after_s "
                                      f"{self.cfg.max_retry_after_s:g}", attempt)
                if attempt < self.cfg.max_attempts:
                    self.sleep(e.seconds)
                continue
            except (urllib.error.URLError, OSError, ValueError) as e:
                last_err = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
                if attempt < self.cfg.max_attempts:
                    self.sleep(min(self.cfg.backoff_s * 2 ** (attempt - 1), self.cfg.max_backoff_s))
                continue
            v = parse(reply)
            if v is not None:
                self._cache_put(key, prompt, reply)
                return JudgeResult(True, v, reply, model=self.cfg.model, attempts=attempt)
            last_err = f"unusable reply: {reply[:80]!r}"
            temperature = min(temperature + self.cfg.temperature_step, 2.0)
        return self._fail(last_err, self.cfg.max_attempts)

    def _fail(self, err: str, attempts: int) -> JudgeResult:
        self.stats.failures += 1
        kind = err.split(":")[0]
        self.stats.errors[kind] = self.stats.errors.get(kind, 0) + 1
        return JudgeResult(False, None, None, error=err, model=self.cfg.model, attempts=attempts)


def parse_score(reply: str) -> float | None:
    """MM-Vet: the first whitespace token as a number in [0, 1], else None."""
    tok = (reply or "").strip().split()
    if not tok:
        return None
    try:
        v = float(tok[0].strip(",;"))
    except ValueError:
        return None
    return v if 0.0 <= v <= 1.0 else None


def parse_yes_no(reply: str) -> str | None:
    tok = (reply or "").strip().split()
    if not tok:
        return None
    w = tok[0].strip(".,;:!\"'*").lower()
    return w if w in ("yes", "no") else None
