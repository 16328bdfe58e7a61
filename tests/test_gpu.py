"""The same parity on CUDA; bfloat16 judged against transformers' own bfloat16 error; edges
chunked = one pass, and the memory plan against CUDA's allocator. Skips cleanly without CUDA."""

from __future__ import annotations

import pytest
import torch

from actwh.compute.loading import load_model

from conftest import PROMPTS, padded_batch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

# bfloat16 keeps 8 bits of mantissa, so neither actwh nor transformers reproduces float32 logits
# in it. actwh's error against transformers' float32 logits must stay within C times
# transformers' own bfloat16 error against the same reference (root mean square and largest
# entry), plus EPS for models whose bf16 error happens to be near zero.
C_RMS, C_MAX, EPS = 2.0, 3.0, 1e-3


@pytest.fixture(autouse=True)
def no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def test_cuda_float32_matches_transformers(family_dir, hf_model):
    loaded = load_model(family_dir[1], device="cuda")
    tokens, mask = padded_batch(loaded.tokenizer, PROMPTS, "left")
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ours = loaded.model(tokens.cuda(), mask.cuda()).cpu()
        theirs = hf_model(input_ids=tokens, attention_mask=mask, position_ids=pos).logits
    real = mask.bool()
    assert (ours[real] - theirs[real]).abs().max() <= 1e-4


def test_cuda_bfloat16_error_within_transformers_own(family_dir, hf_model):
    import transformers as T

    loaded = load_model(family_dir[1], device="cuda", dtype=torch.bfloat16)
    hf16 = T.AutoModelForCausalLM.from_pretrained(family_dir[1], dtype=torch.bfloat16,
                                                  attn_implementation="eager").cuda().eval()
    tokens, mask = padded_batch(loaded.tokenizer, PROMPTS, "right")
    with torch.no_grad():
        ours = loaded.model(tokens.cuda(), mask.cuda()).float().cpu()
        theirs16 = hf16(input_ids=tokens.cuda(), attention_mask=mask.cuda()).logits.float().cpu()
        ref = hf_model(input_ids=tokens, attention_mask=mask).logits
    real = mask.bool()
    ours_err, hf_err = (ours - ref)[real], (theirs16 - ref)[real]
    rms = lambda e: float(e.pow(2).mean().sqrt())  # noqa: E731
    assert rms(ours_err) <= C_RMS * rms(hf_err) + EPS, (rms(ours_err), rms(hf_err))
    assert float(ours_err.abs().max()) <= C_MAX * float(hf_err.abs().max()) + EPS
    agree = (ours[real].argmax(-1) == ref[real].argmax(-1)).float().mean()
    hf_agree = (theirs16[real].argmax(-1) == ref[real].argmax(-1)).float().mean()
    assert agree >= hf_agree - 0.1


def test_cuda_gradients_match_cpu(family_dir):
    cpu = load_model(family_dir[1], device="cpu").model
    gpu = load_model(family_dir[1], device="cuda").model
    tokens, mask = padded_batch(load_model(family_dir[1], device="cpu").tokenizer, PROMPTS)
    site = "blocks.0.hook_resid_post"

    def metric(logits):
        return logits[:, -1, 3].sum()

    a = cpu.run_with_cache(tokens, [site], attention_mask=mask, backward_of=metric)
    b = gpu.run_with_cache(tokens.cuda(), [site], attention_mask=mask.cuda(), backward_of=metric)
    assert torch.allclose(a.grads[site], b.grads[site].cpu(), atol=1e-4)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_chunked_edges_equal_one_pass_and_cpu(family_dir, dtype):
    from actwh.compute.edges import EdgeChunks, component_edges
    from actwh.compute.targets import Batch

    dt = getattr(torch, dtype)
    loaded = load_model(family_dir[1], device="cuda", dtype=dt)
    tokens, mask = padded_batch(loaded.tokenizer, PROMPTS, "left")
    batch = Batch(tokens, mask, torch.tensor([5, 7, 9]), torch.tensor([6, 8, 10]))
    whole = component_edges(loaded.model, batch, "logit_diff")
    got = component_edges(loaded.model, batch, "logit_diff", chunks=EdgeChunks(rows=2, positions=5, groups=3))
    scale = float(whole.values.abs().max())
    tol = 2e-6 if dt == torch.float32 else 2e-2  # bf16 products: rounding of each GEMM's output
    torch.testing.assert_close(got.values, whole.values, rtol=tol * 5, atol=tol * scale)
    cpu = component_edges(load_model(family_dir[1], device="cpu").model, batch, "logit_diff")
    if dt == torch.float32:
        torch.testing.assert_close(whole.values.cpu(), cpu.values, rtol=1e-4, atol=1e-5 * scale)


