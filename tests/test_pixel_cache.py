"""The pixel cache (`otterfast data cache-pixels`): batches bit-identical with and without it, images it could not
cache fail or are skipped exactly as before, and a cache that no longer matches its index is never used."""

import json
import os
import shutil
import warnings

import numpy as np
import pytest

from otterfast.cli import main
from otterfast.data import pixel_cache
from otterfast.data.defects import DataError
from otterfast.data.loader import NativeLoader
from test_loader import INT_KEYS, _corrupt_dataset


@pytest.fixture
def index_copy(demo_index, tmp_path):
    """The session's demo index is shared: each test caches into its own copy."""
    out = str(tmp_path / "idx")
    shutil.copytree(demo_index, out)
    return out


def _epochs(idx, n=2, **kw):
    loader = NativeLoader(idx, **kw)
    batches = [b for _ in range(n) for b in loader]
    return loader, batches


def _assert_identical(a, b, pix="pixel_values"):
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        for k in INT_KEYS + [pix]:
            if k in y:
                assert x[k].dtype == y[k].dtype and np.array_equal(x[k], y[k]), k
        assert x["sample_id"] == y["sample_id"]


@pytest.mark.parametrize("transform,size,draft", [("otter", 224, False), ("clip", 224, False), ("clip", 64, True)])
def test_cached_batches_are_bit_identical(index_copy, transform, size, draft):
    kw = dict(batch_size=2, seed=3, capacity=512, image_transform=transform, image_size=size, jpeg_draft=draft)
    plain, before = _epochs(index_copy, pixel_cache="never", **kw)
    assert plain.pixel_cache is None
    s = pixel_cache.build(index_copy, transform=transform, size=size, jpeg_draft=draft, threads=2)
    assert s["cached"] == s["images"] > 0 and s["failed"] == []
    assert s["bytes"] == s["images"] * 3 * size * size
    cached, after = _epochs(index_copy, **kw)
    assert cached.pixel_cache and cached.pixel_cache.endswith(pixel_cache.cache_name(transform, size, draft) + ".u8")
    _assert_identical(after, before)


def test_other_transforms_do_not_use_it(index_copy):
    pixel_cache.build(index_copy, transform="clip", size=224)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no cache of that name: nothing to warn about
        assert NativeLoader(index_copy, image_transform="otter").pixel_cache is None
        assert NativeLoader(index_copy, image_transform="clip", image_size=112).pixel_cache is None
        assert NativeLoader(index_copy, image_transform="clip", jpeg_draft=True).pixel_cache is None
    with pytest.raises(DataError, match=r"pixel_cache: require, but no pixel cache .*otter-224\.json"):
        NativeLoader(index_copy, image_transform="otter", pixel_cache="require")


def test_a_stale_cache_is_never_used(index_copy):
    pixel_cache.build(index_copy, transform="otter")
    assert NativeLoader(index_copy, pixel_cache="require").pixel_cache
    meta = os.path.join(index_copy, "meta.json")
    with open(meta) as f:
        m = json.load(f)
    m["seconds"] = m.get("seconds", 0) + 1  # any rewrite of the index (prepared or repacked again)
    with open(meta, "w") as f:
        json.dump(m, f)
    with pytest.warns(UserWarning, match="earlier state of the index"):
        assert NativeLoader(index_copy).pixel_cache is None
    with pytest.raises(DataError, match="earlier state of the index"):
        NativeLoader(index_copy, pixel_cache="require")


def test_a_cache_of_the_wrong_size_is_not_used(index_copy):
    s = pixel_cache.build(index_copy, transform="otter")
    u8 = os.path.join(index_copy, "pixels", "otter-224.u8")
    with open(u8, "r+b") as f:
        f.truncate(s["bytes"] - 1)
    wrong = r"otter-224\.u8: holds .* bytes, not .* images x 150528: rebuild it"
    with pytest.warns(UserWarning, match=wrong):
        assert NativeLoader(index_copy).pixel_cache is None
    with pytest.raises(DataError, match=wrong):
        NativeLoader(index_copy, pixel_cache="require")
    os.remove(u8)  # e.g. deleted to free disk, its .json kept
    with pytest.warns(UserWarning, match="cannot open"):
        assert NativeLoader(index_copy).pixel_cache is None


