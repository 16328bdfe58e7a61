"""Node-level edges into chosen downstream nodes (Transformer Debugger's many-upstream-to-one).

For a downstream node v (an MLP neuron at a position, an attention head's q input at a query
position, k or v input at a key position, an autoencoder or transcoder latent, or the target),
r_v = ∂(act_v · stopgrad(grad_v))/∂in_v, the gradient with respect to v's own copy of what it
reads (the residual stream, or for an SAE on a component's output, that output). Each upstream
node u writes w_u into it; edge(u → v) = r_v · w_u, and Σ_u edge + r_v · (biases) = r_v · in_v,
exactly.

Which writers v sees follows the residual stream in order: the embedding, each layer's heads
(split by key token: pattern[q, k] · v_k W_O) and MLP neurons. A spliced autoencoder replaces
what it decomposes: one on a residual site replaces everything written before it by its latents
and error node; one on hook_attn_out replaces that layer's heads, one on hook_mlp_out or a
transcoder that layer's neurons. So latent → latent edges run across layers, heads feed latents,
and latents feed the target.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from actwh.compute.edges import norm_vjp
from actwh.compute.keep import KeepRule
from actwh.compute.model import HookedTransformer, expand_kv, post_norm_sites, write_gain
from actwh.compute.sae import at, spliced
from actwh.compute.targets import Batch, Target, get_target
from actwh.ontology import DOWN_INPUTS


@dataclass(frozen=True)
class Down:
    """A downstream node of one prompt."""

    batch_index: int
    layer: int  # n_layers for the target
    node_type: str  # "mlp_neuron", "attn_head", "sae_latent" or "logit"
    index: int  # neuron, head (key/value head for k and v under GQA), latent, target token
    pos: int  # the position whose residual stream v reads
    down_input: str | None = None  # q, k, v for heads


@dataclass
class Part:
    """Edges from one group of upstream nodes (one type, one layer)."""

    node_type: str
    layer: int
    values: torch.Tensor  # [n]
    index: torch.Tensor  # [n] upstream node index
    pos: torch.Tensor  # [n] upstream position


@dataclass
class NodeEdges:
    down: Down
    r: torch.Tensor  # [d_model] the gradient at v's copy of what it reads
    parts: list[Part]
    bias: torch.Tensor  # [] r · (output biases upstream of v)
    r_dot_in: torch.Tensor  # [] r · in_v (completeness)
    act_times_grad: torch.Tensor  # [] act_v · grad_v

    def part(self, node_type: str, layer: int) -> Part:
        return next(p for p in self.parts if p.node_type == node_type and p.layer == layer)

    def total(self) -> torch.Tensor:
        return sum((p.values.sum() for p in self.parts), self.bias.new_zeros(()))


@dataclass(frozen=True)
class Writer:
    kind: str  # embed | heads | neurons | sae
    layer: int


def stream(model: HookedTransformer) -> list[tuple[str, object]]:
    """The residual stream in order: ("point", hook site) and ("write", Writer) items."""
    items: list[tuple[str, object]] = [("write", Writer("embed", -1))]
    for L in range(model.cfg.n_layers):
        p, s = f"blocks.{L}.", at(model, L)
        items.append(("point", p + "hook_resid_pre"))
        items.append(("write", Writer("sae" if s and s.info.site == p + "hook_attn_out" else "heads", L)))
        items.append(("point", p + "hook_resid_mid"))
        mlp_sae = s is not None and (s.info.kind == "transcoder" or s.info.site == p + "hook_mlp_out")
        items.append(("write", Writer("sae" if mlp_sae else "neurons", L)))
        items.append(("point", p + "hook_resid_post"))
    return items


def reads(model: HookedTransformer, v: Down) -> tuple[list[Writer], str]:
    """The writers v's input is the sum of (plus their biases), and the site holding that input."""
    cfg, L = model.cfg, v.layer
    p = f"blocks.{L}."
    if v.node_type == "sae_latent":
        site = at(model, L).info.site
        if site.endswith("hook_attn_out"):
            return [Writer("heads", L)], site
        if site.endswith("hook_mlp_out"):
            return [Writer("neurons", L)], site
        if at(model, L).info.kind == "transcoder":
            point, inclusive = p + ("hook_resid_pre" if cfg.parallel else "hook_resid_mid"), True
        else:
            point, inclusive = site, False
    elif v.node_type == "attn_head":
        point, inclusive = p + "hook_resid_pre", True
    elif v.node_type == "mlp_neuron":
        point, inclusive = p + ("hook_resid_pre" if cfg.parallel else "hook_resid_mid"), True
    else:  # the target reads the final residual stream
        point, inclusive = f"blocks.{cfg.n_layers - 1}.hook_resid_post", True
    writers: list[Writer] = []
    for kind, x in stream(model):
        if kind == "point":
            if x == point and not inclusive:
                break
            hp = model.hook_points[x]
            if hp.sae is not None:
                writers = [Writer("sae", hp.sae.info.layer)]
            if x == point:
                break
        else:
            writers.append(x)
    resid = point if v.node_type != "sae_latent" or at(model, L).info.kind == "transcoder" else site
    return writers, resid


