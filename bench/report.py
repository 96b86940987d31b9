"""Turning run records into medians, ratios, a terminal table, Markdown, JSON and charts."""

from __future__ import annotations

import statistics
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.charts import CHARTS, idle_charts
from bench.context import C_PEER, MOUNT, RAW, Outcome, RunRecord
from bench.jobs import METRIC_LABELS, Job

__all__ = ["BACKING_MODE", "METRIC_LABELS", "build_results", "draw_charts", "markdown",
           "summarise", "text_table"]

BACKING_MODE = "mount measured with fusedisk default backing I/O"
PEER_MODE = ("C peer = libfuse's passthrough_ll.c compiled at run time, over a directory of "
             "the same filesystem, O_DIRECT taken off its backing opens (buffered backing, "
             "like fusedisk's)")
_FIGURES = ("mbps", "iops", "p99_us")
#: the idle scenario's targets in table order, and how tables name them
_SIDES = ((RAW, "raw"), (MOUNT, "mount"), (C_PEER, "C peer"))
_HEADER = ["job", "metric", "raw", "mount", "C peer", "mount/raw", "mount/peer",
           "p99 raw µs", "p99 mount µs", "p99 peer µs", "CPU/IO mount µs", "CPU/IO peer µs"]


def _ratios(top: dict[str, float] | None,
            bottom: dict[str, float] | None) -> dict[str, float | None] | None:
    if top is None or bottom is None:
        return None
    return {name: top[name] / bottom[name] if bottom[name] > 0 else None for name in _FIGURES}


def summarise(records: list[RunRecord], jobs: list[Job]) -> dict[str, dict[str, Any]]:
    """Per job: medians over repetitions for each target, and ratios of the medians.

    ``{job: {"raw": {...}, "mount": {...} | None, "peer": {...} | None,
    "ratio": {...} | None, "ratio_peer": {...} | None}}``; a side holds
    ``mbps``, ``iops``, ``p99_us``, ``runs`` and, for the mount and the C peer,
    the medians per run of ``daemon_cpu_s`` and ``daemon_cpu_us_per_io`` (the
    daemon's CPU over one fio run, ramp included, per I/O fio issued in it).
    ``ratio`` is mount/raw, ``ratio_peer`` mount/peer; above 1 means the mount
    is higher.
    """
    summary: dict[str, dict[str, Any]] = {}
    for job in jobs:
        sides: dict[str, dict[str, float] | None] = {}
        for target, _ in _SIDES:
            runs = [r for r in records if r.job == job.name and r.target == target]
            if not runs:
                sides[target] = None
                continue
            side = {name: statistics.median(getattr(r.figures, name) for r in runs)
                    for name in _FIGURES}
            side["runs"] = len(runs)
            for key in ("daemon_cpu_s", "daemon_cpu_us_per_io"):
                values = [getattr(r, key) for r in runs if getattr(r, key) is not None]
                if values:
                    side[key] = statistics.median(values)
            sides[target] = side
        summary[job.name] = {**sides, "ratio": _ratios(sides[MOUNT], sides[RAW]),
                             "ratio_peer": _ratios(sides[MOUNT], sides[C_PEER])}
    return summary


def _scenario_json(name: str, outcome: Outcome, jobs: list[Job]) -> dict[str, Any]:
    if outcome.error is not None:
        return {"error": outcome.error}
    if name == "idle":
        return {"summary": summarise(outcome.records, jobs), "targets": outcome.targets,
                "runs": [asdict(r) for r in outcome.records]}
    data = {"caption": outcome.caption, "summary": outcome.summary, "table": outcome.table,
            "extra_tables": outcome.extra_tables, "targets": outcome.targets,
            "runs": outcome.runs, "series": outcome.series, "commands": outcome.commands,
            "notes": outcome.notes}
    if outcome.records:
        data["fio_runs"] = [asdict(r) for r in outcome.records]
    return data


def build_results(*, mode: str, raw_only: bool, parameters: dict[str, Any],
                  machine: dict[str, Any], jobs: list[Job], outcomes: dict[str, Outcome],
                  created: str, repo_root: Path) -> dict[str, Any]:
    """The JSON document of one benchmark run (``results.json``)."""
    fio_commands: dict[str, dict[str, str]] = {}
    idle = outcomes.get("idle")
    for record in idle.records if idle is not None else []:
        fio_commands.setdefault(record.job, {}).setdefault(record.target, record.command)
    layout = idle.summary.get("layout", {}) if idle is not None and idle.error is None else {}
    return {
        "schema_version": 2,
        "created": created,
        "mode": mode,
        "raw_only": raw_only,
        "backing_mode": None if raw_only else BACKING_MODE,
        "parameters": parameters,
        "machine": machine,
        "jobs": {
            job.name: {"file": str(job.path.relative_to(repo_root)), "rw": job.rw, "bs": job.bs,
                       "ioengine": job.ioengine, "iodepth": job.iodepth, "direct": job.direct,
                       "metric": job.metric}
            for job in jobs
        },
        "layout_commands": layout,
        "fio_commands": fio_commands,
        "scenarios": {name: _scenario_json(name, outcome, jobs)
                      for name, outcome in outcomes.items()},
        "targets": [{"scenario": name, **target} for name, outcome in outcomes.items()
                    for target in outcome.targets],
        "failed": {name: outcome.error for name, outcome in outcomes.items()
                   if outcome.error is not None},
    }


