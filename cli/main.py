"""The `actwh` command group. Commands are thin: one library call each, errors as one line."""

from __future__ import annotations

import click

from actwh import __version__
from actwh.cli.output import RENDERERS, format_option, render
from actwh.errors import ActwhError


class Group(click.Group):
    """Turns the library's typed errors into one-line messages with exit status 1."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except ActwhError as e:
            raise click.ClickException(str(e)) from None
        except click.UsageError as e:  # one line, like every other error
            raise click.ClickException(e.format_message()) from None
        except KeyboardInterrupt:
            click.echo("Error: interrupted", err=True)
            ctx.exit(130)
        except OSError as e:  # an unwritable output path, a vanished folder
            where = f": {e.filename}" if getattr(e, "filename", None) else ""
            raise click.ClickException(f"{e.strerror or e}{where}") from None


@click.group(cls=Group)
@click.version_option(__version__, prog_name="actwh")
def cli() -> None:
    """actwh: an activation warehouse for transformer interpretability.

    Populate a DuckDB file with activations and attributions, then ask it questions in SQL.
    """


model_option = click.option(
    "--model", "model_path", default=None, metavar="DIR",
    help="Hugging Face checkpoint folder or local cache name (default: the embedded model).")
device_option = click.option("--device", default=None, help="cuda or cpu (default: cuda if present).")


@cli.command()
@click.argument("text")
@model_option
@device_option
@click.option("-k", default=5, show_default=True, help="How many next tokens to show.")
def predict(text: str, model_path: str | None, device: str | None, k: int) -> None:
    """Show the model's top-k next tokens after TEXT."""
    from actwh.compute.loading import load_model
    from actwh.compute.inference import top_next_tokens

    loaded = load_model(model_path, device=device)
    for token, prob in top_next_tokens(loaded, text, k):
        click.echo(f"{prob:8.4f}  {token!r}")


@cli.command()
@model_option
def sites(model_path: str | None) -> None:
    """List the model's hook sites (the names hooks, scalars and SQL use)."""
    from actwh.compute.loading import load_model

    for name in load_model(model_path, device="cpu").model.hook_points:
        click.echo(name)


def db_option(f):
    return click.option("--db", envvar="ACTWH_DB", default="actwh.duckdb", show_default=True,
                        help="Warehouse: a DuckDB file, lake:PATH (a DuckLake catalog) or "
                             "parquet:DIR (a folder of Parquet shards) (or $ACTWH_DB).")(f)


TYPED = {"str": str, "int": int, "float": float}


