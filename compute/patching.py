"""Patched forward passes: the model run with a circuit's edges kept and every other edge patched.

A component-graph edge u → v carries u's write into v's own copy of the residual stream (DESIGN.md,
"Edge attribution": upstream `embed` / `attn_head` / `mlp`, downstream each head's q, k and v
input, each MLP's input and the target). Patching the edge replaces that write, for v alone, by
u's baseline write:

    in_v = resid_v − Σ_{u → v patched} (out_u − base_u)

where resid_v is the residual stream v reads in this (patched) run and out_u is u's write in this
run, so patches compose as in EAP-IG's `evaluate_graph`. Every downstream input is patched
separately, per prompt, inside one forward pass (batched over prompts): nothing patched gives the
clean logits, everything patched gives the baseline run (the corrupted prompt's logits for the
corrupt baseline). Baselines: `"zero"` (base_u = 0), corrupted token ids (base_u = u's write on
the corrupted prompt, read with the clean prompt's attention mask) or precomputed writes such as
`mean_writes(...)` (per position, over prompts). Attention output biases belong to no head and
are never patched; an MLP node's write includes its output bias. Under post-sublayer norms
(Gemma 2/3, OLMo 2) a head's write is z_h W_O_h through its post-norm's gain in the same run
(model.write_gain), so writes still sum to the residual stream and both exactness properties hold.

Only the circuit's nodes run (`run_patched(sparse=...)`): a node none of whose out-edges is kept
is read as its baseline write everywhere, so its baseline write stands in for it in the stream
and neither it nor its inputs are computed; an attention layer runs only the heads it must.

Node sets: `run_nodes_patched` replaces the writes of every node outside a kept set (heads,
whole MLPs, neurons, autoencoder latents) by their baseline values, i.e. activation patching.
"""

from __future__ import annotations

from typing import Iterable

import torch

from actwh.compute.edges import Node, downstream_nodes, upstream_nodes
from actwh.compute.model import HookedTransformer, post_norm_sites, write_gain
from actwh.compute.targets import Batch
from actwh.errors import ActwhError


def _embed_sites(model: HookedTransformer) -> list[str]:
    return [n for n in ("hook_embed", "hook_pos_embed") if n in model.hook_points]


def write_sites(model: HookedTransformer) -> list[str]:
    """The hook sites whose values make up every upstream node's write."""
    out = _embed_sites(model)
    for L in range(model.cfg.n_layers):
        out += [f"blocks.{L}.attn.hook_z", f"blocks.{L}.hook_mlp_out", *post_norm_sites(model, L)]
        out += [f"blocks.{L}.mlp.hook_post"] if model.cfg.n_experts else []
    return out


def writes_from(model: HookedTransformer, acts: dict[str, torch.Tensor]) -> torch.Tensor:
    """Every upstream node's write, in `upstream_nodes` order. [batch, pos, U, d_model]"""
    outs = [sum(acts[n] for n in _embed_sites(model))]
    for L, block in enumerate(model.blocks):
        heads = torch.einsum("bphe,hed->hbpd", acts[f"blocks.{L}.attn.hook_z"], block.attn.W_O)
        gain = write_gain(model, acts, L, "attn")  # post norms: heads write through its gain
        outs += list(heads if gain is None else heads * gain)
        if model.cfg.n_experts:  # experts are the nodes: each one's routed, weighted output
            outs += list(_expert_writes(model, L, acts[f"blocks.{L}.mlp.hook_post"], acts).unbind(2))
        else:
            outs.append(acts[f"blocks.{L}.hook_mlp_out"])
    return torch.stack(outs, dim=2)


def _expert_writes(model, L, post, acts) -> torch.Tensor:
    """[b, p, experts, d]: each expert's write (through a post-norm's gain, if any)."""
    writes = model.blocks[L].mlp.expert_writes(post)
    gain = write_gain(model, acts, L, "mlp")
    return writes if gain is None else writes * gain[:, :, None, :]


def upstream_writes(model: HookedTransformer, tokens: torch.Tensor,
                    mask: torch.Tensor | None = None, *, with_logits: bool = False,
                    positions: torch.Tensor | None = None):
    """Every upstream node's write on `tokens` (run with attention mask `mask`). [b, p, U, d]
    With `with_logits`, (writes, logits) of that one pass (logits at `positions` only, if given:
    [b, 1, vocab])."""
    with torch.no_grad():
        cache = model.run_with_cache(tokens.to(model.device), write_sites(model),
                                     attention_mask=None if mask is None else mask.to(model.device),
                                     positions=positions)
    writes = writes_from(model, cache.acts)
    return (writes, cache.logits) if with_logits else writes


