"""The integer dedup (data_pipeline.dedup): quality on planted duplicates, connected components (distributed ==
single task == a reference union-find), a 100,000-member duplicate cluster, resume, Ray, and bad input.

Every test writes its own Parquet partitions (doc_id uint64 ascending, text) the way ingest does."""

from __future__ import annotations

import json
import os
import resource

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_pipeline import storage
from data_pipeline.components import both_directions, components_stage, write_buckets
from data_pipeline.config import DedupConfig
from data_pipeline.dedup import DedupInputError, dedup_stage, removal_mask, removed_url
from data_pipeline.doc_ids import make_doc_ids, partition_key
from data_pipeline.minhash import MinHasher
from data_pipeline.runner import Runner
from data_pipeline.synthetic_dups import make_corpus, score


def fresh_rng() -> np.random.Generator:
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"rng seed {seed}")
    return np.random.default_rng(seed)


def write_partitions(docs: list[dict], root, parts: int) -> tuple[list[tuple[int, str]], dict[int, str]]:
    """Write ``docs`` (in order) as ``parts`` Parquet partitions of one source; returns them and doc_id -> id."""
    partitions, names = [], {}
    bounds = np.linspace(0, len(docs), parts + 1).astype(int)
    for f in range(parts):
        chunk = docs[bounds[f] : bounds[f + 1]]
        key = partition_key(0, f)
        ids = make_doc_ids(key, np.arange(len(chunk)))
        url = str(root / f"part-{f:05d}.parquet")
        pq.write_table(
            pa.table(
                {
                    "doc_id": pa.array(ids, pa.uint64()),
                    "text": [d["text"] for d in chunk],
                    "other": [d["id"] for d in chunk],
                }
            ),
            url,
        )
        partitions.append((key, url))
        names.update(zip(ids.tolist(), (d["id"] for d in chunk)))
    return partitions, names


def read_removed(stage, partitions) -> dict[int, int]:
    out: dict[int, int] = {}
    for key, _ in partitions:
        arr = storage.load_array(removed_url(str(stage), key))
        assert arr.dtype.names == ("doc", "kept")
        assert np.all(arr["doc"][1:] > arr["doc"][:-1]), "removal list must be sorted and unique"
        assert np.all(arr["doc"] >> np.uint64(28) == key)
        out.update(zip(arr["doc"].tolist(), arr["kept"].tolist()))
    return out


def stage_bytes(stage) -> dict[str, bytes]:
    return {f: storage.read_bytes(f) for f in storage.list_files(os.path.join(stage, "removed"))}


# ------------------------------------------------------------------------------------------------- kernels


def test_batched_signatures_equal_the_formula():
    rng = fresh_rng()
    h = MinHasher(5, 4, 3, seed=int(rng.integers(1 << 30)))
    sets = [rng.integers(0, 2**63, size=int(n), dtype=np.uint64) for n in rng.integers(0, 60, size=300)]
    sets += [rng.integers(0, 2**63, size=5000, dtype=np.uint64), np.zeros(0, dtype=np.uint64)]  # > one chunk
    got = h.signatures(sets)
    with np.errstate(over="ignore"):
        ref = np.stack(
            [
                ((s[:, None] * h.a[None, :] + h.c[None, :]) >> np.uint64(32)).min(axis=0).astype(np.uint32)
                if len(s)
                else np.full(len(h.a), 0xFFFFFFFF, dtype=np.uint32)
                for s in sets
            ]
        )
    np.testing.assert_array_equal(got, ref)
    keys = h.band_keys_batch(got)
    assert keys.shape == (len(sets), 4)
    # equal band rows <=> equal key (random 64-bit keys: a collision of different rows has probability ~2^-64)
    rows = got.reshape(len(sets), 4, 3)
    for t in range(4):
        _, by_rows = np.unique(rows[:, t], axis=0, return_inverse=True)
        _, by_key = np.unique(keys[:, t], return_inverse=True)
        assert len(set(zip(by_rows.ravel().tolist(), by_key.tolist()))) == len(set(by_key.tolist()))
        assert len(np.unique(by_rows)) == len(np.unique(by_key))


def test_removal_mask_keeps_the_partition_order():
    rng = fresh_rng()
    ids = np.sort(rng.choice(1 << 20, size=500, replace=False).astype(np.uint64))
    gone = np.sort(rng.choice(ids, size=60, replace=False))
    removed = np.zeros(60, dtype=[("doc", "<u8"), ("kept", "<u8")])
    removed["doc"] = gone
    order = rng.permutation(len(ids))
    mask = removal_mask(ids[order], removed)
    np.testing.assert_array_equal(mask, np.isin(ids[order], gone))
    assert not removal_mask(ids, removed[:0]).any()


# ---------------------------------------------------------------------------------------- components


