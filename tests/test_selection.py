"""Selection rules: parsing, and the node sets they keep on a hand-made result."""

from __future__ import annotations

import pytest
import torch

from actwh.compute.scalars import ScalarResults, Plan
from actwh.compute.selection import Selection
from actwh.rows import to_columns
from actwh.errors import ActwhError, UnknownName


def test_parse_and_refusals():
    assert str(Selection.parse("top-k:5:mlp_act_times_grad")) == "top-k:5:mlp_act_times_grad"
    assert Selection.parse("dense").mode == "dense"
    with pytest.raises(ActwhError, match="rank attn_head nodes by attn_act_times_grad"):
        Selection.parse("top-k:3:attn_pattern")
    with pytest.raises(UnknownName):
        Selection.parse("top-k:3:nope")
    for bad in ("top-k:0:mlp_post_act", "top-k:x:mlp_post_act", "most:3"):
        with pytest.raises(ActwhError):
            Selection.parse(bad)


def test_top_k_threshold_and_dense_on_known_values():
    # one prompt, 3 positions (last is padding), 1 layer, 4 neurons
    values = torch.tensor([[[[1.0, -5.0, 0.5, 2.0]], [[-3.0, 0.1, 4.0, 0.0]], [[9.0, 9.0, 9.0, 9.0]]]])
    mask = torch.tensor([[1, 1, 0]])
    res = ScalarResults({"mlp_act_times_grad": values}, {}, torch.zeros(1), torch.zeros(1), mask,
                        Plan((), frozenset(), frozenset(), False))
    def kept(rule):
        cols = to_columns(res, ["mlp_act_times_grad"], Selection.parse(rule), [7])
        return sorted(zip(cols.node["position"].tolist(), cols.node["node_index"].tolist(),
                          cols.node["value"].tolist()))
    assert kept("top-k:3:mlp_act_times_grad") == [(0, 1, -5.0), (1, 0, -3.0), (1, 2, 4.0)]
    assert kept("threshold:2:mlp_act_times_grad") == [(0, 1, -5.0), (0, 3, 2.0), (1, 0, -3.0), (1, 2, 4.0)]
    assert len(kept("dense")) == 8  # every real position, never the pad
    cols = to_columns(res, ["mlp_act_times_grad"], Selection.parse("dense"), [7])
    assert set(cols.node["prompt_id"].tolist()) == {7}


@pytest.mark.parametrize("rule", ["top-k:6:mlp_act_times_grad", "dense"])
def test_rows_go_prompt_scalar_then_node_then_position(rule):
    # The write order DuckDB compresses best (benchmarks/bench_loading.py); both ways of finding
    # it (sorting a few kept entries, scanning a node-major mask) must give it, and every kept
    # entry exactly once.
    g = torch.Generator().manual_seed(3)
    b, p, L, n = 3, 5, 2, 7
    token = {name: torch.randn(b, p, L, n, generator=g) for name in ("mlp_act_times_grad", "mlp_post_act")}
    mask = torch.ones(b, p, dtype=torch.long)
    mask[1, :2] = 0  # left padding
    res = ScalarResults(token, {}, torch.zeros(b), torch.zeros(b), mask,
                        Plan((), frozenset(), frozenset(), False))
    names = ["mlp_post_act", "mlp_act_times_grad"]
    cols = to_columns(res, names, Selection.parse(rule), [10, 11, 12]).node
    keys = list(zip(cols["prompt_id"].tolist(), cols["scalar"].tolist(), cols["layer"].tolist(),
                    cols["node_index"].tolist(), cols["position"].tolist()))
    # prompts ascending; within a prompt, scalars in request order, then (layer, index, position)
    order = {s: i for i, s in enumerate(names)}
    from actwh.compute.scalars import SCALARS
    ids = tuple(SCALARS)
    rank = [(k[0], order[ids[k[1]]], k[2], k[3], k[4]) for k in keys]
    assert rank == sorted(rank) and len(set(rank)) == len(rank)
    # the values are the tensor's at those coordinates (positions count from the first real token)
    offset = {10: 0, 11: 2, 12: 0}
    for (pid, s, layer, idx, pos), v in zip(keys, cols["value"].tolist()):
        assert v == token[ids[s]][pid - 10, pos + offset[pid], layer, idx].item()
    per_prompt = 6 if rule.startswith("top-k") else None
    for pid in (10, 11, 12):
        n_rows = sum(k[0] == pid for k in keys)
        real = int(mask[pid - 10].sum())
        assert n_rows == 2 * (per_prompt or real * L * n)
