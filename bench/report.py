"""Turning run records into medians, ratios, a terminal table, Markdown, JSON and charts."""

from __future__ import annotations

import statistics
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.charts import CHARTS
from bench.context import MOUNT, RAW, Outcome, RunRecord
from bench.jobs import Job

BACKING_MODE = "mount measured with fusedisk default backing I/O"
METRIC_LABELS = {"mbps": "MB/s", "iops": "IOPS", "p99_us": "p99 µs"}
_FIGURES = ("mbps", "iops", "p99_us")
_HEADER = ["job", "metric", "raw", "mount", "mount/raw",
           "p99 raw µs", "p99 mount µs", "p99 mount/raw", "daemon CPU s"]


def summarise(records: list[RunRecord], jobs: list[Job]) -> dict[str, dict[str, Any]]:
    """Per job: medians over repetitions for each target, and mount/raw ratios of the medians.

    ``{job: {"raw": {...}, "mount": {...} | None, "ratio": {...} | None}}``; a
    side holds ``mbps``, ``iops``, ``p99_us``, ``runs`` and, for the mount, the
    median ``daemon_cpu_s`` per run. A ratio above 1 means the mount is higher.
    """
    summary: dict[str, dict[str, Any]] = {}
    for job in jobs:
        sides: dict[str, dict[str, float] | None] = {}
        for target in (RAW, MOUNT):
            runs = [r for r in records if r.job == job.name and r.target == target]
            if not runs:
                sides[target] = None
                continue
            side = {name: statistics.median(getattr(r.figures, name) for r in runs)
                    for name in _FIGURES}
            side["runs"] = len(runs)
            cpu = [r.daemon_cpu_s for r in runs if r.daemon_cpu_s is not None]
            if cpu:
                side["daemon_cpu_s"] = statistics.median(cpu)
            sides[target] = side
        raw, mount = sides[RAW], sides[MOUNT]
        ratio = None
        if raw is not None and mount is not None:
            ratio = {name: mount[name] / raw[name] if raw[name] > 0 else None
                     for name in _FIGURES}
        summary[job.name] = {RAW: raw, MOUNT: mount, "ratio": ratio}
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
        raw, mount, ratio = entry[RAW] or {}, entry[MOUNT] or {}, entry["ratio"] or {}
        digits = 1 if job.metric == "mbps" else 0
        rows.append([
            job.name, METRIC_LABELS[job.metric],
            _number(raw.get(job.metric), digits), _number(mount.get(job.metric), digits),
            _number(ratio.get(job.metric), 2),
            _number(raw.get("p99_us")), _number(mount.get("p99_us")),
            _number(ratio.get("p99_us"), 2), _number(mount.get("daemon_cpu_s"), 2),
        ])
    return rows


def _caption(results: dict[str, Any], scenario: str) -> str:
    params = results["parameters"]
    size_mib = params["size_bytes"] / 2**20
    backing = "raw store only" if results["raw_only"] else results["backing_mode"]
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
        "daemon CPU is the fusedisk daemon's user+system time over one fio run "
        "(ramp included). A mount/raw ratio above 1 means the mount is higher: "
        "better for MB/s and IOPS, worse for p99.",
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
            for target in (RAW, MOUNT):
                side = entry[target]
                if side is not None:
                    detail.append([job.name, target, _number(side["mbps"], 1),
                                   _number(side["iops"]), _number(side["p99_us"]),
                                   _number(side.get("daemon_cpu_s"), 2), str(side["runs"])])
        lines += ["", "All figures (medians):", "",
                  *_md_table(["job", "target", "MB/s", "IOPS", "p99 µs", "daemon CPU s", "runs"],
                             detail)]
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
    """Write this scenario's PNG charts into ``out_dir``; returns {title: file name}.

    One grouped bar chart per metric (MB/s jobs, IOPS jobs) and, when the
    mount was measured, one chart of mount/raw ratios of each job's metric.
    """
    data = results["scenarios"][scenario]
    if "error" in data:
        return {}
    if scenario != "idle":
        draw = CHARTS.get(scenario)
        return draw(scenario, data, out_dir) if draw is not None else {}
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = data["summary"]
    charts: dict[str, str] = {}
    for metric in ("mbps", "iops"):
        chosen = [job for job in jobs if job.metric == metric]
        if not chosen:
            continue
        figure, axes = plt.subplots(figsize=(10, 5))
        positions = range(len(chosen))
        for offset, target in ((-0.2, RAW), (0.2, MOUNT)):
            values = [(summary[job.name][target] or {}).get(metric) for job in chosen]
            if any(value is not None for value in values):
                bars = axes.bar([p + offset for p in positions], [v or 0 for v in values],
                                width=0.4, label=target)
                axes.bar_label(bars, fmt="{:,.0f}", fontsize=8)
        axes.set_xticks(list(positions), [job.name for job in chosen], rotation=20, ha="right")
        axes.set_ylabel(METRIC_LABELS[metric])
        title = f"{scenario}: {METRIC_LABELS[metric]}, mount vs raw"
        axes.set_title(title)
        axes.legend()
        figure.tight_layout()
        name = f"{scenario}-{metric}.png"
        figure.savefig(out_dir / name, dpi=100)
        plt.close(figure)
        charts[title] = name
    ratios = [(job, (summary[job.name]["ratio"] or {}).get(job.metric)) for job in jobs]
    if any(ratio is not None for _, ratio in ratios):
        figure, axes = plt.subplots(figsize=(10, 5))
        labels = [f"{job.name} ({METRIC_LABELS[job.metric]})" for job, _ in ratios]
        bars = axes.barh(labels, [ratio or 0 for _, ratio in ratios])
        axes.bar_label(bars, fmt="{:.2f}×", fontsize=8, padding=2)
        axes.axvline(1.0, color="black", linewidth=1)
        axes.invert_yaxis()
        axes.set_xlabel("mount / raw (1 = as fast as the raw store)")
        title = f"{scenario}: mount/raw ratio"
        axes.set_title(title)
        figure.tight_layout()
        name = f"{scenario}-ratio.png"
        figure.savefig(out_dir / name, dpi=100)
        plt.close(figure)
        charts[title] = name
    return charts
