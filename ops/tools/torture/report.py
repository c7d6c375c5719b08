"""The report as a table."""

from __future__ import annotations

import os
from typing import Any


def _row(name: str, value: Any) -> str:
    return f"  {name:<36} {value}"


def table(r: dict[str, Any]) -> str:
    c = r["comparison"]
    lines = [f"indexq torture test: {r.get('command', '')}"]
    if "machine" in r:
        m = r["machine"]
        lines.append(f"  {m['cores']} cores, chromadb {m['chromadb']}, python {m['python']}, embedder {r['embedder']}")
    if "error" in c:
        lines.append(_row("reading the collections", f"FAILED: {c['error']}"))
    else:
        lines += [
            _row("records, clean / tortured", f"{c['clean']} / {c['tortured']}"),
            _row("lost", c["lost"]),
            _row("extra", c["extra"]),
            _row("wrong documents", c["wrong_documents"]),
            _row("wrong metadata", c["wrong_metadata"]),
            _row(f"wrong embeddings (atol {c['atol']:g})", c["wrong_embeddings"]),
        ]
        lines += [_row("inconsistent reading", x) for x in c["inconsistent"]]
        lines += [_row(f"  e.g. {k}", ", ".join(v)) for k, v in c["examples"].items()]
    if "deep_check" in r:
        lines.append(_row("deep check of the tortured home", "healthy" if r["deep_check"]["healthy"] else
                          f"FAILED (exit {r['deep_check']['exit_code']})"))  # fmt: skip
        w = r["waste"]
        bound = f"bound {w['bound']}: {w['writer_kills']} writer kills x micro-batch {w['micro_batch']}"
        lines.append(_row("chunks embedded more than once", f"{w['embedded_more_than_once']} ({bound})"))
        lines.append(_row("embeddings, clean / tortured", f"{w['clean_embeddings']} / {w['tortured_embeddings']}"))
        by_victim = r["kills"]["by_victim"]
        lines.append(_row("kills", r["kills"]["total"]))
        for victim, n in by_victim.items():
            phases = ", ".join(f"{p} {k}" for p, k in r["kills"]["by_phase"][victim].items())
            lines.append(_row(f"  {victim}", f"{n}: {phases}"))
        lines.append(_row("submissions finished", ", ".join(f"{k} {n}" for k, n in r["finished"].items()) or "none"))
        lines.append(_row("maintenance events", ", ".join(f"{k} {n}" for k, n in sorted(r["events"].items()))))
        lines += [_row(f"damage found in the run (x{n})", what) for what, n in r["damage_repaired"].items()]
        t = r["seconds"]
        lines.append(
            _row("seconds: clean run / kills / in all", f"{t['clean']:.0f} / {t['torture']:.0f} / {t['total']:.0f}")
        )
        lines += [_row("problem", p) for p in r["problems"]]
    lines.append(_row("result", "PASS" if r["passed"] else "FAIL"))
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    import platform

    import chromadb

    return {"cores": os.cpu_count(), "chromadb": chromadb.__version__, "python": platform.python_version()}
