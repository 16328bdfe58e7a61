"""Brute-force references, written independently of actwh's compute code.

Everything here is plain autograd through the hooked model's own modules (or `transformers`
itself) and explicit per-node write vectors, so the tests can compare actwh's vectorised
edges, scalars and stored rows against values that no actwh formula produced. Positions are
those of the batch given; pass one unpadded prompt to get positions counted from its first token.
"""

from __future__ import annotations

import torch

from actwh.compute.targets import TARGETS, Batch


def metric_fn(target: str, batch: Batch):
    return lambda logits: TARGETS[target].metric(logits, batch).sum()


def act_and_grad(model, batch: Batch, target: str, site: str):
    """A hook site's activation and ∂metric/∂activation, by autograd on a leaf swapped in there."""
    got = {}

    def swap(t, name):
        got["x"] = t.detach().clone().requires_grad_(True)
        return got["x"]

    with torch.enable_grad(), model.hooks(fwd=[(site, swap)]):
        logits = model(batch.tokens, batch.mask)
        (g,) = torch.autograd.grad(metric_fn(target, batch)(logits), [got["x"]], allow_unused=True)
    x = got["x"].detach()
    return x, torch.zeros_like(x) if g is None else g


def acts(model, batch: Batch, names) -> dict[str, torch.Tensor]:
    got = {}
    with torch.no_grad(), model.hooks(fwd=[(n, lambda t, n: got.__setitem__(n, t)) for n in names]):
        model(batch.tokens, batch.mask)
    return got


def reads_from(model, node_type: str, layer: int) -> str:
    """The residual-stream site a downstream node reads (DESIGN: sequential MLPs read resid_mid)."""
    cfg = model.cfg
    if node_type == "logit":
        return f"blocks.{cfg.n_layers - 1}.hook_resid_post"
    if node_type == "mlp_neuron" and not cfg.parallel:
        return f"blocks.{layer}.hook_resid_mid"
    return f"blocks.{layer}.hook_resid_pre"


def node_r(model, batch: Batch, target: str, node_type: str, layer: int, index: int, pos: int,
           b: int = 0, down_input: str | None = None):
    """r = ∂(act_v · stopgrad(∂metric/∂act_v))/∂x_v at v's own copy x_v of what it reads, by
    autograd through the block's norm and weights on that one position; and act_v · grad_v."""
    x_site = reads_from(model, node_type, layer)
    if node_type == "logit":
        x, g = act_and_grad(model, batch, target, x_site)
        return g[b, pos], x[b, pos] @ g[b, pos]
    x = acts(model, batch, [x_site])[x_site][b, pos].detach().clone().requires_grad_(True)
    blk = model.blocks[layer]
    with torch.enable_grad():
        if node_type == "mlp_neuron":
            post, g_post = act_and_grad(model, batch, target, f"blocks.{layer}.mlp.hook_post")
            h = blk.ln2(x)
            a = blk.mlp.act(h @ blk.mlp.W_in[:, index] + blk.mlp.b_in[index])
            if model.cfg.gated_mlp:
                a = a * (h @ blk.mlp.W_up[:, index] + blk.mlp.b_up[index])
            if model.cfg.n_experts:  # routed: × the weight of the neuron's expert
                e = next(i for i, (lo, hi) in enumerate(expert_slices(model.cfg)) if lo <= index < hi)
                a = a * routing(blk.mlp, model.cfg, h)[e]
            g = g_post[b, pos, index]
            atg = post[b, pos, index] * g
        else:
            W = {"q": blk.attn.W_Q, "k": blk.attn.W_K, "v": blk.attn.W_V}[down_input]
            bias = {"q": blk.attn.b_Q, "k": blk.attn.b_K, "v": blk.attn.b_V}[down_input]
            site, g_site = act_and_grad(model, batch, target, f"blocks.{layer}.attn.hook_{down_input}")
            a = blk.ln1(x) @ W[index] + bias[index]  # the input before rotary, as hook_q/k/v
            g = g_site[b, pos, index]
            atg = (site[b, pos, index] * g).sum()
        (r,) = torch.autograd.grad((a * g).sum(), [x])
    return r, atg


def _gain(model, a, L, norm):
    """A post-norm (ln1_post / ln2_post) with its scale frozen is the diagonal map w · scale, so a
    write through it is that gain times the raw write; 1 without post norms."""
    ln = getattr(model.blocks[L], norm, None)
    return 1.0 if ln is None else a[f"blocks.{L}.{norm}.hook_scale"] * ln.w


