"""Circuit evaluation: k circuit sizes of a batch (one patched forward pass each, every
downstream input patched per prompt) vs k bare forward passes of the same model; and how many
forward passes an evaluation of k sizes makes in all (shared clean and baseline runs included).

    python benchmarks/bench_evaluate.py [--batch 8] [--seq 32] [--sizes 5]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from common import emit, gpt2_small_shaped, timeit_pair


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--sizes", type=int, default=5)
    args = ap.parse_args()
    from actwh.compute.edges import downstream_nodes, upstream_nodes
    from actwh.compute.loading import DEFAULT_MODEL_DIR, load_model
    from actwh.compute.patching import allowed_edges, baseline_writes, run_patched
    from actwh.compute.targets import Batch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    folders = [("default", DEFAULT_MODEL_DIR), ("gpt2-small-shaped-random", gpt2_small_shaped(
        Path(tempfile.gettempdir()) / "actwh-bench-gpt2-small"))]
    for name, folder in folders:
        model = load_model(folder, device=device).model
        cfg = model.cfg
        g = torch.Generator().manual_seed(0)
        tokens = torch.randint(3, cfg.d_vocab, (args.batch, args.seq), generator=g)
        bad = torch.randint(3, cfg.d_vocab, (args.batch, args.seq), generator=g)
        b = Batch(tokens, torch.ones_like(tokens), tokens[:, -1], tokens[:, -2]).to(device)
        U, V = len(upstream_nodes(model)), len(downstream_nodes(model))
        allowed = allowed_edges(model)
        # nested circuits of growing size, a different one per prompt (as evaluate builds them)
        scores = torch.rand(args.batch, U, V, generator=g).masked_fill(~allowed, -1)
        total = int(allowed.sum())
        masks = [scores >= scores.flatten(1).kthvalue(
            max(1, total - total * (k + 1) // (args.sizes + 1)), dim=1).values[:, None, None]
                 for k in range(args.sizes)]
        base = baseline_writes(model, b, bad.to(device))

        def patched():
            for m in masks:
                run_patched(model, b, m, base=base)

        def bare():
            with torch.no_grad():
                for _ in masks:
                    model(b.tokens, b.mask)

        ours, theirs = timeit_pair(patched, bare, repeat=3)
        common = dict(device=device, model=name, batch=args.batch, seq=args.seq, sizes=args.sizes)
        emit("evaluate_circuit_sizes", ours, "s/batch", "bare_forward_per_size", theirs, **common)
        calls = [0]
        hook = model.register_forward_pre_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
        patched()
        hook.remove()
        emit("evaluate_forward_passes", calls[0], "passes/batch", "sizes", args.sizes, **common)


if __name__ == "__main__":
    main()