def mean_writes(model: HookedTransformer, batches: Iterable[Batch]) -> torch.Tensor:
    """The mean baseline: each upstream node's write averaged over prompts, position by position
    (positions counted over real tokens, so padding on either side lines up); positions only
    some prompts reach average over those prompts. [positions, U, d_model]"""
    total = count = None
    for batch in batches:
        batch = batch.to(model.device)
        w = upstream_writes(model, batch.tokens, batch.mask)  # [b, p, U, d]
        pos = model.positions(batch.mask)
        n = int(pos.max()) + 1
        if total is None:
            total = w.new_zeros(n, *w.shape[2:])
            count = w.new_zeros(n)
        elif n > total.shape[0]:
            total = torch.cat([total, total.new_zeros(n - total.shape[0], *total.shape[1:])])
            count = torch.cat([count, count.new_zeros(n - count.shape[0])])
        real = batch.mask.bool()
        total.index_add_(0, pos[real], w[real])
        count.index_add_(0, pos[real], torch.ones_like(pos[real], dtype=count.dtype))
    if total is None:
        raise ActwhError("the mean baseline needs at least one prompt")
    return total / count.clamp(min=1)[:, None, None]


def baseline_writes(model: HookedTransformer, batch: Batch, baseline) -> torch.Tensor:
    """Baseline writes for `batch` [b, p, U, d]: `baseline` is "zero", corrupted token ids
    [b, p], per-position means [positions, U, d] from `mean_writes`, or writes [b, p, U, d]."""
    cfg = model.cfg
    U = len(upstream_nodes(model))
    b, p = batch.tokens.shape
    dtype = model.W_E.dtype
    if isinstance(baseline, str):
        if baseline != "zero":
            raise ActwhError(f"unknown baseline {baseline!r}; give 'zero', corrupted token ids "
                             "or baseline writes")
        return torch.zeros(b, p, U, cfg.d_model, dtype=dtype, device=model.device)
    if not isinstance(baseline, torch.Tensor):
        raise ActwhError("a baseline is 'zero', a tensor of corrupted token ids or of writes")
    if not baseline.is_floating_point():
        if baseline.shape != batch.tokens.shape:
            raise ActwhError("corrupted prompts must have as many tokens as their clean prompts")
        return upstream_writes(model, baseline, batch.mask)
    baseline = baseline.to(model.device, dtype)
    if baseline.dim() == 3:  # per-position means
        if baseline.shape[1:] != (U, cfg.d_model):
            raise ActwhError(f"mean writes must be [positions, {U}, {cfg.d_model}]")
        pos = model.positions(batch.mask.to(model.device)).clamp(max=baseline.shape[0] - 1)
        return baseline[pos]
    if baseline.shape != (b, p, U, cfg.d_model):
        raise ActwhError(f"baseline writes must be [{b}, {p}, {U}, {cfg.d_model}]")
    return baseline


