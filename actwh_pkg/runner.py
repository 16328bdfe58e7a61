"""The runner: the one bridge between compute and the warehouse.

Reads prompts, tokenizes and checks every one of them before the file is touched, batches them
by length, runs compute, selects nodes per prompt, and writes each batch in one transaction.
A run interrupted at any point resumes (`resume=RUN_ID`) with exactly the prompts that are
missing; a run is `complete` only when every prompt is in.
"""

from __future__ import annotations

import json
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


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass(frozen=True, kw_only=True)
class EdgeOptions:
    """Component-graph edges for a run (provenance: stored with the run's options)."""

    baseline: str = "zero"  # zero (act × grad) or corrupt (clean − corrupt activations)
    ig_steps: int = 0  # 0: EAP, gradient at the clean input; N: EAP-IG with N points
    select: str = "top-k:50"  # top-k:N | threshold:X | dense, per prompt
    positions: str = "summed"  # summed (up_pos/down_pos NULL) or each
    into: int = 0  # > 0: node-level edges into each prompt's `into` top act × grad nodes
    component: bool = True  # the component graph (False when only --edges-into was asked)
    into_latents: bool = False  # node-level edges into every active autoencoder latent

    @property
    def method(self) -> str:
        return "EAP-IG" if self.ig_steps else "EAP"

    @staticmethod
    def parse_into(text: str | None) -> dict:
        """`top:N` or `latents` (the CLI's --edges-into) as EdgeOptions fields."""
        if text is None:
            return {"into": 0, "into_latents": False}
        if text == "latents":
            return {"into": 0, "into_latents": True}
        kind, _, n = text.partition(":")
        if kind != "top" or not n.isdigit() or int(n) < 1:
            raise ActwhError(f"--edges-into {text!r}: use top:N (N >= 1) or latents")
        return {"into": int(n), "into_latents": False}

    def validate(self, has_saes: bool = False) -> None:
        from actwh.compute.edges import check_edge_options

        if self.baseline not in ("zero", "corrupt"):
            raise ActwhError(f"unknown edge baseline {self.baseline!r}; valid: zero, corrupt")
        if not _is_int(self.ig_steps) or self.ig_steps < 0:
            raise ActwhError(f"--ig-steps must be a whole number >= 0, not {self.ig_steps!r}")
        if self.ig_steps and self.baseline != "corrupt":
            raise ActwhError("--ig-steps integrates from the corrupted prompt: use "
                             "--edges-baseline corrupt")
        if not _is_int(self.into) or self.into < 0:
            raise ActwhError(f"--edges-into top:N needs N >= 1, not {self.into!r}")
        if self.into_latents and not has_saes:
            raise ActwhError("--edges-into latents traces into autoencoder latents: give --sae DIR")
        if not (self.component or self.into or self.into_latents):
            raise ActwhError("edges were asked for but no graph: give --edges or --edges-into")
        check_edge_options(self.select, self.positions)


DTYPES = ("float32", "bfloat16", "float16", "float64")


