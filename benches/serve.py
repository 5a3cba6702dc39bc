"""Serving benchmark on the CPU: N concurrent streaming chat requests to `otterfast serve` with the tiny demo model.

    otterfast bench serve                                   # runs/demo/train-otter/export, N = 1, 2, 4
    otterfast bench serve --model runs/demo/train-otterhd/export --concurrency 1,8 --max-tokens 64

The server runs as `otterfast serve` in its own process (torch on `--threads` threads); this process is the
client. Each request: one demo photo (scikit-image's astronaut, 512x512 JPEG) and a question, streamed
(`stream: true`), `ignore_eos: true` so that every reply is exactly `--max-tokens` tokens, greedy. For each N,
after one warm-up request, N requests are sent at once (each on its own connection) and timed:

    TTFT            from sending the request to its first content chunk (queueing included; a chunk is a
                    word: the streamer sends whole words)
    tokens/s/stream (tokens - 1) / (last chunk - first chunk): the decode rate a client sees while it streams
    total tokens/s  all streams' tokens / (last chunk of any - first send)
    peak RSS        the server process's VmHWM after that N (it only grows)

One model and one worker thread serve the queue one request at a time (no batching across requests), so total
tokens/s stays near N=1's while TTFT grows with the queue: the ratio column says how near. Generation is
Generator.generate_text's, as `otterfast generate`: the media encoded once, then the KV cache.
Writes benches/results/serve.json and serve.md.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import statistics
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report import env_info, write_report  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def demo_photo_url() -> str:
    import skimage.data
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(skimage.data.astronaut()).save(buf, "JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def stream_once(port: int, body: bytes) -> dict:
    """One streaming request: send time, the arrival time of each content chunk, the usage."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    t0 = time.perf_counter()
    c.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
    r = c.getresponse()
    if r.status != 200:
        raise RuntimeError(f"HTTP {r.status}: {r.read()[:300]!r}")
    chunks, usage = [], None
    for line in r:
        if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
            continue
        ev = json.loads(line[6:])
        if ev.get("usage"):
            usage = ev["usage"]
        if ev["choices"] and ev["choices"][0]["delta"].get("content"):
            chunks.append(time.perf_counter())
    c.close()
    return {"sent": t0, "chunks": chunks, "tokens": usage["completion_tokens"]}


def run_round(port: int, body: bytes, n: int) -> list[dict]:
    out: list = [None] * n
    errors: list = []

    def go(i):
        try:
            out[i] = stream_once(port, body)
        except Exception as e:  # reported after the round
            errors.append(e)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return out


def summarize(n: int, streams: list[dict]) -> dict:
    ttft = sorted(s["chunks"][0] - s["sent"] for s in streams)
    per = sorted((s["tokens"] - 1) / (s["chunks"][-1] - s["chunks"][0]) for s in streams
                 if len(s["chunks"]) > 1 and s["chunks"][-1] > s["chunks"][0])
    start, end = min(s["sent"] for s in streams), max(s["chunks"][-1] for s in streams)
    tokens = sum(s["tokens"] for s in streams)
    return {"concurrency": n, "ttft_s_median": statistics.median(ttft), "ttft_s_max": ttft[-1],
            "tokens_per_s_per_stream_median": statistics.median(per) if per else None,
            "total_tokens_per_s": tokens / (end - start), "tokens": tokens, "wall_s": end - start}


