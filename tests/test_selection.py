"""Selection rules: parsing, and the node sets they keep on a hand-made result."""

from __future__ import annotations

import pytest
import torch

from actwh.compute.scalars import ScalarResults, Plan
from actwh.compute.selection import Selection, to_columns
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
