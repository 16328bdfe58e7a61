"""One edge computation's peak allocation, measured in a fresh process.

`python tests/memory_probe.py '{"model": DIR, "dtype": "float32", "b": 2, "n": 32, "seed": 0,
"opts": {...}, "chunks": {...} | null}'` prints {"peak": bytes}. tests/test_memory.py measures
every peak this way: in the test process, what earlier tests left allocated or cached (rotary
tables, kernels' scratch, the profiler's own state) changed the measured peak with the order the
tests ran in.

The measured peak is the sum of torch's CPU allocations and frees, in order, as torch.profiler
records them with profile_memory=True (its "[memory]" events): bytes allocated from the start of
the call, the quantity the planner predicts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def measured_peak(fn):
    """(peak bytes allocated by torch on the CPU while fn runs, fn's result)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    events = sorted((e for e in prof.profiler.kineto_results.events()
                     if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")),
                    key=lambda e: e.start_ns())
    now = peak = 0
    for e in events:
        now += e.nbytes()
        peak = max(peak, now)
    return peak, out


def batch_of(b, n, seed=0):
    """A batch of b random prompts of n tokens, one of them shorter (right-padded), and its
    corrupted token ids."""
    import torch

    from actwh.compute.targets import Batch

    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, 48, (b, n), generator=g)
    mask = torch.ones_like(tokens)
    mask[0, n - n // 3:] = 0  # one shorter prompt, right-padded
    return Batch(tokens, mask, tokens[:, 1], tokens[:, 2]), torch.randint(3, 48, (b, n), generator=g)


def peak_in_fresh_process(model, dtype, b, n, seed=0, opts=None, chunks=None) -> int:
    """The peak of component_edges on this case, measured by a new Python process."""
    from dataclasses import asdict

    case = {"model": str(model), "dtype": dtype, "b": b, "n": n, "seed": seed, "opts": opts or {},
            "chunks": None if chunks is None else asdict(chunks)}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(Path(__file__)), json.dumps(case)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])["peak"]


def main(case: dict) -> int:
    import torch

    from actwh.compute.edges import EdgeChunks, component_edges
    from actwh.compute.loading import load_model

    torch.set_num_threads(1)
    loaded = load_model(case["model"], device="cpu", dtype=getattr(torch, case["dtype"]))
    batch, bad = batch_of(case["b"], case["n"], case["seed"])
    opts = dict(case["opts"])
    kw = dict(opts, corrupt=bad if opts.get("corrupt") else None)
    chunks = None if case["chunks"] is None else EdgeChunks(**case["chunks"])
    peak, _ = measured_peak(lambda: component_edges(loaded.model, batch, "logit_diff", chunks=chunks, **kw))
    return peak


if __name__ == "__main__":
    print(json.dumps({"peak": main(json.loads(sys.argv[1]))}))
