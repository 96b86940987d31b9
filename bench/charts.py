"""PNG charts of the idle, cbt, relocation and guest scenarios, drawn from ``results.json`` data.

Each function takes the scenario's entry of ``results["scenarios"]`` (idle:
its summary and jobs) and writes PNGs into ``out_dir``; it returns
{title: file name} (empty when the data has nothing to draw).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.jobs import METRIC_LABELS, Job
from fusedisk import api

_MIB = 2**20
#: the idle scenario's bars: summary key, legend label, colour
_IDLE_SIDES = (("raw", "raw", "tab:gray"), ("mount", "mount (fusedisk)", "tab:blue"),
               ("peer", "C peer (passthrough_ll)", "tab:orange"))


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def idle_charts(name: str, summary: dict[str, dict[str, Any]], jobs: list[Job],
                out_dir: Path) -> dict[str, str]:
    """Grouped bars per metric (MB/s jobs, IOPS jobs): raw, mount and C peer side by side;
    and, when the mount was measured, each job's mount/raw and mount/peer ratio."""
    plt = _pyplot()
    charts: dict[str, str] = {}
    width = 0.8 / len(_IDLE_SIDES)
    for metric in ("mbps", "iops"):
        chosen = [job for job in jobs if job.metric == metric]
        if not chosen:
            continue
        figure, axes = plt.subplots(figsize=(11, 5))
        positions = range(len(chosen))
        for index, (key, label, colour) in enumerate(_IDLE_SIDES):
            values = [(summary[job.name].get(key) or {}).get(metric) for job in chosen]
            if all(value is None for value in values):
                continue
            offset = (index - (len(_IDLE_SIDES) - 1) / 2) * width
            bars = axes.bar([p + offset for p in positions], [v or 0 for v in values],
                            width=width, label=label, color=colour)
            axes.bar_label(bars, fmt="{:,.0f}", fontsize=7)
        axes.set_xticks(list(positions), [job.name for job in chosen], rotation=20, ha="right")
        axes.set_ylabel(METRIC_LABELS[metric])
        title = f"{name}: {METRIC_LABELS[metric]}, raw vs mount vs C peer"
        axes.set_title(title)
        axes.legend()
        charts.update(_save(figure, title, f"{name}-{metric}", out_dir, suptitle=False))
    ratios = [(job, (summary[job.name].get("ratio") or {}).get(job.metric),
               (summary[job.name].get("ratio_peer") or {}).get(job.metric)) for job in jobs]
    if any(to_raw is not None for _, to_raw, _ in ratios):
        figure, axes = plt.subplots(figsize=(10, 6))
        rows = range(len(ratios))
        for offset, column, label, colour in ((-0.2, 1, "mount / raw", "tab:blue"),
                                              (0.2, 2, "mount / C peer", "tab:orange")):
            values = [entry[column] for entry in ratios]
            if all(value is None for value in values):
                continue
            bars = axes.barh([r + offset for r in rows], [v or 0 for v in values], height=0.4,
                             label=label, color=colour)
            axes.bar_label(bars, fmt="{:.2f}×", fontsize=7, padding=2)
        axes.set_yticks(list(rows),
                        [f"{job.name} ({METRIC_LABELS[job.metric]})" for job, _, _ in ratios])
        axes.axvline(1.0, color="black", linewidth=1)
        axes.invert_yaxis()
        axes.set_xlabel("mount / raw and mount / C peer (1 = as fast; targets are on mount/raw)")
        title = f"{name}: mount/raw and mount/peer ratios"
        axes.set_title(title)
        axes.legend(fontsize=8)
        charts.update(_save(figure, title, f"{name}-ratio", out_dir, suptitle=False))
    return charts