def parse_params(pairs: tuple[str, ...]) -> dict:
    """K=V pairs. V is bound as an integer or float when it reads as one, else as text;
    `K=str:V` (or `int:`, `float:`) says the type: `-p code=str:0001` binds the text '0001'."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r} is not K=V", param_hint="--param")
        kind, colon, rest = value.partition(":")
        if colon and kind in TYPED:
            try:
                value = TYPED[kind](rest)
            except ValueError:
                raise click.BadParameter(f"{pair!r}: {rest!r} is not {kind}",
                                         param_hint="--param") from None
        else:
            for cast in (int, float):
                try:
                    value = cast(value)
                    break
                except ValueError:
                    continue
        if key in out:
            raise click.BadParameter(f"{key} is given twice", param_hint="--param")
        out[key] = value
    return out


PARAM_HELP = ("Bind $K to V (repeatable); never pasted into the SQL. V binds as a number when it "
              "reads as one: K=str:V forces text (K=str:0001), K=int:V / K=float:V a number.")


@cli.command()
@click.argument("prompts", type=click.Path(dir_okay=False), required=False)
@db_option
@model_option
@click.option("--scalars", default=None, metavar="A,B,...",
              help="Comma-separated scalar names (see `actwh scalars`); default: act × grad, "
                   "direct effects, activations and patterns.")
@click.option("--all", "all_scalars", is_flag=True, help="Every scalar in the registry.")
@click.option("--target", default=None,
              help="loss | logit | logit_diff | logprob (default: logit_diff when prompts give a "
                   "target and distractor, logprob with a target only, else loss).")
@click.option("--select", default=None, metavar="RULE",
              help="top-k:N:SCALAR | threshold:X:SCALAR | dense [default: top-k:20:mlp_act_times_grad].")
@click.option("--batch-size", default=8, show_default=True, help="Prompts per batch (and per write).")
@device_option
@click.option("--dtype", default="float32", show_default=True,
              type=click.Choice(["float32", "bfloat16", "float16", "float64"]))
@click.option("--name", default=None, help="A name for the run.")
@click.option("--prepend-bos", is_flag=True, help="Force a BOS token before every prompt.")
@click.option("--detach-ln", is_flag=True, help="Freeze LayerNorm scales in the backward pass too.")
@click.option("--resume", type=int, default=None, metavar="RUN_ID",
              help="Finish an interrupted run with its stored settings.")
@click.option("--edges", "edges", is_flag=True, help="Add the component graph's edges (EAP).")
@click.option("--edges-baseline", type=click.Choice(["zero", "corrupt"]), default="zero",
              show_default=True, help="zero: act × grad; corrupt: clean − corrupt activations.")
@click.option("--ig-steps", type=int, default=0, show_default=True,
              help="EAP-IG integration points between corrupt and clean (0: plain EAP).")
@click.option("--edges-select", default="top-k:50", show_default=True,
              help="Edges kept per prompt: top-k:N | threshold:X | dense.")
@click.option("--edges-positions", type=click.Choice(["summed", "each"]), default="summed",
              show_default=True, help="Sum edges over positions or keep one per position.")
@click.option("--edges-into", default=None, metavar="top:N|latents",
              help="Node-level edges into the N top act × grad nodes (neurons, head q/k/v, SAE "
                   "latents) of each prompt, or into every active latent of the spliced "
                   "autoencoders; also into the target unless --edges is given. --edges-select "
                   "then applies per traced node.")
@click.option("--max-memory", default=None, metavar="SIZE",
              help="Device memory the run may hold, e.g. 40GB or 512MB: the component edges are "
                   "chunked, and the batch made smaller, to stay under it [default: what the "
                   "device has free].")
@click.option("--sae", "sae_dirs", multiple=True, type=click.Path(), metavar="DIR",
              help="Splice a sparse autoencoder (SAELens or OpenAI layout); repeatable.")
@click.option("--sae-site", "sae_sites", multiple=True, metavar="SITE",
              help="Hook site for the matching --sae (overrides its config); repeatable.")
@click.option("--commit-seconds", default=2.0, show_default=True, type=float,
              help="Group finished batches into one commit at most this often (0: each batch "
                   "its own commit).")
@click.option("--top", default=10, show_default=True, help="Attributions to print at the end.")
@click.option("--baseline", "node_baseline", type=click.Choice(["zero", "corrupt", "mean"]),
              default="zero", show_default=True,
              help="Baseline of the *_attribution scalars (--ig-steps integrates to it too).")
@click.option("--engine", type=click.Choice(["ray"]), default=None,
              help="Run the compute on a Ray cluster (pip install 'actwh[ray]'); default: here.")
@click.option("--address", default=None, metavar="auto|HOST:PORT",
              help="The Ray cluster to join (default: start a local one).")
@click.option("--workers", type=int, default=1, show_default=True,
              help="Ray actors computing at once (each loads the model once).")
@click.option("--gpus-per-worker", type=float, default=0.0, show_default=True,
              help="GPUs each Ray actor holds (0: compute on the CPU).")
@click.pass_context
def populate(ctx, prompts, db, model_path, scalars, all_scalars, target, select, batch_size, device,
             dtype, name, prepend_bos, detach_ln, resume, edges, edges_baseline, ig_steps,
             edges_select, edges_positions, edges_into, max_memory, sae_dirs, sae_sites,
             commit_seconds, top, node_baseline, engine, address, workers,
             gpus_per_worker) -> None:
    """Run the model over PROMPTS (.txt or .jsonl) and load scalars into the warehouse.

    A populate never gives up on a file someone else holds open: it keeps computing, holds the
    finished batches and writes them when the file is free. --resume RUN_ID finishes an
    interrupted run with its stored options, and refuses if the prompt file, the weights or an
    autoencoder changed since it started."""
    from actwh.runner import (DEFAULT_SCALARS, DEFAULT_SELECTION, EdgeOptions, PopulateOptions,
                              populate as run)
    from actwh.compute.default_model import default_prompts
    from actwh.compute.scalars import SCALARS

    from click.core import ParameterSource

    ray_flags = ("address", "workers", "gpus_per_worker")
    given = [p for p in ctx.command.params if p.name not in ("db", "top", "engine", *ray_flags)
             and ctx.get_parameter_source(p.name) == ParameterSource.COMMANDLINE]
    loose = [p.opts[0] for p in ctx.command.params if p.name in ray_flags
             and ctx.get_parameter_source(p.name) == ParameterSource.COMMANDLINE]
    if loose and engine is None:
        raise click.UsageError(f"{', '.join(loose)} applies to --engine ray")
    ray_engine = None
    if engine == "ray":
        from actwh.ray_engine import RayEngine

        ray_engine = RayEngine(address=address, workers=workers, gpus_per_worker=gpus_per_worker)
        ray_engine.validate()
    opts = None
    if resume is not None:
        others = [p.opts[0] if isinstance(p, click.Option) else p.human_readable_name
                  for p in given if p.name != "resume"]
        if others:
            raise click.UsageError(f"--resume continues a run with its stored options; remove "
                                   f"{', '.join(others)}")
    else:
        from actwh.compute.attribution import ATTRIBUTIONS

        attributing = bool(set(ATTRIBUTIONS) & set((scalars or "").split(","))) or all_scalars
        if not (edges or edges_into):
            loose = [p.opts[0] for p in given if p.name in
                     ("edges_baseline", "ig_steps", "edges_select", "edges_positions")
                     and not (attributing and p.name == "ig_steps")]
            if loose:
                raise click.UsageError(f"{', '.join(loose)} applies to edges: add --edges or "
                                       "--edges-into")
        names = tuple(n for n, s in SCALARS.items() if sae_dirs or not s.sae_level) if all_scalars else (
            tuple(s.strip() for s in scalars.split(",") if s.strip()) if scalars is not None
            else DEFAULT_SCALARS)
        if prompts is None and model_path is None:
            prompts = str(default_prompts())
        if prompts is None:
            raise click.UsageError("give a PROMPTS file (the example prompts belong to the "
                                   "default model)")
        into = EdgeOptions.parse_into(edges_into)
        edge_opts = None
        if edges or edges_into:
            edge_opts = EdgeOptions(baseline=edges_baseline, ig_steps=ig_steps,
                                    select=edges_select, positions=edges_positions,
                                    component=edges, **into)
        opts = PopulateOptions(prompts=prompts, model=model_path, scalars=names, target=target,
                               select=select or DEFAULT_SELECTION, batch_size=batch_size,
                               device=device, dtype=dtype, name=name, prepend_bos=prepend_bos,
                               detach_ln=detach_ln, edges=edge_opts,
                               saes=PopulateOptions.sae_pairs(sae_dirs, sae_sites),
                               baseline=node_baseline, ig_steps=ig_steps if attributing else 0,
                               max_memory=max_memory)
    if commit_seconds < 0:
        raise click.BadParameter("must be >= 0", param_hint="--commit-seconds")
    result = run(db, opts, resume=resume, on_wait=lambda msg: click.echo(msg, err=True),
                 on_warning=lambda msg: click.echo(f"Warning: {msg}", err=True),
                 commit_seconds=commit_seconds, engine=ray_engine)
    if result.already_complete:
        click.echo(f"run {result.run_id} is already complete ({result.n_prompts} prompts); "
                   "nothing to do", err=True)
    else:
        click.echo(f"run {result.run_id}: {result.status}, {result.n_written} prompts written "
                   f"({result.rows['node_scalars']:,} node rows, {result.rows['pair_scalars']:,} "
                   f"pair rows) in {result.seconds:.1f}s -> {db}", err=True)
        if result.completeness:
            c = dict(result.completeness)
            delta = c.pop("delta")
            sums = ", ".join(f"Σ {k} {v:.4g}" for k, v in c.items())
            click.echo(f"completeness (mean per prompt): {sums}; Δmetric (clean − baseline input) "
                       f"{delta:.4g}", err=True)
    if top:
        from actwh.queries.loader import Queries
        from actwh.warehouse.store import Warehouse

        with Warehouse(db) as wh:
            ranked = most_faithful(wh, result.run_id)
            if ranked is None:
                render(Queries()["run_top_attributions"](wh, run=result.run_id, k=top), "table")
            else:
                click.echo(f"ranked by {', '.join(ranked[0])}: {ranked[1]}", err=True)
                render(Queries()["run_top_by_scalars"](wh, run=result.run_id, scalars=ranked[0],
                                                       k=top), "table")


@cli.command()
@db_option
@click.option("--delete", "delete", type=int, default=None, metavar="RUN_ID",
              help="Remove this run (an abandoned one, say) from every table, in one transaction.")
@format_option
def runs(db, delete, fmt) -> None:
    """List the runs in the warehouse (or delete one)."""
    from actwh.warehouse.store import Warehouse

    if delete is not None:
        from actwh.compute.scalars import NODE_TYPES, SCALARS
        from actwh.warehouse.store import WarehouseWriter

        from actwh.warehouse import runlock
        from actwh.warehouse.spec import parse_spec

        Warehouse(db).require_run(delete)  # refuse before opening the file for writing,
        spec = parse_spec(db)
        if spec.kind == "file":  # and while a populate is writing the run
            runlock.check(spec.path, delete, "delete")
        removed = WarehouseWriter(db, NODE_TYPES, tuple(SCALARS)).delete_run(delete)
        click.echo(f"run {delete} deleted ({removed['prompts']} prompts, "
                   f"{removed['node_scalars']:,} node rows, {removed['pair_scalars']:,} pair rows, "
                   f"{removed['edges']:,} edges)", err=True)
        return
    render(Warehouse(db).runs(), fmt)


@cli.command()
@db_option
@format_option
def models(db, fmt) -> None:
    """List the models registered in the warehouse."""
    from actwh.warehouse.store import Warehouse

    render(Warehouse(db).models(), fmt)


@cli.command()
@click.argument("query")
@db_option
@click.option("--param", "-p", "params", multiple=True, metavar="K=V", help=PARAM_HELP)
@format_option
def sql(query, db, params, fmt) -> None:
    """Run one SQL statement on the warehouse (read-only) and print the result."""
    from actwh.warehouse.store import Warehouse

    render(Warehouse(db).sql(query, **parse_params(params)), fmt)


@cli.command()
@click.argument("run", type=int)
@click.argument("folder", type=click.Path(file_okay=False))
@db_option
def export(run, folder, db) -> None:
    """Export one run to FOLDER as Parquet, one file per table."""
    from actwh.warehouse.store import Warehouse

    for path in Warehouse(db).export_run(run, folder):
        click.echo(path)


@cli.command()
@click.argument("source")
@click.option("--db", envvar="ACTWH_DB", default="actwh.duckdb", show_default=True,
              help="The DuckDB file to copy into (or $ACTWH_DB).")
def ingest(source, db) -> None:
    """Copy a lake (lake:PATH) or a Parquet folder (parquet:DIR) into one DuckDB file, exactly
    once: what the file already holds is not added again."""
    from actwh.ontology import NODE_TYPES
    from actwh.warehouse.ingest import ingest as run_ingest

    added = run_ingest(source, db, NODE_TYPES,
                       on_wait=lambda msg: click.echo(msg, err=True))
    click.echo(f"ingested {source} -> {db}: {added['runs']} runs, {added['prompts']} prompts, "
               f"{added['node_scalars']:,} node rows, {added['pair_scalars']:,} pair rows, "
               f"{added['edges']:,} edges", err=True)


@cli.command()
@format_option
def scalars(fmt) -> None:
    """List the derived scalars with their node type, shape and description."""
    import polars as pl

    from actwh.compute.scalars import SCALARS

    render(pl.DataFrame([{"scalar": s.name, "node_type": s.node_type, "shape": s.kind,
                          "description": s.description} for s in SCALARS.values()]), fmt)


@cli.command("queries")
def list_queries() -> None:
    """List the saved queries with their docs and parameters."""
    from actwh.queries.loader import Queries

    for q in Queries():
        click.echo(f"{q.name}({q.signature_text()})\n    {q.doc}")


@cli.command()
@click.argument("name")
@db_option
@click.option("--param", "-p", "params", multiple=True, metavar="K=V", help=PARAM_HELP)
@format_option
def query(name, db, params, fmt) -> None:
    """Run the saved query NAME (see `actwh queries`) with bound parameters."""
    from actwh.queries.loader import Queries
    from actwh.warehouse.store import Warehouse

    saved = Queries()[name]
    render(saved(Warehouse(db), **parse_params(params)), fmt)


@cli.command()
@click.argument("run", type=int)
@click.argument("prompt", type=int, required=False)
@db_option
@click.option("--method", type=click.Choice(["threshold", "top-n", "reachable", "influence"]),
              default="influence", show_default=True, help="How edges are chosen.")
@click.option("--threshold", "value", type=float, default=None,
              help="Minimum |edge value| (threshold, reachable).")
@click.option("-n", default=50, show_default=True, help="Edges kept by top-n.")
@click.option("--node-threshold", default=0.8, show_default=True,
              help="Cumulative influence fraction of nodes kept (influence).")
@click.option("--edge-threshold", default=0.98, show_default=True,
              help="Cumulative influence fraction of edges kept (influence).")
@click.option("--dot", type=click.Path(dir_okay=False), help="Also write Graphviz DOT here.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Also write JSON here.")
@click.option("--format", "fmt", default="table", show_default=True,
              type=click.Choice([*RENDERERS, "html", "svg", "circuit-tracer"]),
              help="How to print the edges, or a standalone picture (html, svg) or circuit-tracer "
                   "graph JSON (written to --output, else printed).")
@click.option("--output", "-o", type=click.Path(dir_okay=False), default=None,
              help="File for --format html|svg|circuit-tracer.")
@click.option("--prompts", "prompt_ids", default=None, metavar="all|ID,...",
              help="A circuit over prompts: edges averaged over them (mean) before filtering.")
@click.option("--save", is_flag=True, help="Store the circuit (over --prompts) in `circuits`.")
def circuit(run, prompt, db, method, value, n, node_threshold, edge_threshold, dot, json_path,
            fmt, output, prompt_ids=None, save=False) -> None:
    """Filter the edges of one prompt of RUN into a circuit and print its edges."""
    if prompt_ids is not None or prompt is None or save:
        return dataset_circuit_command(db, run, prompt, prompt_ids, method, value, n,
                                       node_threshold, edge_threshold, save, fmt)
    import json

    from actwh.queries.circuit import find_circuit
    from actwh.warehouse.store import Warehouse

    if fmt in ("html", "svg", "circuit-tracer"):
        from actwh.views.export import write_circuit

        found = write_circuit(db, run, prompt, fmt, output, method=method, value=value, n=n,
                              node_threshold=node_threshold, edge_threshold=edge_threshold).circuit
    else:
        found = find_circuit(Warehouse(db), run, prompt, method, value, n, node_threshold,
                             edge_threshold)
    if dot:
        with open(dot, "w") as f:
            f.write(found.to_dot())
    if json_path:
        with open(json_path, "w") as f:
            json.dump(found.to_json(), f, indent=1, default=str)
    if fmt in RENDERERS:
        render(found.edges.select("up_label", "down_label", "down_input", "value"), fmt)


@cli.command()
@db_option
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind (the default answers this machine only).")
@click.option("--port", default=8765, show_default=True, type=click.IntRange(0, 65535),
              help="Port (0: any free port).")
@click.option("--open", "open_browser", is_flag=True, help="Open the start page in a browser.")
def view(db, host, port, open_browser) -> None:
    """Serve the warehouse's runs, prompts, attention and circuits as a local web app (read-only)."""
    from actwh.views.server import serve

    serve(db, host, port, open_browser)