@dataclass(frozen=True, kw_only=True)
class PopulateOptions:
    """Everything a run is made from (stored with it; keyword-only). `validate()` checks all that
    can be checked without the model; `populate` calls it before anything is written."""

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
    detach_ln: bool = False  # freeze every norm scale in the backward pass (scalars; not edges)
    edges: EdgeOptions | None = None  # None: no edges
    saes: tuple[tuple[str, str | None], ...] = ()  # (folder, site override) to splice in
    baseline: str = "zero"  # `*_attribution` scalars: zero | corrupt | mean
    ig_steps: int = 0  # `*_attribution` scalars: integration points (0: gradient at clean)
    max_memory: str | int | None = None  # edges: device bytes the run may hold ("40GB"); None: free

    @staticmethod
    def sae_pairs(folders, sites=()) -> tuple[tuple[str, str | None], ...]:
        """Pair --sae folders with --sae-site overrides, in order (fewer sites than folders is
        fine: the rest use their config's hook_name)."""
        folders, sites = tuple(folders), tuple(sites)
        if len(sites) > len(folders):
            raise ActwhError(f"{len(sites)} --sae-site for {len(folders)} --sae: give one --sae "
                             "per site")
        return tuple((str(f), sites[i] if i < len(sites) else None) for i, f in enumerate(folders))

    def validate(self) -> None:
        """Refuse, with one line naming the problem, anything the run could not finish with."""
        from actwh.compute.loading import check_device
        from actwh.compute.scalars import SCALARS, get_scalar
        from actwh.compute.selection import Selection
        from actwh.compute.targets import get_target

        if not isinstance(self.prompts, (str, os.PathLike)):
            raise ActwhError(f"prompts must be a file path, not {self.prompts!r}")
        if isinstance(self.scalars, str) or not self.scalars:
            raise ActwhError("no scalars given: name at least one (see `actwh scalars`)")
        for name in self.scalars:
            get_scalar(name)
        if len(set(self.scalars)) != len(self.scalars):
            raise ActwhError(f"a scalar is named twice in {','.join(self.scalars)}")
        if not self.saes and any(SCALARS[s].sae_level for s in self.scalars):
            raise ActwhError("SAE scalars need an autoencoder: give --sae DIR")
        Selection.parse(self.select)
        if self.target is not None:
            get_target(self.target)
        if not _is_int(self.batch_size) or self.batch_size < 1:
            raise ActwhError(f"--batch-size must be a whole number >= 1, not {self.batch_size!r}")
        if self.dtype not in DTYPES:
            raise ActwhError(f"unknown dtype {self.dtype!r}; valid: {', '.join(DTYPES)}")
        check_device(self.device)
        if self.detach_ln and self.edges is not None:
            raise ActwhError("--detach-ln applies to scalars; edges always use the model's own "
                             "norm pull-backs: run edges without --detach-ln")
        for folder, site in self.saes:
            if not os.path.isdir(folder):
                raise ActwhError(f"SAE folder {folder} not found")
            if site is not None and not isinstance(site, str):
                raise ActwhError(f"SAE site must be a hook name, not {site!r}")
        if self.edges is not None:
            self.edges.validate(has_saes=bool(self.saes))
        if self.baseline not in ("zero", "corrupt", "mean"):
            raise ActwhError(f"unknown --baseline {self.baseline!r}; valid: zero, corrupt, mean")
        if not _is_int(self.ig_steps) or self.ig_steps < 0:
            raise ActwhError(f"--ig-steps must be a whole number >= 0, not {self.ig_steps!r}")
        if self.max_memory is not None:
            from actwh.compute.memory import parse_memory

            parse_memory(self.max_memory)
            if self.edges is None:
                raise ActwhError("--max-memory plans the component graph's edges: add --edges")
            if not self.edges.component:
                raise ActwhError("--max-memory plans the component graph's edges (--edges), not "
                                 "--edges-into's node edges: add --edges, or drop --max-memory")

    def to_json(self) -> dict:
        out = {k: list(v) if isinstance(v, tuple) else v for k, v in self.__dict__.items()}
        if self.edges is not None:
            out["edges"] = {**self.edges.__dict__, "method": self.edges.method}
        return out

    @classmethod
    def from_json(cls, d: dict) -> PopulateOptions:
        d = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        edges = d.get("edges")
        if edges is not None:
            edges = EdgeOptions(**{k: v for k, v in edges.items() if k != "method"})
        saes = tuple(tuple(x) for x in d.get("saes", ()))
        return cls(**{**d, "scalars": tuple(d["scalars"]), "edges": edges, "saes": saes})


@dataclass
class Encoded:
    prompt_id: int
    text: str
    ids: list[int]
    target: int | None
    distractor: int | None
    position: int | None
    corrupt: list[int] | None = None  # token ids of the corrupted counterpart


@dataclass
class PopulateResult:
    run_id: int
    status: str
    n_prompts: int
    n_written: int
    seconds: float
    tokens: int
    rows: dict = field(default_factory=dict)
    already_complete: bool = False  # a resume of a run that was complete: nothing was done
    commits: int = 0  # transactions the batches took (small batches share one)
    completeness: dict = field(default_factory=dict)  # *_attribution: mean Σ and Δmetric


def default_target(prompts) -> str:
    if all(p.target is not None and p.distractor is not None for p in prompts):
        return "logit_diff"
    if all(p.target is not None for p in prompts):
        return "logprob"
    return "loss"