def sites(model: HookedTransformer) -> tuple[list[str], list[str]]:
    cfg = model.cfg
    last = f"blocks.{cfg.n_layers - 1}.hook_resid_post"
    fwd = ["hook_embed"] + (["hook_pos_embed"] if "hook_pos_embed" in model.hook_points else [])
    bwd = [last]
    for L in range(cfg.n_layers):
        p = f"blocks.{L}."
        fwd += [p + s for s in ("hook_resid_pre", "hook_resid_mid", "hook_attn_out", "hook_mlp_out",
                                "hook_resid_post", "ln1.hook_normalized", "ln1.hook_scale",
                                "ln2.hook_normalized", "ln2.hook_scale", "attn.hook_q",
                                "attn.hook_k", "attn.hook_v", "attn.hook_pattern", "mlp.hook_pre",
                                "mlp.hook_post")] + post_norm_sites(model, L)
        if cfg.gated_mlp:
            fwd.append(p + "mlp.hook_pre_linear")
        if cfg.n_experts:
            fwd.append(p + "mlp.hook_routing")
        bwd += [p + "attn.hook_q", p + "attn.hook_k", p + "attn.hook_v", p + "mlp.hook_post"]
    for sae in spliced(model):
        fwd += [sae.info.prefix + ".hook_latents", sae.info.prefix + ".hook_error"]
        bwd.append(sae.info.prefix + ".hook_latents")
    return fwd, bwd


def _act_grad(act_fn, x: torch.Tensor) -> torch.Tensor:
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(act_fn(x).sum(), [x])
    return g


def _through_ln(model, acts, norm: str, L: int, b: int, p: int, g_out: torch.Tensor) -> torch.Tensor:
    """Pull a gradient at a norm's output (w ⊙ normalized + b) back to the residual stream."""
    blk = model.blocks[L]
    ln = blk.ln1 if norm == "ln1" else blk.ln2
    pre = f"blocks.{L}.{norm}."
    n, s = acts[pre + "hook_normalized"][b:b + 1, p:p + 1], acts[pre + "hook_scale"][b:b + 1, p:p + 1]
    return norm_vjp(model, n, s, (g_out * ln.w)[None, None])[0, 0]


def gradient_at_input(model: HookedTransformer, acts, grads, v: Down) -> tuple[torch.Tensor, torch.Tensor]:
    """r_v [d_model] and act_v · grad_v for one downstream node."""
    b, L, p = v.batch_index, v.layer, v.pos
    pre = f"blocks.{L}."
    if v.node_type == "logit":
        last = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
        r = grads[last][b, p]
        return r, acts[last][b, p] @ r
    if v.node_type == "sae_latent":
        sae = at(model, L)
        latents = sae.info.prefix + ".hook_latents"
        act, g = acts[latents][b, p, v.index], grads[latents][b, p, v.index]
        # ReLU, JumpReLU and TopK (selection held) all have slope 1 where the latent is active.
        d = sae.W_enc[:, v.index] * g * (act != 0)
        if sae.info.kind == "transcoder":
            d = _through_ln(model, acts, "ln2", L, b, p, d)
        return d, act * g
    blk = model.blocks[L]
    if v.node_type == "mlp_neuron":
        mlp, n = blk.mlp, v.index
        gate = acts[pre + "mlp.hook_pre"][b, p, n]
        g_post = grads[pre + "mlp.hook_post"][b, p, n]
        slope = _act_grad(mlp.act, gate)
        if model.cfg.gated_mlp:
            up = acts[pre + "mlp.hook_pre_linear"][b, p, n]
            d_ln = slope * up * mlp.W_in[:, n] + mlp.act(gate) * mlp.W_up[:, n]
        else:
            d_ln = slope * mlp.W_in[:, n]
        if model.cfg.n_experts:  # post = route_e(x) · act(gate) · up: the router reads x too
            ln = blk.ln2
            x = ln.w * acts[pre + "ln2.hook_normalized"][b, p] + ln.b
            with torch.enable_grad():  # the top-k choice held, as any gradient holds it
                x = x.detach().requires_grad_(True)
                (d_route,) = torch.autograd.grad(mlp.route(x)[mlp.expert_of[n]], [x])
            weight = acts[pre + "mlp.hook_routing"][b, p, mlp.expert_of[n]]
            unrouted = mlp.act(gate) * (up if model.cfg.gated_mlp else 1)
            d_ln = weight * d_ln + unrouted * d_route
        r = _through_ln(model, acts, "ln2", L, b, p, g_post * d_ln)
        return r, acts[pre + "mlp.hook_post"][b, p, n] * g_post
    W = {"q": blk.attn.W_Q, "k": blk.attn.W_K, "v": blk.attn.W_V}[v.down_input][v.index]
    site = pre + f"attn.hook_{v.down_input}"
    g_site = grads[site][b, p, v.index]  # [d_head]
    r = _through_ln(model, acts, "ln1", L, b, p, W @ g_site)
    return r, (acts[site][b, p, v.index] * g_site).sum()


