"""Node-level edges into one neuron and into one head's q, k and v, against brute force."""

from __future__ import annotations

import pytest
import torch

from actwh.compute.loading import load_model
from actwh.compute.node_edges import Down, node_edges, sites, top_downstream
from actwh.compute.targets import TARGETS, Batch

from conftest import PROMPTS, padded_batch


@pytest.fixture(scope="module")
def model64(family_dir):
    return load_model(family_dir[1], device="cpu", dtype=torch.float64)


def reference_r(model, batch, v: Down, g_fixed):
    """∂(act_v · g_fixed)/∂(v's private copy of the residual stream), by autograd."""
    cfg, blk = model.cfg, model.blocks[v.layer]
    copy, act = {}, {}

    def grab(t, name):
        copy["x"] = t.detach().clone().requires_grad_(True)

    if v.node_type == "mlp_neuron":
        src = "hook_resid_pre" if cfg.parallel else "hook_resid_mid"

        def swap(W, bvec):
            def hook(t, name):
                t = t.clone()
                t[..., v.index] = (blk.ln2(copy["x"]) @ W[:, v.index]) + bvec[v.index]
                return t
            return hook
        hooks = [(f"blocks.{v.layer}.{src}", grab),
                 (f"blocks.{v.layer}.mlp.hook_pre", swap(blk.mlp.W_in, blk.mlp.b_in)),
                 (f"blocks.{v.layer}.mlp.hook_post",
                  lambda t, n: act.__setitem__("a", t[v.batch_index, v.pos, v.index]))]
        if cfg.gated_mlp:
            hooks.append((f"blocks.{v.layer}.mlp.hook_pre_linear", swap(blk.mlp.W_up, blk.mlp.b_up)))
    else:
        W = {"q": blk.attn.W_Q, "k": blk.attn.W_K, "v": blk.attn.W_V}[v.down_input]
        bvec = {"q": blk.attn.b_Q, "k": blk.attn.b_K, "v": blk.attn.b_V}[v.down_input]

        def swap_head(t, name):
            t = t.clone()
            t[:, :, v.index] = blk.ln1(copy["x"]) @ W[v.index] + bvec[v.index]
            act["a"] = t[v.batch_index, v.pos, v.index]
            return t
        hooks = [(f"blocks.{v.layer}.hook_resid_pre", grab),
                 (f"blocks.{v.layer}.attn.hook_{v.down_input}", swap_head)]
    with torch.enable_grad(), model.hooks(fwd=hooks):
        model(batch.tokens, batch.mask)
        (g,) = torch.autograd.grad((act["a"] * g_fixed).sum(), [copy["x"]])
    return g


def traced(loaded):
    """The model, a padded batch, and one forward + backward cache of the node-edge sites."""
    model = loaded.model
    tokens, mask = padded_batch(loaded.tokenizer, PROMPTS)
    batch = Batch(tokens, mask, torch.tensor([5, 7, 9]), torch.tensor([6, 8, 10]))
    fwd, bwd = sites(model)
    cache = model.run_with_cache(tokens, fwd, attention_mask=mask, grad_names=bwd,
                                 backward_of=lambda l: TARGETS["logit_diff"].metric(l, batch).sum())
    return model, batch, cache


def test_node_edges_equal_brute_force_and_sum_exactly(model64):
    model, batch, cache = traced(model64)
    mask = batch.mask
    L = model.cfg.n_layers - 1
    downs = [Down(0, L, "mlp_neuron", 3, 9), Down(0, L, "attn_head", 1, 9, "q"),
             Down(0, L, "attn_head", 0, 4, "k"), Down(0, L, "attn_head", 0, 6, "v")]
    results = node_edges(model, batch, "logit_diff", downs, cache=cache)
    for v, res in zip(downs, results):
        if v.node_type == "mlp_neuron":
            g_fixed = cache.grads[f"blocks.{L}.mlp.hook_post"][0, v.pos, v.index]
        else:
            g_fixed = cache.grads[f"blocks.{L}.attn.hook_{v.down_input}"][0, v.pos, v.index]
        ref = reference_r(model, batch, v, g_fixed)
        assert torch.allclose(res.r, ref[0, v.pos], atol=1e-10), v
        others = ref.clone()
        others[0, v.pos] = 0
        assert others.abs().max() < 1e-12  # only v's position is read
        # Edges from explicit writes, computed independently of the module's vectorised form.
        w_embed = cache.acts["hook_embed"][0, v.pos] + (cache.acts["hook_pos_embed"][0, v.pos]
                                                        if "hook_pos_embed" in cache.acts else 0)
        assert torch.isclose(res.part("embed", -1).values[0], w_embed @ ref[0, v.pos])
        m = 0
        neuron = cache.acts[f"blocks.{m}.mlp.hook_post"][0, v.pos, 2] * model.blocks[m].mlp.W_out[2]
        assert torch.isclose(res.part("mlp_neuron", m).values[2], neuron @ ref[0, v.pos])
        h, k = 1, 2
        kv = h // (model.cfg.n_heads // model.cfg.n_kv_heads)
        write = cache.acts[f"blocks.{m}.attn.hook_pattern"][0, h, v.pos, k] * (
            cache.acts[f"blocks.{m}.attn.hook_v"][0, k, kv] @ model.blocks[m].attn.W_O[h])
        heads = res.part("attn_head", m)
        at_hk = (heads.index == h) & (heads.pos == k)
        assert torch.isclose(heads.values[at_hk][0], write @ ref[0, v.pos])
        # Σ_u edge(u -> v) + bias term = r · in_v, exactly.
        assert torch.isclose(res.total() + res.bias, res.r_dot_in, atol=1e-10)


def test_top_downstream_picks_largest_act_times_grad(model64):
    model, batch, cache = traced(model64)
    mask = batch.mask
    downs = top_downstream(model, batch, cache, 5)
    assert len(downs) == 15
    res = node_edges(model, batch, "logit_diff", downs, cache=cache)
    for b in range(3):
        atg = [abs(r.act_times_grad.item()) for r in res if r.down.batch_index == b]
        assert atg == sorted(atg, reverse=True)
        assert all(mask[b, r.down.pos] for r in res if r.down.batch_index == b)
        best = max(float((cache.acts[f"blocks.{L}.mlp.hook_post"][b] * cache.grads[f"blocks.{L}.mlp.hook_post"][b])
                         [mask[b].bool()].abs().max()) for L in range(model.cfg.n_layers))
        assert atg[0] >= best - 1e-12
