"""What every benchmark reports the same way: the environment, peak RSS, and JSON + markdown under results/.

    from report import env_info, hwm_mb, write_report
    write_report("benches/results/train.json", report_dict, markdown_text)   # writes train.json and train.md
"""

from __future__ import annotations

import json
import os
import platform
import time


def hwm_mb() -> float:
    """This process's peak resident set (VmHWM), MB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def children_hwm_mb() -> float:
    """Sum of the peak RSS of this process's children (e.g. DataLoader workers; fork-shared pages count in each)."""
    total = 0.0
    try:
        with open(f"/proc/self/task/{os.getpid()}/children") as f:
            pids = f.read().split()
    except OSError:
        return 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                total += next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) / 1024
        except (OSError, StopIteration):
            pass
    return total


def pin_cores(n: int) -> list[int]:
    """Restrict this process (and the processes and threads it starts) to its first `n` allowed cores, so that
    both sides of a comparison get the same cores. Returns the cores."""
    cores = sorted(os.sched_getaffinity(0))[: max(1, n)]
    os.sched_setaffinity(0, cores)
    return cores


def env_info(*packages: str) -> dict:
    """Python, CPU model and SIMD flags, core count, date, torch's threads and device, and the versions of
    `packages` (those that import)."""
    model, flags = "", ""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        model = next((l.split(":", 1)[1].strip() for l in text.splitlines() if l.startswith("model name")), "")
        line = next((l for l in text.splitlines() if l.startswith("flags")), "")
        flags = " ".join(x for x in line.split() if x in ("avx2", "avx512f", "avx512_bf16", "amx_tile", "sse4_2", "neon"))
    except OSError:
        pass
    env = {"python": platform.python_version(), "cpus": os.cpu_count(), "cpu": model, "simd": flags,
           "date": time.strftime("%Y-%m-%d")}
    for name in packages:
        try:
            mod = __import__(name)
            env[name] = getattr(mod, "__version__", "?")
        except ImportError:
            continue
        if name == "torch":
            env["torch_threads"] = mod.get_num_threads()
            if mod.cuda.is_available():
                env["gpu"] = mod.cuda.get_device_name(0)
    return env


def write_report(json_path: str, report: dict, markdown: str) -> str:
    """`json_path` and the markdown beside it (same name, .md). Returns the markdown path."""
    os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
    with open(json_path, "w") as f:
        json.dump(report, f, indent=1)
    md_path = os.path.splitext(json_path)[0] + ".md"
    with open(md_path, "w") as f:
        f.write(markdown)
    return md_path