class LayerWrites:
    """Baseline writes kept per layer instead of per node: the embeddings' sum [b, p, d], each
    layer's heads' z [b, p, heads, d_head] and MLP output [b, p, d]. A head's write z_h W_O_h is
    formed only for the heads a sparse patched pass runs; the [b, p, nodes, d] tensor of
    `baseline_writes` is never built (for an 8B Llama, 0.5 MB a token in bfloat16 instead of
    8.7 MB). For models the sparse pass applies to (no post norms, no experts)."""

    def __init__(self, model: HookedTransformer, embed, z: list, mlp: list):
        self.model, self.embed, self.z, self.mlp = model, embed, z, mlp

    @classmethod
    def of_run(cls, model: HookedTransformer, tokens: torch.Tensor, mask: torch.Tensor,
               positions: torch.Tensor | None = None):
        """(the writes of a run on `tokens` with attention mask `mask`, its logits (at
        `positions` only, if given))."""
        L = model.cfg.n_layers
        sites = _embed_sites(model) + [f"blocks.{i}.attn.hook_z" for i in range(L)] + \
            [f"blocks.{i}.hook_mlp_out" for i in range(L)]
        with torch.no_grad():
            c = model.run_with_cache(tokens.to(model.device), sites,
                                     attention_mask=mask.to(model.device), positions=positions)
        embed = sum(c.acts[n] for n in _embed_sites(model))
        return cls(model, embed, [c.acts[f"blocks.{i}.attn.hook_z"] for i in range(L)],
                   [c.acts[f"blocks.{i}.hook_mlp_out"] for i in range(L)]), c.logits

    @classmethod
    def zeros(cls, model: HookedTransformer, b: int, p: int):
        cfg, dev, dt = model.cfg, model.device, model.W_E.dtype
        z = torch.zeros(b, p, cfg.n_heads, cfg.d_head, dtype=dt, device=dev)
        d = torch.zeros(b, p, cfg.d_model, dtype=dt, device=dev)
        return cls(model, d, [z] * cfg.n_layers, [d] * cfg.n_layers)

    @property
    def shape(self):
        return (*self.embed.shape[:2], len(upstream_nodes(self.model)), self.embed.shape[2])

    def heads(self, L: int, idx: torch.Tensor) -> torch.Tensor:
        """[b, p, len(idx), d]: the writes of layer L's heads idx."""
        W_O = self.model.blocks[L].attn.W_O
        return torch.einsum("bphe,hed->bphd", self.z[L][:, :, idx], W_O[idx])

    def layer(self, L: int) -> torch.Tensor:
        """[b, p, d]: Σ of layer L's heads' writes, as the model sums them."""
        return self.z[L].flatten(2) @ self.model.blocks[L].attn.W_O.flatten(0, 1)


class _NodeWrites:
    """`LayerWrites`' reading of a [b, p, nodes, d] tensor of baseline writes."""

    def __init__(self, model: HookedTransformer, base: torch.Tensor):
        cfg = model.cfg
        self.base, self.H, self.per = base, cfg.n_heads, cfg.n_heads + 1
        self.embed = base[:, :, 0]
        self.mlp = [base[:, :, 1 + L * self.per + cfg.n_heads] for L in range(cfg.n_layers)]

    def heads(self, L: int, idx: torch.Tensor) -> torch.Tensor:
        return self.base[:, :, 1 + L * self.per + idx]

    def layer(self, L: int) -> torch.Tensor:
        u = 1 + L * self.per
        return self.base[:, :, u:u + self.H].sum(2)


def edge_mask(model: HookedTransformer, edges: Iterable[tuple[Node, Node]]) -> torch.Tensor:
    """A keep mask [U, V] from (upstream, downstream) node pairs (see `upstream_nodes` and
    `downstream_nodes`; a downstream attention node names its input q, k or v)."""
    up = {n: i for i, n in enumerate(upstream_nodes(model))}
    down = {n: i for i, n in enumerate(downstream_nodes(model))}
    keep = torch.zeros(len(up), len(down), dtype=torch.bool)
    for u, v in edges:
        if u not in up:
            raise ActwhError(f"{u} is not an upstream node of this model")
        if v not in down:
            raise ActwhError(f"{v} is not a downstream node of this model")
        keep[up[u], down[v]] = True
    return keep


def allowed_edges(model: HookedTransformer) -> torch.Tensor:
    """[U, V] bool: u lies upstream of v (the component graph's edges)."""
    cfg = model.cfg
    per_layer = cfg.n_heads + cfg.n_mlp_nodes
    cols = []
    for L in range(cfg.n_layers):
        cols += [1 + L * per_layer] * (cfg.n_heads + 2 * cfg.n_kv_heads)
        cols.append(1 + L * per_layer + (0 if cfg.parallel else cfg.n_heads))
    cols.append(1 + cfg.n_layers * per_layer)
    n_up = torch.tensor(cols)
    return torch.arange(1 + cfg.n_layers * per_layer)[:, None] < n_up[None, :]


def _normalized(norm, x: torch.Tensor) -> torch.Tensor:
    """A `Norm`'s normalized value (before its weight and bias) of x, without its hooks."""
    if norm.kind == "none":  # OLMo 2's absent pre-norms
        return x
    dtype = x.dtype
    x = x.to(torch.promote_types(dtype, torch.float32))
    if not norm.rms:
        x = x - x.mean(-1, keepdim=True)
    return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps)).to(dtype)


