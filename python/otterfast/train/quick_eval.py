"""A quick `otterfast eval run` on the model at each checkpoint (config key `eval_run`, docs/train.md).

At every checkpoint step (`save_every`, and the run's last step) the ranks export the model as it is (the same
collective export as the run's end, into OUTPUT_DIR/evals/step_N/export), then rank 0 runs the eval YAML's
datasets on it, `limit` rows each, with otterfast's own eval runner, while the other ranks wait. The scores go into
that step's metrics line as `eval_<dataset>_<metric>` (TensorBoard / wandb: `eval/<dataset>_<metric>`) and the
runner's files (results.json, summary.md, per-dataset predictions) stay in OUTPUT_DIR/evals/step_N/. The export is
removed afterwards unless `keep_export` is set (for a large model it is the model's full size on disk each time).

The eval YAML is the one `otterfast eval run` takes, with its `models` and `output` replaced: the model is the run's
own. Its datasets, limits, judge and decode settings are used as written. It is checked when the run starts, so a
mistake in it does not surface at the first checkpoint hours later.
"""

from __future__ import annotations

import math
import os
import shutil
import time

import yaml


class QuickEval:
    """The checked eval YAML of a run; `run` is collective (every rank calls it at the same step)."""

    def __init__(self, section, kind: str, output_dir: str, device: str):
        from ..eval.runner import ConfigError, parse_config

        self.section, self.kind, self.output_dir, self.device = section, kind, output_dir, device
        path = section.config
        try:
            with open(path, encoding="utf-8") as f:
                doc = yaml.safe_load(f)
        except OSError as e:
            raise ValueError(f"eval_run.config: cannot read {path}: {e.strerror or e}") from None
        except yaml.YAMLError as e:
            raise ValueError(f"eval_run.config: {path} is not valid YAML: {e}") from None
        if not isinstance(doc, dict):
            raise ValueError(f"eval_run.config: {path} must hold a mapping (output, datasets, ...)")
        self.base_dir = os.path.dirname(os.path.abspath(path))
        self.doc = doc
        try:
            parse_config(self._config("step_0"), self.base_dir)
        except ConfigError as e:
            raise ValueError(f"eval_run.config {path}: {e}") from None
        for d in self.doc.get("datasets") or []:
            data = d.get("data") if isinstance(d, dict) else None
            if data and not os.path.exists(data if os.path.isabs(data) else os.path.join(self.base_dir, data)):
                raise ValueError(f"eval_run.config {path}: dataset file {data} does not exist")

    def _config(self, name: str) -> dict:
        """The eval YAML with the run's model in place of its `models` and the step's folder as its `output`."""
        s = self.section
        options = {"device": self.device}
        if s.dtype:
            options["dtype"] = s.dtype
        model = {"name": name, "kind": self.kind, "path": os.path.join(self.folder(name), "export"),
                 "options": options}
        if s.decode:
            model["decode"] = dict(s.decode)
        cfg = {k: v for k, v in self.doc.items() if k not in ("models", "output")}
        cfg.update(models=[model], output=self.folder(name), resume=False)
        if s.limit is not None:
            cfg["limit"] = s.limit
        return cfg

    def folder(self, name: str) -> str:
        return os.path.join(self.output_dir, "evals", name)

    def run(self, engine, model, step: int, index_dir: str, rank: int, meta: dict) -> dict:
        """Export (all ranks), evaluate (rank 0), return rank 0's metrics (`eval_*` keys; {} on other ranks)."""
        import torch.distributed as dist

        from ..eval.runner import parse_config, run_config
        from . import checkpoint as ck
        from .export import export

        t0 = time.perf_counter()
        name = f"step_{step}"
        folder = self.folder(name)
        export(engine, model, folder, index_dir, rank, meta=meta)
        out: dict = {}
        if rank == 0:
            rng = ck.rng_state()  # the run trains the same with or without these evals
            try:
                results = run_config(parse_config(self._config(name), self.base_dir), progress=False)
            finally:
                ck.set_rng_state(rng)
            for r in results:
                for k, v in (r.get("metrics") or {}).items():
                    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                        out[f"eval_{r['dataset']}_{k}"] = float(v)
            if not self.section.keep_export:
                shutil.rmtree(os.path.join(folder, "export"), ignore_errors=True)
            out["eval_s"] = time.perf_counter() - t0
        if dist.is_initialized():
            dist.barrier()  # the other ranks wait for rank 0's eval before the next step
        return out