def _gain_sites(model):
    return [n for n in model.hook_points if n.endswith(("ln1_post.hook_scale", "ln2_post.hook_scale"))]


def writes(model, batch: Batch, node_type: str, layer: int, pos: int, b: int = 0):
    """Every upstream node's write into what v reads at `pos`: {(type, layer, index, pos): vector},
    and the sum of the output biases written there. Heads are split by key position; under
    post-norms every write passes the post-norm's frozen gain at `pos`."""
    cfg = model.cfg
    names = ["hook_embed"] + (["hook_pos_embed"] if "hook_pos_embed" in model.hook_points else [])
    for L in range(cfg.n_layers):
        names += [f"blocks.{L}.attn.hook_pattern", f"blocks.{L}.attn.hook_v", f"blocks.{L}.mlp.hook_post"]
    a = acts(model, batch, names + _gain_sites(model))
    gain_at = lambda L, norm: 1.0 if not cfg.post_norm else _gain(model, a, L, norm)[b, pos]  # noqa: E731
    out = {("embed", -1, 0, pos): a["hook_embed"][b, pos] + (a["hook_pos_embed"][b, pos]
                                                           if "hook_pos_embed" in a else 0)}
    bias = torch.zeros_like(out[("embed", -1, 0, pos)])
    if node_type == "logit":
        heads_upto, neurons_upto = cfg.n_layers, cfg.n_layers
    elif node_type == "mlp_neuron":
        heads_upto, neurons_upto = (layer if cfg.parallel else layer + 1), layer
    else:
        heads_upto, neurons_upto = layer, layer
    group = cfg.n_heads // cfg.n_kv_heads
    for L in range(cfg.n_layers):
        blk = model.blocks[L]
        if L < heads_upto:
            pattern, v = a[f"blocks.{L}.attn.hook_pattern"][b], a[f"blocks.{L}.attn.hook_v"][b]
            for h in range(cfg.n_heads):
                for k in range(pattern.shape[-1]):
                    out[("attn_head", L, h, k)] = pattern[h, pos, k] * (v[k, h // group] @ blk.attn.W_O[h]) \
                        * gain_at(L, "ln1_post")
            bias = bias + blk.attn.b_O * gain_at(L, "ln1_post")
        if L < neurons_upto:
            post = a[f"blocks.{L}.mlp.hook_post"][b, pos]
            for n in range(post.shape[-1]):  # d_mlp, or every expert's neurons
                out[("mlp_neuron", L, n, pos)] = post[n] * blk.mlp.W_out[n] * gain_at(L, "ln2_post")
            bias = bias + blk.mlp.b_out * gain_at(L, "ln2_post")
    return out, bias


def node_edges_ref(model, batch: Batch, target: str, node_type: str, layer: int, index: int,
                   pos: int, b: int = 0, down_input: str | None = None):
    """Brute-force edges into one downstream node: ({upstream key: value}, r, bias term, r · x_v)."""
    r, _ = node_r(model, batch, target, node_type, layer, index, pos, b, down_input)
    w, bias = writes(model, batch, node_type, layer, pos, b)
    x_site = reads_from(model, node_type, layer)
    x = acts(model, batch, [x_site])[x_site][b, pos]
    return {k: float(vec @ r) for k, vec in w.items()}, r, float(bias @ r), float(x @ r)


# --- component graph ------------------------------------------------------------------------

def expert_slices(cfg):
    """Neuron ranges of each expert: expert e's neurons are e·d_mlp … (e+1)·d_mlp − 1, the shared
    expert (last) after all routed ones."""
    out = [(e * cfg.d_mlp, (e + 1) * cfg.d_mlp) for e in range(cfg.n_experts)]
    if cfg.d_shared:
        out.append((cfg.n_experts * cfg.d_mlp, cfg.n_experts * cfg.d_mlp + cfg.d_shared))
    return out


def routing(mlp, cfg, x):
    """transformers' routing by hand: float softmax over router logits, top-k (renormalised when
    the config says so), zeros elsewhere; the shared expert's sigmoid gate appended."""
    probs = torch.softmax((x @ mlp.W_router).double(), -1)
    top, idx = torch.topk(probs, cfg.top_k, dim=-1)
    if cfg.norm_topk_prob:
        top = top / top.sum(-1, keepdim=True)
    w = torch.zeros_like(probs).scatter(-1, idx, top).to(x.dtype)
    if cfg.d_shared:
        w = torch.cat([w, torch.sigmoid(x @ mlp.W_shared_gate)], -1)
    return w


def normalized(norm, x):
    """A pre-norm's normalized value of x, by its formula (OLMo 2's identity norms pass x)."""
    if norm.kind == "none":
        return x
    if not norm.rms:
        x = x - x.mean(-1, keepdim=True)
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps)


def component_outputs(model, batch: Batch, extra_hooks=()):
    """Upstream writes of the component graph: embed (+pos), z_h W_O_h per head (through a
    post-norm's frozen gain), MLP outputs."""
    names = ["hook_embed"] + (["hook_pos_embed"] if "hook_pos_embed" in model.hook_points else [])
    names += [f"blocks.{L}.{s}" for L in range(model.cfg.n_layers) for s in ("attn.hook_z", "hook_mlp_out")]
    names += _gain_sites(model)
    names += [f"blocks.{L}.mlp.hook_post" for L in range(model.cfg.n_layers)]
    a = model.run_with_cache(batch.tokens, names, attention_mask=batch.mask, fwd_hooks=extra_hooks).acts
    outs = [a["hook_embed"] + a.get("hook_pos_embed", 0)]
    for L, blk in enumerate(model.blocks):
        gain = _gain(model, a, L, "ln1_post")
        for h in range(model.cfg.n_heads):
            outs.append(gain * (a[f"blocks.{L}.attn.hook_z"][:, :, h] @ blk.attn.W_O[h]))
        if model.cfg.n_experts:  # each expert: its own neurons' (routed, weighted) writes
            post = a[f"blocks.{L}.mlp.hook_post"]
            for lo, hi in expert_slices(model.cfg):
                outs.append(_gain(model, a, L, "ln2_post") * (post[..., lo:hi] @ blk.mlp.W_out[lo:hi]))
        else:
            outs.append(a[f"blocks.{L}.hook_mlp_out"])
    return outs


def component_grad(model, batch: Batch, target: str, node_type: str, layer: int, index: int,
                   down_input: str | None = None, extra_hooks=()):
    """∂metric/∂in_v where only v reads a private copy of the residual stream, and that copy
    (the input x_v). [b, p, d] each."""
    cfg = model.cfg
    copy = {}

    def grab(t, name):
        copy["x"] = t.detach().clone().requires_grad_(True)

    hooks = list(extra_hooks)
    if node_type == "attn_head":
        blk = model.blocks[layer]
        W = {"q": blk.attn.W_Q, "k": blk.attn.W_K, "v": blk.attn.W_V}[down_input]
        bias = {"q": blk.attn.b_Q, "k": blk.attn.b_K, "v": blk.attn.b_V}[down_input]

        def swap(t, name):
            t = t.clone()
            t[:, :, index] = blk.ln1(copy["x"]) @ W[index] + bias[index]
            return t
        hooks += [(f"blocks.{layer}.hook_resid_pre", grab),
                  (f"blocks.{layer}.attn.hook_{down_input}", swap)]
    elif node_type == "mlp":  # the MLP (router and experts included) reads the copy
        blk = model.blocks[layer]
        src = "hook_resid_pre" if cfg.parallel else "hook_resid_mid"
        hooks += [(f"blocks.{layer}.{src}", grab),
                  (f"blocks.{layer}.ln2.hook_normalized", lambda t, n: normalized(blk.ln2, copy["x"]))]
    else:
        def keep(t, name):
            copy["x"] = t
        hooks.append((f"blocks.{cfg.n_layers - 1}.hook_resid_post", keep))
    with torch.enable_grad(), model.hooks(fwd=hooks):
        logits = model(batch.tokens, batch.mask)
        (g,) = torch.autograd.grad(metric_fn(target, batch)(logits), [copy["x"]])
    return g * batch.mask[..., None], copy["x"].detach()


def hf_logits(hf_model, ids: list[int]) -> torch.Tensor:
    """`transformers`' own logits for one unpadded prompt. [pos, vocab]"""
    with torch.no_grad():
        return hf_model(input_ids=torch.tensor([ids])).logits[0].double()


def hf_metric_and_loss(hf_model, ids, target_id, distractor_id, position=None):
    """logit_diff at `position` (default: the last token) and the mean next-token loss."""
    logits = hf_logits(hf_model, ids)
    p = len(ids) - 1 if position is None else position
    diff = float(logits[p, target_id] - logits[p, distractor_id])
    nll = -logits[:-1].log_softmax(-1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    return diff, float(nll.mean())