def _apply_norm(norm, x: torch.Tensor) -> torch.Tensor:
    n = _normalized(norm, x)
    return norm.w * n if norm.rms else n * norm.w + norm.b


def run_patched(model: HookedTransformer, batch: Batch, keep_edges, baseline="zero", *,
                base: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                sparse: bool | None = None) -> torch.Tensor:
    """Logits [b, p, vocab] of one forward pass with only `keep_edges` carrying clean writes.

    keep_edges: a bool mask [U, V] (every prompt) or [b, U, V] (one circuit per prompt) over
    (`upstream_nodes`, `downstream_nodes`), or an iterable of (upstream, downstream) Node pairs;
    pairs that are not edges (u not upstream of v) are ignored. baseline: see `baseline_writes`;
    `base` passes precomputed baseline writes [b, p, U, d] instead (several circuits, one
    baseline run). positions [b]: only those positions' logits [b, 1, vocab].

    sparse (None: wherever it applies): compute only the circuit's nodes. A node none of whose
    out-edges is kept writes its baseline value wherever it is read, so it need not run: its
    baseline write stands in for it in the stream, heads and MLPs outside every prompt's circuit
    are skipped (an attention layer runs only its needed heads) and so are their inputs. It
    applies to models without post-sublayer norms (there a head's write depends on every head of
    its layer through the norm's scale), mixtures of experts, spliced autoencoders or hooks
    attached by the caller; elsewhere every node runs, through hooks on the model's own forward.
    """
    batch = batch.to(model.device)
    cfg = model.cfg
    if not isinstance(keep_edges, torch.Tensor):
        keep_edges = edge_mask(model, keep_edges)
    U, V = len(upstream_nodes(model)), len(downstream_nodes(model))
    b = batch.tokens.shape[0]
    if keep_edges.shape not in ((U, V), (b, U, V)):
        raise ActwhError(f"keep_edges must be [{U}, {V}] or [{b}, {U}, {V}], "
                         f"not {list(keep_edges.shape)}")
    keep = keep_edges.to(dtype=torch.bool)  # where it is (sparse passes read it on the host)
    if keep.dim() == 2:
        keep = keep[None].expand(b, U, V)
    if base is None:
        base = baseline_writes(model, batch, baseline)
    elif isinstance(base, LayerWrites):
        if sparse is False or not sparse_applies(model):
            raise ActwhError("baseline writes kept per layer are for sparse patching; give "
                             "baseline_writes(...) for this model")
        if tuple(base.shape) != (b, batch.tokens.shape[1], U, cfg.d_model):
            raise ActwhError("the per-layer baseline writes are of another batch")
    else:
        want = (b, batch.tokens.shape[1], U, cfg.d_model)
        if tuple(base.shape) != want or base.dtype != model.W_E.dtype:
            raise ActwhError(f"base must be the baseline writes {list(want)} in the model's "
                             f"dtype {model.W_E.dtype}, not {list(base.shape)} {base.dtype}")
        base = base.to(model.device)
    if sparse is None:
        sparse = sparse_applies(model)
    elif sparse and not sparse_applies(model):
        raise ActwhError("sparse patching does not apply to this model (post-sublayer norms, "
                         "experts, spliced autoencoders or hooks attached)")
    if sparse:
        with torch.no_grad():
            return _run_sparse(model, batch, keep, base, positions)
    keep = keep.to(model.device)
    dtype = model.W_E.dtype
    # patch[b, u, v] = 1 where the edge u → v carries the baseline write
    patch = (allowed_edges(model).to(model.device)[None] & ~keep).to(dtype)
    live: dict[str, torch.Tensor] = {}
    diff = torch.zeros_like(base)  # this run's writes minus the baseline's, filled in as they come
    done = [0]  # how many upstream nodes have written so far

    def delta(cols: slice) -> torch.Tensor | None:
        """Σ_u patched (out_u − base_u) into the downstream nodes `cols`: [b, p, n, d] or None."""
        m = patch[:, : done[0], cols]
        if not bool(m.any()):
            return None
        return torch.einsum("bpud,bun->bpnd", diff[:, :, : done[0]], m)

    allowed = allowed_edges(model).to(model.device)
    kept = keep & allowed[None]
    # Without attention output biases an input with no kept in-edge is Σ of baseline writes
    # alone (zero under the zero baseline): taken as that sum, not as the stream minus a sum
    # that cancels, whose rounding an RMSNorm would magnify.
    no_bias = all("b_O" in blk.attn.absent_biases for blk in model.blocks)

    def patched_in(resid: torch.Tensor, cols: slice) -> torch.Tensor | None:
        """The inputs of downstream nodes `cols` [b, p, n, d], or None where nothing is patched."""
        d = delta(cols)
        if d is None:
            return None
        x = resid[:, :, None] - d
        if no_bias:
            empty = ~kept[:, :, cols].any(1)  # [b, n]
            if bool(empty.any()):
                low = base[:, :, allowed[:, cols.start]].sum(2)
                x = torch.where(empty[:, None, :, None], low[:, :, None], x)
        return x

    def wrote(out: torch.Tensor, n: int) -> None:  # out: [b, p, n, d], the next n nodes' writes
        i = done[0]
        diff[:, :, i:i + n] = out - base[:, :, i:i + n]
        done[0] = i + n

    def save(t, name):
        live[name] = t

    def embed_done(t, name):
        live[name] = t
        if all(n in live for n in _embed_sites(model)):
            wrote(sum(live[n] for n in _embed_sites(model))[:, :, None], 1)

    hooks = [(n, embed_done) for n in _embed_sites(model)]
    col = 0
    for L, block in enumerate(model.blocks):
        p = f"blocks.{L}."
        attn = block.attn
        hooks.append((p + "hook_resid_pre", save))
        for site, n, W, bias in (("q", cfg.n_heads, attn.W_Q, attn.b_Q),
                                 ("k", cfg.n_kv_heads, attn.W_K, attn.b_K),
                                 ("v", cfg.n_kv_heads, attn.W_V, attn.b_V)):
            def qkv(t, name, cols=slice(col, col + n), W=W, bias=bias, ln=block.ln1, p=p):
                x = patched_in(live[p + "hook_resid_pre"], cols)  # [b, p, heads, d]
                if x is None:
                    return None
                return torch.einsum("bphd,hde->bphe", _apply_norm(ln, x), W) + bias
            hooks.append((p + f"attn.hook_{site}", qkv))
            col += n

        def heads_done(z, name, attn=attn):
            wrote(torch.einsum("bphe,hed->bphd", z, attn.W_O), cfg.n_heads)

        def heads_post(scale, name, attn=attn, L=L, p=p):  # post norms: writes pass its gain
            gain = write_gain(model, {name: scale}, L, "attn")[:, :, None, :]
            wrote(torch.einsum("bphe,hed->bphd", live[p + "attn.hook_z"], attn.W_O) * gain,
                  cfg.n_heads)
        if cfg.post_norm:  # the write needs the post-norm's scale, which comes after hook_z
            hooks += [(p + "attn.hook_z", save), (p + "ln1_post.hook_scale", heads_post)]
        else:
            hooks.append((p + "attn.hook_z", heads_done))
        hooks.append((p + "hook_resid_mid", save))

        def mlp_in(t, name, cols=slice(col, col + 1), ln=block.ln2, p=p):
            x = patched_in(live[p + ("hook_resid_pre" if cfg.parallel else "hook_resid_mid")], cols)
            return None if x is None else _normalized(ln, x[:, :, 0])
        hooks.append((p + "ln2.hook_normalized", mlp_in))
        col += 1

        def mlp_done(t, name, L=L, p=p):
            if cfg.n_experts:
                wrote(_expert_writes(model, L, live[p + "mlp.hook_post"], live), cfg.n_mlp_nodes)
            else:
                wrote(t[:, :, None], 1)
        if cfg.n_experts:
            hooks += [(p + "mlp.hook_post", save)] + [(n, save) for n in post_norm_sites(model, L)]
        hooks.append((p + "hook_mlp_out", mlp_done))
    last = f"blocks.{cfg.n_layers - 1}.hook_resid_post"
    hooks.append((last, save))

    def target_in(t, name):
        x = patched_in(live[last], slice(col, col + 1))
        return None if x is None else _normalized(model.ln_final, x[:, :, 0])
    hooks.append(("ln_final.hook_normalized", target_in))
    with torch.no_grad(), model.hooks(hooks):  # target_in patches the whole final stream
        logits = model(batch.tokens, batch.mask)
    if positions is None:
        return logits
    return logits[torch.arange(b, device=logits.device), positions.to(logits.device)][:, None]


