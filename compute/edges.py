"""Edge attribution over the component graph (EAP, Syed et al. 2023; EAP-IG, Hanna et al. 2024).

Upstream nodes: `embed` (token + position embedding), every `attn_head`, every `mlp` layer (in a
mixture of experts, every `mlp_expert` instead: its routed, weighted output, the shared expert
last; they sum to the layer's output exactly; the layer stays one downstream node, whose input
feeds the router and every expert).
Downstream nodes: every attention head through its q, k or v input, every `mlp`, and the target
(`logit`). score(u → v, pos) = out_u[pos] · ∂metric/∂in_v[pos], where in_v is v's own copy of the
residual stream, taken before v's norm, with the gradient flowing through the norm's scale.

All edges come from one forward and one backward pass (per integration step): the backward
pass gives ∂metric/∂q, k, v of every head and ∂metric/∂(normalized MLP input); pulling those
back through W_Q/W_K/W_V and through each position's norm Jacobian (closed form) gives the
gradient at each downstream node's private copy of the residual stream, exactly as if every
node had its own copy. Conventions follow the public EAP-IG code: the attention output bias
belongs to no head (a bias term), an MLP's output includes its bias, value biases stay inside
each head. With grouped-query attention, k and v inputs are per key/value head. Under post-norms
(Gemma 2/3, OLMo 2) a head's write is z_h W_O_h through the post-norm's frozen gain
(model.write_gain), the MLP's is hook_mlp_out (after its post-norm), and an attention bias term is
its gained bias, per position: the writes still sum to the residual stream exactly, and downstream
gradients (pre-norms pulled back in closed form; OLMo 2's are identities) are unchanged.

Spliced autoencoders leave this graph as it is (the splice is exact, so every write and every
gradient is the model's own); latents enter edges at node level (node_edges.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from actwh.compute.keep import KeepRule
from actwh.compute.model import HookedTransformer, post_norm_sites, write_gain
from actwh.compute.targets import Batch, Target, get_target
from actwh.errors import ActwhError


@dataclass(frozen=True)
class Node:
    layer: int  # -1 for embed, n_layers for the target
    node_type: str  # embed, attn_head, mlp, logit
    index: int
    down_input: str | None = None  # q, k, v for attention-head inputs


def upstream_nodes(model: HookedTransformer) -> list[Node]:
    cfg = model.cfg
    nodes = [Node(-1, "embed", 0)]
    for L in range(cfg.n_layers):
        nodes += [Node(L, "attn_head", h) for h in range(cfg.n_heads)]
        nodes += [Node(L, "mlp_expert", e) for e in range(cfg.n_experts + bool(cfg.d_shared))] \
            if cfg.n_experts else [Node(L, "mlp", 0)]
    return nodes


def downstream_nodes(model: HookedTransformer) -> list[Node]:
    cfg = model.cfg
    nodes = []
    for L in range(cfg.n_layers):
        for inp, n in (("q", cfg.n_heads), ("k", cfg.n_kv_heads), ("v", cfg.n_kv_heads)):
            nodes += [Node(L, "attn_head", h, inp) for h in range(n)]
        nodes.append(Node(L, "mlp", 0))
    return nodes + [Node(cfg.n_layers, "logit", 0)]


@dataclass
class EdgeResults:
    values: torch.Tensor  # [batch, pos, U, V] (positions "each") or [batch, U, V] ("summed")
    up: list[Node]
    down: list[Node]
    allowed: torch.Tensor  # [U, V] bool: u is upstream of v
    bias: torch.Tensor  # [batch, pos, V]: Σ attention output biases upstream of v · g_v
    in_dot_grad: torch.Tensor  # [batch, pos, V]: in_v · ∂metric/∂in_v (completeness check)
    metric: torch.Tensor  # [batch] clean metric
    corrupt_metric: torch.Tensor | None  # [batch] metric on the corrupted prompts


def norm_vjp(model, normalized: torch.Tensor, scale: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Jᵀg for x ↦ normalized(x) at each position (LayerNorm centres, RMSNorm does not).

    normalized, scale: [b, p, d], [b, p, 1]; g: [b, p, ..., d] (extra node dims allowed).
    Jᵀg = s·(g − mean(g) − n·mean((g − mean(g))·n)); written as two reductions and two fused
    passes over g, since g is the largest tensor of the edge computation ([b, p, heads, d]).
    """
    if not model.cfg.pre_norm:  # identity ln1/ln2 (OLMo 2): the gradient passes unchanged
        return g
    b, p, d = normalized.shape
    # the widest of the three (norm statistics are kept in float32 under bf16/fp16)
    dt = torch.promote_types(torch.promote_types(g.dtype, normalized.dtype), scale.dtype)
    gf = g.reshape(b, p, -1, d).to(dt)  # [b, p, X, d]
    s = scale.reshape(b, p, 1, 1).to(dt)
    n = normalized.reshape(b, p, 1, d).to(dt)
    k = (gf @ n.transpose(-1, -2)) / d  # mean(g·n): [b, p, X, 1]
    if model.cfg.norm == "layernorm":
        m = gf.mean(-1, keepdim=True)
        k = k - m * n.mean(-1, keepdim=True)  # mean(n) is 0 up to rounding; kept for exactness
        out = torch.addcmul(-(s * m), gf, s, out=torch.empty_like(gf))
    else:
        out = torch.mul(gf, s, out=torch.empty_like(gf))
    return out.addcmul_(n, s * k, value=-1).view(*g.shape[:-1], d)  # in g's memory layout


