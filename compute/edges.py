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

The products are large GEMMs: per chunk of positions, every upstream write [U, positions·d_model]
against every downstream gradient [V, positions·d_model] (a chunk of downstream groups at a time),
summed in float32 into one [U, V] result per prompt. Each product is computed in the model's dtype:
under bf16/fp16 the GEMM accumulates in float32 inside the kernel but its output is rounded to
that dtype before the float32 sum across chunks and IG steps. `EdgeChunks` (chosen for a memory budget
by compute/memory.py) splits prompts, positions and downstream groups; every split gives the same
edges up to float rounding. EAP-IG accumulates one step at a time (the edges are linear in the
gradient), recomputing the upstream writes per position chunk when there is more than one.

Spliced autoencoders leave this graph as it is (the splice is exact, so every write and every
gradient is the model's own); latents enter edges at node level (node_edges.py).
"""

from __future__ import annotations

from contextlib import contextmanager
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


@dataclass(frozen=True)
class EdgeChunks:
    """How the edge computation is split (compute/memory.py picks one for a memory budget).

    rows: prompts per forward + backward pass (None: the whole batch); positions: positions per
    edge GEMM (None: all); groups: downstream groups (each layer's q, k, v heads, its MLP, the
    target) per GEMM (None: all). Every split gives the same edges up to float rounding: prompts
    are independent, and an edge is a sum over positions of per-position products. recompute:
    the backward pass reruns each block from its input (activation checkpointing) instead of
    keeping what autograd saves in the forward pass: the same values, one more forward pass,
    one layer's attention probabilities held at a time instead of every layer's."""

    rows: int | None = None
    positions: int | None = None
    groups: int | None = None
    recompute: bool = False  # keep only each block's input for the backward; rerun the block there

    def __post_init__(self):
        for name in ("rows", "positions", "groups"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ActwhError(f"edge chunk {name} must be a whole number >= 1, not {v!r}")
        if not isinstance(self.recompute, bool):
            raise ActwhError(f"edge chunk recompute must be True or False, not {self.recompute!r}")


def _group_sizes(cfg) -> list[int]:
    """Downstream nodes per group, in `downstream_nodes` order."""
    return [n for _ in range(cfg.n_layers) for n in (cfg.n_heads, cfg.n_kv_heads, cfg.n_kv_heads, 1)] + [1]


def write_upstream(model: HookedTransformer, acts, sl: slice, out: torch.Tensor, sign: int = 1) -> None:
    """Every upstream node's write to the residual stream at positions `sl`, copied into
    (sign 1) or subtracted from (sign -1) out [batch, U, positions, d_model] (any strides).
    With post norms a head's write passes through the frozen gain (model.write_gain)."""
    def put(i: int, t: torch.Tensor) -> None:  # t: [b, n, pc, d]
        dst = out[:, i:i + t.shape[1]]
        dst.copy_(t) if sign > 0 else dst.sub_(t)

    e = acts["hook_embed"][:, sl]
    if "hook_pos_embed" in acts:
        e = e + acts["hook_pos_embed"][:, sl]
    put(0, e[:, None])
    i = 1
    for L, block in enumerate(model.blocks):
        z = acts[f"blocks.{L}.attn.hook_z"][:, sl]
        heads = torch.einsum("bphe,hed->bhpd", z, block.attn.W_O)
        gain = write_gain(model, acts, L, "attn")
        put(i, heads if gain is None else heads * gain[:, None, sl])
        i += heads.shape[1]
        del heads
        if model.cfg.n_experts:  # each expert's routed, weighted output; they sum to hook_mlp_out
            experts = block.mlp.expert_writes(acts[f"blocks.{L}.mlp.hook_post"][:, sl]).transpose(1, 2)
            gain = write_gain(model, acts, L, "mlp")
            put(i, experts if gain is None else experts * gain[:, None, sl])
            i += experts.shape[1]
        else:
            put(i, acts[f"blocks.{L}.hook_mlp_out"][:, sl, None].transpose(1, 2))
            i += 1


def upstream_outputs(model: HookedTransformer, acts) -> torch.Tensor:
    """Every upstream node's write to the residual stream. [batch, pos, U, d_model]"""
    b, p, d = acts["hook_embed"].shape
    out = acts["hook_embed"].new_empty(b, p, len(upstream_nodes(model)), d)
    write_upstream(model, acts, slice(None), out.transpose(1, 2))
    return out


def group_grads(model: HookedTransformer, acts, grads, last: str, mask: torch.Tensor | None,
                sl: slice = slice(None), first: int = 0, stop: int | None = None):
    """∂metric/∂in_v at positions `sl` for downstream groups first … stop-1 (each layer's q, k, v
    heads and its MLP, then the target), one [batch, pc, n, d_model] tensor per group, yielded
    one at a time so that only one group's gradients are alive. mask [batch, pos]: zeroes
    padding positions (applied to the small per-head gradients, before the pull-back)."""
    cfg = model.cfg
    m = None if mask is None else mask[:, sl]

    def masked(t: torch.Tensor) -> torch.Tensor:  # t: [b, pc, n, ...]
        return t if m is None else t * m[:, :, None, None].to(t.dtype)

    stop = 4 * cfg.n_layers + 1 if stop is None else stop
    for k in range(first, stop):
        L, j = divmod(k, 4)
        if L == cfg.n_layers:
            yield masked(grads[last][:, sl, None, :])
            continue
        p, block = f"blocks.{L}.", model.blocks[L]
        if j < 3:
            site, W = "qkv"[j], (block.attn.W_Q, block.attn.W_K, block.attn.W_V)[j]
            g_site = masked(grads[p + f"attn.hook_{site}"][:, sl])  # [b, pc, heads, d_head]
            g_norm = torch.einsum("bphe,hde->bphd", g_site, W * block.ln1.w[:, None])
            yield norm_vjp(model, acts[p + "ln1.hook_normalized"][:, sl], acts[p + "ln1.hook_scale"][:, sl],
                           g_norm)
        else:
            yield norm_vjp(model, acts[p + "ln2.hook_normalized"][:, sl], acts[p + "ln2.hook_scale"][:, sl],
                           masked(grads[p + "ln2.hook_normalized"][:, sl, None, :]))


def downstream_grads(model: HookedTransformer, acts, grads, last: str,
                     mask: torch.Tensor | None = None) -> list[torch.Tensor]:
    """∂metric/∂in_v for every downstream group, [batch, pos, n, d_model] each (group_grads)."""
    return list(group_grads(model, acts, grads, last, mask))


def group_layout(model: HookedTransformer, acts, last: str):
    """Per downstream group: its input residual stream [b, p, d], how many upstream nodes
    (a prefix of `upstream_nodes`) feed it, and how many attention layers lie upstream."""
    cfg = model.cfg
    per_layer = cfg.n_heads + cfg.n_mlp_nodes
    out = []
    for L in range(cfg.n_layers):
        p = f"blocks.{L}."
        pre = acts[p + "hook_resid_pre"]
        for _ in "qkv":
            out.append((pre, 1 + L * per_layer, L))
        if cfg.parallel:
            out.append((pre, 1 + L * per_layer, L))
        else:
            out.append((acts[p + "hook_resid_mid"], 1 + L * per_layer + cfg.n_heads, L + 1))
    out.append((acts[last], 1 + cfg.n_layers * per_layer, cfg.n_layers))
    return out


def _bias_sums(model: HookedTransformer, acts, sl: slice) -> list:
    """Σ of the attention output biases of the first n layers (n = 0 … n_layers), each
    broadcastable to [b, pc, d] (per position: a post-norm's gain scales each layer's bias)."""
    out = [0]
    for L, blk in enumerate(model.blocks):
        gain = write_gain(model, acts, L, "attn")
        out.append(out[-1] + (blk.attn.b_O if gain is None else blk.attn.b_O * gain[:, sl]))
    return out


@contextmanager
def recompute_blocks(model: HookedTransformer, on: bool = True):
    """Within the block, each transformer block runs under non-reentrant activation
    checkpointing (torch.utils.checkpoint): its forward keeps only its inputs, and the backward
    reruns it. The rerun happens after run_with_cache's hooks are removed, so no hook fires in it:
    only hook-free blocks may be rerun (the component graph's only hooks keep values; spliced
    autoencoders are modules and rerun exactly). Caches and gradients are unchanged
    (tests/test_edge_chunks.py)."""
    if not on:
        yield
        return
    from torch.utils.checkpoint import checkpoint

    for blk in model.blocks:
        blk.forward = lambda *a, f=type(blk).forward.__get__(blk): checkpoint(f, *a, use_reentrant=False)
    try:
        yield
    finally:
        for blk in model.blocks:
            del blk.forward


def _sub_batch(batch: Batch, rows: slice) -> Batch:
    pick = lambda t: None if t is None else t[rows]  # noqa: E731
    return Batch(batch.tokens[rows], batch.mask[rows], pick(batch.target_ids), pick(batch.distractor_ids),
                 pick(batch.positions))


def component_edges(model: HookedTransformer, batch: Batch, target: str | Target,
                    corrupt: torch.Tensor | None = None, ig_steps: int = 0,
                    positions: str = "summed", chunks: EdgeChunks | None = None) -> EdgeResults:
    """All component-graph edges of a batch.

    corrupt: token ids of the corrupted prompts (same shape as batch.tokens), or None for the
    zero baseline (act × grad). ig_steps = 0: gradients at the clean input (EAP); N ≥ 1: the
    mean gradient over inputs corrupt + α(clean − corrupt), α = k/N, k = 0 … N−1 (EAP-IG).
    chunks: how to split the work (EdgeChunks; None: one pass, one GEMM per step).

    Edges are one GEMM per chunk of positions and downstream groups: every upstream node's write
    [U, positions·d_model] against every downstream gradient [V, positions·d_model], accumulated
    into one [U, V] result per prompt (per position with positions="each"); pairs where u does
    not lie upstream of v are computed and set to zero.
    """
    target = get_target(target) if isinstance(target, str) else target
    if positions not in ("summed", "each"):
        raise ActwhError(f"edge positions must be 'summed' or 'each', not {positions!r}")
    if ig_steps and corrupt is None:
        raise ActwhError("--ig-steps needs corrupted prompts (the corrupt baseline)")
    if corrupt is not None and corrupt.shape != batch.tokens.shape:
        raise ActwhError("corrupted prompts must have as many tokens as their clean prompts")
    chunks = chunks or EdgeChunks()
    n = batch.tokens.shape[0]
    if chunks.rows is None or chunks.rows >= n:
        return _edges(model, batch, target, corrupt, ig_steps, positions, chunks)
    parts = [_edges(model, _sub_batch(batch, slice(i, i + chunks.rows)), target,
                    None if corrupt is None else corrupt[i:i + chunks.rows], ig_steps, positions, chunks)
             for i in range(0, n, chunks.rows)]
    cat = lambda name: torch.cat([getattr(r, name) for r in parts])  # noqa: E731
    return EdgeResults(cat("values"), parts[0].up, parts[0].down, parts[0].allowed, cat("bias"),
                       cat("in_dot_grad"), cat("metric"),
                       None if corrupt is None else cat("corrupt_metric"))


def _edges(model: HookedTransformer, batch: Batch, target: Target, corrupt, ig_steps: int,
           positions: str, chunks: EdgeChunks) -> EdgeResults:
    batch = batch.to(model.device)
    fwd, bwd, last = _sites(model)
    metric_fn = lambda logits: target.metric(logits, batch).sum()  # noqa: E731
    with recompute_blocks(model, chunks.recompute and not ig_steps):
        clean = model.run_with_cache(batch.tokens, fwd, attention_mask=batch.mask,
                                     backward_of=metric_fn if not ig_steps else None,
                                     grad_names=bwd)
    bad = corrupt_metric = None
    if corrupt is not None:
        bad = model.run_with_cache(corrupt.to(model.device), fwd, attention_mask=batch.mask)
        corrupt_metric = target.metric(bad.logits, batch)
    metric = target.metric(clean.logits, batch)
    clean.logits = None  # the largest tensor of the forward pass; not needed past here
    if bad is not None:
        bad.logits = None
    up, down = upstream_nodes(model), downstream_nodes(model)
    b, n_pos = batch.tokens.shape
    U, V = len(up), len(down)
    cfg = model.cfg
    dtype = clean.acts["hook_embed"].dtype
    acc = torch.promote_types(dtype, torch.float32)  # sums over chunks and steps: never below float32
    dev = model.device
    each = positions == "each"
    values = torch.zeros((b, n_pos, U, V) if each else (b, U, V), dtype=acc, device=dev)
    bias = torch.zeros(b, n_pos, V, dtype=acc, device=dev)
    in_dot_grad = torch.zeros(b, n_pos, V, dtype=acc, device=dev)
    allowed = torch.zeros(U, V, dtype=torch.bool, device=dev)
    layout = group_layout(model, clean.acts, last)
    sizes = _group_sizes(cfg)
    starts = [0]
    for s in sizes:
        starts.append(starts[-1] + s)
    for (_, n_up, _), c0, c1 in zip(layout, starts, starts[1:]):
        allowed[:n_up, c0:c1] = True
    pc = chunks.positions or n_pos
    gc = chunks.groups or len(sizes)
    pos_chunks = [slice(p0, min(p0 + pc, n_pos)) for p0 in range(0, n_pos, pc)]
    group_chunks = [(g0, min(g0 + gc, len(sizes))) for g0 in range(0, len(sizes), gc)]

    def upstream(sl: slice) -> torch.Tensor:
        """[b, U, pc, d] writes at sl (clean − corrupt); node-major in memory when summed (the
        GEMM reads [U, pc·d] rows), position-major when each (one [U, d] × [d, V] per position)."""
        w = sl.stop - sl.start
        buf = torch.empty((b, w, U, cfg.d_model) if each else (b, U, w, cfg.d_model), dtype=dtype, device=dev)
        view = buf.transpose(1, 2) if each else buf
        write_upstream(model, clean.acts, sl, view)
        if bad is not None:
            write_upstream(model, bad.acts, sl, view, sign=-1)
        return buf

    def accumulate(acts, grads, ups_cache: dict) -> None:
        with torch.no_grad():
            for sl in pos_chunks:
                ups = ups_cache.get(sl.start)
                if ups is None:
                    ups = upstream(sl)
                    if len(pos_chunks) == 1:
                        ups_cache[sl.start] = ups
                w = sl.stop - sl.start
                b_O = _bias_sums(model, clean.acts, sl)
                for g0, g1 in group_chunks:
                    c0, c1 = starts[g0], starts[g1]
                    G = torch.empty((b, w, c1 - c0, cfg.d_model) if each else (b, c1 - c0, w, cfg.d_model),
                                    dtype=dtype, device=dev)
                    view = G.transpose(1, 2) if each else G  # [b, n, pc, d]
                    grads_of = group_grads(model, acts, grads, last, batch.mask, sl, g0, g1)
                    for k, g in zip(range(g0, g1), grads_of):
                        # norm pull-backs run in float32 under bf16/fp16; padding is zero
                        g = g.to(dtype)
                        x, _, n_attn = layout[k]
                        cols = slice(starts[k] - c0, starts[k + 1] - c0)
                        view[:, cols] = g.transpose(1, 2)
                        out_cols = slice(starts[k], starts[k + 1])
                        bo = b_O[n_attn]
                        if torch.is_tensor(bo):  # [d] or, with post-norm gains, [b, pc, d]
                            bias[:, sl, out_cols] += g @ bo if bo.dim() == 1 else (g @ bo[:, :, :, None])[..., 0]
                        in_dot_grad[:, sl, out_cols] += (g @ x[:, sl, :, None])[..., 0]
                        del g
                    n_up = layout[g1 - 1][1]  # the widest prefix in this chunk (prefixes grow)
                    if each:  # [b, pc, U, d] @ [b, pc, d, n] -> [b, pc, U, n]
                        values[:, sl, :, c0:c1] += ups @ G.transpose(-1, -2)
                    else:  # [b, n_up, pc·d] @ [b, pc·d, n] -> [b, n_up, n]
                        values[:, :n_up, c0:c1] += ups[:, :n_up].reshape(b, n_up, -1) @ \
                            G.reshape(b, c1 - c0, -1).transpose(1, 2)
                    del G, view

    ups_cache: dict = {}
    if ig_steps:
        embed_names = [n for n in ("hook_embed", "hook_pos_embed") if n in model.hook_points]
        clean_e = {n: clean.acts[n] for n in embed_names}
        bad_e = {n: bad.acts[n] for n in embed_names}
        for k in range(ig_steps):
            alpha = k / ig_steps
            hooks = [(n, lambda t, n, a=alpha: bad_e[n] + a * (clean_e[n] - bad_e[n]))
                     for n in embed_names]
            with recompute_blocks(model, chunks.recompute):
                step = model.run_with_cache(batch.tokens, _step_sites(model), attention_mask=batch.mask,
                                            backward_of=metric_fn, grad_names=bwd, fwd_hooks=hooks)
            accumulate(step.acts, step.grads, ups_cache)
            del step
        for t in (values, bias, in_dot_grad):
            t.div_(ig_steps)
    else:
        accumulate(clean.acts, clean.grads, ups_cache)
    values.masked_fill_(~allowed, 0)  # pairs where u is not upstream of v
    return EdgeResults(values, up, down, allowed, bias, in_dot_grad, metric, corrupt_metric)


def _step_sites(model: HookedTransformer) -> list[str]:
    """The forward sites an EAP-IG step's pull-backs read (its norms)."""
    return [f"blocks.{L}.{n}.{h}" for L in range(model.cfg.n_layers) for n in ("ln1", "ln2")
            for h in ("hook_normalized", "hook_scale")]


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