def _number(value: float | None, digits: int = 0) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def _rows(summary: dict[str, dict[str, Any]], jobs: list[Job]) -> list[list[str]]:
    rows = []
    for job in jobs:
        entry = summary[job.name]
        raw, mount, c_peer = (entry.get(target) or {} for target in (RAW, MOUNT, C_PEER))
        ratio, ratio_peer = entry["ratio"] or {}, entry.get("ratio_peer") or {}
        digits = 1 if job.metric == "mbps" else 0
        rows.append([
            job.name, METRIC_LABELS[job.metric],
            *(_number(side.get(job.metric), digits) for side in (raw, mount, c_peer)),
            _number(ratio.get(job.metric), 2), _number(ratio_peer.get(job.metric), 2),
            *(_number(side.get("p99_us")) for side in (raw, mount, c_peer)),
            *(_number(side.get("daemon_cpu_us_per_io"), 1) for side in (mount, c_peer)),
        ])
    return rows


def _caption(results: dict[str, Any], scenario: str) -> str:
    params = results["parameters"]
    size_mib = params["size_bytes"] / 2**20
    backing = ("raw store only" if results["raw_only"]
               else f"{results['backing_mode']}; {PEER_MODE}")
    reps = params.get("idle_reps") or params["reps"]
    return (f"{scenario}: medians of {reps} rep(s); {size_mib:g} MiB file, "
            f"{params['runtime_s']} s per job; {backing}")


def _text_rows(rows: list[list[str]], text_columns: int = 2) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row[:text_columns], widths,
                                                          strict=False)]
        cells += [cell.rjust(width) for cell, width in zip(row[text_columns:],
                                                           widths[text_columns:], strict=True)]
        lines.append("  ".join(cells).rstrip())
    return lines


def _target_line(target: dict[str, Any]) -> str:
    value = target["value"]
    shown = "—" if value is None else f"{value:,.3g}" if isinstance(value, float) else str(value)
    verdict = {True: "met", False: "NOT met", None: "not measured"}[target["met"]]
    return f"target (issue {target['issue']}): {target['figure']} = {shown}, want " \
           f"{target['target']}: {verdict}"


def text_table(results: dict[str, Any], scenario: str, jobs: list[Job]) -> str:
    """The terminal table of one scenario (for idle: medians and ratios per job)."""
    data = results["scenarios"][scenario]
    if "error" in data:
        return f"{scenario}: FAILED: {data['error']}"
    if scenario == "idle":
        return "\n".join([_caption(results, scenario),
                          *_text_rows([_HEADER, *_rows(data["summary"], jobs)]),
                          *(_target_line(target) for target in data["targets"])])
    lines = [data["caption"], *_text_rows(data["table"], 1)]
    for title, rows in data["extra_tables"].items():
        lines += [f"{title}:", *_text_rows(rows, 1)]
    lines += [_target_line(target) for target in data["targets"]]
    return "\n".join(lines)


def _md_table(header: list[str], rows: list[list[str]], text_columns: int = 2) -> list[str]:
    """Markdown table lines; columns after the first ``text_columns`` are right-aligned."""
    aligns = ["---" if i < text_columns else "---:" for i in range(len(header))]
    return ["| " + " | ".join(row) + " |" for row in [header, aligns, *rows]]


