"""Connected components over integer edges: one task (numpy union-find) or distributed star rounds.

Input: edge files written by the dedup's reduce tasks, each an ``(n, 2)`` uint64 array of *directed pairs*
(node, neighbour) holding both directions of every edge, already split into C node-hash buckets
(``bucket(node) = (fmix64(node) >> 32) * C >> 32``): bucket c's files hold every pair whose node hashes to c.
Output: for every node that is not the minimum of its component, the record (node, component minimum),
written as ``(n, 2)`` uint64 files sorted by node and split into caller-given ranges of node ids (the
dedup's partition groups). The component minimum is the survivor of a duplicate cluster.

Single task (up to ``single_task_edges`` candidate edges): every file is loaded, each undirected edge kept
once, and :func:`components_in_memory` (hooking of roots + full path compression, O(log n) rounds of numpy
ops) labels every node with its component's minimum.

Distributed: the alternating large-star / small-star rounds of Kiveris, Lattanzi, Mirrokni, Rastogi and
Vassilvitskii, "Connected Components in MapReduce and Beyond" (SoCC 2014). With Γ(u) the neighbours of u and
m(S) = min S:

- large-star: for every node u, with m = m(Γ(u) ∪ {u}), replace each edge (u, v) with v > u by (v, m);
- small-star: for every node u, with N = {v ∈ Γ(u) : v < u} and m = m(N ∪ {u}), replace the edges
  (u, v), v ∈ N, by (v, m) for v ∈ N ∪ {u}, v ≠ m.

Both keep the components; alternating them converges in O(log^2 n) rounds to stars centred on the
component minima. A step changed nothing exactly when no node has both a smaller and a larger neighbour
(large-star: a node with a larger neighbour is its own m) and no node has two smaller neighbours
(small-star); the tasks count those nodes and the loop stops after a round where both counts are zero: then
every node has at most one smaller neighbour and a node with one has no larger neighbour, i.e. the graph is
a set of stars (centre, leaves) with the centre smallest. Each step is C tasks (one per node bucket); task c
reads the C files addressed to it by the previous step, sorts its pairs (numpy lexsort) and groups them by
node, and writes C files, one per destination bucket. A cluster with millions of members is one node's
sorted run of pairs in one task: 16 bytes per member, never a Python object per member.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from data_pipeline import storage
from data_pipeline.runner import Runner, Task

log = logging.getLogger(__name__)

_C1 = np.uint64(0xFF51AFD7ED558CCD)
_C2 = np.uint64(0xC4CEB9FE1A85EC53)
EMPTY_PAIRS = np.zeros((0, 2), dtype=np.uint64)


class ComponentsDidNotConverge(RuntimeError):
    pass


def bucket_of(nodes: np.ndarray, buckets: int) -> np.ndarray:
    """int64 bucket in [0, buckets) of each node id: ``(fmix64(node) >> 32) * buckets >> 32``."""
    x = np.asarray(nodes, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = x ^ (x >> np.uint64(33))
        x = x * _C1
        x = x ^ (x >> np.uint64(33))
        x = x * _C2
        x = x ^ (x >> np.uint64(33))
    return ((x >> np.uint64(32)) * np.uint64(buckets) >> np.uint64(32)).astype(np.int64)


def unique_pairs(pairs: np.ndarray) -> np.ndarray:
    """Rows of an (n, 2) uint64 array, sorted by (column 0, column 1), duplicates dropped."""
    if len(pairs) == 0:
        return EMPTY_PAIRS
    p = pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]
    keep = np.ones(len(p), dtype=bool)
    keep[1:] = (p[1:, 0] != p[:-1, 0]) | (p[1:, 1] != p[:-1, 1])
    return p[keep]


def load_pairs(urls: list[str]) -> np.ndarray:
    arrs = [storage.load_array(u) for u in urls]
    arrs = [a.reshape(-1, 2) for a in arrs if len(a)]
    return np.concatenate(arrs).astype(np.uint64, copy=False) if arrs else EMPTY_PAIRS


def write_buckets(pairs: np.ndarray, out_dir: str, name: str, buckets: int) -> None:
    """Split directed pairs by ``bucket_of(node)``: ``out_dir/<bucket:05d>/<name>.npy`` (every bucket written)."""
    b = bucket_of(pairs[:, 0], buckets) if len(pairs) else np.zeros(0, dtype=np.int64)
    order = np.argsort(b, kind="stable")
    pairs, b = pairs[order], b[order]
    cuts = np.searchsorted(b, np.arange(buckets + 1))
    for c in range(buckets):
        storage.save_array(storage.join(out_dir, f"{c:05d}", f"{name}.npy"), pairs[cuts[c] : cuts[c + 1]])


def both_directions(edges: np.ndarray) -> np.ndarray:
    return np.concatenate([edges, edges[:, ::-1]]) if len(edges) else EMPTY_PAIRS


def write_by_range(records: np.ndarray, bounds: list[int], out_dir: str, name: str) -> None:
    """Sort (node, x) records by node and split them at ``bounds`` (the lower node id of ranges 1..G-1):
    ``out_dir/<range:05d>/<name>.npy`` for every range."""
    records = records[np.argsort(records[:, 0], kind="stable")] if len(records) else EMPTY_PAIRS
    cuts = np.concatenate([[0], np.searchsorted(records[:, 0], np.asarray(bounds, dtype=np.uint64)), [len(records)]])
    for g in range(len(bounds) + 1):
        storage.save_array(storage.join(out_dir, f"{g:05d}", f"{name}.npy"), records[cuts[g] : cuts[g + 1]])


# ----------------------------------------------------------------------------------------------- in memory


def components_in_memory(u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(nodes, root) for every node of the edges (u_i, v_i): ``root`` = the minimum node of its component.

    Nodes are relabelled 0..n-1 in increasing order. Each round hooks, for every edge whose endpoints have
    different labels, the larger label (a root) onto the smaller (``minimum.at``), then compresses every
    path (label = label[label] until nothing changes). Labels only decrease and stay inside the component,
    so at the end every node carries the smallest index of its component, i.e. its minimum node.
    """
    u = np.asarray(u, dtype=np.uint64)
    v = np.asarray(v, dtype=np.uint64)
    nodes, inv = np.unique(np.concatenate([u, v]), return_inverse=True)
    a, b = inv[: len(u)].astype(np.int64), inv[len(u) :].astype(np.int64)
    label = np.arange(len(nodes), dtype=np.int64)
    while len(a):
        la, lb = label[a], label[b]
        cross = la != lb
        if not cross.any():
            break
        a, b, la, lb = a[cross], b[cross], la[cross], lb[cross]
        np.minimum.at(label, np.maximum(la, lb), np.minimum(la, lb))
        while True:
            nxt = label[label]
            if np.array_equal(nxt, label):
                break
            label = nxt
    return nodes, nodes[label]