def reference_components(u: np.ndarray, v: np.ndarray) -> dict[int, int]:
    parent: dict[int, int] = {}

    def find(x: int) -> int:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in zip(u.tolist(), v.tolist()):
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return {x: find(x) for x in list(parent) if find(x) != x}


def run_components(tmp_path, u, v, mode: str, buckets: int = 5, groups: int = 3) -> tuple[dict[int, int], object]:
    base = tmp_path / mode
    edges = np.stack([u, v], axis=1).astype(np.uint64)
    # two producers, each writing both directions by node bucket (as the dedup's reduce tasks do)
    for i, half in enumerate((edges[::2], edges[1::2])):
        write_buckets(both_directions(half), str(base / "in"), f"p{i}", buckets)
    inputs = [[str(base / "in" / f"{c:05d}" / f"p{i}.npy") for i in range(2)] for c in range(buckets)]
    nodes = np.unique(edges)
    bounds = [int(b) for b in np.quantile(nodes, np.linspace(0, 1, groups + 1)[1:-1]).astype(np.uint64)]
    res = components_stage(Runner(use_ray=False), str(base / "cc"), inputs, len(u), bounds, 10**9, force=mode)
    got: dict[int, int] = {}
    for g, files in enumerate(res.assign_files):
        for f in files:
            rec = storage.load_array(f).reshape(-1, 2)
            lo = bounds[g - 1] if g else 0
            hi = bounds[g] if g < len(bounds) else 2**64
            assert np.all((rec[:, 0] >= lo) & (rec[:, 0] < hi)), "assignment written to the wrong node range"
            got.update(zip(rec[:, 0].tolist(), rec[:, 1].tolist()))
    return got, res