def cbt_chart(name: str, data: dict[str, Any], out_dir: Path) -> dict[str, str]:
    """Bars: each job's figure with CBT on and off."""
    jobs = data["summary"].get("jobs") or {}
    if not jobs:
        return {}
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(jobs), figsize=(5 * len(jobs), 4), squeeze=False)
    for axis, (job, entry) in zip(axes[0], jobs.items(), strict=True):
        metric = entry["metric"]
        values = [entry["cbt-on"][metric], entry["cbt-off"][metric]]
        bars = axis.bar(["CBT on", "CBT off (--no-cbt)"], values, color=["tab:blue", "tab:gray"])
        axis.bar_label(bars, fmt="{:,.0f}", fontsize=8)
        ratio = entry["ratio_on_off"]
        axis.set_title(f"{job}: on/off {ratio:.3f}" if ratio else job, fontsize=10)
        axis.set_ylabel("MB/s" if metric == "mbps" else "IOPS")
    title = f"{name}: CBT on vs off"
    return _save(figure, title, name, out_dir)


def relocation_chart(name: str, data: dict[str, Any], out_dir: Path) -> dict[str, str]:
    """Three panels: the writer's IOPS over time (relocation shaded), dirty bytes over time
    (pass changes marked), dirty bytes per pass."""
    series = data.get("series") or {}
    status = series.get("status") or []
    if not status and not series.get("iops"):
        return {}
    plt = _pyplot()
    figure, (top, middle, bottom) = plt.subplots(3, 1, figsize=(10, 10))
    end = series.get("relocation_s") or 0
    iops = series.get("iops") or []
    if iops:
        top.plot([t for t, _ in iops], [v for _, v in iops], marker=".", linewidth=1,
                 label="fio IOPS (per log interval)")
    if series.get("idle_iops"):
        top.axhline(series["idle_iops"], color="black", linestyle="--", linewidth=1,
                    label="idle IOPS (before)")
        top.axhline(series["idle_iops"] / 2, color="red", linestyle=":", linewidth=1,
                    label="50 % of idle (target floor)")
    top.axvspan(0, end, color="tab:orange", alpha=0.15, label="relocation")
    top.set_ylabel("IOPS")
    top.set_xlabel("seconds after fusedisk migrate started")
    top.legend(fontsize=8, loc="lower left")
    top.set_title("guest writes during the relocation")

    points = [p for p in status if p.get("dirty_bytes") is not None]
    if points:
        middle.plot([p["t"] for p in points], [p["dirty_bytes"] / _MIB for p in points],
                    marker=".", label="dirty bytes")
        copied = [p for p in status if p.get("bytes_copied") is not None]
        middle.plot([p["t"] for p in copied], [p["bytes_copied"] / _MIB for p in copied],
                    linestyle="--", label="bytes copied")
        previous = None
        for p in status:
            if p.get("pass") is not None and p.get("pass") != previous:
                middle.axvline(p["t"], color="gray", linewidth=0.8, linestyle=":")
                middle.annotate(f"pass {p['pass']}", (p["t"], 0), fontsize=7, rotation=90,
                                xytext=(2, 2), textcoords="offset points")
                previous = p.get("pass")
            if p.get("state") == api.State.MIRRORING:
                middle.axvspan(p["t"] - 0.25, p["t"] + 0.25, color="tab:purple", alpha=0.1)
        middle.legend(fontsize=8)
    middle.axvspan(0, end, color="tab:orange", alpha=0.08)
    middle.set_ylabel("MiB")
    middle.set_xlabel("seconds after fusedisk migrate started (status every 0.5 s; "
                      "purple = mirroring)")
    middle.set_title("dirty and copied bytes over time")

    passes = [p for p in series.get("passes") or [] if p.get("dirty_first") is not None]
    if passes:
        bars = bottom.bar([str(p["pass"]) for p in passes],
                          [p["dirty_first"] / _MIB for p in passes])
        bottom.bar_label(bars, fmt="{:,.1f}", fontsize=8)
    bottom.set_xlabel("pass")
    bottom.set_ylabel("MiB dirty when the pass was first seen")
    bottom.set_title("dirty bytes per pass")
    title = f"{name}: IOPS and dirty bytes during the relocation"
    return _save(figure, title, name, out_dir)


