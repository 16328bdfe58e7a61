"""CPU proxies for issue 18's edge figures: the component graph against a bare transformers
forward + backward, chunked against one pass (time, paired), and the memory planner's predicted
peak against the measured one (torch.profiler's allocation events, as tests/test_memory.py).

    python benchmarks/bench_edge_chunks.py [--batch 4] [--seq 64]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from bench_gpu import peak_of
from common import emit, gpt2_small_shaped, timeit_pair


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    import transformers as T

    from actwh.compute.edges import EdgeChunks, component_edges
    from actwh.compute.loading import load_model
    from actwh.compute.memory import plan, predict
    from actwh.compute.targets import Batch

    folder = gpt2_small_shaped(Path(tempfile.gettempdir()) / "actwh-bench-gpt2-small")
    loaded = load_model(folder, device="cpu")
    cfg = loaded.model.cfg
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, cfg.d_vocab, (args.batch, args.seq), generator=g)
    b = Batch(tokens, torch.ones_like(tokens), tokens[:, -1], tokens[:, -2])
    hf = T.AutoModelForCausalLM.from_pretrained(folder)
    rows = torch.arange(args.batch)

    def bare():
        hf.zero_grad(set_to_none=True)
        logits = hf(tokens).logits
        (logits[rows, -1, tokens[:, -1]] - logits[rows, -1, tokens[:, -2]]).sum().backward()

    def edges(chunks=None):
        return lambda: component_edges(loaded.model, b, "logit_diff", chunks=chunks)

    common = dict(device="cpu", model="gpt2-small-shaped-random", batch=args.batch, seq=args.seq)
    ours, base = timeit_pair(edges(), bare, repeat=args.repeat)
    emit("edges_component_graph", ours, "s/batch", "hf_forward_backward", base, **common)
    whole_peak, _ = peak_of(edges())
    emit("edges_peak_predicted", predict(cfg, args.batch, args.seq, torch.float32).peak / 1e6, "MB",
         "edges_peak_measured", whole_peak / 1e6, **common)
    budget = int(0.5 * whole_peak)
    planned, _ = plan(cfg, args.batch, args.seq, torch.float32, budget)
    for chunks in (EdgeChunks(positions=args.seq // 4), EdgeChunks(groups=8), EdgeChunks(rows=1),
                   EdgeChunks(recompute=True), planned):
        t, t1 = timeit_pair(edges(chunks), edges(), repeat=args.repeat)
        peak, _ = peak_of(edges(chunks))
        pred = predict(cfg, args.batch, args.seq, torch.float32, chunks=chunks).peak
        emit("edges_chunked", t, "s/batch", "one_pass", t1, chunks=str(chunks), peak_mb=round(peak / 1e6, 2),
             predicted_mb=round(pred / 1e6, 2), one_pass_peak_mb=round(whole_peak / 1e6, 2),
             budget_mb=round(budget / 1e6, 2) if chunks is planned else None, **common)


if __name__ == "__main__":
    main()