def _edges_from(model: HookedTransformer, acts, w: Writer, b: int, p: int, r: torch.Tensor):
    """Edges from one writer's nodes at position p (heads: from every key position) into r,
    and r · the writer's bias."""
    cfg = model.cfg
    dev = r.device
    at_p = lambda n: torch.full((n,), p, device=dev)  # noqa: E731
    if w.kind == "embed":
        e = acts["hook_embed"][b, p] + (acts["hook_pos_embed"][b, p] if "hook_pos_embed" in acts else 0)
        return [Part("embed", -1, (e @ r).reshape(1), torch.zeros(1, dtype=torch.long, device=dev),
                     at_p(1))], r.new_zeros(())
    if w.kind in ("neurons", "heads"):  # a post-norm's frozen gain at p scales what they write
        gain = write_gain(model, acts, w.layer, "mlp" if w.kind == "neurons" else "attn")
        r = r if gain is None else r * gain[b, p]
    if w.kind == "neurons":
        mlp = model.blocks[w.layer].mlp
        vals = acts[f"blocks.{w.layer}.mlp.hook_post"][b, p] * (mlp.W_out @ r)
        return [Part("mlp_neuron", w.layer, vals, torch.arange(cfg.d_neurons, device=dev),
                     at_p(cfg.d_neurons))], mlp.b_out @ r
    if w.kind == "heads":
        attn = model.blocks[w.layer].attn
        vals = expand_kv(acts[f"blocks.{w.layer}.attn.hook_v"][b], cfg.n_heads, dim=1)  # [pos, head, d_head]
        vo_r = torch.einsum("khe,hed,d->hk", vals, attn.W_O, r)  # [head, key]
        heads = acts[f"blocks.{w.layer}.attn.hook_pattern"][b, :, p, :] * vo_r
        n_pos = heads.shape[1]
        index = torch.arange(cfg.n_heads, device=dev).repeat_interleave(n_pos)
        return [Part("attn_head", w.layer, heads.reshape(-1), index,
                     torch.arange(n_pos, device=dev).repeat(cfg.n_heads))], attn.b_O @ r
    sae = at(model, w.layer)
    latents = acts[sae.info.prefix + ".hook_latents"][b, p]
    active = latents.nonzero().flatten()  # only active latents write anything
    vals = latents[active] * (sae.W_dec[active] @ r)
    error = acts[sae.info.prefix + ".hook_error"][b, p] @ r
    return [Part("sae_latent", w.layer, vals, active, at_p(len(active))),
            Part("sae_error", w.layer, error.reshape(1), torch.zeros(1, dtype=torch.long, device=dev),
                 at_p(1))], sae.b_dec @ r


def node_edges(model: HookedTransformer, batch: Batch, target: str | Target, downs: list[Down],
               cache=None) -> list[NodeEdges]:
    """Edges into each chosen downstream node, from one forward and one backward pass."""
    target = get_target(target) if isinstance(target, str) else target
    batch = batch.to(model.device)
    if cache is None:
        fwd, bwd = sites(model)
        cache = model.run_with_cache(batch.tokens, fwd, attention_mask=batch.mask,
                                     backward_of=lambda l: target.metric(l, batch).sum(),
                                     grad_names=bwd)
    acts, grads = cache.acts, cache.grads
    out = []
    plans: dict[tuple[str, int], tuple[list[Writer], str]] = {}  # what a node type in a layer reads
    with torch.no_grad():
        for v in downs:
            b, p = v.batch_index, v.pos
            r, atg = gradient_at_input(model, acts, grads, v)
            r = r.to(model.W_E.dtype)  # norm pull-backs run in float32 under bf16/fp16
            key = (v.node_type, v.layer)
            if key not in plans:
                plans[key] = reads(model, v)
            writers, resid = plans[key]
            parts, bias = [], r.new_zeros(())
            for w in writers:
                got, w_bias = _edges_from(model, acts, w, b, p, r)
                parts += got
                bias = bias + w_bias
            out.append(NodeEdges(v, r, parts, bias, acts[resid][b, p] @ r, atg))
    return out


