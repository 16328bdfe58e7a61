"""Populate on a Ray cluster (`actwh populate PROMPTS --engine ray`).

The driver (the process that runs `populate`) checks every input and encodes every prompt
exactly as a local populate does, before any worker starts; then Ray Data runs the compute of
the prompts' batches on a pool of actors (each loads the model and its autoencoders once, and
checks their weights against the driver's), and the driver writes what comes back: it is the
single writer of the DuckDB file, fed by the workers' Arrow tables through the same writer
thread and bounded pipeline as a local run (the driver stops pulling results while two batches
wait to be written, and Ray Data's streaming executor then stops the workers' output from
piling up: memory stays bounded, whatever the number of prompts).

Exactly once: every batch has a number; a worker that dies mid-batch has its batch redone by a
restarted actor (Ray Data's actor pool restarts actors and retries their tasks), and the driver
writes a batch number once, checking that it holds exactly the prompts that batch was given,
and that every batch came back before the run is marked complete.

Ray is an optional dependency (`pip install 'actwh[ray]'`); nothing imports this module unless
an engine is asked for.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import socket
import time
from dataclasses import dataclass

from actwh.errors import ActwhError

log = logging.getLogger("actwh.ray")
ADDRESS_RE = re.compile(r"^(?:ray://)?(\[[0-9a-fA-F:]+\]|[A-Za-z0-9_.-]+):(\d{1,5})$")


@dataclass(frozen=True, kw_only=True)
class RayEngine:
    """Where and how wide a Ray populate runs (not stored with the run: a resume may change it).

    address: None starts a local cluster (or uses the one this process already joined); "auto"
    joins the cluster started on this machine with `ray start`; "HOST:PORT" joins that one.
    """

    address: str | None = None
    workers: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0

    def validate(self) -> None:
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1:
            raise ActwhError(f"--workers must be a whole number >= 1, not {self.workers!r}")
        for flag, v in (("--gpus-per-worker", self.gpus_per_worker),
                        ("cpus per worker", self.cpus_per_worker)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise ActwhError(f"{flag} must be a number >= 0, not {v!r}")
        if self.address is not None and self.address != "auto" and not ADDRESS_RE.match(self.address):
            raise ActwhError(f"--address {self.address!r}: give auto or HOST:PORT (the cluster's "
                             "GCS address, e.g. 10.0.0.5:6379)")

    def device(self, opts_device: str | None) -> str:
        """The workers' torch device: a GPU when each worker has one, else the run's device."""
        if self.gpus_per_worker > 0:
            return "cuda"
        return opts_device or "cpu"

    def to_json(self) -> dict:
        return {"name": "ray", "workers": self.workers, "gpus_per_worker": self.gpus_per_worker,
                "cpus_per_worker": self.cpus_per_worker}


def require_ray():
    try:
        import ray  # noqa: F401
        import ray.data  # noqa: F401
    except ImportError:
        raise ActwhError("--engine ray needs Ray: pip install 'actwh[ray]'") from None
    return ray


def connect(engine: RayEngine) -> None:
    """Join (or start) the cluster, or refuse in one line, before anything is written."""
    ray = require_ray()
    address = engine.address
    if address not in (None, "auto"):
        host, port = ADDRESS_RE.match(address).groups()
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
        except OSError as e:
            reason = e.strerror or str(e) or type(e).__name__
            raise ActwhError(f"--address {address}: no Ray cluster answers there ({reason})") from None
    if not ray.is_initialized():  # else this process already joined one (a notebook, a test)
        _init(ray, address)
    have = ray.cluster_resources()
    for name, each, flag in (("CPU", engine.cpus_per_worker, "cpus per worker"),
                             ("GPU", engine.gpus_per_worker, "--gpus-per-worker")):
        need = each * engine.workers
        if need > have.get(name, 0):
            raise ActwhError(f"--workers {engine.workers} with {flag} {each:g} need {need:g} "
                             f"{name}s; the Ray cluster has {have.get(name, 0):g}")


def _init(ray, address) -> None:
    # Ray's C++ core logs harmless notices (constructor arguments in the object store) to the
    # driver's terminal; errors that matter reach Python as exceptions.
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    try:
        ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False,
                 include_dashboard=False if address is None else None)
    except (ConnectionError, RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if address == "auto":
            raise ActwhError("--address auto: no running Ray cluster found on this machine (start "
                             f"one with `ray start --head`): {first}") from None
        raise ActwhError(f"--address {address}: cannot join the Ray cluster: {first}") from None


class RayCompute:
    """One actor of the pool: loads the model (and autoencoders) once, then computes batches
    into the warehouse's Arrow tables, exactly as a local populate's compute step does."""

    SPEC: dict | None = None  # set on the subclass each run makes (see `compute_on_ray`)

    def __init__(self, spec: dict | None = None):
        import torch

        from actwh.compute.loading import load_model
        from actwh.compute.scalars import get_scalar
        from actwh.compute.selection import Selection
        from actwh.compute.targets import get_target
        from actwh.runner import PopulateOptions

        spec = self.SPEC if spec is None else spec
        opts = PopulateOptions.from_json(spec["options"])
        self.opts, self.run_id = opts, spec["run_id"]
        self.loaded = load_model(opts.model, device=spec["device"], dtype=getattr(torch, opts.dtype))
        if self.loaded.info.weights_sha256 != spec["weights_sha256"]:
            raise ActwhError(f"a Ray worker on {socket.gethostname()} reads other weights at "
                             f"{opts.model} than the driver: give every node the same files")
        if opts.saes:
            from actwh.compute.sae import load_sae, splice

            for (folder, site), sha in zip(opts.saes, spec["saes_sha256"]):
                sae = load_sae(folder, site)
                if sae.info.weights_sha256 != sha:
                    raise ActwhError(f"a Ray worker on {socket.gethostname()} reads another "
                                     f"autoencoder at {folder} than the driver")
                splice(self.loaded.model, sae)
        self.target = get_target(spec["target"])
        self.scalars = [get_scalar(s).name for s in opts.scalars]
        self.selection = Selection.parse(opts.select)
        self.needed = self.selection.scalars_needed(self.scalars)
        base = spec["node_baseline"]
        if base is not None and isinstance(base[0], dict):
            base = ({k: v.to(self.loaded.model.device) for k, v in base[0].items()}, base[1])
        self.node_baseline = base
        self.token_text: dict[int, str] = {}
        self.edge_memory = None
        if opts.edges is not None and opts.edges.component:  # this worker's device's budget
            from actwh.compute.memory import populate_plan

            self.edge_memory = populate_plan(self.loaded.model, opts.max_memory, opts.batch_size,
                                             spec["longest"], opts.edges)[0]
        self.committer = None
        if spec.get("commit_to"):  # a lake or a Parquet folder: this worker commits its batches
            from actwh.warehouse.shards import BatchCommitter

            self.committer = BatchCommitter.from_spec(spec["commit_to"], self.run_id, wait_s=None)

    def __call__(self, batch):
        import pyarrow as pa

        from actwh.runner import Encoded, compute_batch

        nos, payloads = [], []
        for no, chunk in zip(batch.column("batch_no").to_pylist(), batch.column("chunk").to_pylist()):
            chunk = [Encoded(**e) for e in json.loads(chunk)]
            sums: dict = {}
            tables = compute_batch(self.loaded, chunk, self.target, self.needed, self.scalars,
                                   self.selection, self.opts.detach_ln, self.run_id,
                                   self.token_text, self.opts.edges, self.node_baseline, sums,
                                   self.edge_memory)
            nos.append(no)
            got = {"sums": sums, "pid": os.getpid()}
            if self.committer is None:  # the driver writes the DuckDB file
                got["tables"] = tables
            else:
                got["rows"] = {t: tables[t].num_rows for t in tables}
                got["prompt_ids"] = tables["prompts"].column("prompt_id").to_pylist()
                got["committed"] = self._commit(tables)
            payloads.append(pickle.dumps(got, protocol=5))
        return pa.table({"batch_no": pa.array(nos, pa.int64()),
                         "payload": pa.array(payloads, pa.large_binary())})


    def _commit(self, tables) -> bool:
        """Commit one batch (exactly once: a batch redone after a worker died may find itself
        committed already, which the commit itself checks). False when it was already in."""
        from actwh.warehouse.writer import BatchAlreadyCommitted

        try:
            self.committer.commit(tables)
        except BatchAlreadyCommitted:
            return False
        return True


class WorkersAlive:
    """How many of the pool's actors are alive (asked of the cluster at most once a second)."""

    def __init__(self):
        self.at, self.n = 0.0, None

    def __call__(self) -> str:
        if time.monotonic() - self.at > 1.0:
            self.at = time.monotonic()
            try:
                from ray._private import state

                self.n = sum(1 for a in state.actors().values()
                             if "RayCompute" in a.get("ActorClassName", "") and a.get("State") == "ALIVE")
            except Exception:  # noqa: BLE001 (a private API: progress only)
                self.n = None
        return f"  workers alive {'?' if self.n is None else self.n}"


