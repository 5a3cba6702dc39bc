"""`otterfast data repack`: the index's parquet image tables rewritten in small row groups of raw bytes give the
same batches (tokens and pixels) from both loaders; the repacked files are the ones checked; bad states refused."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from otterfast.data.defects import DataError
from otterfast.data.index import PreparedIndex
from otterfast.data.loader import NativeLoader
from otterfast.data.reference import ReferenceLoader
from otterfast.data.repack import repack


@pytest.fixture(scope="module")
def repacked(demo_index, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("repacked") / "index")
    shutil.copytree(demo_index, out)
    summary = repack(out, row_group_rows=16, log=lambda *_: None)
    assert summary["images"] > 0
    return out


def _batches(loader, n=6):
    out = []
    for b in loader:
        out.append({k: v for k, v in b.items() if isinstance(v, np.ndarray)})
        if len(out) == n:
            break
    return out


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_repacked_index_gives_the_same_batches(demo_index, repacked, backend):
    make = {"native": lambda p: NativeLoader(p, batch_size=2, seed=3, capacity=1024, num_threads=1),
            "reference": lambda p: ReferenceLoader(p, batch_size=2, seed=3, capacity=1024)}[backend]
    before, after = _batches(make(demo_index)), _batches(make(repacked))
    assert len(before) == len(after) > 0
    for a, b in zip(before, after):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_repacked_tables_are_small_row_groups_of_raw_bytes(demo_index, repacked):
    old, new = PreparedIndex(demo_index), PreparedIndex(repacked)
    parquet = [i for i, s in enumerate(old.sources) if s.kind == "parquet"]
    assert parquet
    for i in parquet:
        src = new.sources[i]
        assert src.encoding == "raw" and len(src.files) == 1 and src.files[0].startswith(os.path.abspath(repacked))
        md = pq.ParquetFile(src.files[0]).metadata
        n = (np.asarray(old.images.column("source")) == i).sum()
        assert md.num_rows == len({(f, g, r) for s, f, g, r in zip(*(old.images.column(c).to_pylist() for c in (
            "source", "file", "row_group", "row"))) if s == i}) and n >= md.num_rows
        assert all(md.row_group(g).num_rows <= 16 for g in range(md.num_row_groups))
    # JSON sources untouched; the originals stay the recorded inputs
    for i, s in enumerate(old.sources):
        if s.kind == "json":
            assert new.sources[i] == s
    assert new.meta["inputs"] == old.meta["inputs"]


def test_repacked_files_are_the_ones_checked(repacked, tmp_path):
    out = str(tmp_path / "index")
    shutil.copytree(repacked, out)
    meta = json.load(open(os.path.join(out, "meta.json")))
    # the copy points at the module fixture's tables: re-point it at its own copies, with their stats
    for e in meta["image_files"]:
        e["path"] = e["path"].replace(os.path.abspath(repacked), os.path.abspath(out))
    for s in meta["sources"]:
        s["files"] = [f.replace(os.path.abspath(repacked), os.path.abspath(out)) for f in s["files"]]
    from otterfast.data.fingerprint import stat_entry

    meta["image_files"] = [stat_entry(e["path"]) for e in meta["image_files"]]
    json.dump(meta, open(os.path.join(out, "meta.json"), "w"))
    NativeLoader(out, num_threads=1)  # fine as copied
    victim = meta["image_files"][0]["path"]
    with open(victim, "ab") as f:
        f.write(b"\0")
    with pytest.raises(DataError, match="image table .*rewritten"):
        NativeLoader(out, num_threads=1)


def test_repack_twice_is_refused_and_cli_answers(repacked):
    with pytest.raises(DataError, match="already repacked"):
        repack(repacked, log=lambda *_: None)
    r = subprocess.run([sys.executable, "-m", "otterfast.cli", "data", "repack", os.path.dirname(repacked) + "/nope"],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "Traceback" not in r.stderr and "not a prepared index" in r.stderr


def test_train_repacks_huge_row_groups_when_auto(demo_index, tmp_path, monkeypatch, capsys):
    from otterfast.data import repack as rp
    from otterfast.train.loop import _repack

    out = str(tmp_path / "index")
    shutil.copytree(demo_index, out)
    _repack(out, "auto")  # the demo's tables are small: nothing to do
    assert "repacked" not in json.load(open(os.path.join(out, "meta.json")))
    monkeypatch.setattr(rp, "BIG_ROW_GROUP_BYTES", 1000)  # every demo table now counts as Otter's huge layout
    assert rp.needs_repack(out)
    _repack(out, "never")
    assert "repacked" not in json.load(open(os.path.join(out, "meta.json")))
    _repack(out, "auto")
    assert "repacked" in json.load(open(os.path.join(out, "meta.json"))) and "row group)" in capsys.readouterr().out
    assert rp.needs_repack(out) == []
    _repack(out, "always")  # already repacked: left alone
