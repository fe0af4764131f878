"""The loader's prefetch and its reads from object storage (the local moto S3 server, tests/s3_server.py)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import dataset_writer
import numpy as np
import pytest

from data_pipeline import storage
from data_pipeline.api import build_loader
from data_pipeline.manifest import ManifestError, read_manifest
from data_pipeline.mds_reader import ShardError, SourceShards

SEQ = 16
SIZES = {"a": 260, "b": 180, "c": 50}


@pytest.fixture(scope="module")
def local_ds(tmp_path_factory) -> Path:
    return dataset_writer.make_dataset(
        tmp_path_factory.mktemp("ds"), SIZES, seed=int(np.random.default_rng().integers(1 << 30))
    )


@pytest.fixture(scope="module")
def remote_ds(local_ds, s3_server) -> str:
    """The same dataset copied into the bucket."""
    url = f"{s3_server.url}/ds-{local_ds.parent.name}"
    assert storage.copy_tree(str(local_ds.parent), url) > 10
    return url


def take(loader, n):
    return [next(loader) for _ in range(n)]


def assert_same(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        np.testing.assert_array_equal(x["tokens"], y["tokens"])
        np.testing.assert_array_equal(x["doc_ids"], y["doc_ids"])


@pytest.mark.parametrize("gb,mb,dp", [(12, 2, 2), (8, 4, 1), (12, 1, 3)])
def test_prefetch_on_off_identical(local_ds, gb, mb, dp):
    rng = np.random.default_rng()
    depth = int(rng.integers(1, 6))
    for r in range(dp):
        off = build_loader(local_ds, None, SEQ, gb, mb, r, dp, 9)
        on = build_loader(local_ds, None, SEQ, gb, mb, r, dp, 9, prefetch=depth)
        n = int(rng.integers(30, 80))
        assert_same(take(on, n), take(off, n))
        assert on.state_dict() == off.state_dict()  # the state counts what was taken, not what was read ahead
        on.close()


def test_resume_exact_with_prefetch(local_ds):
    rng = np.random.default_rng()
    gb, mb, dp = 12, 2, 2
    ref = [take(build_loader(local_ds, None, SEQ, gb, mb, r, dp, 9), 90) for r in range(dp)]
    for cut in rng.choice(np.arange(1, 80), size=4, replace=False):
        for r in range(dp):
            ld = build_loader(local_ds, None, SEQ, gb, mb, r, dp, 9, prefetch=4)
            take(ld, int(cut))
            state = json.loads(json.dumps(ld.state_dict()))
            ld.close()
            resumed = build_loader(local_ds, None, SEQ, gb, mb, r, dp, 9, prefetch=3)
            resumed.load_state_dict(state)
            assert_same(take(resumed, 10), ref[r][cut : cut + 10])
            # load_state_dict on a running prefetcher drops what it read ahead and restarts at the new position
            resumed.load_state_dict(json.loads(json.dumps({**state, "consumed_samples": 0, "micro_step": 0})))
            assert_same(take(resumed, 3), ref[r][:3])
            resumed.close()


def test_remote_reads_match_local_with_cache_and_without(local_ds, remote_ds, tmp_path):
    n = 60
    want = take(build_loader(local_ds, None, SEQ, 12, 2, 1, 2, 5), n)
    direct = build_loader(remote_ds, None, SEQ, 12, 2, 1, 2, 5)  # fsspec into memory, no cache
    assert_same(take(direct, n), want)
    cached = build_loader(remote_ds, None, SEQ, 12, 2, 1, 2, 5, prefetch=3, cache_dir=tmp_path / "cache")
    assert_same(take(cached, n), want)
    cached.close()
    files = [p for p in (tmp_path / "cache").rglob("*.mds.zstd")]
    assert files and all(storage.basename(str(p)).startswith("shard.") for p in files)


def test_source_opens_only_what_it_reads(remote_ds, tmp_path):
    """Construction reads parts.json only; a sample opens its part's index and one shard (into the cache)."""
    _, m = read_manifest(remote_ds)
    src = SourceShards(storage.join(remote_ds, m["sources"]["a"]["dir"]), cache_dir=tmp_path / "c")
    assert src.num_parts == m["sources"]["a"]["parts"] > 3 and len(src) == m["sources"]["a"]["samples"]
    assert not src._parts and not list((tmp_path / "c").rglob("*.mds*"))
    i = int(np.random.default_rng().integers(src.cum[2], src.cum[3]))  # a sample in part 2
    sample = src[i]
    assert sample["tokens"].shape == (SEQ + 1,)
    assert list(src._parts) == [2]
    cached = list((tmp_path / "c").rglob("*.mds.zstd"))
    assert len(cached) == 1 and "part-000002" in str(cached[0])