def random_graph(rng, n_nodes: int) -> tuple[np.ndarray, np.ndarray]:
    """Chains with shuffled ids (the worst case of label propagation), stars, and random sparse edges, over
    random 64-bit ids (including ids >= 2^63)."""
    ids = np.unique(rng.integers(0, 2**64, size=n_nodes, dtype=np.uint64, endpoint=False))
    ids = ids[rng.permutation(len(ids))]
    u, v = [], []
    q = len(ids) // 4
    for chain in np.array_split(ids[:q], 5):
        u.append(chain[:-1])
        v.append(chain[1:])
    for star in np.array_split(ids[q : 2 * q], 20):
        u.append(np.full(len(star) - 1, star[0]))
        v.append(star[1:])
    rest = ids[2 * q :]
    m = len(rest)
    u.append(rest[rng.integers(0, m, size=m // 2)])
    v.append(rest[rng.integers(0, m, size=m // 2)])
    u, v = np.concatenate(u), np.concatenate(v)
    dup = rng.integers(0, len(u), size=len(u) // 5)  # repeated and reversed edges, as several bands give
    return np.concatenate([u, v[dup]]), np.concatenate([v, u[dup]])


@pytest.mark.parametrize("trial", range(3))
def test_distributed_components_equal_single_task_on_random_graphs(tmp_path, trial):
    rng = fresh_rng()
    u, v = random_graph(rng, int(rng.integers(200, 3000)))
    keep = u != v
    u, v = u[keep], v[keep]
    expected = reference_components(u, v)
    single, rs = run_components(tmp_path, u, v, "single")
    dist, rd = run_components(tmp_path, u, v, "distributed")
    assert single == expected
    assert dist == expected
    sizes = np.unique(np.array(list(expected.values()), dtype=np.uint64), return_counts=True)[1]
    assert rs.largest_cluster == rd.largest_cluster == int(sizes.max()) + 1
    assert rs.edges == rd.edges == len({(max(a, b), min(a, b)) for a, b in zip(u.tolist(), v.tolist())})
    assert rd.rounds >= 2  # the shuffled chains need more than one round


def test_components_of_a_hub_with_150k_members(tmp_path):
    """One cluster of 150,000 members: star edges to the hub plus random edges among the members (the shape of
    an LSH bucket of boilerplate), and a few small clusters next to it."""
    rng = fresh_rng()
    members = np.unique(rng.integers(1, 2**62, size=150_500, dtype=np.uint64))[:150_000]
    members = members[rng.permutation(len(members))]
    hub = members[rng.integers(len(members))]
    u = [np.full(len(members), hub), members[rng.integers(0, len(members), size=50_000)]]
    v = [members, members[rng.integers(0, len(members), size=50_000)]]
    small = np.uint64(2**62) + np.arange(300, dtype=np.uint64)
    u.append(small[0::3])
    v.append(small[1::3])
    u, v = np.concatenate(u), np.concatenate(v)
    keep = u != v
    u, v = u[keep], v[keep]
    least = int(members.min())
    expected = {m: least for m in members.tolist() if m != least}
    expected.update({int(a): int(b) for a, b in zip(small[1::3], small[0::3])})
    single, rs = run_components(tmp_path, u, v, "single", buckets=4)
    dist, rd = run_components(tmp_path, u, v, "distributed", buckets=4)
    assert single == expected and dist == expected
    assert rs.largest_cluster == rd.largest_cluster == 150_000


# --------------------------------------------------------------------------------------------- the stage


@pytest.fixture(scope="module")
def planted():
    # 1,200 bases, each with one variant; targets cover exact copies, J >= 0.9 and J <= 0.5
    return make_corpus(1200, (1.0, 0.97, 0.93, 0.9, 0.5, 0.45, 0.4, 0.3), seed=int.from_bytes(os.urandom(4), "little"))


def check_quality(planted, removed_ids: dict[int, int], names: dict[int, str], summary: dict) -> None:
    docs, pairs = planted
    removed = {names[d]: names[k] for d, k in removed_ids.items()}
    s = score(pairs, removed, {d["id"] for d in docs})
    print(json.dumps(s, indent=1))
    # With 14 bands x 8 rows, P(candidate | J) = 1 - (1 - J^8)^14: 0.9999 at J = 0.9, 0.053 at J = 0.5, 0.009
    # at 0.4; over this mix of J <= 0.5 the expected rate is about 2%, and the binomial spread over ~600 pairs
    # (sd 0.6%) keeps it well under 5%. Recall on J >= 0.9 is >= 0.9999 per pair: 0.95 is far below.
    assert s["pairs_j_ge_0.9"] > 300 and s["pairs_exact"] > 100 and s["pairs_j_le_0.5"] > 400
    assert s["recall_j_ge_0.9_or_exact"] >= 0.95
    assert s["recall_exact"] == 1.0
    assert s["false_positive_j_le_0.5"] <= 0.05
    assert s["lost_clusters"] == 0 and s["spurious_merges"] == 0
    # the survivor is the cluster's minimum doc id, never removed itself
    assert all(k < d and k not in removed_ids for d, k in removed_ids.items())
    assert summary["removed"] == len(removed_ids) == summary["exact"] + summary["near"]
    assert summary["exact"] == s["pairs_exact"]
    assert summary["documents"] == len(docs)
    assert summary["largest_cluster"] == 2  # planted groups are pairs


def test_quality_on_planted_corpus(tmp_path, planted):
    partitions, names = write_partitions(planted[0], tmp_path, parts=5)
    summary = dedup_stage(Runner(use_ray=False), partitions, str(tmp_path / "dedup"), DedupConfig(band_ranges=2))
    check_quality(planted, read_removed(tmp_path / "dedup", partitions), names, summary)
    assert summary["cc_mode"] == "single"
    assert summary["tasks"]["bands"]["tasks"] == 28 and summary["tasks"]["sign"]["tasks"] == 5
    assert summary["tasks"]["sign"]["signed"] == len(planted[0]) - summary["exact"]  # exact copies not MinHashed


def test_distributed_settings_give_the_same_removal_lists(tmp_path, planted):
    docs = planted[0][:800]
    partitions, _ = write_partitions(docs, tmp_path, parts=3)
    a = dedup_stage(Runner(use_ray=False), partitions, str(tmp_path / "a"), DedupConfig())
    b = dedup_stage(
        Runner(use_ray=False),
        partitions,
        str(tmp_path / "b"),
        DedupConfig(band_ranges=3, exact_ranges=2, cc_partitions=3, partitions_per_collect=2),
        cc_mode="distributed",
    )
    assert b["cc_mode"] == "distributed" and a["removed"] == b["removed"] > 0
    ra, rb = stage_bytes(str(tmp_path / "a")), stage_bytes(str(tmp_path / "b"))
    assert [os.path.basename(f) for f in ra] == [os.path.basename(f) for f in rb]
    assert list(ra.values()) == list(rb.values())


def test_resume_skips_finished_tasks_and_ends_identical(tmp_path, planted):
    partitions, _ = write_partitions(planted[0][:900], tmp_path, parts=4)
    stage = str(tmp_path / "dedup")
    cfg = DedupConfig(partitions_per_collect=2)
    first = dedup_stage(Runner(use_ray=False), partitions, stage, cfg)
    before = stage_bytes(stage)
    total = sum(s["tasks"] for s in first["tasks"].values())
    # a build killed part-way: some tasks' outputs and completion records are gone
    rng = fresh_rng()
    for step in ("sign", "bands", "collect", "hash"):
        records = storage.list_files(os.path.join(stage, step, "_done"))
        for r in rng.choice(records, size=max(1, len(records) // 3), replace=False):
            storage.remove(r)
    storage.remove(os.path.join(stage, "removed", os.path.basename(removed_url(stage, partitions[0][0]))))
    storage.remove(os.path.join(stage, "collect", "_done", "00000.json"))
    storage.remove(os.path.join(stage, "sign", "000-000"))
    storage.remove(os.path.join(stage, "sign", "_done"))  # every sign task reruns: the band files return
    second = dedup_stage(Runner(use_ray=False), partitions, stage, cfg)
    ran = sum(s["tasks"] - s["skipped"] for s in second["tasks"].values())
    assert 0 < ran < total
    assert second["tasks"]["exact"]["skipped"] == second["tasks"]["exact"]["tasks"]
    assert stage_bytes(stage) == before
    assert {k: v for k, v in second.items() if k not in ("tasks", "seconds")} == {
        k: v for k, v in first.items() if k not in ("tasks", "seconds")
    }
    third = dedup_stage(Runner(use_ray=False), partitions, stage, cfg)
    assert all(s["skipped"] == s["tasks"] for s in third["tasks"].values())


def boilerplate_corpus(rng, members: int, others: int) -> list[dict]:
    """``members`` near-identical documents (one 120-word template, one word replaced by a unique token in
    each: about 5 of ~116 shingles differ from the template, J ~ 0.92 between two members; every 50th an exact
    copy of the template) mixed with ``others`` unrelated documents."""

    def word(i: int) -> str:  # letters only: simplify() maps digits to 0
        return "".join(chr(97 + int(c, 26)) for c in np.base_repr(i, 26).lower())

    vocab = [word(i) + "q" for i in rng.choice(200_000, size=20_000, replace=False)]
    template = [vocab[i] for i in rng.integers(0, len(vocab), size=120)]
    pos = rng.integers(0, 120, size=members)
    docs = []
    for i in range(members):
        words = list(template)
        if i % 50:
            words[pos[i]] = "uniq" + word(i)
        docs.append({"id": f"m{i}", "text": " ".join(words)})
    for i in range(others):
        docs.append({"id": f"o{i}", "text": " ".join(vocab[j] for j in rng.integers(0, len(vocab), size=120))})
    return [docs[j] for j in rng.permutation(len(docs))]


@pytest.mark.slow
def test_one_cluster_of_100k_boilerplate_documents(tmp_path):
    rng = fresh_rng()
    docs = boilerplate_corpus(rng, 100_000, 2_000)
    partitions, names = write_partitions(docs, tmp_path, parts=6)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    summary = dedup_stage(Runner(use_ray=False), partitions, str(tmp_path / "dedup"), DedupConfig())
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS of the test process: {rss0:.0f} MB before, {rss1:.0f} MB after the dedup")
    removed = read_removed(tmp_path / "dedup", partitions)
    members = sorted(d for d, n in names.items() if n.startswith("m"))
    # every member is in the one cluster; its survivor is the least member id; no unrelated document removed
    assert summary["largest_cluster"] == 100_000
    assert removed == {d: members[0] for d in members[1:]}
    assert summary["exact"] == 100_000 // 50 - 1
    assert rss1 < 4096, "the 100k-member cluster must fit in a few GB"


def test_bad_partition_is_named(tmp_path):
    key = partition_key(0, 0)
    url = str(tmp_path / "bad.parquet")
    pq.write_table(
        pa.table({"doc_id": pa.array(make_doc_ids(key, np.array([2, 1])), pa.uint64()), "text": ["a b c", "d e f"]}),
        url,
    )
    with pytest.raises(Exception, match="bad.parquet.*ascending"):
        dedup_stage(Runner(use_ray=False), [(key, url)], str(tmp_path / "d"), DedupConfig())
    url2 = str(tmp_path / "wrongkey.parquet")
    pq.write_table(
        pa.table({"doc_id": pa.array(make_doc_ids(key + 1, np.array([0])), pa.uint64()), "text": ["a b c"]}), url2
    )
    with pytest.raises(Exception, match="wrongkey.parquet.*partition key"):
        dedup_stage(Runner(use_ray=False), [(key, url2)], str(tmp_path / "e"), DedupConfig())
    assert issubclass(DedupInputError, ValueError)


@pytest.mark.slow
def test_on_ray_equals_in_process(tmp_path, planted):
    docs = planted[0][:600]
    partitions, _ = write_partitions(docs, tmp_path, parts=3)
    local = dedup_stage(Runner(use_ray=False), partitions, str(tmp_path / "local"), DedupConfig())
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    import ray

    from data_pipeline.ray_session import start_local_ray

    started = not ray.is_initialized()
    if started:
        start_local_ray(num_cpus=2, object_store_mb=200)
    try:
        on_ray = dedup_stage(
            Runner(use_ray=True), partitions, str(tmp_path / "ray"), DedupConfig(), cc_mode="distributed"
        )
    finally:
        if started:
            ray.shutdown()
    assert on_ray["removed"] == local["removed"] > 0
    assert list(stage_bytes(str(tmp_path / "ray")).values()) == list(stage_bytes(str(tmp_path / "local")).values())