def sparse_applies(model: HookedTransformer) -> bool:
    """Whether `run_patched` can skip the nodes outside a circuit (see there)."""
    from actwh.compute.sae import spliced

    cfg = model.cfg
    hooked = any(hp._forward_hooks or hp._forward_pre_hooks for hp in model.hook_points.values())
    mixed = cfg.qk_norm == "all"  # q/k norms across every head: a layer's heads run together
    return not (cfg.post_norm or cfg.n_experts or mixed or spliced(model) or hooked)


def _run_sparse(model: HookedTransformer, batch: Batch, keep: torch.Tensor, base: torch.Tensor,
                positions: torch.Tensor | None) -> torch.Tensor:
    """`run_patched` computing only the nodes with a kept out-edge (in some prompt).

    Two streams run side by side: this run's, carrying out_u for each upstream node u that ran
    and base_u for the others (plus the attention output biases, as in the model's own stream),
    and the baseline's, Σ base_u plus the biases. v's input is either this run's stream minus
    Σ (out_u − base_u) over the nodes that ran and whose edge into v is patched, or the
    baseline's stream plus Σ (out_u − base_u) over v's kept in-edges, whichever sums fewer terms
    (the same value: Σ_kept out_u + Σ_patched base_u + biases, as in the hooked pass). An input
    (of one prompt) nothing that ran is patched into is this run's stream itself, so with every
    edge kept the pass is the model's own forward; one with no kept in-edge is the baseline's
    stream itself (exactly zero under the zero baseline without biases, where a sum that cancels
    would leave rounding for an RMSNorm to magnify). Which nodes run and which sums are needed is
    worked out on the host from the masks (given on the host, no device synchronisation)."""
    cfg = model.cfg
    dev = model.device
    H, KV = cfg.n_heads, cfg.n_kv_heads
    group = H // KV
    bw = base if isinstance(base, LayerWrites) else _NodeWrites(model, base)
    dtype = bw.embed.dtype
    allowed = allowed_edges(model)
    keep_h = keep.cpu() & allowed[None]  # [b, U, V] on the host: every decision is made here
    patch_h = allowed[None] & ~keep_h
    needed = keep_h.any(dim=(0, 2))  # [U]: some prompt reads this node's own write
    keep_d = keep_h.to(dev)
    patch_d = patch_h.to(dev)
    # buf[:, :, j] = out − base of the j-th node that ran (the nodes that run are the needed ones)
    buf = bw.embed.new_empty(*bw.embed.shape[:2], int(needed.sum()), bw.embed.shape[2])
    ran: list[int] = []

    def inputs(resid, low, vs: torch.Tensor):
        """The inputs of downstream columns `vs` (host LongTensor): [b, p, d] when they all read
        one stream, else [b, p, len(vs), d]."""
        if not ran:
            return resid
        r = torch.tensor(ran)
        patched, kept = patch_h[:, r][:, :, vs], keep_h[:, r][:, :, vs]  # [b, ran, n]
        n_patch = int(patched.sum())
        if n_patch == 0:
            return resid
        n_keep = int(kept.sum())
        if n_keep == 0:
            return low
        mask, start = (patch_d, resid) if n_patch <= n_keep else (keep_d, low)
        w = mask[:, r.to(dev)][:, :, vs.to(dev)].to(dtype)  # [b, ran, n]
        terms = torch.matmul(w.transpose(1, 2)[:, None], buf[:, :, :len(ran)])  # [b, p, n, d]
        x = start[:, :, None] - terms if mask is patch_d else start[:, :, None] + terms
        # per prompt and input, a stream as it is where nothing or everything is patched
        for exact, stream in ((~kept.any(1), low), (~patched.any(1), resid)):
            if bool(exact.any()):
                x = torch.where(exact.to(dev)[:, None, :, None], stream[:, :, None], x)
        return x

    def record(us: torch.Tensor, out: torch.Tensor, was: torch.Tensor) -> None:
        """Nodes `us` ran: their writes `out` and baseline writes `was`, [b, p, n, d]."""
        j = len(ran)
        buf[:, :, j:j + len(us)] = out - was
        ran.extend(us.tolist())

    x, masks, rot = model.embed(batch.tokens, batch.mask)
    low = bw.embed
    resid = low
    if bool(needed[0]):
        record(torch.tensor([0]), x[:, :, None], bw.embed[:, :, None])
        resid = x
    u, col = 1, 0
    for L, block in enumerate(model.blocks):
        attn = block.attn
        cos, sin = rot.get("sliding" if attn.sliding else "full", (None, None))
        heads = needed[u:u + H].nonzero()[:, 0]
        layer_base = bw.layer(L)
        if len(heads):
            kvs = torch.unique(heads // group)

            def project(vs, sel, W, b):
                x_in = inputs(resid, low, vs)
                sel = sel.to(dev)
                if x_in.dim() == 3:
                    return torch.einsum("bpd,hde->bphe", block.ln1(x_in), W[sel]) + b[sel]
                return torch.einsum("bphd,hde->bphe", _apply_norm(block.ln1, x_in), W[sel]) + b[sel]
            q = project(col + heads, heads, attn.W_Q, attn.b_Q)
            k = project(col + H + kvs, kvs, attn.W_K, attn.b_K)
            v = project(col + H + KV + kvs, kvs, attn.W_V, attn.b_V)
            everyone = len(heads) == H
            kv_of = None if everyone else torch.searchsorted(kvs, heads // group).to(dev)
            z = attn.attend(q, k, v, masks["sliding" if attn.sliding else "full"], cos, sin,
                            kv_of=kv_of)
            writes = torch.einsum("bphe,hed->bphd", z, attn.W_O[heads.to(dev)])
            was = bw.heads(L, heads.to(dev))
            if everyone:  # as the model adds them, so an unpatched run is the clean one
                attn_out = z.flatten(2) @ attn.W_O.flatten(0, 1)
            else:  # the heads that did not run write their baseline
                attn_out = writes.sum(2) + (layer_base - was.sum(2))
            record(u + heads, writes, was)
        else:
            attn_out = layer_base
        low_out = layer_base
        if "b_O" not in attn.absent_biases:
            attn_out, low_out = attn_out + attn.b_O, low_out + attn.b_O
        col += H + 2 * KV
        u += H
        mid, low_mid = resid + attn_out, low + low_out
        if bool(needed[u]):
            x_in = inputs(resid, low, torch.tensor([col])) if cfg.parallel else \
                inputs(mid, low_mid, torch.tensor([col]))
            mlp_out = block.mlp(block.ln2(x_in if x_in.dim() == 3 else x_in[:, :, 0]))
            record(torch.tensor([u]), mlp_out[:, :, None], bw.mlp[L][:, :, None])
        else:
            mlp_out = bw.mlp[L]
        resid, low = mid + mlp_out, low_mid + bw.mlp[L]
        col += 1
        u += 1
    x_in = inputs(resid, low, torch.tensor([col]))
    return model.unembed(x_in if x_in.dim() == 3 else x_in[:, :, 0], positions)


# --- node-level patching: activation patching of node writes ----------------------------------

def node_sites(model: HookedTransformer, node_type: str, layer: int) -> list[tuple[str, bool]]:
    """The hook sites holding a node type's activations in `layer`, each with whether its
    third axis indexes the nodes (heads, neurons, latents) or the site is the whole node."""
    if node_type == "attn_head":
        return [(f"blocks.{layer}.attn.hook_z", True)]
    if node_type == "mlp_neuron":
        return [(f"blocks.{layer}.mlp.hook_post", True)]
    if node_type == "mlp":
        return [(f"blocks.{layer}.hook_mlp_out", False)]
    if node_type == "embed":
        return [(n, False) for n in _embed_sites(model)]
    if node_type in ("sae_latent", "sae_error"):
        from actwh.compute.sae import at

        sae = at(model, layer)
        if sae is None:
            raise ActwhError(f"no autoencoder is spliced in layer {layer}")
        if node_type == "sae_latent":
            return [(f"{sae.info.prefix}.hook_latents", True)]
        return [(f"{sae.info.prefix}.hook_error", False)]
    raise ActwhError(f"cannot patch {node_type} nodes; patchable: attn_head, mlp_neuron, mlp, "
                     "embed, sae_latent, sae_error")


def node_masks(model: HookedTransformer, batch: Batch, nodes) -> dict[str, torch.Tensor]:
    """Bool masks over each site's activations [b, p, (units)] from per-prompt node lists:
    nodes[i] = [(layer, node_type, index, position or None for every position), ...]."""
    b, p = batch.tokens.shape
    masks: dict[str, torch.Tensor] = {}
    for i, items in enumerate(nodes):
        for layer, node_type, index, pos in items:
            for site, units in node_sites(model, node_type, layer):
                if site not in masks:
                    model.hook_point(site)  # an unknown site raises
                    masks[site] = torch.zeros(b, p, *([site_units(model, site)] if units else []),
                                              dtype=torch.bool, device=model.device)
                m = masks[site][i]
                where = slice(None) if pos is None else pos
                if units:
                    if not 0 <= index < m.shape[-1]:
                        raise ActwhError(f"{node_type} {index} is out of range in layer {layer}")
                    m[where, index] = True
                else:
                    m[where] = True
    return masks


def site_units(model: HookedTransformer, site: str) -> int:
    cfg = model.cfg
    if site.endswith("attn.hook_z"):
        return cfg.n_heads
    if site.endswith("mlp.hook_post"):
        return cfg.d_mlp
    from actwh.compute.sae import spliced

    for sae in spliced(model):
        if site == f"{sae.info.prefix}.hook_latents":
            return sae.info.d_sae
    raise ActwhError(f"{site} has no node axis")


def site_baselines(model: HookedTransformer, batch: Batch, sites, baseline) -> dict[str, torch.Tensor]:
    """Baseline activations of `sites` for `batch`: "zero", corrupted token ids [b, p] (run with
    the clean attention mask), or per-position means {site: [positions, ...]} (`mean_acts`)."""
    sites = list(sites)
    with torch.no_grad():
        clean = model.run_with_cache(batch.tokens, sites, attention_mask=batch.mask).acts
    if isinstance(baseline, str):
        if baseline != "zero":
            raise ActwhError(f"unknown baseline {baseline!r}")
        return {s: torch.zeros_like(clean[s]) for s in sites}
    if isinstance(baseline, dict):
        pos = model.positions(batch.mask)
        return {s: baseline[s].to(clean[s].dtype)[pos.clamp(max=baseline[s].shape[0] - 1)]
                for s in sites}
    if baseline.shape != batch.tokens.shape:
        raise ActwhError("corrupted prompts must have as many tokens as their clean prompts")
    with torch.no_grad():
        return model.run_with_cache(baseline.to(model.device), sites, attention_mask=batch.mask).acts


def mean_acts(model: HookedTransformer, batches: Iterable[Batch], sites) -> dict[str, torch.Tensor]:
    """Per-position means over prompts of each site's activations (positions over real tokens,
    as `mean_writes`). {site: [positions, ...]}"""
    sites = list(sites)
    total: dict[str, torch.Tensor] = {}
    count = None
    for batch in batches:
        batch = batch.to(model.device)
        with torch.no_grad():
            acts = model.run_with_cache(batch.tokens, sites, attention_mask=batch.mask).acts
        pos = model.positions(batch.mask)
        n = int(pos.max()) + 1
        real = batch.mask.bool()
        grow = lambda t, n: t if t.shape[0] >= n else torch.cat(  # noqa: E731
            [t, t.new_zeros(n - t.shape[0], *t.shape[1:])])
        count = grow(torch.zeros(n, device=model.device) if count is None else count, n)
        count.index_add_(0, pos[real], torch.ones(int(real.sum()), device=model.device))
        for s in sites:
            a = acts[s]
            t = total.get(s)
            t = grow(a.new_zeros(n, *a.shape[2:]) if t is None else t, n)
            total[s] = t.index_add_(0, pos[real], a[real])
    if count is None:
        raise ActwhError("the mean baseline needs at least one prompt")
    return {s: t / count.clamp(min=1).view(-1, *[1] * (t.dim() - 1)).to(t.dtype)
            for s, t in total.items()}


def run_nodes_patched(model: HookedTransformer, batch: Batch, masks: dict[str, torch.Tensor],
                      base: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits with the masked activations of each site replaced by the baseline's (activation
    patching of node writes: a head's z, a neuron's post-activation, a latent, an MLP's output,
    the embeddings), everything downstream recomputed. masks: `node_masks`; base:
    `site_baselines` of at least the masked sites."""
    batch = batch.to(model.device)

    def patch(t, name):
        m = masks[name]
        while m.dim() < t.dim():
            m = m.unsqueeze(-1)
        return torch.where(m, base[name].to(t.dtype), t)
    with torch.no_grad(), model.hooks([(s, patch) for s in masks]):
        return model(batch.tokens, batch.mask)
