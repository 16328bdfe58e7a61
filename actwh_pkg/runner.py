"""The runner: the one bridge between compute and the warehouse.

Reads prompts, tokenizes and checks every one of them before the file is touched, batches them
by length, runs compute, selects nodes per prompt, and writes each batch in one transaction.
A run interrupted at any point resumes (`resume=RUN_ID`) with exactly the prompts that are
missing; a run is `complete` only when every prompt is in.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from actwh import __version__
from actwh.errors import ActwhError, PromptError

log = logging.getLogger("actwh.runner")

DEFAULT_SCALARS = ("mlp_post_act", "mlp_act_times_grad", "mlp_direct_effect",
                   "attn_act_times_grad", "attn_direct_effect", "attn_pattern", "token_attribution")
DEFAULT_SELECTION = "top-k:20:mlp_act_times_grad"


@dataclass(frozen=True)
class PopulateOptions:
    prompts: str  # path of the .txt / .jsonl file
    model: str | None = None  # checkpoint folder or cache name; None = the embedded model
    scalars: tuple[str, ...] = DEFAULT_SCALARS
    target: str | None = None  # None: logit_diff / logprob / loss by what the prompts carry
    select: str = DEFAULT_SELECTION
    batch_size: int = 8
    device: str | None = None
    dtype: str = "float32"
    name: str | None = None
    prepend_bos: bool = False
    detach_ln: bool = False  # freeze every norm scale in the backward pass too

    def to_json(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.__dict__.items()}


@dataclass
class Encoded:
    prompt_id: int
    text: str
    ids: list[int]
    target: int | None
    distractor: int | None
    position: int | None


@dataclass
class PopulateResult:
    run_id: int
    status: str
    n_prompts: int
    n_written: int
    seconds: float
    tokens: int
    rows: dict = field(default_factory=dict)


def default_target(prompts) -> str:
    if all(p.target is not None and p.distractor is not None for p in prompts):
        return "logit_diff"
    if all(p.target is not None for p in prompts):
        return "logprob"
    return "loss"


def encode_all(loaded, prompts, target, prepend_bos: bool) -> list[Encoded]:
    from actwh.compute.inference import encode
    from actwh.compute.prompts import token_id

    out = []
    for p in prompts:
        try:
            ids = encode(loaded, p.text, prepend_bos)
        except PromptError as e:
            raise PromptError(f"prompt {p.prompt_id}: {e}") from None
        tgt = dis = None
        if target.needs_target:
            if p.target is None:
                raise PromptError(f"prompt {p.prompt_id}: target {target.name!r} needs a target")
            tgt = token_id(loaded.tokenizer, p.target, "target", p.prompt_id)
        if target.needs_distractor:
            if p.distractor is None:
                raise PromptError(f"prompt {p.prompt_id}: target {target.name!r} needs a distractor")
            dis = token_id(loaded.tokenizer, p.distractor, "distractor", p.prompt_id)
        if p.position is not None and not 0 <= p.position < len(ids):
            raise PromptError(f"prompt {p.prompt_id}: position {p.position} is outside its "
                              f"{len(ids)} tokens")
        out.append(Encoded(p.prompt_id, p.text, ids, tgt, dis, p.position))
    return out


class Progress:
    """prompts done, tokens/s and ETA on a terminal; silent when stderr is not a TTY."""

    def __init__(self, total: int, enabled: bool | None = None):
        self.total, self.done, self.tokens, self.start = total, 0, 0, time.monotonic()
        self.enabled = sys.stderr.isatty() if enabled is None else enabled

    def update(self, prompts: int, tokens: int) -> None:
        self.done += prompts
        self.tokens += tokens
        if not self.enabled:
            return
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = self.tokens / elapsed
        eta = (self.total - self.done) * elapsed / max(self.done, 1)
        sys.stderr.write(f"\r{self.done}/{self.total} prompts  {rate:,.0f} tokens/s  "
                         f"ETA {eta:,.0f}s ")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


def populate(db: str | os.PathLike, opts: PopulateOptions | None = None, resume: int | None = None,
             progress: bool | None = None, on_wait=None) -> PopulateResult:
    """Fill (or resume) one run. Every input is checked before the warehouse is opened."""
    import torch

    from actwh.compute.loading import load_model
    from actwh.compute.prompts import read_prompts
    from actwh.compute.scalars import NODE_TYPES, SCALARS, get_scalar
    from actwh.compute.selection import Selection
    from actwh.compute.targets import get_target
    from actwh.warehouse.store import WarehouseWriter

    if resume is not None:
        if not os.path.exists(db):
            raise ActwhError(f"cannot resume run {resume}: no warehouse at {db}")
        writer = WarehouseWriter(db, NODE_TYPES, tuple(SCALARS), on_wait=on_wait)
        stored = writer.run(resume)["options"]
        opts = PopulateOptions(**{**stored, "scalars": tuple(stored["scalars"])})
    assert opts is not None
    scalars = [get_scalar(s).name for s in opts.scalars]
    selection = Selection.parse(opts.select)
    prompts = read_prompts(opts.prompts)
    target = get_target(opts.target or default_target(prompts))
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
             "float64": torch.float64}.get(opts.dtype)
    if dtype is None:
        raise ActwhError(f"unknown dtype {opts.dtype!r}; valid: float32, bfloat16, float16, float64")
    loaded = load_model(opts.model, device=opts.device, dtype=dtype)
    encoded = encode_all(loaded, prompts, target, opts.prepend_bos)
    opts = PopulateOptions(**{**opts.__dict__, "target": target.name})

    writer = WarehouseWriter(db, NODE_TYPES, tuple(SCALARS), on_wait=on_wait)
    if resume is None:
        info = loaded.info
        cfg = loaded.model.cfg
        model_id = writer.register_model(dict(
            name=info.name, source=info.source, weights_sha256=info.weights_sha256, arch=info.arch,
            n_layers=cfg.n_layers, n_heads=cfg.n_heads, d_model=cfg.d_model, d_head=cfg.d_head,
            d_mlp=cfg.d_mlp, d_vocab=cfg.d_vocab, n_ctx=cfg.n_ctx, config=info.config))
        run_id = writer.create_run(
            model_id, name=opts.name, target=target.name, scalars=",".join(scalars),
            selection=str(selection), code_version=__version__,
            device=str(loaded.model.device), dtype=opts.dtype, n_prompts=len(encoded),
            options=opts.to_json())
    else:
        run_id = resume
    done = writer.done_prompts(run_id)
    pending = sorted((e for e in encoded if e.prompt_id not in done), key=lambda e: len(e.ids))
    bar = Progress(len(pending), progress)
    start, rows, n_tokens = time.monotonic(), {"node_scalars": 0, "pair_scalars": 0}, 0
    token_text: dict[int, str] = {}
    needed = selection.scalars_needed(scalars)
    for i in range(0, len(pending), opts.batch_size):
        chunk = pending[i:i + opts.batch_size]
        tables = compute_batch(loaded, chunk, target, needed, scalars, selection, opts.detach_ln,
                               run_id, token_text)
        writer.append_batch(run_id, tables)
        for t in rows:
            rows[t] += tables[t].num_rows
        n_tok = sum(len(e.ids) for e in chunk)
        n_tokens += n_tok
        bar.update(len(chunk), n_tok)
    bar.close()
    status = writer.finish_run(run_id)
    return PopulateResult(run_id, status, len(encoded), len(pending), time.monotonic() - start,
                          n_tokens, rows)


def compute_batch(loaded, chunk: list[Encoded], target, needed, scalars, selection, detach_ln,
                  run_id: int, token_text: dict[int, str]) -> dict[str, pa.Table]:
    """Compute one batch and shape it into the Arrow tables the warehouse appends."""
    import torch

    from actwh.compute.scalars import compute_scalars
    from actwh.compute.selection import to_columns
    from actwh.compute.targets import Batch

    n = max(len(e.ids) for e in chunk)
    pad = loaded.tokenizer.pad_token_id or 0
    tokens = torch.tensor([e.ids + [pad] * (n - len(e.ids)) for e in chunk])
    mask = torch.tensor([[1] * len(e.ids) + [0] * (n - len(e.ids)) for e in chunk])
    ids = lambda attr: (torch.tensor([getattr(e, attr) for e in chunk])  # noqa: E731
                        if getattr(chunk[0], attr) is not None else None)
    positions = None
    if any(e.position is not None for e in chunk):
        positions = torch.tensor([len(e.ids) - 1 if e.position is None else e.position
                                  for e in chunk])
    batch = Batch(tokens, mask, ids("target"), ids("distractor"), positions)
    res = compute_scalars(loaded.model, batch, target, needed, detach_ln=detach_ln)
    prompt_ids = np.array([e.prompt_id for e in chunk], dtype=np.int32)
    cols = to_columns(res, scalars, selection, prompt_ids)

    def table(columns: dict[str, np.ndarray]) -> pa.Table:
        n_rows = len(columns["value"])
        arrays = {"run_id": pa.array(np.full(n_rows, run_id, dtype=np.int32))}
        for k, v in columns.items():
            if k in ("node_type", "scalar"):
                names = cols.node_type_names if k == "node_type" else cols.scalar_names
                arrays[k] = pa.DictionaryArray.from_arrays(pa.array(v), pa.array(names))
            else:
                arrays[k] = pa.array(v)
        return pa.table(arrays)

    for e in chunk:
        for t in e.ids:
            if t not in token_text:
                token_text[t] = loaded.tokenizer.decode([t])
    order = np.argsort(prompt_ids, kind="stable")
    sorted_chunk = [chunk[i] for i in order]
    metric, loss = res.metric.float().cpu().numpy()[order], res.loss.float().cpu().numpy()[order]
    prompts = pa.table({
        "run_id": pa.array([run_id] * len(chunk), pa.int32()),
        "prompt_id": pa.array([e.prompt_id for e in sorted_chunk], pa.int32()),
        "text": [e.text for e in sorted_chunk],
        "n_tokens": pa.array([len(e.ids) for e in sorted_chunk], pa.int32()),
        "target_token_id": pa.array([e.target for e in sorted_chunk], pa.int32()),
        "distractor_token_id": pa.array([e.distractor for e in sorted_chunk], pa.int32()),
        "metric": pa.array(metric.astype(np.float64)),
        "loss": pa.array(loss.astype(np.float64)),
    })
    tok_rows = [(e.prompt_id, pos, t) for e in sorted_chunk for pos, t in enumerate(e.ids)]
    tokens_table = pa.table({
        "run_id": pa.array([run_id] * len(tok_rows), pa.int32()),
        "prompt_id": pa.array([r[0] for r in tok_rows], pa.int32()),
        "position": pa.array([r[1] for r in tok_rows], pa.int32()),
        "token_id": pa.array([r[2] for r in tok_rows], pa.int32()),
        "token": [token_text[r[2]] for r in tok_rows],
    })
    return {"prompts": prompts, "tokens": tokens_table, "node_scalars": table(cols.node),
            "pair_scalars": table(cols.pair)}
