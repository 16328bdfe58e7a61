"""Saved queries: `queries/*.sql` files turned into Python callables returning Polars DataFrames.

aiosql parses the files (`-- name:` blocks and their doc comments); on top of it each query
declares its parameters and defaults on a `-- params:` line, which must match the `$name`
parameters its SQL uses, both ways, or loading fails naming the file and line. Values are always
bound by DuckDB, never formatted into the text. aiosql's own execution returns tuples, so we
execute `fn.sql` ourselves to get Arrow/Polars results.
"""

from __future__ import annotations

import ast
import inspect
import re
from dataclasses import dataclass
from pathlib import Path

from actwh.errors import ActwhError, UnknownName

QUERIES_DIR = Path(__file__).parent
_MISSING = inspect.Parameter.empty
_STRIP = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|--[^\n]*|/\*.*?\*/", re.S)
_PARAM = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)")


class QueryError(ActwhError):
    """A saved query is malformed, or was called with missing or unknown parameters."""


@dataclass(frozen=True)
class SavedQuery:
    name: str
    doc: str  # the first doc line: what the query answers
    params: tuple[tuple[str, object], ...]  # (name, default or inspect.Parameter.empty)
    sql: str
    file: Path
    line: int

    def bind(self, **kwargs) -> dict:
        names = [p for p, _ in self.params]
        unknown = set(kwargs) - set(names)
        if unknown:
            raise QueryError(f"query {self.name} has no parameter {sorted(unknown)[0]!r}; "
                             f"parameters: {self.signature_text()}")
        bound = {}
        for p, default in self.params:
            if p in kwargs:
                bound[p] = kwargs[p]
            elif default is _MISSING:
                raise QueryError(f"query {self.name} needs parameter {p!r}; "
                                 f"parameters: {self.signature_text()}")
            else:
                bound[p] = default
        return bound

    def __call__(self, wh, **kwargs):
        """Run against a Warehouse; returns a Polars DataFrame. An empty result whose
        parameter values match nothing in the file (a run that does not exist, a misspelled
        scalar) is an error naming the valid values."""
        bound = self.bind(**kwargs)
        df = wh.sql(self.sql, **bound)
        if df.height == 0 and hasattr(wh, "check_values"):
            wh.check_values(bound)
        return df

    def signature_text(self) -> str:
        return ", ".join(p if d is _MISSING else f"{p}={d!r}" for p, d in self.params)


def _parse_params(text: str, where: str) -> tuple[tuple[str, object], ...]:
    out = []
    for part in filter(None, (s.strip() for s in re.split(r",(?=(?:[^']*'[^']*')*[^']*$)", text))):
        name, eq, default = (s.strip() for s in part.partition("="))
        if not name.isidentifier():
            raise QueryError(f"{where}: bad parameter declaration {part!r}")
        if not eq:
            out.append((name, _MISSING))
            continue
        if default.upper() == "NULL":
            out.append((name, None))
            continue
        try:
            out.append((name, ast.literal_eval(default)))
        except (ValueError, SyntaxError):
            raise QueryError(f"{where}: default of {name!r} is not a literal: {default}") from None
    return tuple(out)


def used_params(sql: str) -> set[str]:
    """`$name` parameters, ignoring comments and string literals."""
    return set(_PARAM.findall(_STRIP.sub(" ", sql)))


def load_file(path: Path) -> dict[str, SavedQuery]:
    import aiosql

    text = path.read_text()
    lines = text.splitlines()
    try:
        parsed = aiosql.from_str(text, "duckdb", mandatory_parameters=False)
    except Exception as e:
        raise QueryError(f"{path}: {e}") from None
    out = {}
    for name in parsed.available_queries:
        if name.endswith("_cursor"):
            continue
        fn = getattr(parsed, name)
        line = next((i + 1 for i, l in enumerate(lines) if re.match(rf"--\s*name:\s*{name}\b", l)), 0)
        where = f"{path}:{line}"
        doc_lines = [d.strip() for d in (fn.__doc__ or "").splitlines() if d.strip()]
        declared = [d for d in doc_lines if d.startswith("params:")]
        if not declared:
            raise QueryError(f"{where}: query {name} has no '-- params:' line")
        params = _parse_params(declared[0][len("params:"):], where)
        docs = [d for d in doc_lines if not d.startswith("params:")]
        if not docs:
            raise QueryError(f"{where}: query {name} has no doc line")
        used, names = used_params(fn.sql), {p for p, _ in params}
        if used - names:
            raise QueryError(f"{where}: query {name} uses undeclared parameter "
                             f"${sorted(used - names)[0]}")
        if names - used:
            raise QueryError(f"{where}: query {name} declares unused parameter "
                             f"{sorted(names - used)[0]!r}")
        out[name] = SavedQuery(name, docs[0], params, fn.sql.rstrip().rstrip(";"), path, line)
    return out


_PARSED: dict[str, SavedQuery] = {}  # the package's own queries, parsed once per process


def load_queries(folder: Path = QUERIES_DIR) -> dict[str, SavedQuery]:
    """Every query of folder's `*.sql` files. The package's own folder is parsed once per
    process (its files do not change under a running program); any other folder, each call."""
    if Path(folder) == QUERIES_DIR and _PARSED:
        return _PARSED
    out: dict[str, SavedQuery] = {}
    for path in sorted(Path(folder).glob("*.sql")):
        for name, q in load_file(path).items():
            if name in out:
                raise QueryError(f"{path}:{q.line}: query {name} is also defined in {out[name].file}")
            out[name] = q
    if Path(folder) == QUERIES_DIR:
        _PARSED.update(out)
    return out


class Queries:
    """Attribute access to the saved queries: `q.top_nodes(wh, run=1, prompt=3)`."""

    def __init__(self, folder: Path = QUERIES_DIR):
        self._queries = load_queries(folder)
        for name, query in self._queries.items():
            setattr(self, name, _as_function(query))

    def __iter__(self):
        return iter(self._queries.values())

    def __getitem__(self, name: str) -> SavedQuery:
        if name not in self._queries:
            raise UnknownName("query", name, self._queries)
        return self._queries[name]


def _as_function(query: SavedQuery):
    def run(wh, **kwargs):
        return query(wh, **kwargs)

    run.__name__ = run.__qualname__ = query.name
    run.__doc__ = f"{query.doc}\n\nParameters: {query.signature_text()}\n\n{query.sql}"
    run.__signature__ = inspect.Signature(
        [inspect.Parameter("wh", inspect.Parameter.POSITIONAL_ONLY)]
        + [inspect.Parameter(p, inspect.Parameter.KEYWORD_ONLY, default=d) for p, d in query.params])
    return run
