"""HDF5 shard directories: round trips, parallel writing, verification, and failures with one line."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest

from hpctrain.config import DataConfig, config_from_dict
from hpctrain.data import load_splits, shards
from hpctrain.errors import UserError
from hpctrain.local_launch import run_cli, run_mpi


def make_npz(path: Path, n: int = 230, n_val: int = 40, shape: tuple[int, ...] = (3, 5), seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    arrays = {"x": rng.normal(size=(n, *shape)).astype(np.float32), "y": rng.integers(0, 4, n),
              "x_val": rng.normal(size=(n_val, *shape)).astype(np.float32), "y_val": rng.integers(0, 4, n_val)}
    np.savez(path, **arrays)
    return arrays


@pytest.fixture
def npz(tmp_path) -> tuple[Path, dict]:
    return tmp_path / "src.npz", make_npz(tmp_path / "src.npz")


def read_all(dataset, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Everything, requested in a shuffled order with repeats, put back in position order."""
    order = np.random.default_rng(seed).permutation(np.r_[np.arange(len(dataset)), [0, 0, len(dataset) - 1]])
    x, y = dataset.get(order)
    back = np.empty((len(dataset), *x.shape[1:]), dtype=x.dtype)
    back[order], labels = x, np.empty(len(dataset), dtype=y.dtype)
    labels[order] = y
    assert np.array_equal(x[order == 0][0], x[order == 0][1])      # repeated index, same sample
    return back, labels


@pytest.mark.parametrize("compression", ["none", "gzip", "lzf"])
def test_round_trip_npz_equals_source(npz, tmp_path, monkeypatch, compression):
    monkeypatch.setenv("HDF5_USE_FILE_LOCKING", "FALSE")     # as on Lustre/GPFS
    src, arrays = npz
    manifest = shards.shard(str(src), tmp_path / "d", shard_size=64, compression=compression, chunk_kib=1)
    assert [e["count"] for e in manifest["shards"]] == [64, 64, 64, 38, 40]
    assert [e["chunk_rows"] for e in manifest["shards"]] == [17] * 5            # 1 KiB of 60-byte samples
    assert manifest["counts"] == {"train": 230, "val": 40} and manifest["sample_shape"] == [3, 5]
    splits = load_splits(DataConfig(name=str(tmp_path / "d")))
    for ds, x, y, first in ((splits.train, arrays["x"], arrays["y"], 0), (splits.val, arrays["x_val"], arrays["y_val"], 230)):
        got_x, got_y = read_all(ds)
        assert np.array_equal(got_x, x) and np.array_equal(got_y, y) and np.array_equal(ds.labels, y)
        assert np.array_equal(ds.sample_ids, np.arange(first, first + len(y)))
    assert splits.num_classes == 4 and splits.input_shape == (3, 5)
    with h5py.File(tmp_path / "d" / "shard-00000.h5") as f:
        assert f["x"].chunks[0] >= 1 and f["x"].fletcher32
        assert f["x"].compression == (None if compression == "none" else compression)


def test_round_trip_builtin_keeps_its_split_and_ids(tmp_path):
    shards.shard("digits", tmp_path / "d", shard_size=500)
    got, ref = load_splits(DataConfig(name=str(tmp_path / "d"))), load_splits(DataConfig(name="digits"))
    for a, b in ((got.train, ref.train), (got.val, ref.val)):
        assert np.array_equal(read_all(a)[0], b.get(np.arange(len(b)))[0])
        assert np.array_equal(a.sample_ids, b.sample_ids) and np.array_equal(a.labels, b.labels)


def test_mnist1d_size_is_configurable_and_checked(tmp_path, monkeypatch):
    monkeypatch.setenv("HPCTRAIN_CACHE", str(tmp_path))
    splits = load_splits(DataConfig(name="mnist1d", num_samples=500))
    assert (len(splits.train), len(splits.val)) == (400, 100)          # the mnist1d recipe's 80/20 split
    with pytest.raises(UserError, match=r"^config: data.num_samples = 0 must be positive$"):
        config_from_dict({"data": {"num_samples": 0}})


def test_npy_pair_and_hdf5_sources_and_load_time_holdout(tmp_path):
    rng = np.random.default_rng(3)
    x, y = rng.integers(0, 255, size=(101, 4, 4), dtype=np.uint8), rng.integers(0, 3, 101)
    np.save(tmp_path / "x_train.npy", x)
    np.save(tmp_path / "y_train.npy", y)
    with h5py.File(tmp_path / "src.h5", "w") as f:
        f["x"], f["y"] = x, y
    for src in ("x_train.npy", "src.h5"):
        out = tmp_path / f"d-{src}"
        shards.shard(str(tmp_path / src), out, shard_size=30)
        splits = load_splits(DataConfig(name=str(out), val_fraction=0.25), seed=5)
        ids = np.r_[splits.train.sample_ids, splits.val.sample_ids]
        assert len(splits.val) == 25 and sorted(ids) == list(range(101))       # a disjoint holdout
        got_x, got_y = read_all(splits.val)
        assert got_x.dtype == np.float32
        assert np.array_equal(got_x, x[splits.val.sample_ids]) and np.array_equal(got_y, y[splits.val.sample_ids])


def test_each_rank_writes_only_its_shards(npz, tmp_path):
    src, _ = npz
    out = tmp_path / "d"
    with shards.open_source(str(src)) as sources:
        shards.prepare_out_dir(out, overwrite=False)
        entries = shards.write_shards(sources, out, 64, "none", rank=1, size=2)
    assert [e["file"] for e in entries] == ["shard-00001.h5", "shard-00003.h5"]
    assert sorted(p.name for p in out.iterdir()) == ["shard-00001.h5", "shard-00003.h5"]