def pause_chart(name: str, data: dict[str, Any], out_dir: Path) -> dict[str, str]:
    """The probe's latency over time for the median repetition, switchover marked."""
    series = data.get("series") or {}
    latency = series.get("latency") or []
    if not latency:
        return {}
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(10, 5))
    axes.plot([p[0] for p in latency], [max(p[1], 1e-3) for p in latency], linewidth=0.7,
              label="probe write latency (max per 10 ms)")
    errors = [p for p in latency if p[2]]
    if errors:
        axes.scatter([p[0] for p in errors], [max(p[1], 1e-3) for p in errors], color="red",
                     marker="x", label="failed writes", zorder=3)
    axes.axvspan(0, series.get("relocation_s") or 0, color="tab:orange", alpha=0.12,
                 label="relocation (migrate running)")
    start, end = series.get("window") or (0, 0)
    axes.axvspan(start, end, color="tab:red", alpha=0.2, label="switchover window")
    if series.get("max_ms") is not None and series.get("max_at_s") is not None:
        axes.annotate(f"{series['max_ms']:.1f} ms", (series["max_at_s"], series["max_ms"]),
                      xytext=(5, 5), textcoords="offset points", fontsize=8)
    axes.axhline(100, color="black", linestyle=":", linewidth=1, label="100 ms target")
    axes.set_yscale("log")
    axes.set_xlabel("seconds after fusedisk migrate started")
    axes.set_ylabel("latency, ms (log)")
    pause = series.get("pause_ms")
    title = (f"{name}: probe latency, rep {int(series.get('rep', 0)) + 1}"
             + (f" (daemon pause_ms {pause:.1f})" if isinstance(pause, (int, float)) else ""))
    axes.set_title(title)
    axes.legend(fontsize=8, loc="upper left")
    return _save(figure, title, name, out_dir, suptitle=False)


def guest_chart(name: str, data: dict[str, Any], out_dir: Path) -> dict[str, str]:
    """The guest's longest iteration per interval over time, one panel per side (the
    median repetition of each), the switchover and the window around it marked."""
    series = data.get("series") or {}
    sides = [side for side in ("fusedisk", "qemu-mirror") if (series.get(side) or {}).get(
        "latency")]
    if not sides:
        return {}
    plt = _pyplot()
    figure, panels = plt.subplots(len(sides), 1, figsize=(10, 3.2 * len(sides)),
                                  squeeze=False)
    for axes, side in zip((row[0] for row in panels), sides, strict=True):
        shown = series[side]
        latency = shown["latency"]
        axes.plot([p[0] for p in latency], [max(p[1], 1e-3) for p in latency],
                  linewidth=0.7, label="longest guest I/O per interval")
        axes.axvspan(0, shown.get("relocation_s") or 0, color="tab:orange", alpha=0.12,
                     label="relocation")
        start, end = shown.get("window_s") or (0, 0)
        axes.axvspan(start - series.get("before_s", 0), end + series.get("after_s", 0),
                     color="tab:red", alpha=0.15, label="around the switchover")
        axes.axvline(start, color="tab:red", linewidth=0.8)
        if shown.get("around_ms") is not None and shown.get("around_at_s") is not None:
            axes.annotate(f"{shown['around_ms']:.1f} ms",
                          (shown["around_at_s"], shown["around_ms"]),
                          xytext=(5, 5), textcoords="offset points", fontsize=8)
        axes.axhline(5, color="black", linestyle=":", linewidth=1, label="5 ms target")
        axes.set_yscale("log")
        axes.set_ylabel("ms (log)")
        axes.set_title(f"{side}, rep {int(shown.get('rep', 0)) + 1}: switch "
                       f"{shown.get('switch_ms', 0):.1f} ms", fontsize=10)
        axes.legend(fontsize=7, loc="upper left")
    panels[-1][0].set_xlabel("seconds after the relocation started")
    title = f"{name}: the guest's I/O gaps, fusedisk vs QEMU's mirror"
    return _save(figure, title, name, out_dir)


CHARTS = {"cbt": cbt_chart, "relocate-busy": relocation_chart,
          "relocate-outrun": relocation_chart, "switchover-pause": pause_chart,
          "guest-switchover": guest_chart}


def _save(
    figure: Any, title: str, name: str, out_dir: Path, suptitle: bool = True
) -> dict[str, str]:
    """Title, lay out, write ``<name>.png`` and close *figure*; ``{title: file}``."""
    if suptitle:
        figure.suptitle(title)
    figure.tight_layout()
    file = f"{name}.png"
    figure.savefig(out_dir / file, dpi=100)
    _pyplot().close(figure)
    return {title: file}
