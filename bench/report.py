"""Ratios and targets from a results document (the JSON bench.run writes).

Kept apart from the runner so a saved result can be re-read and printed:
``python -m bench.report bench/results/FILE.json``.
"""

from __future__ import annotations

import json
import sys
from statistics import mean, median
from typing import Any

MIB = 1024 * 1024

# Issue #9's targets.
LOGICAL_WALL_MAX = 1.10  # x pg_dump alone
REPO_SIZE_MAX = 0.80  # x restic's and borg's, after the simulated days
RESTORE_WALL_MAX = 1.15  # x pg_restore from a local file
ONE_TABLE_READ_MAX = 0.10  # of the snapshot's bytes, for a table under 5% of the database
RSS_MAX_MIB = 200.0


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b in (None, 0):
        return None
    return a / b  # type: ignore[operator]


def _fmt(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _days(doc: dict[str, Any], section: str) -> list[dict[str, Any]]:
    return list(doc.get(section, {}).get("days", []))


def _series(days: list[dict[str, Any]], tool: str, key: str,
            skip_first: bool = False) -> list[float]:
    out = []
    for i, d in enumerate(days):
        if skip_first and i == 0:
            continue
        run = d["runs"].get(tool)
        if run is not None and run.get(key) is not None:
            out.append(float(run[key]))
    return out


def _mean(xs: list[float]) -> float | None:
    return mean(xs) if xs else None


def summarize(doc: dict[str, Any]) -> dict[str, Any]:
    """Ratios (pgkloset / other) and the verdict on each target."""
    s: dict[str, Any] = {"ratios": [], "targets": []}
    rows: list[dict[str, Any]] = s["ratios"]

    def add(section: str, metric: str, other: str, mine: float | None, theirs: float | None,
            unit: str) -> float | None:
        r = _ratio(mine, theirs)
        rows.append({"section": section, "metric": metric, "vs": other, "pgkloset": mine,
                     "other": theirs, "unit": unit, "ratio": r})
        return r

    logical = _days(doc, "logical")
    if logical:
        paired = [p for d in logical for p in d.get("pairs", [])]
        if paired:
            mine = median(float(p["pgkloset_wall_s"]) for p in paired)
            theirs = median(float(p["pg_dump_wall_s"]) for p in paired)
            rows.append({"section": "logical", "metric": f"wall, {len(paired)} pairs (median "
                         "of ratios)", "vs": "pg_dump", "pgkloset": mine, "other": theirs,
                         "unit": "s", "ratio": median(_paired_ratios(logical))})
            floors = [float(p["cpu_floor"]) for p in paired if "cpu_floor" in p]
            if floors:  # the host's CPU over each pgkloset run, spread over every core
                rows.append({"section": "logical", "metric": f"CPU floor, {len(floors)} pairs (median)", "vs": "pg_dump",
                             "pgkloset": None, "other": None, "unit": "s",
                             "ratio": median(floors)})
            alt = [p for p in paired if "alt_wall_s" in p]
            if alt:  # --pair-env: the same pairs' third run, with a setting changed
                rows.append({"section": "logical", "metric": f"wall, {len(alt)} pairs with "
                             f"{alt[0]['alt_env']} (median of ratios)", "vs": "pg_dump",
                             "pgkloset": median(float(p["alt_wall_s"]) for p in alt),
                             "other": theirs, "unit": "s",
                             "ratio": median(float(p["alt_ratio"]) for p in alt)})
        if _series(logical, "pgkloset_stream", "wall_s"):
            add("logical", "wall, all days (mean): pg_dump | backup stream", "pg_dump",
                _mean(_series(logical, "pgkloset_stream", "wall_s")),
                _mean(_series(logical, "pg_dump", "wall_s")), "s")
        for tool in ("pg_dump", "restic", "borg"):
            if not _series(logical, tool, "wall_s"):
                continue
            add("logical", "wall, day 1", tool, _mean(_series(logical[:1], "pgkloset", "wall_s")),
                _mean(_series(logical[:1], tool, "wall_s")), "s")
            if len(logical) > 1:
                add("logical", "wall, later days (mean)", tool,
                    _mean(_series(logical, "pgkloset", "wall_s", True)),
                    _mean(_series(logical, tool, "wall_s", True)), "s")
            add("logical", "CPU, all days (mean)", tool,
                _mean(_series(logical, "pgkloset", "cpu_s")), _mean(_series(logical, tool, "cpu_s")),
                "s")
            if tool != "pg_dump":
                add("logical", "peak RSS (max)", tool,
                    max(_series(logical, "pgkloset", "tool_rss_mib")),
                    max(_series(logical, tool, "tool_rss_mib")), "MiB")
                add("logical", f"repository after day {len(logical)}", tool,
                    _series(logical, "pgkloset", "repo_bytes")[-1] / MIB,
                    _series(logical, tool, "repo_bytes")[-1] / MIB, "MiB")
    physical = _days(doc, "physical")
    if physical:
        add("physical", "wall, day 1", "pg_basebackup",
            _mean(_series(physical[:1], "pgkloset", "wall_s")),
            _mean(_series(physical[:1], "pg_basebackup", "wall_s")), "s")
        if _series(physical, "pgbackrest", "wall_s"):
            add("physical", "wall, day 1 (pgBackRest full)", "pgbackrest",
                _mean(_series(physical[:1], "pgkloset", "wall_s")),
                _mean(_series(physical[:1], "pgbackrest", "wall_s")), "s")
            if len(physical) > 1:
                add("physical", "wall, later days (pgBackRest incr, mean)", "pgbackrest",
                    _mean(_series(physical, "pgkloset", "wall_s", True)),
                    _mean(_series(physical, "pgbackrest", "wall_s", True)), "s")
            add("physical", "CPU, all days (mean)", "pgbackrest",
                _mean(_series(physical, "pgkloset", "cpu_s")),
                _mean(_series(physical, "pgbackrest", "cpu_s")), "s")
            add("physical", "peak RSS (max)", "pgbackrest",
                max(_series(physical, "pgkloset", "tool_rss_mib")),
                max(_series(physical, "pgbackrest", "tool_rss_mib")), "MiB")
            last = physical[-1]["runs"]
            add("physical", f"repository after day {len(physical)}", "pgbackrest (with WAL)",
                last["pgkloset"]["repo_bytes"] / MIB, last["pgbackrest"]["repo_bytes"] / MIB,
                "MiB")
            add("physical", f"repository after day {len(physical)}", "pgbackrest backup/ only",
                last["pgkloset"]["repo_bytes"] / MIB,
                last["pgbackrest"]["info"]["backup_dir_bytes"] / MIB, "MiB")
    restore = doc.get("restore", {})
    if "logical_full" in restore:
        r = restore["logical_full"]
        add("restore", "logical, whole database", "pg_restore (local file)",
            r["pgkloset"]["wall_s"], r["pg_restore"]["wall_s"], "s")
    for r in restore.get("one_table", []):
        name = r["table"].split(".", 1)[1]
        add("restore", f"one table {name}, wall", "pg_restore -L (local file)",
            r["pgkloset"]["wall_s"], r["pg_restore"]["wall_s"], "s")
        add("restore", f"one table {name}, bytes read", "pg_restore -L (local file)",
            r["pgkloset"]["info"]["bytes_read"] / MIB,
            r["pg_restore"]["info"]["bytes_read"] / MIB, "MiB")
    if "physical" in restore and "pgbackrest" in restore["physical"]:
        r = restore["physical"]
        both = " (mean of both orders)" if "rounds" in r else ""
        add("restore", f"physical, whole cluster{both}", "pgbackrest", r["pgkloset"]["wall_s"],
            r["pgbackrest"]["wall_s"], "s")
    s["targets"] = _targets(doc, logical, physical, restore)
    return s


def _paired_ratios(logical: list[dict[str, Any]]) -> list[float]:
    """pgkloset / pg_dump wall of every back-to-back pair (``--pairs``), all days."""
    return [float(p["ratio"]) for d in logical for p in d.get("pairs", [])]


def _floor_note(logical: list[dict[str, Any]]) -> str:
    """What the pairs' CPU allowed: the host's busy CPU-seconds over the cores."""
    floors = [float(p["cpu_floor"]) for d in logical for p in d.get("pairs", []) if "cpu_floor" in p]
    if not floors:
        return ""
    return f"CPU floor (every process's CPU / cores) median {median(floors):.2f}; "


def _verdict(name: str, measured: float | None, limit: float, detail: str,
             lower_is_better: bool = True) -> dict[str, Any]:
    if measured is None:
        return {"target": name, "measured": None, "limit": limit, "met": None,
                "detail": "not measured in this run"}
    met = measured <= limit if lower_is_better else measured >= limit
    return {"target": name, "measured": round(measured, 3), "limit": limit, "met": met,
            "margin": round(measured / limit - 1, 3), "detail": detail}


def _targets(doc: dict[str, Any], logical: list[dict[str, Any]],
             physical: list[dict[str, Any]], restore: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    ratios = [d["runs"]["pgkloset"]["wall_s"] / d["runs"]["pg_dump"]["wall_s"]
              for d in logical if "pg_dump" in d["runs"] and "pgkloset" in d["runs"]]
    daily = ("one run each per day: mean " + _fmt(_mean(ratios)) + " (per day "
             + ", ".join(f"{r:.2f}" for r in ratios) + ")")
    paired = _paired_ratios(logical)
    if paired:
        # Back-to-back pairs share the host's state of the moment; their median is
        # robust to the odd slow run that a mean of one sample per day is not.
        out.append(_verdict("logical backup wall <= 1.10 x pg_dump", median(paired),
                            LOGICAL_WALL_MAX, f"median of {len(paired)} back-to-back pairs "
                            f"(mean {mean(paired):.2f}, {min(paired):.2f}-{max(paired):.2f}); "
                            + _floor_note(logical) + daily))
    else:
        out.append(_verdict("logical backup wall <= 1.10 x pg_dump", _mean(ratios),
                            LOGICAL_WALL_MAX, daily))
    ratios = [d["runs"]["pgkloset"]["wall_s"] / d["runs"]["pgbackrest"]["wall_s"]
              for d in physical if "pgbackrest" in d["runs"] and "pgkloset" in d["runs"]]
    out.append(_verdict("physical backup wall <= pgBackRest", _mean(ratios), 1.0,
                        "mean over days (day 1 full, then incr); per day: "
                        + ", ".join(f"{r:.2f}" for r in ratios)))
    for peer in ("restic", "borg"):
        if logical and peer in logical[-1]["runs"]:
            last = logical[-1]["runs"]
            r = last["pgkloset"]["repo_bytes"] / last[peer]["repo_bytes"]
            days = len(logical)
            note = f"after {days} simulated days" + ("" if days >= 30 else
                                                     " (the target names 30)")
            out.append(_verdict(f"repository <= 0.8 x {peer}", r, REPO_SIZE_MAX, note))
    if "logical_full" in restore:
        r = restore["logical_full"]
        out.append(_verdict("logical full restore <= 1.15 x pg_restore",
                            r["pgkloset"]["wall_s"] / r["pg_restore"]["wall_s"],
                            RESTORE_WALL_MAX, "wall time, same dump, same target server"))
    tables = restore.get("one_table", [])
    if tables:
        # The target speaks of any small table: judge the worst one, show each.
        fracs = [(r["pgkloset"]["info"]["bytes_read"] / r["snapshot_stored_bytes"], r)
                 for r in tables]
        detail = "; ".join(f"{r['table']} ({r['table_share_of_database']:.2%} of the database)"
                           f" read {f:.1%}" for f, r in fracs)
        out.append(_verdict("one-table restore reads < 10% of the snapshot",
                            max(f for f, _ in fracs), ONE_TABLE_READ_MAX,
                            "worst table; bytes fetched from the kloset / the snapshot's "
                            f"stored bytes: {detail}"))
    rss = [float(v) for v in doc.get("pgkloset_rss_mib", [])]
    out.append(_verdict("peak RSS < 200 MiB", max(rss) if rss else None, RSS_MAX_MIB,
                        f"largest of {len(rss)} pgkloset processes (backup, restore, sweep)"))
    return out


def render(doc: dict[str, Any]) -> str:
    s = doc.get("summary") or summarize(doc)
    lines = [f"{'section':<9} {'metric':<44} {'versus':<27} {'pgkloset':>10} {'other':>10} "
             f"{'ratio':>6}"]
    for r in s["ratios"]:
        lines.append(f"{r['section']:<9} {r['metric']:<44} {r['vs']:<27} "
                     f"{_fmt(r['pgkloset']):>10} {_fmt(r['other']):>10} {_fmt(r['ratio']):>6}"
                     f" {r['unit']}")
    lines.append("")
    lines.append("targets (issue #9):")
    for t in s["targets"]:
        mark = {True: "MET   ", False: "MISSED", None: "n/a   "}[t["met"]]
        margin = "" if t.get("margin") is None else f" ({t['margin']:+.0%} vs limit)"
        lines.append(f"  {mark} {t['target']}: {_fmt(t['measured'], 3)} "
                     f"(limit {t['limit']}){margin}; {t['detail']}")
    return "\n".join(lines)


_ORDER = ["pg_dump", "pg_basebackup", "pgkloset", "pgkloset_stream", "restic", "borg",
          "pgbackrest"]


def _md_table(head: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    return out


def markdown(doc: dict[str, Any]) -> str:
    """The figures as Markdown tables, for docs/BENCHMARKS.md."""
    s = doc.get("summary") or summarize(doc)
    lines: list[str] = ["#### Ratios (pgkloset / other)", ""]
    lines += _md_table(["section", "metric", "versus", "pgkloset", "other", "ratio"], [
        [r["section"], r["metric"], r["vs"], f"{_fmt(r['pgkloset'])} {r['unit']}",
         f"{_fmt(r['other'])} {r['unit']}", _fmt(r["ratio"])] for r in s["ratios"]])
    lines += ["", "#### Targets", ""]
    lines += _md_table(["target", "measured", "limit", "verdict", "detail"], [
        [t["target"], _fmt(t["measured"], 3), str(t["limit"]),
         {True: "met", False: "**missed**", None: "n/a"}[t["met"]]
         + ("" if t.get("margin") is None else f" ({t['margin']:+.0%})"), t["detail"]]
        for t in s["targets"]])
    for section in ("logical", "physical", "sweep", "physical_sweep"):
        days = _days(doc, section)
        if not days:
            continue
        seen = list(dict.fromkeys(t for d in days for t in d["runs"]))
        tools_ = sorted(seen, key=lambda t: (_ORDER.index(t) if t in _ORDER else len(_ORDER),
                                             seen.index(t)))
        lines += ["", f"#### {section}: per day (wall s / CPU s / RSS MiB / repository MiB)", ""]
        rows = []
        for d in days:
            cells = [str(d["day"])]
            for t in tools_:
                r = d["runs"].get(t)
                if r is None:
                    cells.append("-")
                    continue
                repo = "" if r.get("repo_bytes") is None else f" / {r['repo_bytes'] / MIB:.1f}"
                cells.append(f"{r['wall_s']:.2f} / {r['cpu_s']:.2f} / {r['tool_rss_mib']:.0f}"
                             + repo)
            loads = [r["load_before"][0] for r in d["runs"].values()]
            cells.append(f"{min(loads):.1f}-{max(loads):.1f}")
            rows.append(cells)
        lines += _md_table(["day", *tools_, "load avg (1 min)"], rows)
    pairs = [(d["day"], p) for d in _days(doc, "logical") for p in d.get("pairs", [])]
    if pairs:
        lines += ["", "#### logical: back-to-back pairs (wall s)", ""]
        alt = next((p["alt_env"] for _, p in pairs if "alt_env" in p), None)
        floor = any("cpu_floor" in p for _, p in pairs)
        head = ["day", "first", "pg_dump", "pgkloset", "ratio"] + (["CPU floor"] if floor else [])
        if alt:
            head += [f"with {alt}", "its ratio"]
        lines += _md_table(head, [
            [str(day), p["order"][0], f"{p['pg_dump_wall_s']:.2f}",
             f"{p['pgkloset_wall_s']:.2f}", f"{p['ratio']:.3f}"]
            + ([_fmt(p.get("cpu_floor"), 3)] if floor else [])
            + ([f"{p['alt_wall_s']:.2f}", f"{p['alt_ratio']:.3f}"] if alt else [])
            for day, p in pairs])
    return "\n".join(lines)


if __name__ == "__main__":
    with open(sys.argv[-1]) as f:
        document = json.load(f)
    document["summary"] = summarize(document)
    print(markdown(document) if "--markdown" in sys.argv else render(document))
