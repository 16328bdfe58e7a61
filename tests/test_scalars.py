"""Derived scalars against identities, finite differences and `transformers` itself."""

from __future__ import annotations

import pytest
import torch

from actwh.compute.loading import load_model
from actwh.compute.scalars import SCALARS, Plan, compute_scalars
from actwh.compute.targets import TARGETS, Batch
from actwh.errors import UnknownName

from conftest import PROMPTS, direct_effect_sites, gain_sites, padded_batch, post_gain, softcap_t


@pytest.fixture(scope="module")
def model64(family_dir):
    """The tiny model in float64, so finite differences are not drowned by rounding."""
    return load_model(family_dir[1], device="cpu", dtype=torch.float64)


def make_batch(loaded, side="right", texts=PROMPTS):
    tokens, mask = padded_batch(loaded.tokenizer, texts, side)
    n = len(texts)
    return Batch(tokens, mask, target_ids=torch.tensor([5, 7, 9][:n]),
                 distractor_ids=torch.tensor([6, 8, 10][:n]))


def component_sum(model, cache_acts):
    """embed (+ pos) + every head's result + attention biases + every MLP's output (heads and
    biases through a post-norm's frozen gain)."""
    cfg = model.cfg
    total = cache_acts["hook_embed"] + cache_acts.get("hook_pos_embed", 0)
    for L, block in enumerate(model.blocks):
        z = cache_acts[f"blocks.{L}.attn.hook_z"]
        gain = post_gain(model, cache_acts, L, "ln1_post")
        for h in range(cfg.n_heads):
            total = total + gain * (z[:, :, h] @ block.attn.W_O[h])
        total = total + gain * block.attn.b_O
        total = total + cache_acts[f"blocks.{L}.hook_mlp_out"]
    return total


def test_decomposition_sums_to_final_residual(tiny_model):
    model = tiny_model.model
    b = make_batch(tiny_model)
    names = [n for n in model.hook_points if n.endswith(("hook_embed", "hook_pos_embed", "hook_z",
                                                          "hook_mlp_out", "_post.hook_scale"))]
    final = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    cache = model.run_with_cache(b.tokens, names + [final], attention_mask=b.mask)
    diff = component_sum(model, cache.acts) - cache.acts[final]
    assert diff[b.mask.bool()].abs().max() <= 1e-4


@pytest.mark.parametrize("target", ["logit", "logit_diff", "logprob", "loss"])
def test_direct_effects_sum_to_metric(model64, target):
    model = model64.model
    b = make_batch(model64)
    res = compute_scalars(model, b, target, ["embed_direct_effect", "attn_direct_effect",
                                             "mlp_direct_effect", "mlp_layer_direct_effect"])
    total = (res.token["embed_direct_effect"].sum((1, 2, 3)) + res.token["attn_direct_effect"].sum((1, 2, 3))
             + res.token["mlp_direct_effect"].sum((1, 2, 3)))
    # Bias terms: attention and MLP output biases along g, the final norm's bias and the
    # unembedding bias along the readout, and the readout's constant (frozen normaliser).
    from actwh.compute.scalars import Ctx

    # With a final-logit soft-cap, logit = t · z with t = cap·tanh(z/cap)/z frozen per entry.
    cache = model.run_with_cache(b.tokens, direct_effect_sites(model), attention_mask=b.mask)
    ctx = Ctx(model, b, TARGETS[target], cache)
    g = ctx.g_final() * b.mask[..., None]
    for L, block in enumerate(model.blocks):
        g_attn = g * post_gain(model, cache.acts, L, "ln1_post")
        g_mlp = g * post_gain(model, cache.acts, L, "ln2_post")
        total = total + (g_attn @ block.attn.b_O).sum(-1) + (g_mlp @ block.mlp.b_out).sum(-1)
    r = TARGETS[target].readout(cache.logits, b)
    t = softcap_t(model, cache.acts, r)
    if model.cfg.final_softcap:
        assert (t - 1).abs().max() > 0.01  # the cap bends these logits
    per_entry = r.weight * t * (model.ln_final.b @ model.W_U + model.b_U)[r.vocab]
    total = total.index_add(0, r.batch, per_entry) + r.constant
    assert (total - res.metric).abs().max() <= 1e-3
    # The layer-level MLP direct effect is its neurons' plus its output bias.
    bias = torch.stack([(g * post_gain(model, cache.acts, L, "ln2_post")) @ blk.mlp.b_out
                        for L, blk in enumerate(model.blocks)], dim=2)
    layer = res.token["mlp_direct_effect"].sum(-1) + bias
    assert torch.allclose(res.token["mlp_layer_direct_effect"][..., 0], layer, atol=1e-8)