def encode_all(loaded, prompts, target, prepend_bos: bool, need_corrupt: bool = False) -> list[Encoded]:
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
        bad = None
        if need_corrupt:
            if p.corrupt is None:
                raise PromptError(f"prompt {p.prompt_id}: the corrupt baseline needs a \"corrupt\" text")
            bad = encode(loaded, p.corrupt, prepend_bos)
            if len(bad) != len(ids):
                raise PromptError(f"prompt {p.prompt_id}: its corrupted text is {len(bad)} tokens, "
                                  f"the prompt {len(ids)}; they must match position by position")
        out.append(Encoded(p.prompt_id, p.text, ids, tgt, dis, p.position, bad))
    return out


class Progress:
    """prompts done, tokens/s and ETA on a terminal; silent when stderr is not a TTY."""

    def __init__(self, total: int, enabled: bool | None = None, extra=None):
        self.total, self.done, self.tokens, self.start = total, 0, 0, time.monotonic()
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.extra = extra  # a function giving more to show (a Ray run: workers alive)

    def update(self, prompts: int, tokens: int) -> None:
        self.done += prompts
        self.tokens += tokens
        if not self.enabled:
            return
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = self.tokens / elapsed
        eta = (self.total - self.done) * elapsed / max(self.done, 1)
        more = self.extra() if self.extra is not None else ""
        sys.stderr.write(f"\r{self.done}/{self.total} prompts  {rate:,.0f} tokens/s  "
                         f"ETA {eta:,.0f}s{more} ")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


@dataclass
class Prepared:
    """A run checked and ready to compute: everything `populate` knows before it writes."""

    opts: PopulateOptions  # with target, absolute paths filled in
    resume: int | None
    stored: dict | None
    loaded: object
    saes: list
    sae_shas: list
    target: object
    selection: object
    scalars: list
    encoded: list
    prompts_sha: str
    attributing: bool
    batch_size: int  # the options' batch size, or smaller where the memory plan says so
    edge_memory: int | None  # the device budget the component edges are chunked to fit

    @property
    def needed(self):
        return self.selection.scalars_needed(self.scalars)


