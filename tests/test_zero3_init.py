"""ZeRO-3 construction under deepspeed.zero.Init with the checkpoint streamed in (train/zero3_init.py).

1. `test_streamed_model_equals_from_pretrained`: this file run as a script under torchrun (2 gloo ranks) builds
   tiny OtterHD and Otter checkpoints' models partitioned, gathers them and compares every parameter, buffer,
   config value and trainable flag with today's `build_model` (from_pretrained): sharded safetensors, Otter with
   an MPT LM (lm_head tied to wte, saved once), a vocabulary grown to the tokenizer's, LoRA (OtterHD's and
   Otter's, adapters initialised as today). A missing and an unknown key are errors naming them.
2. `test_zero3_init_trains_like_today_in_half_the_memory`: a random OtterHD of 309M parameters saved in bf16
   (0.59 GiB, 3 shards) and trained in fp32 (1.15 GiB), 2 ranks at ZeRO-3, 3 optimizer steps through the
   trainer, streamed and built whole: losses and the export equal; each rank's peak RSS once the model is ready
   (the trainer prints it per rank) stays under half the model + the overhead of the same run on a tiny model +
   a margin on the streamed path, while today's path holds the whole model on each rank. `-s` prints the numbers.
3. `test_zero3_init_lora_trains_like_today`: a tiny OtterHD with LoRA, both paths, 2 ranks: the same losses
   and merged export (adapters are added after the stream and partitioned by deepspeed.initialize).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from test_train_runs import BIN, ROOT, _env, metrics, train

HERE = os.path.abspath(__file__)
BIG_TEXT = {"hidden_size": 1024, "num_hidden_layers": 3, "num_attention_heads": 16, "intermediate_size": 4096,
            "max_position_embeddings": 4096, "partial_rotary_factor": 0.5, "qk_layernorm": True,
            "hidden_act": "relu2"}
BIG_VOCAB = 131072  # most parameters in the (free) embedding table and the lm_head: cheap steps on 2 cores
MARGIN_MB = 128  # on top of the tiny model's overhead and half the model: read chunks, allocator slack


def _otter_doc(lm: str, vocab: int | None = None) -> dict:
    import yaml

    with open(os.path.join(ROOT, "configs", "models", "otter-tiny.yaml")) as f:
        doc = yaml.safe_load(f)
    if lm == "mpt":
        doc["otter"]["text_config"] = {"model_type": "mpt", "d_model": 64, "n_heads": 4, "n_layers": 2,
                                       "expansion_ratio": 2, "max_seq_len": 2048, "vocab_size": vocab}
    return doc


def _save(model, folder: str, **kw) -> str:
    model.save_pretrained(folder, **kw)
    return folder


def _edit_checkpoint(src: str, dst: str, drop: str | None = None, add: str | None = None) -> str:
    """A copy of a single-file checkpoint without tensor `drop` / with an extra tensor `add`."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    path = os.path.join(dst, "model.safetensors")
    sd = load_file(path)
    if drop:
        del sd[drop]
    if add:
        sd[add] = torch.zeros(3)
    save_file(sd, path, metadata={"format": "pt"})
    return dst


# ---- 1. the streamed model equals today's, on 2 ranks ----------------------------------------------------------

@pytest.fixture(scope="module")
def tok():
    return {"vocab_size": 647, "fuyu_placeholder_id": 8, "media_id": 3, "eoc_id": 4}


