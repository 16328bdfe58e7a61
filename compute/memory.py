"""Memory plan for component-graph edges: predict the peak, pick chunks that fit a budget.

`predict` sums the tensors the edge computation (compute/edges.py) holds at its largest moment,
from the model's shape, the batch, the sequence length, the dtype and the edge options; `plan`
picks the largest `EdgeChunks` (prompts per pass, then positions, then downstream groups per
GEMM; blocks recomputed in the backward only when nothing fits without) whose predicted peak fits
a budget, or refuses with one line when even one prompt, one position and one group with
recomputed blocks do not fit.

What is counted: bytes allocated on the device from the moment `component_edges` starts
(weights and anything the caller already holds are not), i.e. what
`torch.cuda.max_memory_allocated() - torch.cuda.memory_allocated()` (before the call) measures on
a GPU, and what torch.profiler's memory events sum to on a CPU (tests/test_memory.py). The
forward and backward passes are modelled from what autograd keeps for the backward of
compute/model.py's layers (attention probabilities, the activations each op saves) and the
cached sites; the edge phase from the buffers compute/edges.py allocates.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

from actwh.compute.edges import EdgeChunks
from actwh.errors import ActwhError

UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
         "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_memory(text) -> int:
    """Bytes from `40GB`, `512MB`, `1.5GiB` or a whole number of bytes (decimal units: GB is
    10^9 bytes; GiB is 2^30)."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
        if not m or m.group(2).upper() not in UNITS:
            raise ActwhError(f"--max-memory {text!r}: give a size such as 40GB, 512MB or 1.5GiB")
        value = int(float(m.group(1)) * UNITS[m.group(2).upper()])
    if value <= 0:
        raise ActwhError(f"--max-memory {text!r}: must be more than 0 bytes")
    return value