@cli.command()
@click.argument("kind", type=click.Choice(["ioi", "induction", "successor"]), required=False)
def examples(kind) -> None:
    """Print the path of the default model's example prompt files (or of one KIND)."""
    from actwh.compute.default_model import default_prompts

    for k in [kind] if kind else ["ioi", "induction", "successor"]:
        click.echo(default_prompts(k))


@cli.command()
@click.argument("run", type=int)
@db_option
@click.option("--prompts", "prompt_ids", default="all", show_default=True, metavar="all|ID,...",
              help="Which of the run's prompts to evaluate.")
@click.option("--method", type=click.Choice(["influence", "top-n", "threshold"]),
              default="influence", show_default=True, help="How each prompt's circuit is chosen "
              "from the run's stored edges.")
@click.option("--sizes", default=None, metavar="A,B,...",
              help="Circuit sizes: edge counts (top-n), |value| thresholds (threshold) or "
                   "cumulative edge-influence fractions (influence) [default: 10,...,500 | "
                   "1,...,0.01 | 0.5,...,0.99].")
@click.option("--baseline", type=click.Choice(["corrupt", "zero", "mean"]), default="corrupt",
              show_default=True, help="What patched edges carry: the corrupted prompt's "
              "writes, zero, or the mean over the run's prompts.")
