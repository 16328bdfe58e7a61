"""Acceptance 1 of issue 18: edges computed in chunks (prompts, positions, downstream groups,
all three at once, and with blocks recomputed in the backward pass) equal the one-pass edges within float32 rounding, on every family, for
the zero and corrupt baselines and EAP-IG, with positions summed and kept. The one-pass edges
are checked against brute-force autograd in test_edges.py."""

from __future__ import annotations

import pytest
import torch

from actwh.compute.edges import EdgeChunks, component_edges
from actwh.compute.targets import Batch
from actwh.errors import ActwhError

from conftest import padded_batch

# mixed lengths (3, 8, 14 tokens and a corrupted twin of each, token for token)
TEXTS = ["when Mary and John went to the store , John gave a drink to", "the cat", "one two three four five six seven"]
BAD = ["when John and Mary went to the store , Mary gave a ball to", "a dog", "two three four five six seven eight"]
# each split alone, then all three at once (sizes that do not divide the batch, the 14
# positions or the 4·layers + 1 groups, so chunks end mid-layer and a last chunk is short)
ALL = EdgeChunks(rows=2, positions=5, groups=3)
# recompute: blocks rerun in the backward pass (activation checkpointing)
PLANS = {"zero-summed-right": [EdgeChunks(rows=1), EdgeChunks(positions=3), EdgeChunks(groups=2),
                               EdgeChunks(recompute=True)],
         "zero-each-left": [ALL], "corrupt-summed-left": [EdgeChunks(rows=2, positions=5, groups=3, recompute=True)],
         "ig-summed-right": [EdgeChunks(rows=1, positions=1, groups=1, recompute=True)], "ig-each-left": [ALL]}


def batches(loaded, side):
    tokens, mask = padded_batch(loaded.tokenizer, TEXTS, side)
    bad, bad_mask = padded_batch(loaded.tokenizer, BAD, side)
    assert torch.equal(mask, bad_mask)
    return Batch(tokens, mask, torch.tensor([5, 7, 9]), torch.tensor([6, 8, 10])), bad


def same(a, b, scale=None):
    """Equal within float32 rounding of sums of a few hundred products of terms up to `scale`
    (in_v · g_v cancels to near zero under a norm, so its terms set its rounding, not its size)."""
    scale = float(a.abs().max()) if scale is None else scale
    assert scale > 0
    torch.testing.assert_close(b, a, rtol=1e-5, atol=2e-6 * scale)


@pytest.mark.parametrize("case", list(PLANS))
def test_chunked_edges_equal_one_pass(tiny_model, case):
    base, positions, side = case.split("-")
    model = tiny_model.model
    batch, bad = batches(tiny_model, side)
    kw = dict(positions=positions, corrupt=None if base == "zero" else bad, ig_steps=2 if base == "ig" else 0)
    whole = component_edges(model, batch, "logit_diff", **kw)
    for plan in PLANS[case]:
        got = component_edges(model, batch, "logit_diff", chunks=plan, **kw)
        same(whole.values, got.values)
        same(whole.in_dot_grad, got.in_dot_grad, float(whole.values.abs().max()))
        assert torch.equal(got.allowed, whole.allowed)
        assert (got.values[..., ~whole.allowed] == 0).all()
        torch.testing.assert_close(got.bias, whole.bias, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got.metric, whole.metric, rtol=1e-6, atol=1e-6)
        if base != "zero":
            torch.testing.assert_close(got.corrupt_metric, whole.corrupt_metric, rtol=1e-6, atol=1e-6)


def test_bad_chunks_are_refused():
    for bad in (dict(rows=0), dict(positions=-1), dict(groups=1.5), dict(rows=True), dict(recompute=1)):
        with pytest.raises(ActwhError, match="edge chunk"):
            EdgeChunks(**bad)