def test_streamed_model_equals_from_pretrained(tmp_path, tok):
    import torch

    from otterfast.models.build import build_model, load_model_config

    torch.manual_seed(0)
    hd = os.path.join(ROOT, "configs", "models", "otterhd-tiny.yaml")
    hd_ck = _save(build_model(load_model_config(hd), tok), str(tmp_path / "hd"), max_shard_size="60KB")
    assert os.path.exists(os.path.join(hd_ck, "model.safetensors.index.json"))  # sharded
    small_tok = dict(tok, vocab_size=640)  # a checkpoint with fewer rows than the tokenizer: grown on load
    hd_small = _save(build_model(load_model_config(hd), small_tok), str(tmp_path / "hd_small"))
    llama = _save(build_model(load_model_config(_otter_doc("llama")), tok), str(tmp_path / "otter_llama"))
    mpt = _save(build_model(load_model_config(_otter_doc("mpt", 640)), small_tok), str(tmp_path / "otter_mpt"))
    ck_keys = _checkpoint_keys(mpt)
    assert not [k for k in ck_keys if "lm_head" in k]  # tied: saved once, as wte
    dropped = "language_model.model.final_layernorm.weight"  # Fuyu's saved name of model.language_model.final_...
    assert dropped in _checkpoint_keys(hd_small)
    cases = {
        "otterhd_sharded": {"architecture": "otterhd", "checkpoint": hd_ck},
        "otterhd_grown_vocab": {"architecture": "otterhd", "checkpoint": hd_small},
        "otterhd_lora": {"architecture": "otterhd", "checkpoint": hd_ck, "train": "lora"},
        "otter_llama": {**_otter_doc("llama"), "checkpoint": llama},
        "otter_llama_lora": {**_otter_doc("llama"), "checkpoint": llama,
                             "otter": {**_otter_doc("llama")["otter"], "lora_config": {"r": 4, "lora_alpha": 8}}},
        "otter_mpt_tied_grown": {**_otter_doc("mpt", 640), "checkpoint": mpt},
        "missing_key": {"architecture": "otterhd",
                        "checkpoint": _edit_checkpoint(hd_small, str(tmp_path / "missing"), drop=dropped)},
        "unknown_key": {"architecture": "otterhd",
                        "checkpoint": _edit_checkpoint(hd_small, str(tmp_path / "unknown"), add="vision_tower.w")},
    }
    spec = {"cases": cases, "tok": tok, "out": str(tmp_path / "result.json")}
    with open(tmp_path / "spec.json", "w") as f:
        json.dump(spec, f)
    p = subprocess.run([os.path.join(BIN, "torchrun"), "--standalone", "--nproc_per_node=2", HERE,
                        str(tmp_path / "spec.json")], cwd=ROOT, env=_env(), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]
    with open(spec["out"]) as f:
        res = json.load(f)
    same = ("otterhd_sharded", "otterhd_grown_vocab", "otterhd_lora", "otter_llama", "otter_llama_lora",
            "otter_mpt_tied_grown")
    assert {name: res[name] for name in same} == {name: {"differences": []} for name in same}
    assert "not in the checkpoint: model.language_model.final_layernorm.weight" in res["missing_key"]["error"]
    assert "name no parameter" in res["unknown_key"]["error"] and "vision_tower.w" in res["unknown_key"]["error"]


def _checkpoint_keys(folder: str) -> list[str]:
    from otterfast.train.zero3_init import checkpoint_files

    return list(checkpoint_files(folder))


def _compare_main(spec_path: str) -> None:
    """Under torchrun: each case's streamed model, gathered, against build_model's (rank 0 writes the result)."""
    import deepspeed
    import torch
    import torch.distributed as dist

    from otterfast.models.build import build_model, load_model_config, unloaded
    from otterfast.train.deepspeed_setup import init_distributed, setup_env
    from otterfast.train.zero3_init import build_partitioned

    setup_env()
    init_distributed(torch.device("cpu"))
    world = dist.get_world_size()
    ds = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "train_batch_size": world,
          "zero_optimization": {"stage": 3}}
    with open(spec_path) as f:
        spec = json.load(f)
    tok, results = spec["tok"], {}
    try:
        for name, doc in spec["cases"].items():
            cfg = load_model_config(doc)
            try:
                torch.manual_seed(0)
                model = build_partitioned(unloaded(cfg, tok), ds, getattr(torch, cfg.dtype))
            except Exception as e:  # noqa: BLE001 - the error cases
                results[name] = {"error": f"{type(e).__name__}: {e}"}
                continue
            torch.manual_seed(0)
            ref = build_model(cfg, tok)
            results[name] = {"differences": _differences(model, ref, deepspeed)}
    finally:
        if dist.get_rank() == 0:
            with open(spec["out"], "w") as f:
                json.dump(results, f)
        dist.destroy_process_group()


