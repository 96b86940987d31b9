"""The benchmark's fio job files: discovery, selection and what each measures."""

from __future__ import annotations

import configparser
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from bench.errors import BenchError

JOBS_DIR = Path(__file__).resolve().parent / "jobs"
FILL_JOB = Path(__file__).resolve().parent / "fill.fio"

# Block sizes at or above this are judged by throughput, smaller ones by IOPS.
_THROUGHPUT_MIN_BS = 64 * 1024

Metric = Literal["mbps", "iops"]
#: how tables and charts name each figure
METRIC_LABELS = {"mbps": "MB/s", "iops": "IOPS", "p99_us": "p99 µs"}


@dataclass(frozen=True, slots=True)
class Job:
    """One fio job file and the settings the report describes it by."""

    name: str
    path: Path
    rw: str
    bs: str
    ioengine: str
    iodepth: int
    direct: bool

    @property
    def metric(self) -> Metric:
        """The figure this job is judged by: MB/s for large blocks, IOPS for small."""
        return "mbps" if parse_size(self.bs) >= _THROUGHPUT_MIN_BS else "iops"


def parse_size(text: str) -> int:
    """Parse ``4k``, ``1M``, ``1GiB``, ``65536`` (binary multiples) into bytes.

    Raises ValueError on anything else.
    """
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    value = text.strip().lower().removesuffix("ib").removesuffix("b")
    multiplier = 1
    if value[-1:] in units:
        multiplier = units[value[-1]]
        value = value[:-1]
    if not value.isdigit():
        raise ValueError(f"not a size: {text!r}")
    return int(value) * multiplier


def _load(path: Path) -> Job:
    parser = configparser.ConfigParser(
        allow_no_value=True, interpolation=None, comment_prefixes=(";", "#")
    )
    parser.read(path)
    sections = [s for s in parser.sections() if s != "global"]
    if len(sections) != 1:
        raise BenchError(f"{path}: expected exactly one job section, found {len(sections)}")
    merged = dict(parser["global"]) if parser.has_section("global") else {}
    merged.update(parser[sections[0]])
    try:
        return Job(
            name=sections[0],
            path=path,
            rw=merged["rw"],
            bs=merged["bs"],
            ioengine=merged["ioengine"],
            iodepth=int(merged.get("iodepth") or 1),
            direct=merged.get("direct") == "1",
        )
    except (KeyError, ValueError) as exc:
        raise BenchError(f"{path}: cannot read job settings ({exc})") from None


def _report_order(job: Job) -> tuple[bool, bool, bool, int, str]:
    """O_DIRECT before buffered, MB/s jobs before IOPS jobs, reads before writes, by depth."""
    return (not job.direct, job.metric == "iops", "write" in job.rw, job.iodepth, job.name)


def all_jobs() -> list[Job]:
    """Every job in ``bench/jobs/`` in report order; the section name must match the file."""
    jobs = sorted((_load(path) for path in JOBS_DIR.glob("*.fio")), key=_report_order)
    for job in jobs:
        if job.path.stem != job.name:
            raise BenchError(f"{job.path}: job section [{job.name}] does not match the file name")
    return jobs


def select_jobs(names: list[str] | None) -> list[Job]:
    """The jobs named (in the order given), or all of them when ``names`` is None."""
    jobs = all_jobs()
    if names is None:
        return jobs
    by_name = {job.name: job for job in jobs}
    unknown = [name for name in names if name not in by_name]
    if unknown:
        raise BenchError(
            f"unknown job(s) {', '.join(unknown)}; known: {', '.join(by_name)}"
        )
    return [by_name[name] for name in names]
