"""Files of a source checkout that the installed package does not carry: `benches/` scripts and `configs/`.

Imports nothing of ours, so that any command module can use it (`otterfast bench ...`, `otterfast demo`).
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository root, for an editable install (pip install -e .)


def bench_script(name: str) -> str:
    """The path of `benches/NAME`, or SystemExit naming it when this is not a source checkout."""
    path = ROOT / "benches" / name
    if not path.exists():
        raise SystemExit(f"otterfast: {path} not found: benchmarks run from a source checkout (pip install -e .)")
    return str(path)


def run_bench(name: str, argv: list[str]) -> int:
    """Run `benches/NAME`'s `main(argv)` (the benches are scripts, not modules of the package)."""
    import runpy

    return runpy.run_path(bench_script(name))["main"](argv)
