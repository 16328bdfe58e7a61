"""Acceptance 2 of issue 18: the edge memory planner (compute/memory.py).

The measured peak is the sum of torch's CPU allocations and frees, in order, as torch.profiler
records them with profile_memory=True: bytes allocated from the start of the call, the quantity
the planner predicts. Each peak is measured in a fresh process (tests/memory_probe.py): in the
test process it changed with what earlier tests had left behind."""

from __future__ import annotations

import json

import pytest
import torch
from memory_probe import batch_of, measured_peak, peak_in_fresh_process

from actwh.compute.edges import EdgeChunks, component_edges
from actwh.compute.loading import load_model
from actwh.compute.memory import MARGIN, parse_memory, plan, predict
from actwh.errors import ActwhError


def checkpoint(folder, kind):
    """Real-proportioned small models: many heads per d_model (as in 1–8B models, where the
    edges' buffers outweigh the forward pass), a GPT-2 (LayerNorm, learned positions) and a
    Llama (RMSNorm, rotary, grouped-query attention, gated MLP)."""
    import transformers as T

    from conftest import make_tokenizer

    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = T.GPT2Config(n_layer=4, n_embd=64, n_head=16, n_positions=128, vocab_size=48,
                           bos_token_id=0, eos_token_id=0)
    else:
        cfg = T.LlamaConfig(num_hidden_layers=4, hidden_size=64, num_attention_heads=16,
                            num_key_value_heads=4, intermediate_size=192, max_position_embeddings=128,
                            vocab_size=48, bos_token_id=0, eos_token_id=0)
    T.AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return {k: checkpoint(tmp_path_factory.mktemp(k), k) for k in ("gpt2", "llama")}


CASES = [("gpt2", "float32", 2, 32, {}, None),
         ("llama", "float32", 3, 48, {"corrupt": True}, None),
         ("llama", "float32", 2, 32, {"positions": "each"}, None),
         ("gpt2", "float32", 3, 64, {"corrupt": True, "ig_steps": 2}, EdgeChunks(rows=2, positions=8, groups=5)),
         ("llama", "bfloat16", 2, 32, {}, None),
         ("gpt2", "bfloat16", 2, 48, {"positions": "each"}, EdgeChunks(positions=8, groups=3)),
         ("llama", "bfloat16", 2, 96, {}, EdgeChunks(positions=16, recompute=True)),
         ("gpt2", "float32", 2, 64, {"corrupt": True, "ig_steps": 2}, EdgeChunks(rows=1, recompute=True)),
         # later IG steps run beside the results and the cached upstream writes (0.85 before
         # they were counted)
         ("llama", "float32", 2, 96, {"corrupt": True, "ig_steps": 3}, None)]


@pytest.mark.parametrize("kind,dtype,b,n,opts,chunks", CASES)
def test_prediction_within_15_percent_of_measured_peak(models, kind, dtype, b, n, opts, chunks):
    cfg = load_model(models[kind], device="cpu", dtype=getattr(torch, dtype)).model.cfg
    got = peak_in_fresh_process(models[kind], dtype, b, n, opts=opts, chunks=chunks)
    want = predict(cfg, b, n, getattr(torch, dtype), chunks=chunks, **opts).peak
    assert abs(want / got - 1) <= 0.15, (want, got)


@pytest.mark.parametrize("b,n,fraction", [(3, 64, 0.4), (1, 128, 0.6)])
def test_a_budget_below_the_one_pass_peak_is_kept_with_the_same_values(models, b, n, fraction):
    """Chunks over prompts and groups (3 × 64), and for one long prompt, whose forward and
    backward pass alone outgrows the budget, blocks recomputed in the backward (1 × 128)."""
    loaded = load_model(models["gpt2"], device="cpu")
    cfg = loaded.model.cfg
    batch, _ = batch_of(b, n, seed=1)
    whole = component_edges(loaded.model, batch, "logit_diff")
    whole_peak = peak_in_fresh_process(models["gpt2"], "float32", b, n, seed=1)
    budget = int(fraction * whole_peak)
    chunks, pred = plan(cfg, b, n, torch.float32, budget)
    assert chunks != EdgeChunks() and pred.peak * MARGIN <= budget
    assert chunks.recompute == (b == 1)
    peak = peak_in_fresh_process(models["gpt2"], "float32", b, n, seed=1, chunks=chunks)
    got = component_edges(loaded.model, batch, "logit_diff", chunks=chunks)
    assert peak <= budget < whole_peak
    scale = float(whole.values.abs().max())
    torch.testing.assert_close(got.values, whole.values, rtol=1e-5, atol=2e-6 * scale)
    torch.testing.assert_close(got.bias, whole.bias, rtol=1e-5, atol=1e-6)


def test_a_budget_too_small_for_any_chunk_is_refused(models):
    cfg = load_model(models["llama"], device="cpu").model.cfg
    with pytest.raises(ActwhError, match="too small .* even one prompt, one position"):
        plan(cfg, 4, 64, torch.float32, 100_000)
    assert plan(cfg, 4, 64, torch.float32, 10**12)[0] == EdgeChunks()  # room for one pass


@pytest.mark.parametrize("text,want", [("40GB", 40 * 10**9), ("512MB", 512 * 10**6), ("1.5GiB", 3 * 2**29),
                                       ("2048", 2048), ("64 kib", 2**16)])
def test_sizes_parse(text, want):
    assert parse_memory(text) == want