# ------------------------------------------------------------------------------------------ star rounds


def _groups(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start index of each node's run in sorted unique pairs, and each pair's run number."""
    start = np.ones(len(p), dtype=bool)
    start[1:] = p[1:, 0] != p[:-1, 0]
    return np.flatnonzero(start), np.cumsum(start) - 1


def large_star(p: np.ndarray) -> tuple[np.ndarray, int]:
    """Sorted unique pairs (u, v) of both directions grouped by u -> (edges (v, m(u)) for v > u, changed)."""
    if len(p) == 0:
        return EMPTY_PAIRS, 0
    starts, gid = _groups(p)
    node, nbr = p[:, 0], p[:, 1]
    m = np.minimum(nbr[starts], node[starts])  # m(Γ(u) ∪ {u}); nbr[start] is the least neighbour
    larger = nbr > node
    ends = np.append(starts[1:], len(p)) - 1
    changed = int(((nbr[ends] > node[starts]) & (m < node[starts])).sum())
    return np.stack([nbr[larger], m[gid[larger]]], axis=1), changed


def small_star(p: np.ndarray) -> tuple[np.ndarray, int]:
    """Sorted unique pairs (u, v), v < u, grouped by u -> (edges (v, m) for v ∈ N(u) ∪ {u}, v ≠ m, changed)."""
    if len(p) == 0:
        return EMPTY_PAIRS, 0
    starts, gid = _groups(p)
    node, nbr = p[:, 0], p[:, 1]
    m = nbr[starts]  # every neighbour here is smaller than u
    keep = nbr != m[gid]
    sizes = np.diff(np.append(starts, len(p)))
    out = np.concatenate([np.stack([nbr[keep], m[gid[keep]]], axis=1), np.stack([node[starts], m], axis=1)])
    return out, int((sizes >= 2).sum())


def star_step_task(step: str, inputs: list[str], out_dir: str, src: int, buckets: int) -> dict:
    """One bucket of one step. large: writes (v, m) keyed by v (the small-star's grouping node);
    small: writes both directions of its edges (the next large-star's grouping)."""
    p = unique_pairs(load_pairs(inputs))
    if step == "large":
        edges, changed = large_star(p)
        out = edges
    elif step == "small":
        edges, changed = small_star(p)
        out = both_directions(edges)
    else:
        raise ValueError(f"unknown star step {step!r}")
    write_buckets(out, out_dir, f"{src:05d}", buckets)
    return {"pairs": int(len(p)), "changed": changed, "edges_out": int(len(edges))}


def star_assign_task(inputs: list[str], out_dir: str, src: int, bounds: list[int]) -> dict:
    """Converged stars: bucket c holds (centre, leaf) for its centres; writes (leaf, centre) by node range."""
    p = unique_pairs(load_pairs(inputs))
    leaf = p[:, 1] > p[:, 0]
    rec = np.stack([p[leaf, 1], p[leaf, 0]], axis=1)
    largest = 0
    if len(rec):
        _, counts = np.unique(rec[:, 1], return_counts=True)
        largest = int(counts.max()) + 1
    write_by_range(rec, bounds, out_dir, f"{src:05d}")
    return {"removed": int(len(rec)), "largest_cluster": largest}


def single_task(inputs: list[str], out_dir: str, bounds: list[int]) -> dict:
    """Every edge in one process: union-find, then (node, minimum) for non-minimal nodes by node range."""
    p = load_pairs(inputs)
    p = unique_pairs(p[p[:, 0] > p[:, 1]])  # each undirected edge once
    nodes, root = components_in_memory(p[:, 0], p[:, 1])
    moved = nodes != root
    rec = np.stack([nodes[moved], root[moved]], axis=1)
    largest = 0
    if len(rec):
        _, counts = np.unique(root, return_counts=True)
        largest = int(counts.max())
    write_by_range(rec, bounds, out_dir, "single")
    return {"edges": int(len(p)), "removed": int(len(rec)), "largest_cluster": largest}


@dataclass
class ComponentsResult:
    mode: str  # "single" or "distributed"
    edges: int  # distinct undirected edges
    removed: int  # non-minimal nodes
    largest_cluster: int  # members of the largest component (0 without edges)
    rounds: int
    assign_files: list[list[str]] = field(default_factory=list)  # per node range, the files of its records
    runs: dict[str, dict] = field(default_factory=dict)  # per step: tasks, skipped


def _record(runner: Runner, runs: dict[str, dict]) -> None:
    r = runner.runs[-1]
    runs[r.name] = {"tasks": r.tasks, "skipped": r.skipped, "seconds": round(r.seconds, 3)}


def components_stage(
    runner: Runner,
    url: str,
    inputs_by_bucket: list[list[str]],
    candidate_edges: int,
    bounds: list[int],
    single_task_edges: int,
    max_rounds: int = 64,
    force: str = "",
) -> ComponentsResult:
    """Components of the graph in ``inputs_by_bucket`` (C lists of pair files); each step under ``url``.

    ``force`` = "single" / "distributed" overrides the choice by ``candidate_edges`` (tests)."""
    groups = len(bounds) + 1
    runs: dict[str, dict] = {}
    mode = force or ("single" if candidate_edges <= single_task_edges else "distributed")
    if mode == "single":
        d = storage.join(url, "single")
        (s,) = runner.run(
            "dedup-cc-single",
            d,
            single_task,
            [Task("single", {"inputs": [f for fs in inputs_by_bucket for f in fs], "out_dir": d, "bounds": bounds})],
        )
        _record(runner, runs)
        files = [[storage.join(d, f"{g:05d}", "single.npy")] for g in range(groups)]
        return ComponentsResult("single", s["edges"], s["removed"], s["largest_cluster"], 0, files, runs)
    buckets = len(inputs_by_bucket)
    inputs = inputs_by_bucket
    edges = 0
    for rnd in range(1, max_rounds + 1):
        changed = {}
        for step in ("large", "small"):
            d = storage.join(url, f"r{rnd:03d}-{step}")
            sums = runner.run(
                f"dedup-cc-r{rnd}-{step}",
                d,
                star_step_task,
                [
                    Task(f"{c:05d}", {"step": step, "inputs": inputs[c], "out_dir": d, "src": c, "buckets": buckets})
                    for c in range(buckets)
                ],
            )
            _record(runner, runs)
            if rnd == 1 and step == "large":
                edges = sum(s["pairs"] for s in sums) // 2
            changed[step] = sum(s["changed"] for s in sums)
            inputs = [[storage.join(d, f"{dst:05d}", f"{c:05d}.npy") for c in range(buckets)] for dst in range(buckets)]
        log.info(
            "connected components round %d: large-star changed %d nodes, small-star %d",
            rnd,
            changed["large"],
            changed["small"],
        )
        if changed["large"] == 0 and changed["small"] == 0:
            break
    else:
        raise ComponentsDidNotConverge(
            f"connected components did not converge in {max_rounds} rounds; raise dedup.max_cc_rounds"
        )
    d = storage.join(url, "assign")
    sums = runner.run(
        "dedup-cc-assign",
        d,
        star_assign_task,
        [Task(f"{c:05d}", {"inputs": inputs[c], "out_dir": d, "src": c, "bounds": bounds}) for c in range(buckets)],
    )
    _record(runner, runs)
    files = [[storage.join(d, f"{g:05d}", f"{c:05d}.npy") for c in range(buckets)] for g in range(groups)]
    return ComponentsResult(
        "distributed",
        edges,
        sum(s["removed"] for s in sums),
        max([s["largest_cluster"] for s in sums] + [0]),
        rnd,
        files,
        runs,
    )
