"""Benchmark the identity worker against ceilings measured in the same run.

    .venv/bin/python bench/run.py [--quick] [--runs N] [--out bench/results/NAME.json]

Each run makes its own RabbitMQ vhost and PostgreSQL database and removes them at the end,
whatever happens. With --runs N the whole run is repeated N times and the table shows the
median of every figure. See BENCHMARKS.md for what each scenario measures and why.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))

from env import ROOT, as_deployed, git_head
from scenarios import one_run

TARGETS = [
    # (what is promised, where the median figure is, comparison, threshold)
    ("session.verify >= 0.8x broker ceiling", "ratios.verify_vs_broker", ">=", 0.8),
    ("session.end >= 0.8x broker ceiling", "ratios.end_vs_broker", ">=", 0.8),
    ("account.create >= 0.9x argon2 ceiling", "ratios.create_vs_argon2_hash", ">=", 0.9),
    ("session.start >= 0.9x argon2 ceiling", "ratios.start_vs_argon2_verify", ">=", 0.9),
    ("verify p99 < 50 ms at 200/s, 1,000-create backlog", "backlog_verify.p99_ms", "<", 50.0),
    ("peak RSS < 300 MiB, 10k backlog, default prefetch", "rss_default_mib", "<", 300.0),
    ("peak RSS < 300 MiB, 10k backlog, large prefetch", "rss_large_mib", "<", 300.0),
    ("two workers >= 1.6x one (session.verify)", "scaling.ratio", ">=", 1.6),
]


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def derive(run: dict[str, Any]) -> None:
    """The ratios and flat figures the targets are judged on."""
    w, broker, argon2 = run["worker"], run["broker_ceiling"], run["argon2_ceiling"]
    run["ratios"] = {
        "verify_vs_broker": round(w["session.verify"]["throughput"] / broker["throughput"], 3),
        "end_vs_broker": round(w["session.end"]["throughput"] / broker["throughput"], 3),
        "get_vs_broker": round(w["account.get"]["throughput"] / broker["throughput"], 3),
        "create_vs_argon2_hash": round(w["account.create"]["throughput"] / argon2["hash_per_s"], 3),
        "start_vs_argon2_verify": round(
            w["session.start"]["throughput"] / argon2["verify_per_s"], 3
        ),
    }
    run["rss_default_mib"] = run["rss_10k_backlog"]["default_prefetch"]["peak_rss_mib"]
    run["rss_large_mib"] = run["rss_10k_backlog"]["large_prefetch"]["peak_rss_mib"]


def median_of(runs: list[Any]) -> Any:
    """The median of every number found at the same place in every run."""
    first = runs[0]
    if isinstance(first, dict):
        keys = [k for k in first if all(isinstance(r, dict) and k in r for r in runs)]
        return {k: median_of([r[k] for r in runs]) for k in keys}
    if isinstance(first, bool) or not isinstance(first, int | float):
        return first
    values = [r for r in runs if isinstance(r, int | float) and r == r]  # drop NaN
    return round(statistics.median(values), 3) if values else None


def lookup(data: dict[str, Any], path: str) -> Any:
    for part in path.split("."):
        data = data[part]
    return data


def judge(median: dict[str, Any]) -> list[dict[str, Any]]:
    verdicts = []
    for name, path, op, threshold in TARGETS:
        value = lookup(median, path)
        met = value is not None and (value >= threshold if op == ">=" else value < threshold)
        verdicts.append({"target": name, "measured": value, "met": met})
    return verdicts


def machine() -> dict[str, Any]:
    def first(command: list[str]) -> str:
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=30)
            return result.stdout.strip().splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            return "unknown"

    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "unknown",
    )
    mem_kib = int(Path("/proc/meminfo").read_text().split()[1])
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "ram_gib": round(mem_kib / 1024 / 1024, 1),
        "python": platform.python_version(),
        "rabbitmq": first(["rabbitmqctl", "version"]),
        "postgresql": first(
            ["psql", "-h", "127.0.0.1", "-U", "postgres", "-tAc", "SHOW server_version"]
        ),
        "git": git_head(),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
    }


def table(median: dict[str, Any], verdicts: list[dict[str, Any]], runs: int) -> str:
    rows = [f"median of {runs} run(s)", ""]
    a, b = median["argon2_ceiling"], median["broker_ceiling"]
    rows.append(
        f"argon2 ceiling: {a['hash_per_s']} hash/s, {a['verify_per_s']} verify/s "
        f"(before {a['before']['hash_per_s']}, after {a['after']['hash_per_s']} hash/s)"
    )
    rows.append(
        f"broker ceiling: {b['throughput']}/s  p50 {b['p50_ms']} ms  p99 {b['p99_ms']} ms "
        f"(before {b['before']['throughput']}/s, after {b['after']['throughput']}/s)"
    )
    floors = [b[when].get("at_backlog_rate") for when in ("before", "after")]
    if all(floors):
        rows.append(
            "bare consumer at the backlog rate, p50 / p99 ms: "
            + ", ".join(
                f"{f['p50_ms']} / {f['p99_ms']} ({f['completed']} answered"
                + "".join(f", {k} {f[k]}" for k in ("lost", "errors") if k in f)
                + ")"
                for f in floors
            )
            + " (before, after)"
        )
    rows.append("")
    rows.append(f"{'command':<16}{'per s':>9}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'cpu ms':>9}")
    for command, r in median["worker"].items():
        if isinstance(r, dict):
            rows.append(
                f"{command:<16}{r['throughput']:>9}{r['p50_ms']:>9}{r['p95_ms']:>9}"
                f"{r['p99_ms']:>9}{r.get('worker_cpu_ms_per_command', ''):>9}"
            )
    m = median["mix"]
    rows.append(
        f"{'mix (open loop)':<16}{m['throughput']:>9}{m['p50_ms']:>9}{m['p95_ms']:>9}"
        f"{m['p99_ms']:>9}   offered {m['offered_per_s']}/s"
    )
    rows.append(f"worker peak RSS during the runs above: {median['worker']['peak_rss_mib']} MiB")
    rows.append("")
    rows.append(f"ratios: {median['ratios']}")
    s = median["scaling"]
    rows.append(
        f"scaling: 1 worker {s['1_worker']['throughput']}/s, "
        f"2 workers {s['2_worker']['throughput']}/s, ratio {s['ratio']}"
    )
    rows.append("")
    for v in verdicts:
        rows.append(f"{'MET    ' if v['met'] else 'NOT MET'}  {v['target']}: {v['measured']}")
    return "\n".join(rows)


async def main_async(args: argparse.Namespace) -> int:
    runs: list[dict[str, Any]] = []
    discarded: list[str] = []
    # The machine is shared: a run broken from outside (a broker restarted, connections
    # closed by someone's test) is discarded, said so in the report, and run again.
    while len(runs) < args.runs and len(discarded) <= args.runs:
        log(f"run {len(runs) + 1} of {args.runs}")
        try:
            run = await one_run(args.quick, log)
        except Exception as exc:
            log(f"run discarded: {exc!r}")
            discarded.append(repr(exc))
            continue
        derive(run)
        runs.append(run)
    if not runs:
        return 1
    median = median_of(runs)
    verdicts = judge(median)
    print(table(median, verdicts, len(runs)))
    if args.out:
        report = {
            "machine": machine(),
            "runs": runs,
            "median": median,
            "targets": verdicts,
            "discarded_runs": discarded,
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
        log(f"wrote {args.out}")
    return 0


def main() -> int:
    as_deployed()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="shorter spans (a smoke run)")
    parser.add_argument("--runs", type=int, default=1, help="full runs; medians are reported")
    parser.add_argument("--out", help="write the JSON report here (bench/results/NAME.json)")
    args = parser.parse_args()
    if args.out is None:
        args.out = str(ROOT / "bench" / "results" / f"{time.strftime('%Y%m%d-%H%M%S')}.json")
    return uvloop.run(main_async(args))


if __name__ == "__main__":
    raise SystemExit(main())