@click.option("--node-threshold", default=0.8, show_default=True,
              help="Cumulative influence fraction of nodes kept (influence).")
@click.option("--circuit", "circuit_id", type=int, default=None, metavar="ID",
              help="Evaluate a stored circuit (see `actwh circuit --save`) instead.")
@click.option("--nodes", "nodes", is_flag=True,
              help="Node circuits: the top-n heads, neurons and latents by a stored scalar keep "
                   "their activations, every other one is patched (--method top-n; sizes: node "
                   "counts).")
@click.option("--scalars", "rankers", default=None, metavar="A,B,...",
              help="--nodes: the stored scalars that rank heads, neurons and latents [default: "
                   "their act × grad and attribution scalars the run stored].")
@click.option("--batch-size", default=8, show_default=True, help="Prompts per patched pass.")
@device_option
@format_option
def evaluate(run, db, prompt_ids, method, sizes, baseline, node_threshold, circuit_id, nodes,
             rankers, batch_size, device, fmt) -> None:
    """Faithfulness of RUN's circuits: patch every edge outside them and measure the metric."""
    from actwh.evaluate import EvalOptions, evaluate as run_eval, parse_prompt_ids, parse_sizes
    from actwh.queries.loader import Queries
    from actwh.warehouse.store import Warehouse

    circuit = None
    if circuit_id is not None:
        from actwh.queries.circuits import read_circuit

        circuit = read_circuit(Warehouse(db), circuit_id)
        if sizes is not None:
            raise click.BadParameter("a stored circuit has one size", param_hint="--sizes")
    if nodes and method == "influence":
        method = "top-n"  # node circuits are top-n node sets
    opts = EvalOptions(method, parse_sizes(sizes, method), baseline, parse_prompt_ids(prompt_ids),
                       node_threshold, batch_size, device)
    if nodes:
        from actwh.evaluate import evaluate_nodes

        if circuit is not None:
            raise click.UsageError("--nodes and --circuit are two kinds of circuit: give one")
        names = tuple(x.strip() for x in rankers.split(",") if x.strip()) if rankers else None
        result = evaluate_nodes(db, run, opts, names)
    else:
        result = run_eval(db, run, opts, circuit)
    click.echo(f"evaluation {result.eval_id}: {len(result.rows['prompt_id'])} rows -> {db}",
               err=True)
    render(Queries()["faithfulness_curve"](Warehouse(db), eval=result.eval_id), fmt)