def markdown(results: dict[str, Any], jobs: list[Job],
             charts: dict[str, dict[str, str]]) -> str:
    """The Markdown report; ``charts`` maps scenario → {chart title: image file name}."""
    machine = results["machine"]
    lines = [
        "# fusedisk benchmark: raw store vs mount, CBT, live relocation", "",
        f"- created: {results['created']} ({results['mode']} run)",
        f"- git revision: {machine['git_revision'] or 'unknown'}",
        f"- backing: {results['backing_mode'] or 'raw store only (no mount)'}",
        f"- processes: {machine['process_placement']}",
        "- MB/s are 10^6 bytes/s; p99 is fio's 99th percentile completion latency; "
        "daemon CPU is the FUSE daemon's (fusedisk's or the C peer's) user+system time "
        "over one fio run (ramp included); CPU/IO is that divided by the I/Os fio "
        "issued in the run (the 1 s ramp counted at the measured rate). A mount/raw or "
        "mount/peer ratio above 1 means the mount is higher: better for MB/s and IOPS, "
        "worse for p99. Targets compare the mount with raw; mount/peer is information.",
        "", "## Machine", "",
        *_md_table(["item", "value"], [
            ["CPU", f"{machine['cpu_model']} × {machine['cpu_count']}"],
            ["memory", f"{machine['memory_gib']} GiB"],
            ["kernel", machine["kernel"]],
            ["OS", machine["os"] or "unknown"],
            ["fio", machine["fio"]],
            ["Python", machine["python"]],
            *([f"filesystem of {name}", fstype]
              for name, fstype in machine["filesystems"].items()),
        ]),
    ]
    if results["targets"] or results["failed"]:
        lines += ["", "## Targets", "",
                  *_md_table(["scenario", "figure", "value", "target", "verdict", "issue"], [
                      [t["scenario"], t["figure"],
                       _number(t["value"], 3) if isinstance(t["value"], float)
                       else str(t["value"]), t["target"],
                       {True: "met", False: "**not met**", None: "not measured"}[t["met"]],
                       str(t["issue"])]
                      for t in results["targets"]
                  ] + [[name, "**failed**", "—", "—", error, "—"]
                       for name, error in results["failed"].items()], text_columns=6)]
    for scenario, data in results["scenarios"].items():
        if "error" in data:
            lines += ["", f"## Scenario `{scenario}`", "", f"**Failed:** {data['error']}"]
            continue
        if scenario != "idle":
            lines += ["", f"## Scenario `{scenario}`", "", data["caption"], "",
                      *_md_table(data["table"][0], data["table"][1:], text_columns=1)]
            for title, rows in data["extra_tables"].items():
                lines += ["", f"{title}:", "", *_md_table(rows[0], rows[1:], text_columns=1)]
            lines += [""] + [f"- {_target_line(t)}" for t in data["targets"]]
            lines += [f"- {note}" for note in data["notes"]]
            lines += [""] + [f"![{title}]({name})"
                             for title, name in charts.get(scenario, {}).items()]
            lines += ["", "Commands:", "", "```", *data["commands"], "```"]
            continue
        summary = data["summary"]
        lines += ["", f"## Scenario `{scenario}`", "", _caption(results, scenario), "",
                  *_md_table(_HEADER, _rows(summary, jobs)), ""]
        lines += [f"- {_target_line(t)}" for t in data["targets"]] + [""]
        lines += [f"![{title}]({name})" for title, name in charts.get(scenario, {}).items()]
        detail = []
        for job in jobs:
            entry = summary[job.name]
            for target, label in _SIDES:
                side = entry.get(target)
                if side is not None:
                    detail.append([job.name, label, _number(side["mbps"], 1),
                                   _number(side["iops"]), _number(side["p99_us"]),
                                   _number(side.get("daemon_cpu_s"), 2),
                                   _number(side.get("daemon_cpu_us_per_io"), 1),
                                   str(side["runs"])])
        lines += ["", "All figures (medians):", "",
                  *_md_table(["job", "target", "MB/s", "IOPS", "p99 µs", "daemon CPU s",
                              "daemon CPU µs/IO", "runs"], detail)]
    lines += ["", "## Jobs", "",
              *_md_table(["job", "file", "rw", "bs", "engine", "depth", "O_DIRECT"], [
                  [name, f"`{job['file']}`", job["rw"], job["bs"], job["ioengine"],
                   str(job["iodepth"]), "yes" if job["direct"] else "no"]
                  for name, job in results["jobs"].items()
              ], text_columns=5),
              "", "## fio command lines", "", "```"]
    lines += [command for command in results["layout_commands"].values()]
    for targets in results["fio_commands"].values():
        lines += list(targets.values())
    lines += ["```", ""]
    return "\n".join(lines)


def draw_charts(results: dict[str, Any], scenario: str, jobs: list[Job],
                out_dir: Path) -> dict[str, str]:
    """Write this scenario's PNG charts into ``out_dir``; returns {title: file name}
    (for idle see ``charts.idle_charts``).
    """
    data = results["scenarios"][scenario]
    if "error" in data:
        return {}
    if scenario != "idle":
        draw = CHARTS.get(scenario)
        return draw(scenario, data, out_dir) if draw is not None else {}
    return idle_charts(scenario, data["summary"], jobs, out_dir)