def _sites(model: HookedTransformer):
    cfg = model.cfg
    last = f"blocks.{cfg.n_layers - 1}.hook_resid_post"
    fwd = ["hook_embed", *(["hook_pos_embed"] if "hook_pos_embed" in model.hook_points else []), last]
    bwd = [last]
    for L in range(cfg.n_layers):
        p = f"blocks.{L}."
        fwd += [p + "attn.hook_z", p + "hook_mlp_out", p + "hook_resid_pre", p + "hook_resid_mid",
                *([p + "mlp.hook_post"] if cfg.n_experts else []),
                p + "ln1.hook_normalized", p + "ln1.hook_scale", p + "ln2.hook_normalized",
                p + "ln2.hook_scale", *post_norm_sites(model, L)]
        bwd += [p + "attn.hook_q", p + "attn.hook_k", p + "attn.hook_v", p + "ln2.hook_normalized"]
    return fwd, bwd, last


def upstream_outputs(model: HookedTransformer, acts) -> torch.Tensor:
    """Every upstream node's write to the residual stream. [batch, pos, U, d_model]
    With post norms a head's write passes through the frozen gain (model.write_gain)."""
    outs = [acts["hook_embed"] + acts.get("hook_pos_embed", 0)]
    for L, block in enumerate(model.blocks):
        z = acts[f"blocks.{L}.attn.hook_z"]
        heads = torch.einsum("bphe,hed->hbpd", z, block.attn.W_O)
        gain = write_gain(model, acts, L, "attn")
        outs += list(heads if gain is None else heads * gain)
        if model.cfg.n_experts:  # each expert's routed, weighted output; they sum to hook_mlp_out
            experts = block.mlp.expert_writes(acts[f"blocks.{L}.mlp.hook_post"]).permute(2, 0, 1, 3)
            gain = write_gain(model, acts, L, "mlp")
            outs += list(experts if gain is None else experts * gain)
        else:
            outs.append(acts[f"blocks.{L}.hook_mlp_out"])
    # node-major in memory: the position-summed edge matmuls read it as [b, U, p·d], no copy
    return torch.stack(outs, dim=1).transpose(1, 2)


