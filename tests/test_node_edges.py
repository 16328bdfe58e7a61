"""Node-level edges into neurons and into heads' q, k and v inputs, against brute force.

The reference (tests/reference.py) takes r_v by autograd through the block's own norm and
weights at v's private copy of what it reads, and every upstream write as an explicit vector
from the cache; nothing in it comes from actwh's edge code. Every probed node is one the target
depends on (its reference r is asserted non-zero), in a short and a long prompt of one batch,
padded on either side.
"""

from __future__ import annotations

import pytest
import torch

from actwh.compute.loading import load_model
from actwh.compute.node_edges import Down, node_edges, sites, top_downstream
from actwh.compute.targets import TARGETS, Batch

from conftest import PROMPTS, padded_batch
from reference import act_and_grad, node_edges_ref


@pytest.fixture(scope="module")
def model64(family_dir):
    return load_model(family_dir[1], device="cpu", dtype=torch.float64)


def traced(loaded, side="right"):
    """The model, a padded batch, and one forward + backward cache of the node-edge sites."""
    model = loaded.model
    tokens, mask = padded_batch(loaded.tokenizer, PROMPTS, side)
    batch = Batch(tokens, mask, torch.tensor([5, 7, 9]), torch.tensor([6, 8, 10]))
    fwd, bwd = sites(model)
    cache = model.run_with_cache(tokens, fwd, attention_mask=mask, grad_names=bwd,
                                 backward_of=lambda l: TARGETS["logit_diff"].metric(l, batch).sum())
    return model, batch, cache


def probes(model, batch, b):
    """Downstream nodes of prompt b that the target depends on: at the scored position and
    before it, in the first and the last layer, the one of each kind with the largest |act × grad|."""
    L = model.cfg.n_layers - 1
    last = int(batch.scored_positions[b])
    first = int(batch.mask[b].nonzero()[0])
    earlier, before = max(first, last - 1), max(first, last - 2)  # within Mistral's window
    out = []
    for layer, pos in ((L, last), (0, last), (0, earlier)):
        post, g = act_and_grad(model, batch, "logit_diff", f"blocks.{layer}.mlp.hook_post")
        out.append(Down(b, layer, "mlp_neuron", int((post * g)[b, pos].abs().argmax()), pos))
    for layer, pos, kind in ((L, last, "q"), (L, earlier, "k"), (L, before, "v"), (0, earlier, "q"),
                             (0, last, "v")):
        a, g = act_and_grad(model, batch, "logit_diff", f"blocks.{layer}.attn.hook_{kind}")
        out.append(Down(b, layer, "attn_head", int((a * g)[b, pos].sum(-1).abs().argmax()), pos, kind))
    return out


@pytest.mark.parametrize("side", ["right", "left"])
def test_node_edges_equal_brute_force(model64, side):
    model, batch, cache = traced(model64, side)
    downs = probes(model, batch, 0) + probes(model, batch, 1)  # a long and a short prompt
    results = node_edges(model, batch, "logit_diff", downs, cache=cache)
    for v, res in zip(downs, results):
        ref, r, bias, x_dot_r = node_edges_ref(model, batch, "logit_diff", v.node_type, v.layer,
                                               v.index, v.pos, v.batch_index, v.down_input)
        scale = r.abs().max()
        assert scale > 1e-6, v  # the target depends on v: the check below can fail
        assert torch.allclose(res.r, r, atol=1e-9 * scale, rtol=1e-7), v
        got = {}
        for p in res.parts:
            for val, i, q in zip(p.values.tolist(), p.index.tolist(), p.pos.tolist()):
                got[(p.node_type, p.layer, i, q)] = val
        assert set(got) == set(ref), (v, set(got) ^ set(ref))
        tol = 1e-9 * max(1.0, max(abs(x) for x in ref.values()))
        bad = {k: (got[k], ref[k]) for k in ref if abs(got[k] - ref[k]) > tol}
        assert not bad, (v, list(bad.items())[:3])
        if v.layer > 0:  # (in layer 0 only the embedding writes: r · x ≈ 0 under RMSNorm)
            assert max(abs(x) for x in ref.values()) > 1e-4, v
        # Completeness against the reference's own input: Σ_u edge(u -> v) + bias = r · x_v.
        assert abs(sum(ref.values()) + bias - x_dot_r) <= 1e-8 * max(1.0, abs(x_dot_r))
        assert float(res.bias) == pytest.approx(bias, abs=1e-9)
        assert float(res.r_dot_in) == pytest.approx(x_dot_r, abs=1e-9, rel=1e-7)
        assert float(res.total() + res.bias) == pytest.approx(x_dot_r, abs=1e-8, rel=1e-7)


def test_top_downstream_picks_largest_act_times_grad(model64):
    model, batch, cache = traced(model64)
    mask = batch.mask
    downs = top_downstream(model, batch, cache, 5)
    assert len(downs) == 15
    res = node_edges(model, batch, "logit_diff", downs, cache=cache)
    # act x grad of every candidate, by autograd: neurons, and q/k/v inputs summed over d_head
    cands = []
    for L in range(model.cfg.n_layers):
        a, g = act_and_grad(model, batch, "logit_diff", f"blocks.{L}.mlp.hook_post")
        cands.append((a * g))
        for kind in "qkv":
            a, g = act_and_grad(model, batch, "logit_diff", f"blocks.{L}.attn.hook_{kind}")
            cands.append((a * g).sum(-1))
    for b in range(3):
        atg = [abs(r.act_times_grad.item()) for r in res if r.down.batch_index == b]
        assert atg == sorted(atg, reverse=True)
        assert all(mask[b, r.down.pos] for r in res if r.down.batch_index == b)
        every = torch.cat([c[b][mask[b].bool()].abs().flatten() for c in cands])
        assert atg == pytest.approx(every.sort(descending=True).values[:5].tolist(), rel=1e-9)