@cli.command()
@click.argument("run", type=int)
@db_option
@click.option("--nodes", "nodes", default=None, metavar="top:N",
              help="Measure each prompt's N top node attributions (per scalar), one at a time.")
@click.option("--edges", "edges", default=None, metavar="top:N",
              help="Measure each prompt's N top stored edges, one at a time.")
@click.option("--baseline", type=click.Choice(["zero", "corrupt", "mean"]), default=None,
              help="What a measured node or edge is patched to [default: zero for nodes, the "
                   "run's edge baseline for edges].")
@click.option("--scalars", default=None, metavar="A,B,...",
              help="Node scalars whose predictions to measure [default: every act × grad "
                   "scalar the run stored].")
@click.option("--prompts", "prompt_ids", default="all", show_default=True, metavar="all|ID,...")
@click.option("--batch-size", default=8, show_default=True, help="Prompts per patched pass.")
@device_option
@format_option
def verify(run, db, nodes, edges, baseline, scalars, prompt_ids, batch_size, device, fmt) -> None:
    """Measure RUN's top predicted node or edge effects by patching each alone."""
    from actwh.evaluate import parse_prompt_ids
    from actwh.queries.loader import Queries
    from actwh.verify import parse_top, verify as run_verify
    from actwh.warehouse.store import Warehouse

    if (nodes is None) == (edges is None):
        raise click.UsageError("give one of --nodes top:N or --edges top:N")
    what, top = ("nodes", nodes) if nodes is not None else ("edges", edges)
    names = tuple(s.strip() for s in scalars.split(",") if s.strip()) if scalars else None
    eval_id = run_verify(db, run, what, parse_top(top), baseline, parse_prompt_ids(prompt_ids),
                         names, batch_size, device)
    click.echo(f"evaluation {eval_id} -> {db}", err=True)
    render(Queries()["verify_agreement"](Warehouse(db), eval=eval_id), fmt)