def fmt(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def device_free(device) -> int:
    """Bytes the device has free now: on CUDA, the driver's free count plus what torch's
    caching allocator holds reserved but unallocated (ours to reuse, and not free to the
    driver); else the host's available memory."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return torch.cuda.mem_get_info(device)[0] + max(cached, 0)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def in_use(model) -> int:
    """Bytes the caller already holds on the model's device (CUDA's count; on a CPU, the weights)."""
    import torch

    if model.device.type == "cuda":
        return torch.cuda.memory_allocated(model.device)
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


@dataclass(frozen=True)
class Prediction:
    peak: int  # bytes
    phases: dict  # phase -> bytes (the peak is their max)


def _bytes(dtype) -> int:
    import torch

    return torch.empty((), dtype=dtype).element_size()


def predict(cfg, batch: int, seq: int, dtype, *, corrupt: bool = False, ig_steps: int = 0,
            positions: str = "summed", chunks: EdgeChunks | None = None) -> Prediction:
    """Predicted peak bytes of `component_edges` on `batch` prompts padded to `seq` tokens."""
    chunks = chunks or EdgeChunks()
    s = _bytes(dtype)
    f = max(s, 4)  # norm statistics, softmax and float32 accumulations
    a = max(s, 4)  # edge values, bias and in·grad accumulate in at least float32
    r = min(chunks.rows or batch, batch)
    n = seq
    T = r * n
    L, d, H, kv, dh = cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.d_head
    U = 1 + L * (H + cfg.n_mlp_nodes)
    sizes = [x for _ in range(L) for x in (H, kv, kv, 1)] + [1]
    V = sum(sizes)
    pc = min(chunks.positions or n, n)
    gc = chunks.groups or len(sizes)
    Vg = max(sum(sizes[i:i + gc]) for i in range(0, len(sizes), gc))
    dm = cfg.d_neurons
    pos_embed = 0 if cfg.rotary_dim else 1

    # what the cache keeps (forward sites, then gradients), per pass
    fwd_sites = T * s * (d * (1 + pos_embed) + d + L * (H * dh + 5 * d)) + T * f * L * 2 * (1 + cfg.post_norm)
    if cfg.n_experts:
        fwd_sites += T * s * L * dm
    grad_sites = T * s * (L * ((H + 2 * kv) * dh + d) + d)
    # what autograd keeps for the backward beyond the cached sites (fitted on CPU to within 10%
    # over GPT-2- and Llama-shaped models, tests/test_memory.py): q, k, v (and their rotated or
    # expanded copies), the attention probabilities (float32 softmax output, plus its cast
    # below float32), the MLP's inputs to its activation (and gate · up), the norms' float32
    # inputs, einsum's copies of the q/k/v weights; then the logits and, in the backward, two
    # of a layer's score-sized gradients.
    att = r * H * n * n
    qkv_keep = T * s * (H + 2 * kv) * dh * (2 if kv < H or cfg.rotary_dim else 1)
    mlp_keep = T * dm * s * (3 if cfg.gated_mlp else 1)
    norm_keep = (4 if cfg.norm == "layernorm" else 2 if s < f else 0) * T * d * f * cfg.pre_norm
    logits = T * cfg.d_vocab * (s + 2 * f)  # the logits, their gradient and a float32 temporary
    # einsum's contiguous copies of W_Q, W_K, W_V, kept for the backward of their products
    weight_copies = d * (H + 2 * kv) * dh * s
    layer_keep = qkv_keep + att * (f + (s if s < f else 0)) + mlp_keep + norm_keep + weight_copies
    # recomputed blocks keep one layer's share at a time, and the rerun's copies of the sites
    # whose gradients are taken (the originals stay the backward's inputs)
    fwd_bwd = (fwd_sites + grad_sites + logits
               + (layer_keep + grad_sites + 3 * att * f // 2 if chunks.recompute else L * layer_keep + 2 * att * f))
    phases = {"forward_backward": fwd_bwd}
    base = fwd_sites + grad_sites
    if corrupt:
        phases["corrupt_forward"] = base + fwd_sites + 3 * att * f + 2 * logits  # no autograd: one layer's scores
        base += fwd_sites
    out = r * (n if positions == "each" else 1) * U * V * a + 2 * r * n * V * a
    done = (batch - r) * (n if positions == "each" else 1) * U * V * a if r < batch else 0
    ups = r * U * pc * d * s
    if ig_steps:
        step_sites = T * s * L * 2 * d + T * f * L * 2  # a step caches its norms' sites only
        step = step_sites + grad_sites
        # from the second step on, each step's forward + backward runs beside the results
        # and, with one chunk of positions, the cached upstream writes
        later = out + (ups if pc >= n else 0) if ig_steps > 1 else 0
        phases["forward_backward"] = 2 * fwd_sites + fwd_bwd - fwd_sites + step_sites + later
        base = 2 * fwd_sites + step
    if done:  # the earlier prompts' results are held through every phase of the last pass
        phases = {k: v + done for k, v in phases.items()}
    group = r * pc * H * d * (s + (f if s < f else 0) + f)
    # the product, and its float32 copy when it is added to the float32 values below float32
    gemm = (r * pc * U * Vg if positions == "each" else r * U * Vg) * (s + (a if s < a else 0))
    heads = r * max(H, cfg.n_mlp_nodes) * pc * d * s
    phases["edges"] = base + done + out + ups + max(heads, r * Vg * pc * d * s + group + gemm)
    if r < batch:  # the parts are concatenated at the end
        total_out = batch * (n if positions == "each" else 1) * U * V * a + 2 * batch * n * V * a
        phases["concatenate"] = 2 * total_out
    return Prediction(int(max(phases.values())), {k: int(v) for k, v in phases.items()})


def _halvings(n: int) -> list[int]:
    out = [n]
    while out[-1] > 1:
        out.append(math.ceil(out[-1] / 2))
    return out


SMALLEST = EdgeChunks(rows=1, positions=1, groups=1, recompute=True)
MARGIN = 1.15  # the prediction's stated accuracy: a plan's predicted peak × MARGIN fits the budget


def plan(cfg, batch: int, seq: int, dtype, budget: int, *, corrupt: bool = False, ig_steps: int = 0,
         positions: str = "summed") -> tuple[EdgeChunks, Prediction]:
    """The largest chunks (prompts per pass first, then positions, then groups per GEMM) whose
    predicted peak, times MARGIN, fits `budget` bytes; one pass when everything fits."""
    n_groups = 4 * cfg.n_layers + 1
    kw = dict(corrupt=corrupt, ig_steps=ig_steps, positions=positions)
    for recompute in (False, True):  # rerunning blocks costs a forward pass: only when needed
        for rows in _halvings(batch):
            for pc in _halvings(seq):
                for gc in _halvings(n_groups):
                    chunks = EdgeChunks(rows=None if rows == batch else rows,
                                        positions=None if pc == seq else pc,
                                        groups=None if gc == n_groups else gc, recompute=recompute)
                    got = predict(cfg, batch, seq, dtype, chunks=chunks, **kw)
                    if got.peak * MARGIN <= budget:
                        return chunks, got
    least = predict(cfg, batch, seq, dtype, chunks=SMALLEST, **kw)
    raise ActwhError(f"{fmt(budget)} is too small for the edges of {seq}-token prompts: "
                     f"even one prompt, one position and one downstream group need {fmt(least.peak * MARGIN)}")


def _edge_kw(edges) -> dict:
    return dict(corrupt=edges.baseline == "corrupt", ig_steps=edges.ig_steps, positions=edges.positions)


def populate_plan(model, max_memory, batch_size: int, longest: int, edges) -> tuple[int, int]:
    """For a populate with component edges: (the device budget in bytes, prompts per batch).

    The budget is `max_memory` (parse_memory) or, when None, what the model's device holds now
    plus what it has free. Prompts per batch: `batch_size`, or fewer when the plan for the
    longest prompt needs fewer prompts per pass. Raises ActwhError (one line, before anything
    is written) when even one prompt, one position and one group do not fit."""
    total = in_use(model) + device_free(model.device) if max_memory is None else parse_memory(max_memory)
    given = "the device's free memory" if max_memory is None else f"--max-memory {max_memory}"
    left = total - in_use(model)
    if left <= 0:
        raise ActwhError(f"{given} ({fmt(total)}) does not hold the model's weights ({fmt(in_use(model))})")
    try:
        chunks, _ = plan(model.cfg, batch_size, longest, model.W_E.dtype, left, **_edge_kw(edges))
    except ActwhError as e:
        raise ActwhError(f"{given}: {e}") from None
    return total, chunks.rows or batch_size


def batch_chunks(model, rows: int, seq: int, total: int, edges) -> EdgeChunks:
    """The chunks for one batch under a device budget of `total` bytes, given what is in use
    now; the smallest chunks when even those are predicted not to fit (populate checked the
    longest prompt alone before it started)."""
    try:
        return plan(model.cfg, rows, seq, model.W_E.dtype, total - in_use(model), **_edge_kw(edges))[0]
    except ActwhError:
        import logging

        logging.getLogger("actwh.memory").warning(
            "the edges of %d prompts of %d tokens are predicted not to fit the budget even in the "
            "smallest chunks; running them in the smallest chunks", rows, seq)
        return SMALLEST
