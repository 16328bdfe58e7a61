"""The keep rule shared by node selection, component edges and node-level edges."""

from __future__ import annotations

import math

import pytest
import torch

from actwh.compute.keep import KeepRule
from actwh.compute.selection import Selection
from actwh.errors import ActwhError


def test_parse_accepts_the_three_forms_and_round_trips():
    assert KeepRule.parse("top-k:5") == KeepRule("top-k", 5)
    assert KeepRule.parse("threshold:0.25") == KeepRule("threshold", 0.25)
    assert KeepRule.parse("threshold:0") == KeepRule("threshold", 0.0)
    assert KeepRule.parse("dense") == KeepRule("dense")
    for text in ("top-k:5", "threshold:0.25", "dense"):
        assert str(KeepRule.parse(text)) == text
    for text in ("top-k:3:mlp_act_times_grad", "threshold:0.5:attn_act_times_grad", "dense"):
        assert str(Selection.parse(text)) == text


@pytest.mark.parametrize("bad, says", [
    ("top-k:", "needs an amount"), ("threshold:", "needs an amount"), ("top-k", "use top-k:N"),
    ("top-k:0", "whole number > 0"), ("top-k:-2", "whole number > 0"), ("top-k:2.5", "whole number"),
    ("top-k:nan", "whole number"), ("threshold:nan", "finite number ≥ 0"),
    ("threshold:-0.1", "finite number ≥ 0"), ("threshold:inf", "finite number ≥ 0"),
    ("threshold:x", "finite number"), ("dense:3", "use top-k:N"), ("most:3", "use top-k:N"), ("", "use"),
])
def test_parse_refuses_with_one_line(bad, says):
    with pytest.raises(ActwhError, match=says) as e:
        KeepRule.parse(bad, "edge selection")
    assert "\n" not in str(e.value) and repr(bad) in str(e.value)


@pytest.mark.parametrize("bad", ["top-k:nan:mlp_act_times_grad", "threshold:-1:mlp_act_times_grad",
                                 "threshold:nan:mlp_act_times_grad", "top-k::mlp_act_times_grad",
                                 "top-k:3", "threshold:0.5", "dense:mlp_act_times_grad"])
def test_selection_refuses_what_the_rule_refuses(bad):
    with pytest.raises(ActwhError, match="bad selection"):
        Selection.parse(bad)


def test_keep_on_known_values():
    # two rows; the last entry of row 0 is not a candidate, row 1 holds a NaN
    values = torch.tensor([[3.0, -5.0, 0.5, 9.0], [math.nan, 1.0, -2.0, 0.0]])
    cand = torch.tensor([[True, True, True, False], [True, True, True, True]])
    kept = lambda rule: KeepRule.parse(rule).keep(values, cand).tolist()  # noqa: E731
    assert kept("top-k:2") == [[True, True, False, False], [False, True, True, False]]
    assert kept("threshold:1") == [[True, True, False, False], [False, True, True, False]]
    assert kept("threshold:0") == [[True, True, True, False], [False, True, True, True]]
    assert kept("dense") == [[True, True, True, False], [False, True, True, True]]
    # more asked than there are candidates: only candidates are kept
    assert kept("top-k:10") == kept("dense")
    # one-dimensional (node-level edges: per traced node)
    one = KeepRule.parse("top-k:1").keep(torch.tensor([0.1, -0.7, 0.3]), torch.tensor(True))
    assert one.tolist() == [False, True, False]


def test_edges_into_top_n_traces_only_nodes_the_target_depends_on(gpt2_dir):
    """`--edges-into top:N` keeps by the same rule; a node with zero act × grad (here every node
    after the scored position, whose gradient is exactly 0) is never a candidate, so asking for
    more than exist returns exactly the non-zero ones."""
    from actwh.compute.loading import load_model
    from actwh.compute.node_edges import sites, top_downstream
    from actwh.compute.targets import TARGETS, Batch

    loaded = load_model(gpt2_dir, device="cpu")
    model = loaded.model
    batch = Batch.from_text(loaded, ["when Mary and John went to the store , John", "the cat"],
                            targets=["Mary", "dog"], positions=[3, None])
    fwd, bwd = sites(model)
    cache = model.run_with_cache(batch.tokens, fwd, attention_mask=batch.mask, grad_names=bwd,
                                 backward_of=lambda l: TARGETS["logit"].metric(l, batch).sum())
    want = set()  # (prompt, layer, type, index, pos, input) with non-zero act x grad, brute force
    for L in range(model.cfg.n_layers):
        sites_ = [("mlp_neuron", None, f"blocks.{L}.mlp.hook_post")]
        sites_ += [("attn_head", k, f"blocks.{L}.attn.hook_{k}") for k in "qkv"]
        for kind, inp, site in sites_:
            atg = cache.acts[site] * cache.grads[site]
            atg = atg.sum(-1) if inp else atg
            for b, p, i in (atg != 0).nonzero().tolist():
                if batch.mask[b, p]:
                    want.add((b, L, kind, i, p, inp))
    assert want and max(w[4] for w in want if w[0] == 0) == 3  # nothing after the scored token
    got = top_downstream(model, batch, cache, 10**6)
    assert {(d.batch_index, d.layer, d.node_type, d.index, d.pos, d.down_input) for d in got} == want
    assert len(got) == len(want)