def _differences(model, ref, deepspeed) -> list[str]:
    import torch

    out = []
    params = dict(model.named_parameters(remove_duplicate=False))
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        got = {k: v.detach().clone() for k, v in params.items()}
    want = dict(ref.named_parameters(remove_duplicate=False))
    if sorted(got) != sorted(want):
        out.append(f"parameter names: {sorted(set(got) ^ set(want))}")
    for k in set(got) & set(want):
        g, w = got[k], want[k].detach()
        if g.shape != w.shape or g.dtype != w.dtype:
            out.append(f"{k}: {tuple(g.shape)} {g.dtype} vs {tuple(w.shape)} {w.dtype}")
        elif not torch.equal(g, w):
            n = min(len(g), 640) if ("embed" in k or "wte" in k or "lm_head" in k) and g.ndim == 2 else None
            # grown vocabulary rows: today's resize samples N(mean, 1e-9 cov), the stream writes the mean
            if n is None or n == len(g) or not torch.equal(g[:n], w[:n]) or not torch.allclose(g[n:], w[n:], atol=1e-5):
                out.append(f"{k}: values differ (max {float((g - w).abs().max()):.3g})")
        if params[k].requires_grad != want[k].requires_grad:
            out.append(f"{k}: requires_grad {params[k].requires_grad} vs {want[k].requires_grad}")
    for (k, b), (k2, b2) in zip(model.named_buffers(), ref.named_buffers()):
        if k != k2 or b.dtype != b2.dtype or not torch.equal(b, b2):
            out.append(f"buffer {k}")
    a, b = model.config.to_dict(), ref.config.to_dict()
    out += [f"config {k}: {a.get(k)!r} vs {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    for m, r in ((getattr(model, "lang_encoder", model), getattr(ref, "lang_encoder", ref)),):
        tied_m = m.get_output_embeddings().weight is m.get_input_embeddings().weight
        tied_r = r.get_output_embeddings().weight is r.get_input_embeddings().weight
        if tied_m != tied_r:
            out.append(f"{type(m).__name__}: tied {tied_m} vs {tied_r}")
    return out


# ---- 2. through the trainer: same losses and export, half the memory -----------------------------------------

@pytest.fixture(scope="module")
def small_fuyu_index(demo_dir, tmp_path_factory) -> str:
    """The demo data in fuyu format with small images (at most 3 x 3 patches) and samples of <= 64 tokens, so that
    a step of a 305M-parameter model takes a few seconds on 2 cores."""
    from otterfast.data.prepare import PrepareOptions, prepare

    out = str(tmp_path_factory.mktemp("index_fuyu_small"))
    prepare(os.path.join(demo_dir, "data.yaml"), os.path.join(demo_dir, "tokenizer"), out,
            PrepareOptions(format="fuyu", video_frames=1, max_seq_len=64, fuyu_max_height=90, fuyu_max_width=90))
    return out


def _rss_mb(stdout: str, how: str) -> dict[int, float]:
    """{rank: peak RSS in MiB once the model was ready}, from the trainer's per-rank lines."""
    out = {}
    for line in stdout.splitlines():
        if line.startswith("[train] rank ") and "peak RSS" in line:
            assert how in line, line
            out[int(line.split()[2].rstrip(":"))] = float(line.rsplit("peak RSS", 1)[1].split()[0])
    return out


# DeepSpeed's default buckets (5e8 elements: 2 GB fp32 buffers per rank) page-fault GBs on every CPU step: 4e7
SMALL_BUCKETS = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                 "zero_allow_untested_optimizer": True,
                 "zero_optimization": {"stage": 3, "overlap_comm": False, "contiguous_gradients": True,
                                       "reduce_bucket_size": 20_000_000, "stage3_prefetch_bucket_size": 20_000_000,
                                       "stage3_gather_16bit_weights_on_model_save": True}}


def _run(out, index, checkpoint, mode, ds_json, *sets):
    inline = f"model.inline={{architecture: otterhd, checkpoint: {checkpoint}}}"
    return train(out, index, "model.config=null", inline, "deepspeed.zero_stage=3", f"deepspeed.config={ds_json}",
                 f"deepspeed.zero3_init={mode}", "data.loader.capacity=64", "epochs=null", "save_every=0", *sets,
                 nproc=2, timeout=600)


def _export(out):
    from safetensors.torch import load_file

    d, sd = os.path.join(out, "export"), {}
    for name in os.listdir(d):
        if name.endswith(".safetensors"):
            sd.update(load_file(os.path.join(d, name)))
    with open(os.path.join(d, "config.json")) as f:
        return sd, json.load(f)


