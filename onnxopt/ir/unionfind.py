"""Disjoint sets (union-find), the one implementation: qdq's placement groups tensors that must
share a scale with it, prune's channel analysis groups channels that must go together."""
from __future__ import annotations


class UnionFind:
    """Disjoint sets of hashable items, with path halving. An item joins (as a set of its own) on
    its first :meth:`find`; :meth:`union` makes ``a``'s representative that of both sets."""

    def __init__(self):
        self.parent: dict = {}

    def __len__(self) -> int:
        return len(self.parent)

    def find(self, x):
        parent = self.parent
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(self, a, b):
        """Merge the sets of ``a`` and ``b``; returns the representative (``a``'s)."""
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra
        return ra