def prepare(db, opts: PopulateOptions | None, resume: int | None, warn, device=None):
    """Check every input and load the model (on `device` if given, else the options' device);
    a PopulateResult when the resumed run is already complete, else a Prepared run."""
    import hashlib

    import torch

    from actwh.compute.loading import load_model
    from actwh.compute.prompts import read_prompts
    from actwh.compute.scalars import get_scalar
    from actwh.compute.selection import Selection
    from actwh.compute.targets import get_target
    from actwh.warehouse.spec import check_target, parse_spec
    from actwh.warehouse.store import Warehouse

    stored = None
    if resume is not None:
        if opts is not None:
            raise ActwhError(f"resuming run {resume} uses its stored options; give no other options")
        spec = parse_spec(db)
        if not spec.exists():
            raise ActwhError(f"cannot resume run {resume}: no warehouse at {db}")
        if spec.kind == "file":  # another process resuming or still writing it: refused now
            from actwh.warehouse import runlock

            runlock.check(spec.path, resume, "resume")
        with Warehouse(db) as wh:  # read-only: a complete run is left byte for byte as it is
            wh.require_run(resume)
            stored = wh.sql("SELECT r.status, r.n_prompts, r.options, m.weights_sha256 FROM runs r "
                            "JOIN models m USING (model_id) WHERE run_id = $run",
                            run=resume).row(0, named=True)
            stored["texts"] = dict(wh.sql("SELECT prompt_id, text FROM prompts WHERE run_id = $run",
                                          run=resume).iter_rows())
        if stored["status"] == "complete":
            return PopulateResult(resume, "complete", stored["n_prompts"], 0, 0.0, 0,
                                  {"node_scalars": 0, "pair_scalars": 0}, already_complete=True)
        stored_options = json.loads(stored["options"])
        opts = PopulateOptions.from_json(stored_options)
        stored["inputs"] = stored_options.get("inputs") or {}
    if not isinstance(opts, PopulateOptions):
        raise ActwhError("populate needs PopulateOptions (or resume=RUN_ID)")
    opts.validate()
    check_target(db)
    scalars = [get_scalar(s).name for s in opts.scalars]
    selection = Selection.parse(opts.select)
    prompts = read_prompts(opts.prompts)
    prompts_sha = hashlib.sha256(open(opts.prompts, "rb").read()).hexdigest()
    changed = lambda what, old, new: ActwhError(  # noqa: E731
        f"cannot resume run {resume}: {what} changed since it started ({old[:12]}... -> "
        f"{new[:12]}...); start a new run")
    if stored is not None and stored["inputs"].get("prompts_sha256", prompts_sha) != prompts_sha:
        raise changed(f"the prompt file {opts.prompts}", stored["inputs"]["prompts_sha256"],
                      prompts_sha)
    target = get_target(opts.target or default_target(prompts))
    dtype = getattr(torch, opts.dtype)
    loaded = load_model(opts.model, device=opts.device if device is None else device, dtype=dtype)
    if stored is not None and stored["weights_sha256"] != loaded.info.weights_sha256:
        raise changed(f"the weights in {loaded.info.source}", stored["weights_sha256"],
                      loaded.info.weights_sha256)
    saes = []
    if opts.saes:
        from actwh.compute.sae import load_sae, splice

        for i, (folder, site) in enumerate(opts.saes):
            sae = load_sae(folder, site)
            old = (stored["inputs"].get("saes_sha256") or [None] * len(opts.saes))[i] if stored else None
            if old is not None and old != sae.info.weights_sha256:
                raise changed(f"the autoencoder in {folder}", old, sae.info.weights_sha256)
            splice(loaded.model, sae)
            saes.append(sae)
    sae_shas = [s.info.weights_sha256 for s in saes]
    saes.sort(key=lambda s: s.info.layer)
    from actwh.compute.attribution import ATTRIBUTIONS

    attributing = any(s in ATTRIBUTIONS for s in scalars)
    encoded = encode_all(loaded, prompts, target, opts.prepend_bos,
                         need_corrupt=opts.edges is not None and opts.edges.baseline == "corrupt"
                         or attributing and opts.baseline == "corrupt")
    unk = loaded.tokenizer.unk_token_id
    if unk is not None:
        n_unk = sum(e.ids.count(unk) for e in encoded)
        if n_unk:
            warn(f"{n_unk} prompt tokens are unknown to the tokenizer ({loaded.tokenizer.unk_token}) "
                 f"in {sum(unk in e.ids for e in encoded)} of {len(encoded)} prompts")
    if stored is not None:
        if len(encoded) != stored["n_prompts"]:
            raise ActwhError(f"cannot resume run {resume}: it has {stored['n_prompts']} prompts, "
                             f"{opts.prompts} now holds {len(encoded)}; start a new run")
        texts = stored["texts"]
        moved = [e.prompt_id for e in encoded if e.prompt_id in texts and texts[e.prompt_id] != e.text]
        if moved or set(texts) - {e.prompt_id for e in encoded}:
            raise ActwhError(f"cannot resume run {resume}: prompts already written differ from "
                             f"{opts.prompts} (first: prompt {(moved or sorted(texts))[0]}); "
                             "start a new run")
    model_arg = opts.model
    if model_arg is not None and os.path.isdir(model_arg):
        model_arg = os.path.abspath(model_arg)  # so --resume works from any directory
    opts = PopulateOptions(**{**opts.__dict__, "target": target.name, "model": model_arg,
                              "prompts": os.path.abspath(opts.prompts),
                              "saes": tuple((os.path.abspath(f), site) for f, site in opts.saes)})
    batch_size, edge_memory = opts.batch_size, None
    if opts.edges is not None and opts.edges.component:  # refused here, before anything is written
        from actwh.compute.memory import populate_plan

        edge_memory, batch_size = populate_plan(loaded.model, opts.max_memory, opts.batch_size,
                                                max(len(e.ids) for e in encoded), opts.edges)
    return Prepared(opts=opts, resume=resume, stored=stored, loaded=loaded, saes=saes,
                    sae_shas=sae_shas, target=target, selection=selection, scalars=scalars,
                    encoded=encoded, prompts_sha=prompts_sha, attributing=attributing,
                    batch_size=batch_size, edge_memory=edge_memory)


def open_writer(db, *, on_wait=None, commit_rows: int = 200_000, commit_seconds: float = 2.0,
                hold_bytes: int = 256 << 20):
    """The writer of `db` (start_run, done_prompts, queue_batch, finish_run, discard, commits)."""
    from actwh.compute.scalars import SCALARS
    from actwh.ontology import NODE_TYPES
    from actwh.warehouse.shards import open_writer as open_storage

    return open_storage(db, NODE_TYPES, tuple(SCALARS), wait_s=None, on_wait=on_wait,
                        group_rows=commit_rows, group_seconds=commit_seconds,
                        hold_bytes=hold_bytes)