def dataset_circuit_command(db, run, prompt, prompt_ids, method, value, n, node_threshold,
                            edge_threshold, save, fmt) -> None:
    """`actwh circuit RUN --prompts all|ID,... [--save]`: a circuit over prompts."""
    from actwh.evaluate import parse_prompt_ids
    from actwh.queries.circuits import dataset_circuit, save_circuit
    from actwh.warehouse.store import Warehouse

    if prompt is not None and prompt_ids is not None:
        raise click.UsageError("give PROMPT or --prompts, not both")
    if prompt is None and prompt_ids is None:
        raise click.UsageError("give PROMPT or --prompts all|ID,...")
    if fmt not in ("table", "csv", "json", "parquet"):
        raise click.UsageError(f"--format {fmt} draws one prompt's circuit; a circuit over "
                               "--prompts prints as table, csv, json or parquet")
    ids = [prompt] if prompt is not None else parse_prompt_ids(prompt_ids)
    found, used = dataset_circuit(Warehouse(db), run, None if ids is None else list(ids), method,
                                  value, n, node_threshold, edge_threshold)
    if save:
        params = {"threshold": value, "n": n, "node_threshold": node_threshold,
                  "edge_threshold": edge_threshold}
        cid = save_circuit(db, run, found, method, params, used)
        click.echo(f"circuit {cid}: {found.edges.height} edges over {len(used)} prompts -> {db}",
                   err=True)
    render(found.edges.select("up_label", "down_label", "down_input", "value"), fmt)


def most_faithful(wh, run_id: int):
    """The closing table's ranking: the run's `*_attribution` scalars when it requested any (their
    baseline and integrated gradients are what make them more faithful than act × grad), with a
    line saying which; None: rank by act × grad as before."""
    from actwh.compute.attribution import ATTRIBUTIONS
    from actwh.evaluate import read_run

    run = read_run(wh, run_id)
    names = [s for s in run["scalars"].split(",") if s in ATTRIBUTIONS]
    if not names:
        return None
    opts = run["options"]
    steps = opts.get("ig_steps") or 0
    how = f"{opts.get('baseline', 'zero')} baseline" + (f", {steps} IG steps" if steps else "")
    return names, f"the most faithful attributions requested ({how}), not act × grad"