@pytest.mark.parametrize("text", ["", "12XB", "-1GB", "0", "GB", "1e9"])
def test_bad_sizes_are_refused(text):
    with pytest.raises(ActwhError, match="--max-memory"):
        parse_memory(text)


def write_prompts(path, n=4):
    import json
    import random

    from conftest import WORDS

    rng = random.Random(3)
    rows = [{"text": " ".join(rng.choice(WORDS) for _ in range(12 + 9 * i)), "target": "Mary",
             "distractor": "John"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("fraction", [0.6, 0.3])
def test_populate_under_max_memory_stores_the_one_pass_edges(models, tmp_path, fraction, monkeypatch):
    """A budget below the one-pass peak: the run's torch allocations (weights included) stay
    under it and it stores the edges a run without a budget stores; the tighter budget also
    makes the batches smaller (the plan for the longest prompt needs fewer prompts per pass)."""
    from dataclasses import replace

    import numpy as np

    import actwh.runner as runner

    sizes = []
    compute_batch = runner.compute_batch
    monkeypatch.setattr(runner, "compute_batch", lambda loaded, chunk, *a, **k: (
        sizes.append(len(chunk)), compute_batch(loaded, chunk, *a, **k))[1])

    from actwh.compute.memory import fmt, in_use
    from actwh.runner import EdgeOptions, PopulateOptions, populate
    from actwh.warehouse import Warehouse

    prompts = write_prompts(tmp_path / "p.jsonl")
    opts = PopulateOptions(prompts=str(prompts), model=str(models["gpt2"]), scalars=("mlp_act_times_grad",),
                           target="logit_diff", batch_size=4, select="top-k:3:mlp_act_times_grad",
                           edges=EdgeOptions(select="dense"))
    whole_peak, _ = measured_peak(lambda: populate(tmp_path / "a.duckdb", opts, progress=False))
    assert sizes == [4]
    weights = in_use(load_model(models["gpt2"], device="cpu").model)
    budget = weights + int(fraction * (whole_peak - weights))
    peak, _ = measured_peak(lambda: populate(tmp_path / "b.duckdb", replace(opts, max_memory=fmt(budget).replace(" ", "")),
                                             progress=False))
    assert peak <= budget < whole_peak
    assert sizes[1:] == ([4] if fraction > 0.5 else [2, 2])
    plan_used = json.loads(Warehouse(tmp_path / "b.duckdb").sql("SELECT options FROM runs")["options"][0])
    assert plan_used["memory_plan"] == {"budget": fmt(budget).replace(" ", ""), "batch_size": sizes[1]}
    free = json.loads(Warehouse(tmp_path / "a.duckdb").sql("SELECT options FROM runs")["options"][0])
    assert free["memory_plan"] == {"budget": "device free", "batch_size": 4}
    q = ("SELECT prompt_id, up_layer, up_type::VARCHAR AS ut, up_index, down_layer, down_type::VARCHAR AS dt, "
         "down_index, coalesce(down_input::VARCHAR, '') AS di, value FROM edges "
         "ORDER BY prompt_id, up_layer, ut, up_index, down_layer, dt, down_index, di")
    a, b = Warehouse(tmp_path / "a.duckdb").sql(q), Warehouse(tmp_path / "b.duckdb").sql(q)
    assert a.height == b.height > 1000 and a.drop("value").equals(b.drop("value"))
    va, vb = a["value"].to_numpy(), b["value"].to_numpy()
    assert np.abs(va - vb).max() <= 2e-6 * np.abs(va).max()


@pytest.mark.parametrize("size,message", [("1KB", "does not hold the model's weights"),
                                          ("1.5MB", "too small for the edges of")])
def test_populate_refuses_a_budget_too_small_before_writing(models, tmp_path, size, message):
    from click.testing import CliRunner

    from actwh.cli.main import cli

    db = tmp_path / "wh.duckdb"
    prompts = write_prompts(tmp_path / "p.jsonl")
    r = CliRunner().invoke(cli, ["populate", str(prompts), "--model", str(models["llama"]), "--db", str(db),
                                 "--scalars", "mlp_act_times_grad", "--edges", "--max-memory", size])
    assert r.exit_code != 0 and message in r.output and f"--max-memory {size}" in r.output
    assert len(r.output.strip().splitlines()) == 1
    assert not db.exists()


def test_max_memory_needs_edges_and_a_size(models, tmp_path):
    from click.testing import CliRunner

    from actwh.cli.main import cli

    prompts = write_prompts(tmp_path / "p.jsonl")
    base = ["populate", str(prompts), "--model", str(models["llama"]), "--db", str(tmp_path / "wh.duckdb"),
            "--scalars", "mlp_act_times_grad"]
    r = CliRunner().invoke(cli, base + ["--max-memory", "1GB"])
    assert r.exit_code != 0 and "add --edges" in r.output
    r = CliRunner().invoke(cli, base + ["--edges", "--max-memory", "lots"])
    assert r.exit_code != 0 and "--max-memory 'lots'" in r.output
    r = CliRunner().invoke(cli, base + ["--edges-into", "top:2", "--max-memory", "1GB"])
    assert r.exit_code != 0 and r.output.strip().splitlines() == [
        "Error: --max-memory plans the component graph's edges (--edges), not --edges-into's node "
        "edges: add --edges, or drop --max-memory"]
    assert not (tmp_path / "wh.duckdb").exists()