@pytest.mark.slow
def test_zero3_init_trains_like_today_in_half_the_memory(tmp_path, small_fuyu_index):
    import torch

    from otterfast.data.index import PreparedIndex
    from otterfast.models.build import build_model, load_model_config

    tok = PreparedIndex(small_fuyu_index).tok
    torch.manual_seed(0)
    tiny = _save(build_model(load_model_config(os.path.join(ROOT, "configs", "models", "otterhd-tiny.yaml")), tok),
                 str(tmp_path / "tiny"))
    big = build_model(load_model_config({"architecture": "otterhd", "vocab_size": BIG_VOCAB, "text_config": BIG_TEXT}),
                      tok)
    n_params = sum(p.numel() for p in big.parameters())
    model_mb = sum(p.numel() * p.element_size() for p in big.parameters()) / 2**20
    # saved in bf16 (as Fuyu-8B ships) and trained in fp32 (the model YAML's dtype): both paths cast bf16 -> fp32
    _save(big.to(torch.bfloat16), str(tmp_path / "big"), max_shard_size="200MB")  # 3 shards
    del big
    assert n_params >= 300e6

    ds_json = str(tmp_path / "ds.json")
    with open(ds_json, "w") as f:
        json.dump(SMALL_BUCKETS, f)
    p = _run(str(tmp_path / "tiny_run"), small_fuyu_index, tiny, "auto", ds_json, "max_steps=1", "export=false")
    overhead = max(_rss_mb(p.stdout, "partitioned").values())
    runs = {}
    for mode, how in (("auto", "partitioned"), ("off", "built whole")):
        out = str(tmp_path / mode)
        p = _run(out, small_fuyu_index, str(tmp_path / "big"), mode, ds_json, "max_steps=3")
        rows = metrics(out)
        runs[mode] = {"rss": _rss_mb(p.stdout, how), "losses": [r["loss"] for r in rows],
                      "step_peak_gb": [round(r["peak_mem_gb"], 2) for r in rows], "export": _export(out)}
        shutil.rmtree(os.path.join(out, "checkpoints"))  # GBs of optimizer state
    new, old = runs["auto"], runs["off"]
    assert len(new["losses"]) == 3
    assert new["losses"] == pytest.approx(old["losses"], rel=1e-5)
    (sd_new, conf_new), (sd_old, conf_old) = new["export"], old["export"]
    assert conf_new == conf_old and sorted(sd_new) == sorted(sd_old)
    for k, v in sd_old.items():
        assert torch.equal(sd_new[k], v), k
    bound = overhead + model_mb / 2 + MARGIN_MB
    report = (f"{n_params / 1e6:.0f}M parameters, {model_mb:.0f} MiB fp32; overhead (tiny model) {overhead:.0f} MiB; "
              f"bound {bound:.0f} MiB; peak RSS per rank once the model is ready: streamed {new['rss']}, "
              f"built whole {old['rss']}; rank 0's peak RSS after each step (GB): streamed {new['step_peak_gb']}, "
              f"built whole {old['step_peak_gb']}")
    print(report)
    assert sorted(new["rss"]) == [0, 1] and sorted(old["rss"]) == [0, 1]
    assert all(v < bound for v in new["rss"].values()), report
    assert all(v > overhead + model_mb for v in old["rss"].values()), report  # today: the whole model per rank


@pytest.mark.slow
def test_zero3_init_lora_trains_like_today(tmp_path, small_fuyu_index):
    """LoRA adapters are added after the stream, whole, and partitioned by deepspeed.initialize next to the
    streamed parameters: the same losses and the same merged export as today's path."""
    import torch

    from otterfast.data.index import PreparedIndex
    from otterfast.models.build import build_model, load_model_config

    torch.manual_seed(0)
    model = build_model(load_model_config(os.path.join(ROOT, "configs", "models", "otterhd-tiny.yaml")),
                        PreparedIndex(small_fuyu_index).tok)
    ck = _save(model, str(tmp_path / "tiny"), max_shard_size="60KB")
    ds_json = str(tmp_path / "ds.json")
    with open(ds_json, "w") as f:
        json.dump(SMALL_BUCKETS, f)
    got = {}
    for mode, how in (("auto", "partitioned"), ("off", "built whole")):
        out = str(tmp_path / mode)
        p = train(out, small_fuyu_index, "model.config=null",
                  f"model.inline={{architecture: otterhd, checkpoint: {ck}, train: lora}}", "deepspeed.zero_stage=3",
                  f"deepspeed.config={ds_json}", f"deepspeed.zero3_init={mode}", "data.loader.capacity=64",
                  "epochs=null", "save_every=0", "max_steps=2", nproc=2, timeout=300)
        assert len(_rss_mb(p.stdout, how)) == 2
        got[mode] = ([r["loss"] for r in metrics(out)], _export(out))
    assert got["auto"][0] == pytest.approx(got["off"][0], rel=1e-5) and len(got["auto"][0]) == 2
    (sd_new, conf_new), (sd_old, conf_old) = got["auto"][1], got["off"][1]
    assert conf_new == conf_old and sorted(sd_new) == sorted(sd_old)
    assert not [k for k in sd_new if "lora_" in k]  # merged
    for k, v in sd_old.items():
        assert torch.equal(sd_new[k], v), k


def test_zero3_init_key(tmp_path):
    from otterfast.train.config import ConfigError, load_config

    base = {"max_steps": 1, "model": {"config": "x.yaml"}, "data": {"index": "i"}}
    assert load_config(base).deepspeed.zero3_init == "auto"
    assert load_config({**base, "deepspeed": {"zero3_init": False}}).deepspeed.zero3_init == "off"  # YAML `off`
    with pytest.raises(ConfigError, match="zero3_init: expected auto or off"):
        load_config({**base, "deepspeed": {"zero3_init": "on-demand"}})


if __name__ == "__main__":  # the torchrun half of test_streamed_model_equals_from_pretrained
    _compare_main(sys.argv[1])