def test_reader_is_lazy_bounded_and_picklable(npz, tmp_path, monkeypatch):
    src, arrays = npz
    shards.shard(str(src), tmp_path / "d", shard_size=20, chunk_kib=1)    # 17-row chunks
    monkeypatch.setattr(shards.read, "MAX_OPEN_FILES", 3)
    monkeypatch.setattr(shards.read, "CACHE_BYTES", 3 * 17 * 60)
    train = load_splits(DataConfig(name=str(tmp_path / "d"))).train
    assert not train._files                                        # nothing opened before the first read
    assert np.array_equal(read_all(train)[0], arrays["x"])
    assert 0 < len(train._files) <= 3 and 0 < train._cached_bytes <= 3 * 17 * 60
    assert sum(b.nbytes for b in train._cache.values()) == train._cached_bytes
    clone = pickle.loads(pickle.dumps(train))
    assert not clone._files and np.array_equal(clone.get(np.arange(5))[0], arrays["x"][:5])


@pytest.mark.mpi
def test_sharding_under_mpirun_two_ranks(npz, tmp_path):
    src, arrays = npz
    out = tmp_path / "d"
    proc = run_mpi(2, ["shard", "--input", src, "--out", out, "--shard-size", "50", "--compression", "gzip"],
                   env={"HDF5_USE_FILE_LOCKING": "FALSE"})
    assert proc.stdout.count("wrote 6 shards") == 1                # rank 0 alone reports
    assert len(shards.verify(out, show_progress=False)["shards"]) == 6
    assert np.array_equal(read_all(load_splits(DataConfig(name=str(out))).train)[0], arrays["x"])
    assert not list(out.glob(".*tmp*"))


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_verify_catches_flipped_byte_with_one_line(npz, tmp_path):
    src, _ = npz
    out = tmp_path / "d"
    shards.shard(str(src), out, shard_size=64)
    assert shards.verify(out, show_progress=False)["counts"] == {"train": 230, "val": 40}
    _flip_byte(out / "shard-00002.h5")
    proc = run_cli(["shard", "verify", out], check=False)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("hpctrain: error: ") and "Traceback" not in proc.stderr
    assert "shard-00002.h5" in lines[-1] and "checksum mismatch" in lines[-1] and "--overwrite" in lines[-1]


@pytest.mark.parametrize("damage, message", [
    ("truncate", "truncated or replaced"),
    ("delete", r"is missing \(listed in manifest.json\)"),
    ("manifest", "write did not finish"),
    ("index", "truncated or replaced"),
])
def test_damaged_directories_are_refused(npz, tmp_path, damage, message):
    src, _ = npz
    out = tmp_path / "d"
    shards.shard(str(src), out, shard_size=64)
    target = {"truncate": out / "shard-00001.h5", "delete": out / "shard-00001.h5",
              "manifest": out / "manifest.json", "index": out / "index.h5"}[damage]
    if damage == "truncate" or damage == "index":
        target.write_bytes(target.read_bytes()[:-100])
    else:
        target.unlink()
    for check in (lambda: shards.verify(out, show_progress=False), lambda: load_splits(DataConfig(name=str(out)))):
        with pytest.raises(UserError, match=message):
            check()


def test_structure_mismatch_is_caught_on_first_read(npz, tmp_path):
    src, _ = npz
    out = tmp_path / "d"
    shards.shard(str(src), out, shard_size=64)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["sample_shape"] = [5, 3]                                # shards no longer match it
    (out / "manifest.json").write_text(json.dumps(manifest))
    train = load_splits(DataConfig(name=str(out))).train
    with pytest.raises(UserError, match=r"shard-00000.h5: does not match manifest.json \(x is"):
        train.get(np.arange(3))


def test_existing_directory_needs_overwrite(npz, tmp_path):
    src, _ = npz
    out = tmp_path / "d"
    shards.shard(str(src), out, shard_size=100)
    (out / "scores.h5").write_bytes(b"old scores")
    with pytest.raises(UserError, match="already holds shards; pass --overwrite"):
        shards.shard(str(src), out, shard_size=64)
    shards.shard(str(src), out, shard_size=64, overwrite=True)
    assert len(list(out.glob("shard-*.h5"))) == 5 and not (out / "scores.h5").exists()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="holds other files"):
        shards.shard(str(src), tmp_path / "other", overwrite=True)


@pytest.mark.parametrize("arrays, message", [
    ({"x": np.zeros((3, 2))}, r"lacks \['y'\]"),
    ({"x": np.zeros((3, 2)), "y": np.zeros(4)}, "x has 3 samples but y has 4"),
    ({"x": np.zeros((3, 2)), "y": np.array([0.5, 1, 2])}, "integer class labels"),
])
def test_bad_sources_name_the_problem(tmp_path, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(UserError, match=message):
        shards.shard(str(tmp_path / "bad.npz"), tmp_path / "d")


def test_training_on_a_truncated_shard_fails_with_one_line(npz, tmp_path):
    src, _ = npz
    out = tmp_path / "d"
    shards.shard(str(src), out, shard_size=64)
    path = out / "shard-00003.h5"
    path.write_bytes(path.read_bytes()[:1000])
    proc = run_cli(["train", "--set", f'data.name="{out}"', "--set", "model.name=\"mlp\"",
                    "--set", f'run.out_dir="{tmp_path}"', "--set", "train.epochs=1"], check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("hpctrain: error: ") and "shard-00003.h5" in last and "truncated" in last