def finite_difference(model, b, target, site, index, eps=1e-4, frozen=()):
    """(metric(1+eps) - metric(1-eps)) / 2eps for scaling one entry of `site`'s tensor, with the
    sites in `frozen` held at their clean values."""
    held = model.run_with_cache(b.tokens, list(frozen), attention_mask=b.mask).acts

    def run(scale):
        def hook(t, name):
            t = t.clone()
            t[index] = t[index] * scale
            return t
        hooks = [(site, hook)] + [(n, lambda t, n: held[n]) for n in frozen]
        with torch.no_grad(), model.hooks(fwd=hooks):
            return TARGETS[target].metric(model(b.tokens, b.mask), b)
    return (run(1 + eps) - run(1 - eps)) / (2 * eps)


@pytest.mark.parametrize("target", ["logit_diff", "loss"])
def test_act_times_grad_matches_finite_difference(model64, target):
    model = model64.model
    b = make_batch(model64)
    res = compute_scalars(model, b, target, ["mlp_act_times_grad", "attn_act_times_grad",
                                             "attn_head_act_times_grad", "mlp_layer_act_times_grad",
                                             "token_attribution"])
    p, L = 3, model.cfg.n_layers - 1

    def check(value, fd):
        assert abs(value - fd) <= max(1e-5, 0.01 * abs(fd)), (value, fd)

    neuron = int(res.token["mlp_act_times_grad"][0, p, 0].abs().argmax())
    fd = finite_difference(model, b, target, "blocks.0.mlp.hook_post", (0, p, neuron))[0]
    check(float(res.token["mlp_act_times_grad"][0, p, 0, neuron]), float(fd))
    head = int(res.token["attn_head_act_times_grad"][0, p, L].abs().argmax())
    # A head node's write passes a post-norm with its scale frozen (the component-graph node).
    frozen = [s for s in gain_sites(model, L) if "ln1_post" in s]
    fd = finite_difference(model, b, target, f"blocks.{L}.attn.hook_z", (0, p, head), frozen=frozen)[0]
    check(float(res.token["attn_head_act_times_grad"][0, p, L, head]), float(fd))
    # Scaling one query's whole pattern row: derivative = Σ_k p_k ∂m/∂p_k, the token form.
    fd = finite_difference(model, b, target, f"blocks.{L}.attn.hook_pattern", (0, head, p))[0]
    check(float(res.token["attn_act_times_grad"][0, p, L, head]), float(fd))
    fd = finite_difference(model, b, target, "blocks.0.hook_mlp_out", (0, p))[0]
    check(float(res.token["mlp_layer_act_times_grad"][0, p, 0, 0]), float(fd))
    fd = finite_difference(model, b, target, "hook_embed", (0, p))[0]
    if "hook_pos_embed" in model.hook_points:  # the embed node is token + position
        def both(scale):
            hook = lambda t, n: torch.cat([t[:, :p], t[:, p:p + 1] * scale, t[:, p + 1:]], 1)  # noqa
            with torch.no_grad(), model.hooks(fwd=[("hook_embed", hook), ("hook_pos_embed", hook)]):
                return TARGETS[target].metric(model(b.tokens, b.mask), b)[0]
        fd = (both(1 + 1e-4) - both(1 - 1e-4)) / 2e-4
    check(float(res.token["token_attribution"][0, p, 0, 0]), float(fd))


def test_attn_pattern_equals_transformers(tiny_model, hf_model):
    b = make_batch(tiny_model)
    res = compute_scalars(tiny_model.model, b, "logit", ["attn_pattern"])
    with torch.no_grad():
        out = hf_model(input_ids=b.tokens, attention_mask=b.mask, output_attentions=True)
    real = b.mask.bool()
    keep = real[:, None, :, None] & real[:, None, None, :]
    for L, theirs in enumerate(out.attentions):
        ours = res.pair["attn_pattern"][:, L]
        assert (ours - theirs).abs()[keep.expand_as(ours)].max() <= 1e-5