def downstream_grads(model: HookedTransformer, acts, grads, last: str,
                     mask: torch.Tensor | None = None) -> list[torch.Tensor]:
    """∂metric/∂in_v for the downstream nodes, one [batch, pos, n, d_model] tensor per group
    (each layer's q, k, v heads and its MLP, then the target), in `downstream_nodes` order.
    mask [batch, pos]: zeroes padding positions (applied to the small per-head gradients, before
    they are pulled back to d_model)."""
    def masked(t: torch.Tensor) -> torch.Tensor:  # t: [b, p, n, ...]
        return t if mask is None else t * mask[:, :, None, None].to(t.dtype)

    out = []
    for L, block in enumerate(model.blocks):
        p = f"blocks.{L}."
        attn = block.attn
        n1, s1 = acts[p + "ln1.hook_normalized"], acts[p + "ln1.hook_scale"]
        for site, W in (("q", attn.W_Q), ("k", attn.W_K), ("v", attn.W_V)):
            g_site = masked(grads[p + f"attn.hook_{site}"])  # [b, p, heads, d_head]
            # head-major in memory, so the edge matmuls read each head's rows without a copy
            g_norm = torch.einsum("bphe,hde->hbpd", g_site, W * block.ln1.w[:, None])
            g_norm = g_norm.permute(1, 2, 0, 3)
            out.append(norm_vjp(model, n1, s1, g_norm))
        g_mlp = norm_vjp(model, acts[p + "ln2.hook_normalized"], acts[p + "ln2.hook_scale"],
                         masked(grads[p + "ln2.hook_normalized"][:, :, None, :]))
        out.append(g_mlp)
    out.append(masked(grads[last][:, :, None, :]))
    return out


def group_layout(model: HookedTransformer, acts, last: str):
    """Per downstream group: its input residual stream [b, p, 1, d], how many upstream nodes
    (a prefix of `upstream_nodes`) feed it, and how many attention layers lie upstream."""
    cfg = model.cfg
    per_layer = cfg.n_heads + cfg.n_mlp_nodes
    out = []
    for L in range(cfg.n_layers):
        p = f"blocks.{L}."
        pre = acts[p + "hook_resid_pre"][:, :, None, :]
        for _ in "qkv":
            out.append((pre, 1 + L * per_layer, L))
        if cfg.parallel:
            out.append((pre, 1 + L * per_layer, L))
        else:
            out.append((acts[p + "hook_resid_mid"][:, :, None, :], 1 + L * per_layer + cfg.n_heads, L + 1))
    out.append((acts[last][:, :, None, :], 1 + cfg.n_layers * per_layer, cfg.n_layers))
    return out


