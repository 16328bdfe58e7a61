"""Edges: the whole component graph of a batch vs one bare transformers forward + backward, and
vs a straightforward loop that runs one autograd pass per downstream node (small model).

    python benchmarks/bench_edges.py [--batch 4] [--seq 64]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from common import emit, gpt2_small_shaped, timeit


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    args = ap.parse_args()
    import transformers as T

    from actwh.compute.edges import component_edges
    from actwh.compute.loading import DEFAULT_MODEL_DIR, load_model
    from actwh.compute.targets import Batch
    from test_edges import reference_grad

    device = "cuda" if torch.cuda.is_available() else "cpu"
    folders = [("gpt2-small-shaped-random", gpt2_small_shaped(Path(tempfile.gettempdir()) / "actwh-bench-gpt2-small"))]
    if (DEFAULT_MODEL_DIR / "config.json").exists():
        folders.insert(0, ("default", DEFAULT_MODEL_DIR))
    for name, folder in folders:
        loaded = load_model(folder, device=device)
        cfg = loaded.model.cfg
        g = torch.Generator().manual_seed(0)
        tokens = torch.randint(3, cfg.d_vocab, (args.batch, args.seq), generator=g)
        b = Batch(tokens, torch.ones_like(tokens), tokens[:, -1], tokens[:, -2])
        hf = T.AutoModelForCausalLM.from_pretrained(folder).to(device)
        rows = torch.arange(args.batch, device=device)
        t = tokens.to(device)

        def bare():
            hf.zero_grad(set_to_none=True)
            logits = hf(t).logits
            (logits[rows, -1, t[:, -1]] - logits[rows, -1, t[:, -2]]).sum().backward()

        ours = timeit(lambda: component_edges(loaded.model, b, "logit_diff"))
        base = timeit(bare)
        common = dict(device=device, model=name, batch=args.batch, seq=args.seq)
        emit("edges_component_graph", ours, "s/batch", "hf_forward_backward", base, **common)
        if name == "default":
            res = component_edges(loaded.model, b, "logit_diff")

            def loop():
                for v in res.down:
                    reference_grad(loaded.model, b.to(device), "logit_diff", v)

            emit("edges_component_graph", ours, "s/batch", "per_node_autograd_loop",
                 timeit(loop, repeat=1), **common)


if __name__ == "__main__":
    main()