def test_a_cache_from_other_code_or_another_images_table_is_not_used(index_copy):
    import pyarrow as pa

    pixel_cache.build(index_copy, transform="otter")
    js = os.path.join(index_copy, "pixels", "otter-224.json")
    d = json.load(open(js))
    json.dump(dict(d, pixels_version=d["pixels_version"] - 1), open(js, "w"))
    with pytest.warns(UserWarning, match="pixels_version"):
        assert NativeLoader(index_copy).pixel_cache is None
    json.dump(d, open(js, "w"))
    assert NativeLoader(index_copy, pixel_cache="require").pixel_cache
    images = os.path.join(index_copy, "images.arrow")
    with pa.memory_map(images) as src:
        table = pa.ipc.open_file(src).read_all()
    table = table.replace_schema_metadata({"rewritten": "yes"})  # same rows, other bytes
    with pa.OSFile(images + ".new", "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table)
    os.replace(images + ".new", images)  # a new file, as prepare writes one: the old one may still be mapped
    with pytest.warns(UserWarning, match="earlier state of the index"):
        assert NativeLoader(index_copy).pixel_cache is None


@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_a_failed_cache_read_ends_the_epoch_never_skips(index_copy, on_error):
    s = pixel_cache.build(index_copy, transform="otter")
    loader = NativeLoader(index_copy, capacity=512, on_error=on_error)
    assert loader.pixel_cache
    with open(loader.pixel_cache, "r+b") as f:
        f.truncate(s["bytes"] // 2)  # shrunk under a running loader
    with pytest.raises(RuntimeError, match="cannot read the pixel cache's image row"):
        for _ in loader:
            pass
    assert loader.skipped == 0


def test_concurrent_builds_take_turns(index_copy):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as ex:
        runs = list(ex.map(lambda _: pixel_cache.build(index_copy, transform="otter", threads=1, if_missing=True),
                           range(2)))
    assert runs[0] == runs[1]  # the second found the first's cache once it held the lock
    assert sorted(os.listdir(os.path.join(index_copy, "pixels"))) == [".lock", "otter-224.json", "otter-224.u8"]
    assert NativeLoader(index_copy, pixel_cache="require").pixel_cache


@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_images_it_could_not_cache_fail_as_before(mini, tmp_path, demo_tok_dir, on_error):
    idx = _corrupt_dataset(mini, tmp_path, demo_tok_dir)
    kw = dict(batch_size=3, pack=False, on_error=on_error)

    def run():
        loader = NativeLoader(idx, **kw)
        try:
            return loader, list(loader), None
        except DataError as e:
            return loader, None, str(e)

    plain, before, err_before = run()
    s = pixel_cache.build(idx, transform="otter")
    assert s["cached"] == 1 and len(s["failed"]) == 1 and "image id 'BAD'" in s["failed_examples"][0]
    cached, after, err_after = run()
    assert cached.pixel_cache
    assert err_after == err_before
    if on_error == "raise":
        assert "image id 'BAD'" in err_after
    else:
        assert cached.skipped == plain.skipped == 1
        _assert_identical(after, before)


def test_fuyu_index_has_no_cache(demo_index_fuyu, tmp_path):
    idx = str(tmp_path / "fuyu")
    shutil.copytree(demo_index_fuyu, idx)
    with pytest.raises(DataError, match="Fuyu"):
        pixel_cache.build(idx)
    assert NativeLoader(idx).pixel_cache is None


def test_cli_cache_pixels(index_copy, capsys):
    assert main(["data", "cache-pixels", index_copy, "--image-transform", "clip", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "images cached (clip 224 px" in out
    assert NativeLoader(index_copy, image_transform="clip", pixel_cache="require").pixel_cache


def test_the_loader_reads_the_cache_not_the_tables(index_copy):
    """Zeroed slots come back as normalised zeros: the pixels come from the cache, not from a decode."""
    s = pixel_cache.build(index_copy, transform="clip", size=32)
    with open(os.path.join(index_copy, "pixels", "clip-32.u8"), "r+b") as f:
        f.write(bytes(s["bytes"]))
    _, batches = _epochs(index_copy, n=1, image_transform="clip", image_size=32, capacity=512)
    px = np.concatenate([b["pixel_values"] for b in batches])
    assert px.size
    mean, std = np.array([0.48145466, 0.4578275, 0.40821073]), np.array([0.26862954, 0.26130258, 0.27577711])
    assert np.allclose(px, (-mean / std).astype(np.float32)[None, :, None, None])


def test_train_caches_pixels_for_runs_of_several_epochs(index_copy, monkeypatch, capsys):
    import shutil as sh

    from otterfast.train.config import load_config
    from otterfast.train.loop import _cache_pixels

    def cfg(**kw):
        base = {"model": {"config": "configs/models/otterhd-tiny.yaml"}, "data": {"index": index_copy}}
        return load_config(base, [f"{k}={v}" for k, v in kw.items()])

    u8 = os.path.join(index_copy, "pixels", "otter-224.u8")
    _cache_pixels(index_copy, cfg(epochs=1))  # one pass reads each image once: nothing to save
    _cache_pixels(index_copy, cfg(epochs=3, **{"data.cache_pixels": "never"}))
    _cache_pixels(index_copy, cfg(epochs=3, **{"data.loader.pixel_cache": "never"}))
    assert not os.path.exists(u8)
    real = sh.disk_usage
    monkeypatch.setattr(sh, "disk_usage", lambda p: real(p)._replace(free=1000))
    _cache_pixels(index_copy, cfg(epochs=3))  # would not fit in a quarter of the free disk
    assert not os.path.exists(u8) and "not caching pixels" in capsys.readouterr().out
    monkeypatch.setattr(sh, "disk_usage", real)
    _cache_pixels(index_copy, cfg(epochs=3))
    assert os.path.exists(u8) and "cached" in capsys.readouterr().out
    assert NativeLoader(index_copy, pixel_cache="require").pixel_cache == u8
    _cache_pixels(index_copy, cfg(epochs=3))  # there and valid: left alone
    assert capsys.readouterr().out == ""
    _cache_pixels(index_copy, cfg(epochs=1, **{"data.cache_pixels": "always", "data.loader.image_transform": "clip"}))
    assert os.path.exists(os.path.join(index_copy, "pixels", "clip-224.u8"))