def start_run(writer, prep: Prepared, device: str | None = None) -> tuple[int, set[int]]:
    """Create the run (or find a resumed run's written prompts): (run_id, prompt ids done).
    The run is the caller's to write until `writer.release_run(run_id)` (or the process ends):
    resuming a run another process is writing is refused."""
    if prep.resume is not None:
        writer.claim_run(prep.resume)
        return prep.resume, writer.done_prompts(prep.resume)
    info, cfg, opts = prep.loaded.info, prep.loaded.model.cfg, prep.opts
    run_id = writer.start_run(
        dict(name=info.name, source=info.source, weights_sha256=info.weights_sha256,
             arch=info.arch, n_layers=cfg.n_layers, n_heads=cfg.n_heads, d_model=cfg.d_model,
             d_head=cfg.d_head, d_mlp=cfg.d_mlp, d_vocab=cfg.d_vocab, n_ctx=cfg.n_ctx,
             config=info.config),
        [dict(site=s.info.site, d_in=s.info.d_in, d_sae=s.info.d_sae, source=s.info.source,
              weights_sha256=s.info.weights_sha256, config={**s.info.config, "kind": s.info.kind})
         for s in prep.saes],
        name=opts.name, target=prep.target.name, scalars=",".join(prep.scalars),
        selection=str(prep.selection), code_version=__version__,
        device=device or str(prep.loaded.model.device), dtype=opts.dtype,
        n_prompts=len(prep.encoded),
        options={**opts.to_json(), "inputs": {"prompts_sha256": prep.prompts_sha,
                                              "weights_sha256": info.weights_sha256,
                                              "saes_sha256": prep.sae_shas},
                 # what the edges' memory plan chose: prompts per batch, under which budget
                 # (the device's free memory is not recorded: options stay reproducible)
                 **({} if prep.edge_memory is None else {"memory_plan": {
                     "budget": opts.max_memory or "device free", "batch_size": prep.batch_size}})})
    writer.claim_run(run_id)
    return run_id, set()


def batches_of(encoded, done: set[int], batch_size: int) -> list[list[Encoded]]:
    """The prompts not yet written, sorted by length, in batches."""
    pending = sorted((e for e in encoded if e.prompt_id not in done), key=lambda e: len(e.ids))
    return [pending[i:i + batch_size] for i in range(0, len(pending), batch_size)]


class Pipeline:
    """Finishes computed batches (selection, Arrow conversion) and queues them with the writer on
    a thread of its own, so the next batch computes meanwhile. At most `slots` batches are in
    flight between the start of their compute and their write (back-pressure: the compute waits,
    and memory stays bounded). The writer is touched by this thread alone until `close`. An error
    on the thread is raised, as it was, in the caller's thread at its next call. `threaded=False`
    does the same work inline (the sequential populate)."""

    def __init__(self, writer, run_id: int, *, threaded: bool = True, slots: int = 2,
                 on_written=None):
        import queue
        import threading

        self.writer, self.run_id, self.threaded = writer, run_id, threaded
        self.rows = {"node_scalars": 0, "pair_scalars": 0}
        self.on_written = on_written
        self.error: BaseException | None = None
        if threaded:
            self._items: queue.Queue = queue.Queue()
            self._slots = threading.Semaphore(slots)
            self._thread = threading.Thread(target=self._work, name="actwh-writer", daemon=True)
            self._thread.start()

    def _write(self, finish) -> None:
        tables = finish()
        self.writer.queue_batch(self.run_id, tables)
        for t in self.rows:
            self.rows[t] += tables[t].num_rows
        if self.on_written is not None:
            self.on_written(tables)

    def _work(self) -> None:
        while True:
            finish = self._items.get()
            if finish is None:
                return
            if self.error is None:  # after an error, queued batches are dropped
                try:
                    self._write(finish)
                except BaseException as e:  # noqa: BLE001 (raised in the caller's thread)
                    self.error = e
            del finish  # its tensors go before the slot is free
            self._slots.release()

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def reserve(self) -> None:
        """Wait for a free slot before computing the next batch."""
        if not self.threaded:
            return
        while not self._slots.acquire(timeout=0.1):
            self.check()
        self.check()

    def put(self, finish) -> None:
        """Hand over a computed batch: `finish()` returns its tables."""
        if not self.threaded:
            self._write(finish)
            return
        self.check()
        self._items.put(finish)

    def close(self, raise_error: bool = True) -> None:
        """Finish and queue what was handed over (a commit is attempted for each, as due, and
        never waits for a file held by another process); raise the thread's error if any."""
        if self.threaded and self._thread.is_alive():
            self._items.put(None)
            self._thread.join()
        if raise_error:
            self.check()

    @property
    def idle(self) -> bool:
        """Nothing runs on the thread (the writer may be used again)."""
        return not (self.threaded and self._thread.is_alive())


