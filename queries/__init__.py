"""Saved SQL queries as Python callables, and circuit filtering.

    from actwh.queries import q
    q.top_nodes(wh, run=1, prompt=3)
"""

from __future__ import annotations


def __getattr__(name):
    if name == "q":
        from actwh.queries.loader import Queries

        globals()["q"] = Queries()
        return globals()["q"]
    raise AttributeError(name)