def component_edges(model: HookedTransformer, batch: Batch, target: str | Target,
                    corrupt: torch.Tensor | None = None, ig_steps: int = 0,
                    positions: str = "summed") -> EdgeResults:
    """All component-graph edges of a batch.

    corrupt: token ids of the corrupted prompts (same shape as batch.tokens), or None for the
    zero baseline (act × grad). ig_steps = 0: gradients at the clean input (EAP); N ≥ 1: the
    mean gradient over inputs corrupt + α(clean − corrupt), α = k/N, k = 0 … N−1 (EAP-IG).
    """
    target = get_target(target) if isinstance(target, str) else target
    if positions not in ("summed", "each"):
        raise ActwhError(f"edge positions must be 'summed' or 'each', not {positions!r}")
    if ig_steps and corrupt is None:
        raise ActwhError("--ig-steps needs corrupted prompts (the corrupt baseline)")
    batch = batch.to(model.device)
    fwd, bwd, last = _sites(model)
    metric_fn = lambda logits: target.metric(logits, batch).sum()  # noqa: E731
    clean = model.run_with_cache(batch.tokens, fwd, attention_mask=batch.mask,
                                 backward_of=metric_fn if not ig_steps else None,
                                 grad_names=bwd)
    out = upstream_outputs(model, clean.acts)
    corrupt_metric = None
    if corrupt is not None:
        corrupt = corrupt.to(model.device)
        if corrupt.shape != batch.tokens.shape:
            raise ActwhError("corrupted prompts must have as many tokens as their clean prompts")
        bad = model.run_with_cache(corrupt, fwd, attention_mask=batch.mask)
        out = out - upstream_outputs(model, bad.acts)
        corrupt_metric = target.metric(bad.logits, batch)
    if ig_steps:
        embed_names = [n for n in ("hook_embed", "hook_pos_embed") if n in model.hook_points]
        clean_e = {n: clean.acts[n] for n in embed_names}
        bad_e = {n: bad.acts[n] for n in embed_names}
        groups = None
        for k in range(ig_steps):
            alpha = k / ig_steps
            hooks = [(n, lambda t, n, a=alpha: bad_e[n] + a * (clean_e[n] - bad_e[n]))
                     for n in embed_names]
            step = model.run_with_cache(batch.tokens, fwd, attention_mask=batch.mask,
                                        backward_of=metric_fn, grad_names=bwd, fwd_hooks=hooks)
            g = downstream_grads(model, step.acts, step.grads, last, batch.mask)
            groups = g if groups is None else [a + b for a, b in zip(groups, g)]
        groups = [g / ig_steps for g in groups]
    else:
        groups = downstream_grads(model, clean.acts, clean.grads, last, batch.mask)
    up, down = upstream_nodes(model), downstream_nodes(model)
    b, n_pos = batch.tokens.shape
    U, V = len(up), len(down)
    # Attention output biases are bias terms: the running sum over layers feeds each group
    # (per position: a post-norm's gain scales each layer's bias write).
    b_O = [torch.zeros_like(out[:, :, 0])]
    for L, blk in enumerate(model.blocks):
        gain = write_gain(model, clean.acts, L, "attn")
        b_O.append(b_O[-1] + (blk.attn.b_O if gain is None else blk.attn.b_O * gain))
    shape = (b, n_pos, U, V) if positions == "each" else (b, U, V)
    values = out.new_zeros(shape)
    allowed = torch.zeros(U, V, dtype=torch.bool, device=out.device)
    bias, in_dot_grad = out.new_zeros(b, n_pos, V), out.new_zeros(b, n_pos, V)
    col = 0
    d = out.shape[-1]
    with torch.no_grad():
        # Layouts in which every group's upstream prefix is a strided view, so each product is
        # one batched matmul with no copy of the (large) upstream outputs.
        if positions == "each":
            ups = out.reshape(b * n_pos, U, d)
        else:
            ups = out.permute(0, 2, 1, 3).reshape(b, U, n_pos * d)
        for g, (x, n_up, n_attn) in zip(groups, group_layout(model, clean.acts, last)):
            g = g.to(out.dtype)  # norm pull-backs run in float32 under bf16/fp16; padding is zero
            n = g.shape[2]
            cols = slice(col, col + n)
            if positions == "each":
                prod = ups[:, :n_up] @ g.reshape(b * n_pos, n, d).transpose(1, 2)
                values[:, :, :n_up, cols] = prod.view(b, n_pos, n_up, n)
            else:
                # attention groups are head-major in memory (downstream_grads): a view, no copy
                g_rows = g.permute(0, 2, 1, 3).reshape(b, n, n_pos * d)
                values[:, :n_up, cols] = ups[:, :n_up] @ g_rows.transpose(1, 2)
            allowed[:n_up, cols] = True
            bias[:, :, cols] = (g @ b_O[n_attn][:, :, :, None]).squeeze(-1)
            in_dot_grad[:, :, cols] = (g @ x.transpose(-1, -2)).squeeze(-1)
            col += n
    return EdgeResults(values, up, down, allowed, bias, in_dot_grad,
                       target.metric(clean.logits, batch), corrupt_metric)


def check_edge_options(select: str, positions: str) -> KeepRule:
    """The parsed `--edges-select` rule, after checking `--edges-positions`."""
    rule = KeepRule.parse(select, "edge selection")
    if positions not in ("summed", "each"):
        raise ActwhError(f"edge positions must be summed or each, not {positions!r}")
    return rule


def kept_edges(res: EdgeResults, rule: KeepRule, mask: torch.Tensor):
    """The edges `rule` keeps per prompt, as (batch row, position in the padded batch or None
    when summed, upstream node, downstream node, value) tensors; nodes index `res.up`/`res.down`.
    Only upstream pairs (at real positions) are candidates."""
    values = res.values
    each = values.dim() == 4
    flat = values.reshape(values.shape[0], -1)  # [b, (p) * U * V]
    if each:  # upstream pairs at real positions only
        real = mask.bool().to(values.device)
        ok = (res.allowed[None, None] & real[:, :, None, None]).reshape(flat.shape)
    else:
        ok = res.allowed.reshape(-1)[None, :].expand_as(flat)
    bi, fi = rule.keep(flat, ok).nonzero(as_tuple=True)
    U, V = len(res.up), len(res.down)
    return bi, fi // (U * V) if each else None, (fi // V) % U, fi % V, flat[bi, fi]