def target_downs(model: HookedTransformer, batch: Batch, target: Target, logits) -> list[Down]:
    """The target node at each position its readout reads (index: the target token, -1 if none)."""
    r = target.readout(logits, batch)
    seen = sorted(set(zip(r.batch.tolist(), r.pos.tolist())))
    tid = batch.target_ids.tolist() if batch.target_ids is not None else None
    return [Down(b, model.cfg.n_layers, "logit", tid[b] if tid else -1, p) for b, p in seen]


def active_latents(model: HookedTransformer, batch: Batch, cache) -> list[Down]:
    """Every latent with a non-zero activation at a real position, for every spliced autoencoder."""
    real = batch.mask.bool().to(model.device)
    out = []
    for sae in spliced(model):
        latents = cache.acts[sae.info.prefix + ".hook_latents"]
        for b, p, j in ((latents != 0) & real[:, :, None]).nonzero().tolist():
            out.append(Down(b, sae.info.layer, "sae_latent", j, p))
    return out


def top_downstream(model: HookedTransformer, batch: Batch, cache, n: int) -> list[Down]:
    """The n nodes of each prompt with the largest |act × grad| among MLP neurons, head q/k/v
    inputs and autoencoder latents at each position (what `--edges-into top:N` traces into)."""
    cfg = model.cfg
    real = batch.mask.bool().to(model.device)
    groups = []  # (scores [batch, pos, width], make(b, p, i) -> Down)
    for L in range(cfg.n_layers):
        site = f"blocks.{L}.mlp.hook_post"
        groups.append((cache.acts[site] * cache.grads[site],
                       lambda b, p, i, L=L: Down(b, L, "mlp_neuron", i, p)))
        for kind in DOWN_INPUTS:
            site = f"blocks.{L}.attn.hook_{kind}"
            groups.append(((cache.acts[site] * cache.grads[site]).sum(-1),
                           lambda b, p, i, L=L, kind=kind: Down(b, L, "attn_head", i, p, kind)))
    for sae in spliced(model):
        site = sae.info.prefix + ".hook_latents"
        groups.append((cache.acts[site] * cache.grads[site],
                       lambda b, p, i, L=sae.info.layer: Down(b, L, "sae_latent", i, p)))
    flat = torch.cat([s.flatten(1) for s, _ in groups], 1)  # [batch, every node at every position]
    # nothing flows through a node with zero act × grad: only real, non-zero ones are candidates
    candidate = torch.cat([(real[:, :, None] & (s != 0)).flatten(1) for s, _ in groups], 1)
    keep = KeepRule("top-k", n).keep(flat, candidate)
    starts = torch.tensor([0] + [s[0].numel() for s, _ in groups]).cumsum(0).tolist()
    out = []
    for b in range(flat.shape[0]):
        kept = keep[b].nonzero().flatten()
        for idx in kept[flat[b, kept].abs().argsort(descending=True, stable=True)].tolist():
            g = next(j for j in range(len(groups)) if idx < starts[j + 1])
            width = groups[g][0].shape[-1]
            p, i = divmod(idx - starts[g], width)
            out.append(groups[g][1](b, p, i))
    return out


def kept_inputs(results: list[NodeEdges], rule: KeepRule, mask: torch.Tensor):
    """Per traced node, the entries of each of its parts that `rule` keeps (it applies per
    downstream node, so every traced node keeps its strongest inputs): a list of
    (NodeEdges, [(Part, kept indices into the part)]). Candidates: real upstream positions up
    to the node's own."""
    real = mask.bool().cpu()
    out = []
    for res in results:
        v = res.down
        if not res.parts:
            continue
        vals = torch.cat([p.values for p in res.parts]).cpu()
        pos = torch.cat([p.pos.cpu() for p in res.parts])
        keep = rule.keep(vals, real[v.batch_index][pos] & (pos <= v.pos))
        ends = torch.tensor([len(p.values) for p in res.parts]).cumsum(0).tolist()
        out.append((res, [(p, keep[e - len(p.values):e].nonzero().flatten())
                          for p, e in zip(res.parts, ends)]))
    return out
