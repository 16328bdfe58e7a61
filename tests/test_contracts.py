"""Small contracts that mutation testing found unguarded (benchmarks/RESULTS.md, mutation section)."""

from __future__ import annotations

import dataclasses
import re

import pytest

from actwh.compute.keep import KeepRule
from actwh.errors import ActwhError


def test_keep_rules_are_immutable_values():
    rule = KeepRule.parse("top-k:3")
    assert {rule: 1}[KeepRule("top-k", 3)] == 1  # hashable, equal by value
    with pytest.raises(dataclasses.FrozenInstanceError):
        rule.amount = 4


def test_keep_rule_errors_name_the_selection_by_default():
    with pytest.raises(ActwhError, match="^bad selection 'most:3'; use top-k:N, threshold:X or dense$"):
        KeepRule.parse("most:3")


@pytest.mark.parametrize("bad, says", [
    ("most:3", "bad selection 'most:3'; use top-k:N:SCALAR, threshold:X:SCALAR or dense"),
    ("top-k:3", "bad selection 'top-k:3'; use top-k:N:SCALAR, threshold:X:SCALAR or dense"),
    ("dense:mlp_post_act", "bad selection 'dense:mlp_post_act'; use top-k:N:SCALAR, "
                           "threshold:X:SCALAR or dense"),
])
def test_selection_errors_give_the_selection_syntax(bad, says):
    from actwh.compute.selection import Selection

    with pytest.raises(ActwhError, match="^" + re.escape(says) + "$"):
        Selection.parse(bad)


def test_few_kept_rows_still_go_node_by_node_then_by_position():
    """The sparse path of selection (few kept entries, sorted rather than scanned): rows of a
    prompt go scalar, layer, node, then position, as the dense path writes them."""
    import torch

    from actwh.compute.scalars import SCALARS, Plan, ScalarResults
    from actwh.compute.selection import Selection
    from actwh.rows import to_columns

    g = torch.Generator().manual_seed(5)
    b, p, L, n = 2, 6, 3, 8  # 2 x 144 entries, 4 kept per prompt: the sorted path
    token = {"mlp_act_times_grad": torch.randn(b, p, L, n, generator=g)}
    mask = torch.ones(b, p, dtype=torch.long)
    res = ScalarResults(token, {}, torch.zeros(b), torch.zeros(b), mask,
                        Plan((), frozenset(), frozenset(), False))
    cols = to_columns(res, ["mlp_act_times_grad"], Selection.parse("top-k:4:mlp_act_times_grad"), [0, 1]).node
    keys = list(zip(cols["prompt_id"].tolist(), cols["layer"].tolist(), cols["node_index"].tolist(),
                    cols["position"].tolist()))
    assert keys == sorted(keys) and len(keys) == 8
    for pid in (0, 1):
        top = token["mlp_act_times_grad"][pid].abs().flatten().topk(4).indices.tolist()
        want = sorted((pid, (i // n) % L, i % n, i // (L * n)) for i in top)
        assert [k for k in keys if k[0] == pid] == want


@pytest.mark.parametrize("rule", ["dense", "top-k:3:attn_act_times_grad"])
def test_pair_rows_alone_are_the_kept_heads_real_causal_keys(rule):
    """A pair scalar requested alone (no token scalar of heads to select by): dense keeps every
    head's whole row at every real query, top-k the rows of the heads its ranking keeps; keys
    are the real ones at or before the query; positions count from the first real token."""
    import torch

    from actwh.compute.scalars import Plan, ScalarResults
    from actwh.compute.selection import Selection
    from actwh.rows import to_columns

    g = torch.Generator().manual_seed(7)
    b, p, L, h = 2, 5, 2, 3
    pattern = torch.rand(b, L, h, p, p, generator=g)
    rank = torch.randn(b, p, L, h, generator=g)
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]])  # left and right padded
    res = ScalarResults({"attn_act_times_grad": rank}, {"attn_pattern": pattern}, torch.zeros(b),
                        torch.zeros(b), mask, Plan((), frozenset(), frozenset(), False))
    cols = to_columns(res, ["attn_pattern"], Selection.parse(rule), [3, 4]).pair
    got = {(pid, layer, head, q, k): v for pid, layer, head, q, k, v in zip(
        *(cols[c].tolist() for c in ("prompt_id", "layer", "head", "query_pos", "key_pos", "value")))}
    want = {}
    for i, first in ((0, 2), (1, 0)):
        real = [x for x in range(p) if mask[i, x]]
        heads = {(q, layer, head) for q in real for layer in range(L) for head in range(h)}
        if rule != "dense":
            scores = sorted(((abs(float(rank[i, q, layer, head])), (q, layer, head)) for q, layer, head in heads),
                            reverse=True)
            heads = {key for _, key in scores[:3]}
        for q, layer, head in heads:
            for k in real:
                if k <= q:
                    want[(3 + i, layer, head, q - first, k - first)] = float(pattern[i, layer, head, q, k])
    assert got.keys() == want.keys()
    assert all(got[key] == pytest.approx(want[key]) for key in want)
