"""Node-level edges into chosen downstream nodes (Transformer Debugger's many-upstream-to-one).

For a downstream node v (an MLP neuron at a position, or an attention head's q input at a query
position, k or v input at a key position), r_v = ∂(act_v · stopgrad(grad_v))/∂in_v, the gradient
with respect to v's own copy of the residual stream at v's position. Each upstream node u
writes w_u into that residual stream; edge(u → v) = r_v · w_u. Upstream nodes: the token
embedding at v's position, every earlier MLP neuron there, and every earlier head split by key
token (pattern[q, k] · v_k W_O). Σ_u edge + r_v · (output biases) = r_v · in_v, exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from actwh.compute.edges import norm_vjp
from actwh.compute.model import HookedTransformer
from actwh.compute.targets import Batch, Target, get_target


@dataclass(frozen=True)
class Down:
    """A downstream node of one prompt."""

    batch_index: int
    layer: int
    node_type: str  # "mlp_neuron" or "attn_head"
    index: int  # neuron, or head (key/value head for k and v under GQA)
    pos: int  # the position whose residual stream v reads
    down_input: str | None = None  # q, k, v for heads


@dataclass
class NodeEdges:
    down: Down
    r: torch.Tensor  # [d_model] the gradient at v's copy of the residual stream
    embed: torch.Tensor  # [] edge from the token embedding at v's position
    neurons: torch.Tensor  # [L_up, d_mlp] edges from earlier MLP neurons at v's position
    heads: torch.Tensor  # [L_up, n_heads, pos] edges from earlier heads, per key position
    bias: torch.Tensor  # [] r · (output biases upstream of v)
    r_dot_in: torch.Tensor  # [] r · in_v (completeness)
    act_times_grad: torch.Tensor  # [] act_v · grad_v


def sites(model: HookedTransformer) -> tuple[list[str], list[str]]:
    fwd = ["hook_embed"] + (["hook_pos_embed"] if "hook_pos_embed" in model.hook_points else [])
    bwd = []
    for L in range(model.cfg.n_layers):
        p = f"blocks.{L}."
        fwd += [p + s for s in ("hook_resid_pre", "hook_resid_mid", "ln1.hook_normalized",
                                "ln1.hook_scale", "ln2.hook_normalized", "ln2.hook_scale",
                                "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_pattern",
                                "mlp.hook_pre", "mlp.hook_post")]
        if model.cfg.gated_mlp:
            fwd.append(p + "mlp.hook_pre_linear")
        bwd += [p + "attn.hook_q", p + "attn.hook_k", p + "attn.hook_v", p + "mlp.hook_post"]
    return fwd, bwd


def _act_grad(act_fn, x: torch.Tensor) -> torch.Tensor:
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(act_fn(x).sum(), [x])
    return g


def gradient_at_input(model: HookedTransformer, acts, grads, v: Down) -> tuple[torch.Tensor, torch.Tensor]:
    """r_v [d_model] and act_v · grad_v for one downstream node."""
    b, L, p = v.batch_index, v.layer, v.pos
    blk = model.blocks[L]
    pre = f"blocks.{L}."
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
        g_norm = g_post * d_ln * blk.ln2.w
        n2, s2 = acts[pre + "ln2.hook_normalized"][b:b + 1, p:p + 1], acts[pre + "ln2.hook_scale"][b:b + 1, p:p + 1]
        r = norm_vjp(model, n2, s2, g_norm[None, None])[0, 0]
        atg = acts[pre + "mlp.hook_post"][b, p, n] * g_post
        return r, atg
    W = {"q": blk.attn.W_Q, "k": blk.attn.W_K, "v": blk.attn.W_V}[v.down_input][v.index]
    site = pre + f"attn.hook_{v.down_input}"
    g_site = grads[site][b, p, v.index]  # [d_head]
    g_norm = (W @ g_site) * blk.ln1.w
    n1, s1 = acts[pre + "ln1.hook_normalized"][b:b + 1, p:p + 1], acts[pre + "ln1.hook_scale"][b:b + 1, p:p + 1]
    r = norm_vjp(model, n1, s1, g_norm[None, None])[0, 0]
    return r, (acts[site][b, p, v.index] * g_site).sum()


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
    cfg = model.cfg
    out = []
    with torch.no_grad():
        for v in downs:
            b, L, p = v.batch_index, v.layer, v.pos
            r, atg = gradient_at_input(model, acts, grads, v)
            r = r.to(model.W_E.dtype)  # norm pull-backs run in float32 under bf16/fp16
            embed = acts["hook_embed"][b, p] + (acts["hook_pos_embed"][b, p]
                                                if "hook_pos_embed" in acts else 0)
            # Attention of layer L feeds only the MLP of layer L (and not in parallel blocks).
            attn_layers = L + (1 if v.node_type == "mlp_neuron" and not cfg.parallel else 0)
            neurons = torch.stack([acts[f"blocks.{m}.mlp.hook_post"][b, p] *
                                   (model.blocks[m].mlp.W_out @ r) for m in range(L)]) \
                if L else r.new_zeros(0, cfg.d_mlp)
            heads = []
            for m in range(attn_layers):
                attn = model.blocks[m].attn
                vals = acts[f"blocks.{m}.attn.hook_v"][b]  # [pos, kv, d_head]
                group = cfg.n_heads // cfg.n_kv_heads
                vals = vals.repeat_interleave(group, dim=1) if group > 1 else vals
                vo_r = torch.einsum("khe,hed,d->hk", vals, attn.W_O, r)  # [head, key]
                heads.append(acts[f"blocks.{m}.attn.hook_pattern"][b, :, p, :] * vo_r)
            heads = torch.stack(heads) if heads else r.new_zeros(0, cfg.n_heads, batch.tokens.shape[1])
            bias = sum((model.blocks[m].mlp.b_out @ r for m in range(L)), r.new_zeros(())) + \
                sum((model.blocks[m].attn.b_O @ r for m in range(attn_layers)), r.new_zeros(()))
            resid = acts[f"blocks.{L}.hook_resid_mid"] if (v.node_type == "mlp_neuron" and not cfg.parallel) \
                else acts[f"blocks.{L}.hook_resid_pre"]
            out.append(NodeEdges(v, r, embed @ r, neurons, heads, bias, resid[b, p] @ r, atg))
    return out


def top_downstream(model: HookedTransformer, batch: Batch, cache, n: int) -> list[Down]:
    """The n nodes of each prompt with the largest |act × grad| among MLP neurons and head
    q/k/v inputs at each position (what `--edges-into top:N` traces into)."""
    cfg = model.cfg
    real = batch.mask.bool().to(model.device)
    scores, kinds = [], []  # each [batch, L, pos, width]
    for kind, width in (("mlp", cfg.d_mlp), ("q", cfg.n_heads), ("k", cfg.n_kv_heads),
                        ("v", cfg.n_kv_heads)):
        per_layer = []
        for L in range(cfg.n_layers):
            site = f"blocks.{L}.mlp.hook_post" if kind == "mlp" else f"blocks.{L}.attn.hook_{kind}"
            atg = cache.acts[site] * cache.grads[site]
            per_layer.append(atg if kind == "mlp" else atg.sum(-1))
        s = torch.stack(per_layer, 1).abs().masked_fill(~real[:, None, :, None], -1.0)
        scores.append(s.flatten(1))
        kinds.append((kind, width))
    flat = torch.cat(scores, 1)
    top = flat.topk(min(n, flat.shape[1]), dim=1)
    out = []
    p_len = batch.tokens.shape[1]
    for b in range(flat.shape[0]):
        for value, idx in zip(top.values[b].tolist(), top.indices[b].tolist()):
            if value < 0:
                continue
            for (kind, width), s in zip(kinds, scores):
                if idx < s.shape[1]:
                    L, rest = divmod(idx, p_len * width)
                    p, i = divmod(rest, width)
                    out.append(Down(b, L, "mlp_neuron", i, p) if kind == "mlp"
                               else Down(b, L, "attn_head", i, p, kind))
                    break
                idx -= s.shape[1]
    return out


def node_edge_columns(results: list[NodeEdges], select: str, prompt_ids, mask: torch.Tensor) -> dict:
    """Columns for the edges table; `select` (top-k:N | threshold:X | dense) applies per
    downstream node, so every traced node keeps its strongest inputs."""
    import numpy as np

    from actwh.compute.scalars import NODE_TYPES

    mode, _, amount = select.partition(":")
    cols: dict[str, list] = {k: [] for k in ("prompt_id", "up_layer", "up_type", "up_index", "up_pos",
                                             "down_layer", "down_type", "down_index", "down_pos",
                                             "down_input", "value")}
    real = mask.bool().cpu()
    for res in results:
        v = res.down
        L_n, d_mlp = res.neurons.shape
        L_h, n_heads, n_pos = res.heads.shape
        vals = torch.cat([res.embed.reshape(1), res.neurons.reshape(-1), res.heads.reshape(-1)]).cpu()
        layer = torch.cat([torch.tensor([-1]), torch.arange(L_n).repeat_interleave(d_mlp),
                           torch.arange(L_h).repeat_interleave(n_heads * n_pos)])
        kind = torch.cat([torch.tensor([NODE_TYPES.index("embed")]),
                          torch.full((L_n * d_mlp,), NODE_TYPES.index("mlp_neuron")),
                          torch.full((L_h * n_heads * n_pos,), NODE_TYPES.index("attn_head"))])
        index = torch.cat([torch.tensor([0]), torch.arange(d_mlp).repeat(L_n),
                           torch.arange(n_heads).repeat_interleave(n_pos).repeat(L_h)])
        pos = torch.cat([torch.tensor([v.pos]), torch.full((L_n * d_mlp,), v.pos),
                         torch.arange(n_pos).repeat(L_h * n_heads)])
        ok = real[v.batch_index][pos] & (pos <= v.pos)
        score = vals.abs().masked_fill(~ok, -1.0)
        if mode == "top-k":
            keep = torch.zeros_like(ok)
            top = score.topk(min(int(amount), len(score)))
            keep[top.indices[top.values >= 0]] = True
        elif mode == "threshold":
            keep = score >= float(amount)
        else:
            keep = score >= 0
        idx = keep.nonzero().flatten()
        k = len(idx)
        cols["prompt_id"].append(np.full(k, prompt_ids[v.batch_index], np.int32))
        cols["up_layer"].append(layer[idx].numpy().astype(np.int16))
        cols["up_type"].append(kind[idx].numpy().astype(np.int8))
        cols["up_index"].append(index[idx].numpy().astype(np.int32))
        cols["up_pos"].append(pos[idx].numpy().astype(np.int32))
        cols["down_layer"].append(np.full(k, v.layer, np.int16))
        cols["down_type"].append(np.full(k, NODE_TYPES.index(v.node_type), np.int8))
        cols["down_index"].append(np.full(k, v.index, np.int32))
        cols["down_pos"].append(np.full(k, v.pos, np.int32))
        cols["down_input"].append(np.full(k, "qkv".index(v.down_input) if v.down_input else -1, np.int8))
        cols["value"].append(vals[idx].float().numpy())
    out = {k: np.concatenate(v) if v else np.zeros(0) for k, v in cols.items()}
    order = np.argsort(out["prompt_id"], kind="stable")
    return {k: v[order] for k, v in out.items()}