def populate(db: str | os.PathLike, opts: PopulateOptions | None = None, *,
             resume: int | None = None, progress: bool | None = None, on_wait=None,
             on_warning=None, commit_rows: int = 200_000, commit_seconds: float = 2.0,
             hold_bytes: int = 256 << 20, pipelined: bool = True,
             engine=None) -> PopulateResult:
    """Fill (or resume) one run. Every input is checked before the warehouse is written.

    A resume takes the run's stored options (giving `opts` too is refused) and refuses, naming
    what changed, when the prompt file, the weights or an autoencoder differ from what the run
    started with; resuming a complete run changes nothing. Finished batches are grouped into one
    commit per `commit_rows` rows or `commit_seconds` seconds; while another process holds the
    file they are held (in memory up to `hold_bytes`, then in a staging folder beside the file).
    The next batch computes while the last one is selected, converted and written (on a writer
    thread; `pipelined=False` does each step in turn, with the same rows). With component edges,
    whose memory plan counts one batch on the device, a batch is selected and converted before
    the next computes, and only its write overlaps.

    engine: a `ray_engine.RayEngine` runs the compute on a Ray cluster's actors (the driver
    loads the model on its CPU to check and encode, and writes); None computes here.
    """
    warn = on_warning or log.warning
    if engine is not None:
        from actwh import ray_engine

        engine.validate()
        ray_engine.require_ray()
    prep = prepare(db, opts, resume, warn, device="cpu" if engine is not None else None)
    if isinstance(prep, PopulateResult):
        return prep
    if engine is not None:
        ray_engine.connect(engine)  # an unreachable cluster is refused before the file is written
    writer = open_writer(db, on_wait=on_wait, commit_rows=commit_rows,
                         commit_seconds=commit_seconds, hold_bytes=hold_bytes)
    run_id, done = start_run(writer, prep, device=None if engine is None else
                             engine.device(prep.opts.device))
    try:
        return _fill(prep, writer, run_id, done, engine, progress, pipelined, db)
    finally:
        writer.release_run(run_id)


def _fill(prep, writer, run_id, done, engine, progress, pipelined, db) -> PopulateResult:
    """Compute the run's pending prompts and write them (populate's body, the run claimed)."""
    opts, loaded = prep.opts, prep.loaded
    if engine is not None:
        from actwh import ray_engine
    chunks = batches_of(prep.encoded, done, prep.batch_size)
    n_pending = sum(len(c) for c in chunks)
    bar = Progress(n_pending, progress,
                   extra=None if engine is None else ray_engine.WorkersAlive())
    start, n_tokens = time.monotonic(), 0
    token_text: dict[int, str] = {}
    node_baseline = (attribution_baseline(loaded, prep.encoded, prep.scalars, opts,
                                          prep.batch_size) if prep.attributing else None)
    sums: dict = {}  # Σ attributions and Δmetric over the prompts of this call
    pipe = Pipeline(writer, run_id, threaded=pipelined)
    try:
        if engine is not None and chunks:
            n_tokens, sums = ray_engine.compute_on_ray(prep, engine, run_id, chunks,
                                                       node_baseline, pipe, bar, _shards(db))
            chunks = []
        for chunk in chunks:
            pipe.reserve()
            finish = compute_batch(loaded, chunk, prep.target, prep.needed, prep.scalars,
                                   prep.selection, opts.detach_ln, run_id, token_text, opts.edges,
                                   node_baseline, sums, prep.edge_memory, deferred=True)
            if prep.edge_memory is not None:
                # The edges' memory plan counts one batch on the device: this batch's results
                # leave it before the next computes (only the write overlaps).
                tables = finish()
                finish = lambda tables=tables: tables  # noqa: E731
                del tables
            pipe.put(finish)
            del finish
            n_tok = sum(len(e.ids) for e in chunk)
            n_tokens += n_tok
            bar.update(len(chunk), n_tok)
        pipe.close()
        bar.close()
        status = writer.finish_run(run_id)
    except BaseException:
        try:  # an interrupted run still writes what it computed, if the file is free now
            pipe.close(raise_error=False)
        finally:
            if pipe.idle:
                writer.discard()  # committed batches stay; a resume recomputes the held ones
        raise
    return PopulateResult(run_id, status, len(prep.encoded), n_pending, time.monotonic() - start,
                          n_tokens, pipe.rows, commits=writer.commits,
                          completeness={k: v / n_pending for k, v in sums.items()})


