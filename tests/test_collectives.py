"""The double binary tree (refgpt.parallel.collectives): for every rank count, each tree spans
the ranks from one root with at most two children a node, and no rank is interior in both
(what halves each rank's traffic); the blocks of a buffer cover it."""

import pytest

from refgpt.parallel.collectives import blocks, double_trees


@pytest.mark.parametrize("p", range(1, 40))
def test_two_trees_span_the_ranks_and_share_no_interior_rank(p):
    trees = double_trees(p)
    for tree in trees:
        assert sorted(tree) == list(range(p))
        roots = [r for r, (parent, _) in tree.items() if parent is None]
        assert len(roots) == 1
        for r, (parent, kids) in tree.items():
            assert len(kids) <= 2 and all(tree[k][0] == r for k in kids)
        seen, todo = set(), list(roots)                  # every rank reached from the root
        while todo:
            r = todo.pop()
            seen.add(r)
            todo += tree[r][1]
        assert seen == set(range(p))
        depth = max(len(bin(p)) - 2, 1)
        assert all(_depth(tree, r) <= depth for r in tree)
    interior = [{r for r, (_, kids) in t.items() if kids} for t in trees]
    assert not interior[0] & interior[1]


def _depth(tree, r):
    d = 0
    while tree[r][0] is not None:
        r, d = tree[r][0], d + 1
    return d


@pytest.mark.parametrize("n, p", [(0, 3), (2, 3), (10, 3), (12, 4), (1001, 8)])
def test_blocks_cover_the_buffer(n, p):
    counts, displs = blocks(n, p)
    assert sum(counts) == n and max(counts) - min(counts) <= 1
    assert displs == [sum(counts[:s]) for s in range(p)]