def worker_error(e: BaseException) -> ActwhError:
    """A worker's failure as one line: the ActwhError it raised, else the error's last line."""
    seen, cur = set(), e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        for inner in (cur, getattr(cur, "cause", None)):
            if isinstance(inner, ActwhError) and inner.args:
                return ActwhError(str(inner.args[0]).strip().splitlines()[-1])
        cur = getattr(cur, "cause", None) or cur.__cause__
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    return ActwhError(f"a Ray worker failed: {lines[-1].strip() if lines else type(e).__name__}")


def _results(ds):
    """The dataset's output blocks; a worker's failure as one line."""
    it = iter(ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=1))
    try:
        while True:
            try:
                out = next(it)
            except StopIteration:
                return
            except ActwhError:
                raise
            except Exception as e:  # noqa: BLE001 (Ray wraps the worker's error in its own)
                raise worker_error(e) from None
            yield out
    finally:  # stops the pool when the driver stops early (an error, Ctrl-C)
        close = getattr(it, "close", None)
        if close is not None:
            close()


def compute_on_ray(prep, engine: RayEngine, run_id: int, chunks, node_baseline, pipe, bar,
                   commit_to: str | None = None):
    """Run the batches' compute on the pool; hand each batch's tables to `pipe` (the driver's
    writer thread) once, or, given `commit_to` (a lake or Parquet folder spec), let the workers
    commit them. Returns (tokens, sums)."""
    import ray
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    if hasattr(ctx, "enable_operator_progress_bars"):
        ctx.enable_operator_progress_bars = False
    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(logging.ERROR)
    spec = {"options": prep.opts.to_json(), "run_id": run_id, "target": prep.target.name,
            "weights_sha256": prep.loaded.info.weights_sha256, "saes_sha256": prep.sae_shas,
            "device": engine.device(prep.opts.device), "node_baseline": node_baseline,
            "commit_to": commit_to, "longest": max(len(e.ids) for c in chunks for e in c)}
    given = {i: [e.prompt_id for e in c] for i, c in enumerate(chunks)}
    items = [{"batch_no": i, "chunk": json.dumps([e.__dict__ for e in c])} for i, c in enumerate(chunks)]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    del items
    # The run's spec travels with the actor class (pickled by value), not as constructor
    # arguments in the object store, which restarted actors would need to find again.
    compute = type("RayCompute", (RayCompute,), {"SPEC": spec, "__module__": __name__})
    ds = ds.map_batches(compute, batch_size=1,
                        compute=ray.data.ActorPoolStrategy(size=min(engine.workers, len(chunks))),
                        num_cpus=engine.cpus_per_worker, num_gpus=engine.gpus_per_worker or None,
                        batch_format="pyarrow", zero_copy_batch=True)
    written: set[int] = set()
    sums: dict = {}
    results = _results(ds)
    try:
        _write_results(results, given, chunks, written, sums, pipe, bar)
    finally:
        results.close()  # an error or Ctrl-C here stops the pool now, not when collected
    missing = sorted(set(given) - written)
    if missing:
        raise ActwhError(f"{len(missing)} batches did not come back from the Ray workers "
                         f"(first: batch {missing[0]}); resume the run")
    return sum(sum(len(e.ids) for e in chunks[no]) for no in written), sums


def _write_results(results, given, chunks, written, sums, pipe, bar) -> None:
    for out in results:
        for no, payload in zip(out.column("batch_no").to_pylist(), out.column("payload").to_pylist()):
            if no in written:  # a batch redone after its first result came back: once only
                log.warning("batch %d came back twice; written once", no)
                continue
            got = pickle.loads(payload)
            tables = got.get("tables")
            ids = (tables["prompts"].column("prompt_id").to_pylist() if tables is not None
                   else got["prompt_ids"])
            if sorted(ids) != sorted(given[no]):
                raise ActwhError(f"batch {no} came back with prompts {ids}, not the "
                                 f"{given[no]} it was given")
            if tables is not None:  # the driver writes it
                pipe.reserve()
                pipe.put(lambda tables=tables: tables)
            else:  # the worker committed it (or found it committed by an earlier try)
                for t in pipe.rows:  # written by this run either way
                    pipe.rows[t] += got["rows"].get(t, 0)
            written.add(no)
            for k, v in got["sums"].items():
                sums[k] = sums.get(k, 0.0) + v
            bar.update(len(ids), sum(len(e.ids) for e in chunks[no]))
            del got, tables, payload