def _shards(db) -> str | None:
    """A lake or Parquet folder spec, absolute (each Ray worker commits its own batches there);
    None for a DuckDB file (the driver is its one writer) or where the storages are not there."""
    try:
        from actwh.warehouse.spec import parse_spec
    except ImportError:  # a warehouse package without the lake and folder storages
        return None
    spec = parse_spec(db)
    return None if spec.kind == "file" else f"{spec.kind}:{spec.path.resolve()}"


def attribution_baseline(loaded, encoded, scalars, opts, batch_size: int) -> tuple:
    """(baseline, ig_steps) for `*_attribution` scalars; the mean baseline's per-position means
    are taken once, over all the run's prompts, `batch_size` prompts at a time (the run's
    batches: fewer than --batch-size where the memory plan chose fewer)."""
    if opts.baseline != "mean":
        return opts.baseline, opts.ig_steps
    from actwh.compute.attribution import ATTRIBUTIONS, attribution_sites
    from actwh.compute.patching import mean_acts
    from actwh.compute.targets import Batch

    sites = {s for v in attribution_sites(
        loaded.model, [s for s in scalars if s in ATTRIBUTIONS]).values() for s in v}
    sites |= {n for n in ("hook_embed", "hook_pos_embed") if n in loaded.model.hook_points}
    pad = loaded.tokenizer.pad_token_id or 0
    batches = (Batch.from_ids([e.ids for e in encoded[i:i + batch_size]], pad)
               for i in range(0, len(encoded), batch_size))
    return mean_acts(loaded.model, batches, sorted(sites)), opts.ig_steps