def test_cache_limit_evicts_lru_and_is_shared_by_ranks(local_ds, remote_ds, tmp_path):
    """Two 'ranks' (threads with their own readers) share one cache dir under a limit of ~3 shards: their
    samples are right and the cache stays within the limit plus the shards in flight."""
    _, m = read_manifest(local_ds)
    rel = m["sources"]["a"]["dir"]
    local = SourceShards(local_ds.parent / rel)
    shard_bytes = max(p.stat().st_size for p in (local_ds.parent / rel).rglob("*.mds.zstd"))
    limit = 3 * shard_bytes
    cache = tmp_path / "shared"
    errors, sizes = [], []

    def rank(r):
        try:
            src = SourceShards(storage.join(remote_ds, rel), cache_shards=1, cache_dir=cache, cache_limit_bytes=limit)
            for i in range(r, len(src), 2):
                got, ref = src[i], local[i]
                np.testing.assert_array_equal(got["tokens"], ref["tokens"])
                np.testing.assert_array_equal(got["doc_starts"], ref["doc_starts"])
                sizes.append(src.cache.size_bytes())
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert max(sizes) <= limit + 2 * shard_bytes  # at most one fresh shard per rank above the limit
    n_shards = len(list((local_ds.parent / rel).rglob("*.mds.zstd")))
    assert len(list(cache.rglob("*.mds.zstd"))) < n_shards  # eviction happened
    assert not [p for p in cache.rglob("*") if ".tmp-" in p.name]  # no partial download left


def test_corrupt_or_missing_remote_object_named(local_ds, s3_server, tmp_path):
    url = f"{s3_server.url}/broken-{tmp_path.name}"
    storage.copy_tree(str(local_ds.parent), url)
    shards = [f for f in storage.list_files(storage.join(url, "shards", "a")) if f.endswith(".mds.zstd")]
    victim = shards[len(shards) // 2]
    data = bytearray(storage.read_bytes(victim))
    data[len(data) // 2] ^= 0x5A
    storage.write_bytes(victim, bytes(data))
    for kwargs in ({"prefetch": 3, "cache_dir": tmp_path / "cache"}, {}):
        ld = build_loader(url, {"a": 1.0}, SEQ, 40, 40, 0, 1, 0, **kwargs)
        with pytest.raises(ShardError, match=f"{victim}: corrupt MDS shard"):
            take(ld, 20)
        ld.close()
    storage.remove(victim)
    ld = build_loader(url, {"a": 1.0}, SEQ, 40, 40, 0, 1, 0, prefetch=2, cache_dir=tmp_path / "cache2")
    with pytest.raises(ShardError, match=f"{victim}: MDS shard missing"):
        take(ld, 20)
    ld.close()
    storage.remove(storage.join(url, "shards", "b", "part-000001", "index.json"))
    ld = build_loader(url, {"b": 1.0}, SEQ, 40, 40, 0, 1, 0)
    with pytest.raises(ShardError, match=r"shards/b/part-000001/index\.json: MDS index missing"):
        take(ld, 20)
    storage.write_bytes(storage.join(url, "shards", "c", "parts.json"), b'{"version": 1, "samp')
    with pytest.raises(ShardError, match=r"shards/c/parts\.json: corrupt JSON"):
        build_loader(url, {"c": 1.0}, SEQ, 40, 40, 0, 1, 0)
    with pytest.raises(ManifestError, match=f"{s3_server.url}/nothing/manifest.json: manifest not found"):
        read_manifest(f"{s3_server.url}/nothing")


def test_verify_cli_names_the_corrupt_object(local_ds, s3_server, tmp_path):
    """``python -m data_pipeline verify --manifest s3://...`` checks every part and shard of the packed layout."""
    import subprocess
    import sys

    url = f"{s3_server.url}/verify-{tmp_path.name}"
    storage.copy_tree(str(local_ds.parent), url)
    cmd = [sys.executable, "-m", "data_pipeline", "verify", "--manifest", url]
    ok = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and f"{len(SIZES)}/{len(SIZES)} sources OK" in ok.stdout
    victim = [f for f in storage.list_files(storage.join(url, "shards", "b")) if f.endswith(".mds.zstd")][-1]
    storage.write_bytes(victim, storage.read_bytes(victim)[:-7])
    bad = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and f"{victim}: corrupt MDS shard" in bad.stdout


def test_trainer_data_keys_are_typed_and_checked():
    from pretrain.config import ConfigError, load_config

    cfg = load_config(
        "tiny", ["data.dataset=s3://bucket/ds", "data.cache_dir=/tmp/c", "data.prefetch=2", "data.cache_limit_gb=0.5"]
    )
    assert (cfg.data.dataset, cfg.data.cache_dir, cfg.data.prefetch, cfg.data.cache_limit_gb) == (
        "s3://bucket/ds",
        "/tmp/c",
        2,
        0.5,
    )
    with pytest.raises(ConfigError, match="data.prefetch=-1 must be >= 0"):
        load_config("tiny", ["data.prefetch=-1"])
    with pytest.raises(ConfigError, match="did you mean 'cache_limit_gb'"):
        load_config("tiny", ["data.cache_limt_gb=3"])