def test_token_forms_equal_independent_head_quantities(model64):
    model = model64.model
    b = make_batch(model64)
    res = compute_scalars(model, b, "logit_diff", ["attn_direct_effect", "attn_write_norm",
                                                   "attn_act_times_grad"])
    from actwh.compute.scalars import Ctx

    names = [f"blocks.{L}.attn.{s}" for L in range(model.cfg.n_layers)
             for s in ("hook_z", "hook_pattern", "hook_v")] + ["ln_final.hook_scale"]
    names += [s for L in range(model.cfg.n_layers) for s in gain_sites(model, L)]
    names += ["hook_logits_raw"] if model.cfg.final_softcap else []
    cache = model.run_with_cache(b.tokens, names, attention_mask=b.mask)
    g = Ctx(model, b, TARGETS["logit_diff"], cache).g_final()
    for L, block in enumerate(model.blocks):
        result = torch.einsum("bphe,hed->bphd", cache.acts[f"blocks.{L}.attn.hook_z"], block.attn.W_O)
        result = result * post_gain(model, cache.acts, L, "ln1_post")[:, :, None, :] \
            if model.cfg.post_norm else result
        de = (result * g[:, :, None, :]).sum(-1)
        assert torch.allclose(res.token["attn_direct_effect"][:, :, L], de, atol=1e-9)
        for name in ("attn_direct_effect", "attn_write_norm", "attn_act_times_grad"):
            summed = res.pair[name][:, L].sum(-1).permute(0, 2, 1)
            assert torch.allclose(res.token[name][:, :, L], summed, atol=1e-9)
    # write norm: |p| * ||v W_O|| equals the norm of the explicit per-key write vector
    L, h, q, k = 0, 1, 4, 2
    v = cache.acts[f"blocks.{L}.attn.hook_v"][0, k, h // (model.cfg.n_heads // model.cfg.n_kv_heads)]
    write = cache.acts[f"blocks.{L}.attn.hook_pattern"][0, h, q, k] * (v @ model.blocks[L].attn.W_O[h])
    if model.cfg.post_norm:
        write = write * post_gain(model, cache.acts, L, "ln1_post")[0, q]
    assert torch.isclose(res.pair["attn_write_norm"][0, L, h, q, k], write.norm())


def test_padded_batch_equals_prompts_one_at_a_time(tiny_model, hf_model):
    """Left padding changes nothing; each prompt alone is anchored to `transformers`' logits."""
    model = tiny_model.model
    names = list(SCALARS)
    batch = make_batch(tiny_model, "left")
    res = compute_scalars(model, batch, "logit_diff", names)
    n = batch.tokens.shape[1]
    for i, text in enumerate(PROMPTS):
        one = make_batch(tiny_model, texts=[text])
        one = Batch(one.tokens, one.mask, batch.target_ids[i:i + 1], batch.distractor_ids[i:i + 1])
        single = compute_scalars(model, one, "logit_diff", names)
        m = one.tokens.shape[1]
        for name, t in single.token.items():
            assert torch.allclose(res.token[name][i, n - m:], t[0], atol=1e-4), name
        for name, t in single.pair.items():
            assert torch.allclose(res.pair[name][i, :, :, n - m:, n - m:], t[0], atol=1e-4), name
        assert torch.isclose(res.metric[i], single.metric[0], atol=1e-4)
        with torch.no_grad():
            logits = hf_model(input_ids=one.tokens).logits[0, -1]
        want = logits[batch.target_ids[i]] - logits[batch.distractor_ids[i]]
        assert float(single.metric[0]) == pytest.approx(float(want), abs=1e-4)
        pattern = hf_model(input_ids=one.tokens, output_attentions=True).attentions
        for L, theirs in enumerate(pattern):
            assert torch.allclose(single.pair["attn_pattern"][0, L], theirs[0].detach(), atol=1e-5)


def test_unknown_names_list_the_valid_ones(tiny_model):
    b = make_batch(tiny_model)
    with pytest.raises(UnknownName) as err:
        compute_scalars(tiny_model.model, b, "logit", ["mlp_post_act", "mlp_psot_act"])
    assert "mlp_psot_act" in str(err.value) and "mlp_post_act" in str(err.value)
    with pytest.raises(UnknownName) as err:
        compute_scalars(tiny_model.model, b, "logits", ["mlp_post_act"])
    assert all(t in str(err.value) for t in TARGETS)


def test_plan_for_one_mlp_scalar_caches_only_its_site(tiny_model):
    model = tiny_model.model
    plan = Plan.make(model, ["mlp_post_act"])
    assert plan.fwd == {f"blocks.{L}.mlp.hook_post" for L in range(model.cfg.n_layers)}
    assert not plan.bwd and not plan.final_grad
    plan = Plan.make(model, ["mlp_act_times_grad"])
    assert not any("pattern" in s for s in plan.fwd | plan.bwd)


def test_every_scalar_is_fully_declared():
    from actwh.compute.scalars import NODE_TYPES, RANKING

    for s in SCALARS.values():
        assert s.description and s.kind in ("token", "pair") and s.node_type in NODE_TYPES
        assert s.needs
    assert all(r in SCALARS and SCALARS[r].node_type == t for t, r in RANKING.items())


def test_write_norms_equal_the_norm_of_each_write_vector(model64):
    """mlp_write_norm = ||act · W_out[n]||, the norm of the explicit write vector; the fixture
    has negative activations, so a dropped abs() shows."""
    model = model64.model
    b = make_batch(model64, "left")
    res = compute_scalars(model, b, "logit_diff", ["mlp_write_norm"])
    names = [f"blocks.{L}.mlp.hook_post" for L in range(model.cfg.n_layers)]
    gains = [s for L in range(model.cfg.n_layers) for s in gain_sites(model, L)]
    cache = model.run_with_cache(b.tokens, names + gains, attention_mask=b.mask)
    for L, name in enumerate(names):
        post = cache.acts[name]  # [b, p, n]
        assert (post < -1e-3).any()  # the check below can fail
        write = post[..., None] * model.blocks[L].mlp.W_out  # [b, p, n, d]
        if model.cfg.post_norm:  # through the post-norm, its scale frozen, at each position
            write = write * post_gain(model, cache.acts, L, "ln2_post")[:, :, None, :]
        assert torch.allclose(res.token["mlp_write_norm"][:, :, L], write.norm(dim=-1), atol=1e-10)


def test_experts_are_nodes_that_sum_to_the_mlp_and_match_transformers_router(model64, family_dir):
    """Mixture of experts: each expert's write (its neurons' routed, weighted writes, expert e =
    neurons e·d_mlp … (e+1)·d_mlp − 1, a shared expert last) sums to the MLP output; the expert
    scalars against the layer's, a finite difference and transformers' own router logits."""
    import transformers as T

    from reference import expert_slices

    model = model64.model
    cfg = model.cfg
    b = make_batch(model64, "left")
    if not cfg.n_experts:  # dense MLPs: expert scalars have no values, as SAE scalars without one
        res = compute_scalars(model, b, "logit_diff", ["router_prob", "mlp_post_act"])
        assert "router_prob" not in res.token and "mlp_post_act" in res.token
        return
    names = ["expert_act_times_grad", "expert_direct_effect", "router_prob",
             "mlp_layer_act_times_grad", "mlp_layer_direct_effect"]
    res = compute_scalars(model, b, "logit_diff", names)
    real = b.mask.bool()
    sites = [f"blocks.{L}.{s}" for L in range(cfg.n_layers) for s in ("mlp.hook_post", "hook_mlp_out")]
    cache = model.run_with_cache(b.tokens, sites, attention_mask=b.mask)
    for L in range(cfg.n_layers):
        post, W_out = cache.acts[f"blocks.{L}.mlp.hook_post"], model.blocks[L].mlp.W_out
        writes = [post[..., lo:hi] @ W_out[lo:hi] for lo, hi in expert_slices(cfg)]
        assert len(writes) == res.token["router_prob"].shape[-1]
        assert (sum(writes) - cache.acts[f"blocks.{L}.hook_mlp_out"])[real].abs().max() <= 1e-10
        routed = torch.stack([(w != 0).any(-1) for w in writes], -1)[real]  # [tokens, experts]
        assert (routed[:, :cfg.n_experts].sum(-1) == cfg.top_k).all()  # top-k experts write
        for name, layer in (("expert_act_times_grad", "mlp_layer_act_times_grad"),
                            ("expert_direct_effect", "mlp_layer_direct_effect")):
            assert torch.allclose(res.token[name][:, :, L].sum(-1), res.token[layer][:, :, L, 0], atol=1e-10)
    # act × grad of one expert vs scaling its write (all its neurons) by 1 ± eps
    p, L = int(b.mask[0].nonzero()[-1]), 0
    e = int(res.token["expert_act_times_grad"][0, p, L].abs().argmax())
    lo, hi = expert_slices(cfg)[e]
    fd = finite_difference(model, b, "logit_diff", f"blocks.{L}.mlp.hook_post", (0, p, slice(lo, hi)))[0]
    value = float(res.token["expert_act_times_grad"][0, p, L, e])
    assert value != 0 and abs(value - float(fd)) <= max(1e-6, 0.01 * abs(float(fd)))
    # router probabilities against transformers' router logits, on one unpadded prompt
    hf = T.AutoModelForCausalLM.from_pretrained(family_dir[1], dtype=torch.float32).eval()
    one = make_batch(model64, texts=PROMPTS[:1])
    with torch.no_grad():
        out = hf(input_ids=one.tokens, output_router_logits=True)
    mine = compute_scalars(model, one, "logit", ["router_prob"]).token["router_prob"][0]
    for L, logits in enumerate(out.router_logits):
        want = logits.double().softmax(-1)  # [pos, experts]
        assert torch.allclose(mine[:, L, :cfg.n_experts], want, atol=1e-5)
