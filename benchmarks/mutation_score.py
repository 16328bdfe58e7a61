"""Per-file mutation score from mutmut 2's cache (.mutmut-cache, SQLite), as a Markdown table.

killed = killed + timed out (the mutant broke the tests or hung them); score = killed / (killed +
survived + suspicious); mutants never run (untested) are counted apart.
"""

from __future__ import annotations

import sqlite3
import sys
from collections import Counter


def main(path: str = ".mutmut-cache") -> None:
    con = sqlite3.connect(path)
    rows = con.execute(
        "SELECT s.filename, m.status, count(*) FROM Mutant m JOIN Line l ON m.line = l.id "
        "JOIN SourceFile s ON l.sourcefile = s.id GROUP BY s.filename, m.status").fetchall()
    per: dict[str, Counter] = {}
    for name, status, n in rows:
        per.setdefault(name, Counter())[status] += n
    print("| file | mutants | killed | timed out | survived | suspicious | untested | score |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in sorted(per):
        c = per[name]
        killed, timeout = c["ok_killed"], c["bad_timeout"]
        survived, suspicious, untested = c["bad_survived"], c["ok_suspicious"], c["untested"]
        done = killed + timeout + survived + suspicious
        score = f"{100 * (killed + timeout) / done:.0f}%" if done else "-"
        print(f"| {name} | {sum(c.values())} | {killed} | {timeout} | {survived} | {suspicious} | "
              f"{untested} | {score} |")


if __name__ == "__main__":
    main(*sys.argv[1:])