def server_hwm_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="otterfast bench serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=os.path.join(ROOT, "runs/demo/train-otter/export"),
                   help="model folder (default: the demo's tiny Otter; `./dev demo` trains it)")
    p.add_argument("--concurrency", default="1,2,4", help="comma-separated N (default 1,2,4)")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens per reply (ignore_eos: exactly this many)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="the server's torch threads (default: all)")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--json", default=os.path.join(ROOT, "benches/results/serve.json"))
    a = p.parse_args(argv)
    if not os.path.isfile(os.path.join(a.model, "config.json")):
        raise SystemExit(f"otterfast bench serve: {a.model} is not a model folder; `./dev demo` trains the demo's "
                         "tiny models (or pass --model)")
    ns = [int(x) for x in a.concurrency.split(",")]
    load_before = os.getloadavg()[0]  # a shared machine's other work shows in every number: say how busy it was
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads)}  # torch's intra-op threads in the server
    cmd = [sys.executable, "-m", "otterfast.cli", "serve", a.model, "--port", str(a.port), "--log-level", "warning"]
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        t0 = time.time()
        while True:
            try:
                c = http.client.HTTPConnection("127.0.0.1", a.port, timeout=2)
                c.request("GET", "/health")
                r = c.getresponse()
                r.read()
                if r.status == 200:
                    break
            except OSError:
                pass
            if server.poll() is not None or time.time() - t0 > 300:
                raise SystemExit(f"otterfast bench serve: the server did not start:\n{server.stdout.read()}")
            time.sleep(0.2)
        c.request("GET", "/v1/models")
        card = json.loads(c.getresponse().read())["data"][0]
        body = json.dumps({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": demo_photo_url()}},
            {"type": "text", "text": "What is shown in this image?"}]}],
            "max_tokens": a.max_tokens, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}).encode()
        rows = []
        for n in ns:
            run_round(a.port, body, 1)  # warm-up
            row = summarize(n, run_round(a.port, body, n))
            row["server_peak_rss_mb"] = server_hwm_mb(server.pid)
            rows.append(row)
            print(f"[bench serve] N={n}: TTFT median {row['ttft_s_median']:.3f}s max {row['ttft_s_max']:.3f}s, "
                  f"{row['tokens_per_s_per_stream_median']:.1f} tokens/s per stream, "
                  f"{row['total_tokens_per_s']:.1f} tokens/s total, server peak RSS {row['server_peak_rss_mb']:.0f} MB",
                  flush=True)
    finally:
        server.terminate()
        server.wait(timeout=30)
    base = rows[0]["total_tokens_per_s"]
    for r in rows:
        r["total_tokens_per_s_vs_first"] = r["total_tokens_per_s"] / base
    info = env_info("torch", "transformers", "uvicorn", "starlette")
    info["server_threads"] = a.threads
    info["loadavg_1m_before"] = round(load_before, 2)
    report = {"model": {"path": a.model, **{k: card["otterfast"][k] for k in ("kind", "parameters", "dtype")}},
              "max_tokens": a.max_tokens, "image": "astronaut 512x512 JPEG", "rows": rows, "env": info}
    md = [f"# otterfast serve: {', '.join(map(str, ns))} concurrent streaming requests, CPU\n",
          f"Model: {a.model} ({card['otterfast']['kind']}, {card['otterfast']['parameters']:,} parameters, "
          f"{card['otterfast']['dtype']}). Each request: one 512x512 JPEG demo photo and a question, "
          f"{a.max_tokens} tokens (ignore_eos), greedy, streamed. One model, one worker thread, no batching "
          "across requests. Command: `otterfast bench serve " + " ".join(argv or sys.argv[1:]) + "`.\n",
          "| N | TTFT median (s) | TTFT max (s) | tokens/s per stream (median) | total tokens/s | total vs N="
          f"{ns[0]} | server peak RSS (MB) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['concurrency']} | {r['ttft_s_median']:.3f} | {r['ttft_s_max']:.3f} | "
                  f"{r['tokens_per_s_per_stream_median']:.1f} | {r['total_tokens_per_s']:.1f} | "
                  f"{r['total_tokens_per_s_vs_first']:.2f}x | {r['server_peak_rss_mb']:.0f} |")
    md.append("\nEnvironment: " + ", ".join(f"{k} {v}" for k, v in info.items()) + "\n")
    print(write_report(a.json, report, "\n".join(md)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
