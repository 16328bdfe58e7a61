"""Small conveniences over the hooked model: tokenizing one prompt, next-token predictions."""

from __future__ import annotations

import torch

from actwh.compute.loading import LoadedModel
from actwh.errors import PromptError


def encode(loaded: LoadedModel, text: str, prepend_bos: bool = False) -> list[int]:
    """Token ids exactly as the checkpoint's tokenizer makes them; refuses over-long prompts."""
    ids = list(loaded.tokenizer(text).input_ids)
    bos = loaded.tokenizer.bos_token_id
    if prepend_bos and bos is not None and (not ids or ids[0] != bos):
        ids = [bos] + ids
    if not ids:
        raise PromptError("empty prompt")
    n_ctx = loaded.model.cfg.n_ctx
    if len(ids) > n_ctx:
        raise PromptError(f"prompt of {len(ids)} tokens is longer than the context ({n_ctx}): "
                          f"{text[:40]!r}...")
    return ids


@torch.no_grad()
def top_next_tokens(loaded: LoadedModel, text: str, k: int = 5) -> list[tuple[str, float]]:
    ids = torch.tensor([encode(loaded, text)], device=loaded.model.device)
    probs = loaded.model(ids)[0, -1].float().softmax(-1)
    top = probs.topk(k)
    return [(loaded.tokenizer.decode([int(i)]), float(p)) for p, i in zip(top.values, top.indices)]