def test_cuda_memory_prediction_and_budget(tmp_path):
    """The planner's predicted peak within 15% of CUDA's own peak count for a shape whose
    edges need tens of MB, and a budget below the one-pass peak kept."""
    import transformers as T

    from actwh.compute.edges import EdgeChunks, component_edges
    from actwh.compute.memory import plan, predict
    from actwh.compute.targets import Batch

    from conftest import make_tokenizer

    torch.manual_seed(0)
    cfg = T.LlamaConfig(num_hidden_layers=4, hidden_size=256, num_attention_heads=16, num_key_value_heads=4,
                        intermediate_size=512, max_position_embeddings=512, vocab_size=512,
                        bos_token_id=0, eos_token_id=0)
    T.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    make_tokenizer().save_pretrained(tmp_path)
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = load_model(tmp_path, device="cuda", dtype=dtype).model
        tokens = torch.randint(3, 512, (4, 256))
        batch = Batch(tokens, torch.ones_like(tokens), tokens[:, 1], tokens[:, 2])

        def peak(chunks=None):
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            out = component_edges(model, batch, "logit_diff", chunks=chunks)
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - base, out

        peak()  # warm-up: cuBLAS workspaces, kernels
        got, whole = peak()
        want = predict(model.cfg, 4, 256, dtype).peak
        results[dtype] = (want, got)
        assert abs(want / got - 1) <= 0.15, (dtype, want, got)
        chunks, _ = plan(model.cfg, 4, 256, dtype, int(0.5 * got))
        assert chunks != EdgeChunks()
        used, part = peak(chunks)
        assert used <= 0.5 * got
        scale = float(whole.values.abs().max())
        tol = 2e-6 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(part.values, whole.values, rtol=tol * 5, atol=tol * scale)


def test_free_memory_counts_what_the_caching_allocator_holds_unallocated():
    """Memory torch freed but keeps reserved is ours to reuse: the default --max-memory budget
    counts it (the driver's own free count does not)."""
    from actwh.compute.memory import device_free

    torch.cuda.empty_cache()
    x = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    del x  # 256 MB now reserved by the allocator, unallocated
    cached = torch.cuda.memory_reserved() - torch.cuda.memory_allocated()
    assert cached >= 256 << 20
    driver_free = torch.cuda.mem_get_info()[0]
    assert device_free("cuda") - driver_free >= (256 << 20) - (8 << 20)
    torch.cuda.empty_cache()


def test_cuda_patched_pass_matches_the_cpu_one(family_dir):
    """Small per-prompt circuits (whole layers skipped where sparse patching applies): the CUDA
    pass, at every position and at the scored ones, equals the CPU pass."""
    from actwh.compute.edges import downstream_nodes, upstream_nodes
    from actwh.compute.patching import allowed_edges, run_patched
    from actwh.compute.targets import Batch

    cpu = load_model(family_dir[1], device="cpu")
    gpu = load_model(family_dir[1], device="cuda")
    tokens, mask = padded_batch(cpu.tokenizer, PROMPTS, "left")
    bad = tokens.flip(-1)
    batch = Batch(tokens, mask, tokens[:, 0], tokens[:, 1])
    up, down = upstream_nodes(cpu.model), downstream_nodes(cpu.model)
    g = torch.Generator().manual_seed(0)
    first = torch.tensor([n.layer <= 0 for n in up])
    keep = (torch.rand(len(tokens), len(up), len(down), generator=g) < 0.3) & first[None, :, None]
    keep &= allowed_edges(cpu.model)[None]
    want = run_patched(cpu.model, batch, keep, bad)
    got = run_patched(gpu.model, batch, keep, bad.cuda()).cpu()
    real = mask.bool()
    assert (got[real] - want[real]).abs().max() <= 1e-4
    at = run_patched(gpu.model, batch, keep, bad.cuda(), positions=batch.scored_positions).cpu()
    assert (at[:, 0] - want[torch.arange(len(tokens)), batch.scored_positions]).abs().max() <= 1e-4
