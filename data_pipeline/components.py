"""Distributed connected components over a Ray Dataset of edges (the alternating star algorithm).

Kiveris, Lattanzi, Mirrokni, Rastogi, Vassilvitskii, "Connected Components in MapReduce and Beyond"
(SoCC 2014). Nodes are document ids ordered as strings; Γ(u) are u's neighbours, m(S) = min S.

- Large-star: for every node u, with m = m(Γ(u) ∪ {u}), replace each edge (u, v) with v > u by (v, m).
- Small-star: for every node u, with N = {v ∈ Γ(u) : v < u} and m = m(N ∪ {u}), replace the edges
  (u, v), v ∈ N, by (v, m) for v ∈ N ∪ {u}, v ≠ m.

Both steps keep the components; alternating them converges in O(log^2 n) rounds to a set of stars whose
centres are the component minima. A step changed nothing exactly when no node has both a smaller and a
larger neighbour (large-star) and no node has two smaller neighbours (small-star); the reducers count those
nodes, and the loop stops after a round where both counts are zero.

Every step is one distributed sort by node (range partitioning puts all rows of a key in one block, the
property Ray's own ``map_groups`` relies on) followed by a vectorised pandas reduce per block, so no
process ever holds the graph.
The result maps every non-minimal node to its component's minimum: ``{id, kept_id}``.
"""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)


class ComponentsDidNotConverge(RuntimeError):
    pass


def _empty() -> pd.DataFrame:
    return pd.DataFrame({"u": pd.Series([], dtype=object), "v": pd.Series([], dtype=object),
                         "chg": pd.Series([], dtype=np.int64)})


def _both_directions(batch: pd.DataFrame) -> pd.DataFrame:
    u, v = batch["u"].to_numpy(), batch["v"].to_numpy()
    keep = u != v
    return pd.DataFrame({"node": np.concatenate([u[keep], v[keep]]),
                         "nbr": np.concatenate([v[keep], u[keep]])})


def _smaller_side(batch: pd.DataFrame) -> pd.DataFrame:
    u, v = batch["u"].to_numpy(), batch["v"].to_numpy()
    keep = u != v
    u, v = u[keep], v[keep]
    hi = np.where(u > v, u, v)
    lo = np.where(u > v, v, u)
    return pd.DataFrame({"node": hi, "nbr": lo})


def _large_star(part: pd.DataFrame) -> pd.DataFrame:
    part = part.drop_duplicates(["node", "nbr"])
    if part.empty:
        return _empty()
    m = part.groupby("node")["nbr"].min()
    node_min = m.reindex(part["node"]).to_numpy()
    node = part["node"].to_numpy()
    m_all = np.where(node_min < node, node_min, node)      # m(Γ(u) ∪ {u})
    larger = part["nbr"].to_numpy() > node
    out_u, out_v = part["nbr"].to_numpy()[larger], m_all[larger]
    # a node changes its edges when it has a larger neighbour and its minimum is not itself
    changed = pd.Series(larger & (m_all != node)).groupby(node).any()
    chg = np.zeros(len(out_u), dtype=np.int64)
    if len(chg):
        chg[0] = int(changed.sum())
    return pd.DataFrame({"u": out_u, "v": out_v, "chg": chg})


def _small_star(part: pd.DataFrame) -> pd.DataFrame:
    part = part.drop_duplicates(["node", "nbr"])
    if part.empty:
        return _empty()
    grouped = part.groupby("node")["nbr"]
    m = grouped.min()
    deg = grouped.size()
    node = part["node"].to_numpy()
    nbr = part["nbr"].to_numpy()
    mm = m.reindex(node).to_numpy()
    # (v, m) for v in N, v != m ; plus (u, m) once per node
    keep = nbr != mm
    uniq_nodes = m.index.to_numpy()
    out_u = np.concatenate([nbr[keep], uniq_nodes])
    out_v = np.concatenate([mm[keep], m.to_numpy()])
    chg = np.zeros(len(out_u), dtype=np.int64)
    chg[0] = int((deg >= 2).sum())
    return pd.DataFrame({"u": out_u, "v": out_v, "chg": chg})


def group_reduce(ds, key: str, reduce):
    """Apply ``reduce`` (pandas -> pandas) to blocks that each hold every row of their keys.

    A sort by ``key`` range-partitions the rows, so equal keys land in one block (Ray's ``map_groups`` uses
    the same property); the sort-based shuffle is used because Ray 2.60's hash shuffle starts aggregator
    actors per operation (10 s each on 2 cores). The sort keeps the input's number of blocks.
    """
    return ds.sort(key).map_batches(reduce, batch_format="pandas", batch_size=None)


def _step(edges, prepare, reduce):
    out = group_reduce(edges.map_batches(prepare, batch_format="pandas", batch_size=None), "node", reduce).materialize()
    changes = int(out.sum("chg") or 0) if out.count() else 0
    return out.select_columns(["u", "v"]), changes


def connected_components(edges, max_rounds: int = 64):
    """``edges``: Ray Dataset with string columns u, v. Returns a materialised Dataset ``{id, kept_id}``
    with one row per node that is not the minimum of its component (kept_id = that minimum)."""
    if edges.count() == 0:
        import ray.data

        return ray.data.from_pandas(pd.DataFrame({"id": pd.Series([], dtype=object),
                                                  "kept_id": pd.Series([], dtype=object)}))
    for rnd in range(1, max_rounds + 1):
        edges, large = _step(edges, _both_directions, _large_star)
        edges, small = _step(edges, _smaller_side, _small_star)
        log.info("connected components round %d: large-star changed %d nodes, small-star %d", rnd, large, small)
        if large == 0 and small == 0:
            break
    else:
        raise ComponentsDidNotConverge(f"connected components did not converge in {max_rounds} rounds; "
                                       "raise dedup.max_cc_rounds")
    # a converged graph is a set of stars (leaf, centre) with centre < leaf
    return group_reduce(edges.map_batches(_as_assignment, batch_format="pandas", batch_size=None), "id",
                        lambda p: p.drop_duplicates("id")).materialize()


def _as_assignment(batch: pd.DataFrame) -> pd.DataFrame:
    u, v = batch["u"].to_numpy(), batch["v"].to_numpy()
    return pd.DataFrame({"id": np.where(u > v, u, v), "kept_id": np.where(u > v, v, u)})
