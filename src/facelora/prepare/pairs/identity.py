"""Group face embeddings by identity, and pair different photos of the same person.

Similarity is the cosine of unit embeddings, computed block by block so 100,000 faces never
need the full similarity matrix in memory. Groups are the connected components of the graph
"cosine >= threshold" (union-find); pairs additionally require the two photos themselves to
be that similar, so a chain of look-alikes never pairs two different people directly.
"""

from __future__ import annotations

import numpy as np


class UnionFind:
    def __init__(self, n: int):
        self.parent = np.arange(n)

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:  # path compression
            self.parent[i], i = root, self.parent[i]
        return int(root)

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def cluster_identities(embeddings: np.ndarray, threshold: float, block: int = 2048) -> np.ndarray:
    """Label per row: the smallest row index of its identity group."""
    emb = np.asarray(embeddings, dtype=np.float32)
    n = len(emb)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    emb = emb / np.where(norms > 0, norms, 1.0)
    uf = UnionFind(n)
    for start in range(0, n, block):
        sims = emb[start : start + block] @ emb.T
        rows, cols = np.nonzero(sims >= threshold)
        for r, c in zip(rows + start, cols, strict=True):
            if c > r:
                uf.union(int(r), int(c))
    return np.array([uf.find(i) for i in range(n)], dtype=np.int64)


def identity_pairs(
    embeddings: np.ndarray,
    image_ids: list[str],
    contents: list[str],
    min_similarity: float,
    near_duplicate: float,
    max_references: int,
    max_pairs_per_identity: int,
) -> list[tuple[int, int, list[int], float]]:
    """(start, end, references, similarity) row indices: each photo as the end, paired with
    the most similar other photo of its group (not the same file, not a near-duplicate)."""
    emb = np.asarray(embeddings, dtype=np.float32)
    labels = cluster_identities(emb, min_similarity)
    out = []
    for label in np.unique(labels):
        members = np.nonzero(labels == label)[0]
        if len(members) < 2:
            continue
        sims = emb[members] @ emb[members].T
        made = 0
        for i, end in enumerate(members):
            order = np.argsort(-sims[i], kind="stable")
            partners = [
                int(members[j])
                for j in order
                if members[j] != end
                and image_ids[members[j]] != image_ids[end]
                and contents[members[j]] != contents[end]
                and min_similarity <= sims[i, j] < near_duplicate
            ]
            if not partners:
                continue
            start = partners[0]
            out.append(
                (
                    start,
                    int(end),
                    partners[1 : 1 + max_references],
                    float(sims[i][members == start][0]),
                )
            )
            made += 1
            if made >= max_pairs_per_identity:
                break
    return out