def compute_batch(loaded, chunk: list[Encoded], target, needed, scalars, selection, detach_ln,
                  run_id: int, token_text: dict[int, str],
                  edges: EdgeOptions | None = None, node_baseline=None,
                  sums: dict | None = None, edge_memory: int | None = None,
                  deferred: bool = False):
    """Compute one batch and shape it into the Arrow tables the warehouse appends.
    edge_memory: the device budget (bytes) the component edges are chunked to fit
    (the scalars' pass is not planned and never reruns blocks).

    deferred: return a function that does the rest (selection, conversion to Arrow, `sums`,
    `token_text`) and returns the tables, so that it can run on another thread while the next
    batch computes."""
    from actwh import rows
    from actwh.compute.sae import spliced
    from actwh.compute.scalars import compute_scalars
    from actwh.compute.selection import select_nodes
    from actwh.compute.targets import Batch

    batch = Batch.from_ids([e.ids for e in chunk], loaded.tokenizer.pad_token_id or 0,
                           [e.target for e in chunk] if chunk[0].target is not None else None,
                           [e.distractor for e in chunk] if chunk[0].distractor is not None else None,
                           [e.position for e in chunk])
    base, steps = node_baseline or ("zero", 0)
    if isinstance(base, str) and base == "corrupt":
        base = Batch.from_ids([e.corrupt for e in chunk], loaded.tokenizer.pad_token_id or 0).tokens
    chunks = None
    if edges is not None and edges.component and edge_memory is not None:
        from actwh.compute.memory import batch_chunks

        chunks = batch_chunks(loaded.model, len(chunk), batch.tokens.shape[1], edge_memory, edges)
    # the scalars' pass is not planned and never reruns blocks (its forward hooks, --detach-ln's
    # among them, would not fire in a rerun)
    res = compute_scalars(loaded.model, batch, target, needed, detach_ln=detach_ln,
                          node_baseline=base, ig_steps=steps)
    prompt_ids = np.array([e.prompt_id for e in chunk], dtype=np.int32)
    sae_layers = tuple(s.info.layer for s in spliced(loaded.model))
    corrupt_metric = to_target = np.full(len(chunk), np.nan)
    parts = None
    if edges is not None:
        parts, corrupt_metric, to_target = batch_edges(loaded, chunk, batch, target, edges, prompt_ids,
                                                       chunks)
    tokenizer = loaded.tokenizer

    def finish() -> dict[str, pa.Table]:
        if sums is not None:
            for k, v in res.completeness.items():
                sums[k] = sums.get(k, 0.0) + float(v.sum())
        cols = rows.node_columns(select_nodes(res, scalars, selection, sae_layers), prompt_ids,
                                 res.mask)
        for e in chunk:
            for t in e.ids + ([e.target] if e.target is not None else []):
                if t not in token_text:
                    token_text[t] = tokenizer.decode([t])
        out = {"node_scalars": rows.arrow_table(cols.node, run_id, cols.scalar_names),
               "pair_scalars": rows.arrow_table(cols.pair, run_id, cols.scalar_names),
               "tokens": rows.token_table(run_id, chunk, token_text)}
        if parts is not None:
            out["edges"] = rows.arrow_table(rows.edge_columns(parts), run_id)
        out["prompts"] = rows.prompt_table(run_id, chunk, res.metric.float().cpu().numpy(),
                                           res.loss.float().cpu().numpy(), corrupt_metric,
                                           to_target, token_text)
        return out

    return finish if deferred else finish()


def batch_edges(loaded, chunk: list[Encoded], batch, target, edges: EdgeOptions, prompt_ids,
                chunks=None):
    """One batch's edges as row parts (component graph, then node-level edges), with each
    prompt's corrupted metric and sum of edges into the target (NaN where not computed).
    chunks: how the component edges are split (compute.edges.EdgeChunks; None: one pass)."""
    from actwh import rows
    from actwh.compute.keep import KeepRule
    from actwh.compute.targets import Batch

    rule = KeepRule.parse(edges.select, "edge selection")
    corrupt_metric = to_target = np.full(len(chunk), np.nan)
    parts = []
    if edges.component:
        from actwh.compute.edges import component_edges, kept_edges

        bad = None
        if edges.baseline == "corrupt":
            bad = Batch.from_ids([e.corrupt for e in chunk], loaded.tokenizer.pad_token_id or 0).tokens
        er = component_edges(loaded.model, batch, target, corrupt=bad, ig_steps=edges.ig_steps,
                             positions=edges.positions, chunks=chunks)
        parts.append(rows.component_edge_part(er, kept_edges(er, rule, batch.mask), prompt_ids,
                                              [e.target for e in chunk], batch.mask))
        into = er.values[..., -1]
        to_target = (into.sum((1, 2)) if into.dim() == 3 else into.sum(1)).float().cpu().numpy()
        if er.corrupt_metric is not None:
            corrupt_metric = er.corrupt_metric.float().cpu().numpy()
    if edges.into or edges.into_latents:
        from actwh.compute.node_edges import (active_latents, kept_inputs, node_edges, sites,
                                              target_downs, top_downstream)

        fwd, bwd = sites(loaded.model)
        b_dev = batch.to(loaded.model.device)
        cache = loaded.model.run_with_cache(
            b_dev.tokens, fwd, attention_mask=b_dev.mask, grad_names=bwd,
            backward_of=lambda logits: target.metric(logits, b_dev).sum())
        downs = top_downstream(loaded.model, b_dev, cache, edges.into) if edges.into else []
        if edges.into_latents:
            downs = list(dict.fromkeys(downs + active_latents(loaded.model, b_dev, cache)))
        if not edges.component:  # the component graph already has edges into the target
            downs += target_downs(loaded.model, b_dev, target, cache.logits)
        found = node_edges(loaded.model, b_dev, target, downs, cache)
        parts.append(rows.node_edge_part(kept_inputs(found, rule, batch.mask), prompt_ids, batch.mask))
    return parts, corrupt_metric, to_target
