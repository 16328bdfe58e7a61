"""The same parity on CUDA; bfloat16 within a stated tolerance. Skips cleanly without CUDA."""

from __future__ import annotations

import pytest
import torch

from actwh.compute.loading import load_model

from conftest import PROMPTS, padded_batch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

# bfloat16 keeps 8 bits of mantissa: logits of these tiny random models (|logit| up to ~5) stay
# within 0.1 of float32, and the top-1 token agrees almost everywhere.
BF16_ATOL = 0.1


@pytest.fixture(autouse=True)
def no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def test_cuda_float32_matches_transformers(family_dir, hf_model):
    loaded = load_model(family_dir[1], device="cuda")
    tokens, mask = padded_batch(loaded.tokenizer, PROMPTS, "left")
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ours = loaded.model(tokens.cuda(), mask.cuda()).cpu()
        theirs = hf_model(input_ids=tokens, attention_mask=mask, position_ids=pos).logits
    real = mask.bool()
    assert (ours[real] - theirs[real]).abs().max() <= 1e-4


def test_cuda_bfloat16_within_tolerance(family_dir, hf_model):
    loaded = load_model(family_dir[1], device="cuda", dtype=torch.bfloat16)
    tokens, mask = padded_batch(loaded.tokenizer, PROMPTS, "right")
    with torch.no_grad():
        ours = loaded.model(tokens.cuda(), mask.cuda()).float().cpu()
        theirs = hf_model(input_ids=tokens, attention_mask=mask).logits
    real = mask.bool()
    assert (ours[real] - theirs[real]).abs().max() <= BF16_ATOL
    agree = (ours[real].argmax(-1) == theirs[real].argmax(-1)).float().mean()
    assert agree >= 0.9


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
