"""Shared helpers for the benchmark scripts: timing and one JSON line per figure."""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def timeit(fn, repeat: int = 5, warmup: int = 1) -> float:
    """Median seconds of `repeat` calls after `warmup` calls (synchronising CUDA if used)."""
    import torch

    def sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def timeit_pair(fn_a, fn_b, repeat: int = 5, warmup: int = 1) -> tuple[float, float]:
    """Median seconds of fn_a and of fn_b, timed in alternating rounds (a, b, a, b, ...) so that
    drift in the machine's speed lands on both sides of the ratio."""
    import torch

    def once(fn):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    for _ in range(warmup):
        once(fn_a), once(fn_b)
    a, b = zip(*((once(fn_a), once(fn_b)) for _ in range(repeat)))
    return statistics.median(a), statistics.median(b)


def emit(name, value, unit, baseline=None, baseline_value=None, device="cpu", model="", batch=None,
         seq=None, **extra) -> None:
    ratio = None if not baseline_value else round(value / baseline_value, 3)
    print(json.dumps({"name": name, "value": round(value, 6), "unit": unit, "baseline": baseline,
                      "baseline_value": None if baseline_value is None else round(baseline_value, 6),
                      "ratio": ratio, "device": device, "model": model, "batch": batch, "seq": seq,
                      **extra}), flush=True)


def gpt2_small_shaped(folder: Path, n_layers: int = 12, d_model: int = 768, vocab: int = 4096):
    """A tiny-random checkpoint with GPT-2-small's shape (vocabulary shrunk), saved in HF format."""
    import torch
    import transformers as T

    from conftest import make_tokenizer

    if (folder / "config.json").exists():
        return folder
    torch.manual_seed(0)
    cfg = T.GPT2Config(n_layer=n_layers, n_embd=d_model, n_head=12, n_positions=1024,
                       vocab_size=vocab, bos_token_id=0, eos_token_id=0)
    T.GPT2LMHeadModel(cfg).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder
