"""Compare the worker of another commit with this checkout's, back to back on this machine.

    .venv/bin/python bench/compare.py BASE_REF [--rounds 4] [--seconds 8]
                                      [--commands session.verify,session.end]

The base runs from a temporary `git worktree` of BASE_REF (put first on PYTHONPATH; same
virtualenv), the head from this checkout. Each round measures the bare-consumer ceiling (and
the argon2 ceiling, when account.create or session.start is compared), then the base worker
and the head worker on each command (closed loop of 128, or of 16 for the password commands as
in bench/run.py; 2 s warm-up), so the two are compared within minutes of each other and of
their ceiling: on a shared machine the speed drifts more between rounds than between
neighbours. Prints each measurement, then the median over rounds of each worker's ratio to its
round's ceiling: hashes per second for account.create, verifications for session.start, the
bare consumer for the rest. Both workers run in the
environment `as_deployed` gives this script (argon2 on huge pages), so a change of that
environment is measured by running the script twice, once with `GLIBC_TUNABLES` set to
`glibc.malloc.hugetlb=0`.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))

from env import ROOT, CpuMeter, Sandbox, WorkerProcess, as_deployed, worker_env
from loadgen import LoadGenerator
from scenarios import (
    Durations,
    State,
    argon2_ceiling,
    broker_ceiling,
    prepare,
    window_for,
)

from worker.topology import FAST_QUEUE

# The argon2 ceiling each password command is measured against.
ARGON2_CEILING = {"account.create": "hash_per_s", "session.start": "verify_per_s"}


async def measure_worker(
    sandbox: Sandbox, state: State, env: dict[str, str], commands: list[str], seconds: float
) -> dict[str, dict[str, Any]]:
    results = {}
    gen = LoadGenerator(sandbox.amqp_url)
    await gen.open()
    worker = WorkerProcess(env, Path(tempfile.mkdtemp(prefix="identity-compare-")) / "w.log")
    worker.start()
    try:
        for command in commands:
            meter, cpu = CpuMeter([worker.pid]), {}
            with meter.span(cpu):
                sample = await gen.closed_loop(
                    state.maker(command), window=window_for(command), warmup=2, seconds=seconds
                )
            rate = sample.completed / sample.seconds
            results[command] = {
                "throughput": round(rate, 1),
                "worker_cpu_ms": round(1000 * cpu["cpu_worker_cores"] / rate, 3) if rate else None,
            }
    finally:
        worker.stop()
        await gen.close()
    return results


async def ceiling(sandbox: Sandbox, state: State, seconds: float) -> float:
    gen = LoadGenerator(sandbox.amqp_url)
    await gen.open()
    try:
        # The workers' fast queue would get a copy of every command: gone until a worker
        # declares it again.
        channel = await gen.connection.channel()
        await channel.queue_delete(FAST_QUEUE)
        await channel.close()
        durations = Durations(2, seconds, seconds, seconds, seconds)
        measured = await broker_ceiling(sandbox, gen, state, durations, floor=False)
        return float(measured["throughput"])
    finally:
        await gen.close()


async def main(args: argparse.Namespace) -> None:
    commands = args.commands.split(",")
    base_tree = Path(tempfile.mkdtemp(prefix="identity-base-")) / "tree"
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(base_tree), args.base],
        check=True,
        capture_output=True,
    )
    sandbox = Sandbox()
    ratios: dict[str, list[float]] = {}
    try:
        await sandbox.open()
        password_hash = (await argon2_ceiling(0.1))["password_hash"]
        state, keys = await prepare(sandbox, "cmp", password_hash, ends=120_000)
        variants = {
            f"base {args.base}": worker_env(sandbox, keys, PYTHONPATH=str(base_tree)),
            "head": worker_env(sandbox, keys),
        }
        for round_no in range(args.rounds):
            top = await ceiling(sandbox, state, args.seconds)
            ceilings = dict.fromkeys(commands, top)
            if ARGON2_CEILING.keys() & set(commands):
                argon2 = await argon2_ceiling(args.seconds / 2)
                ceilings.update({c: argon2[k] for c, k in ARGON2_CEILING.items() if c in ceilings})
                print(
                    f"round {round_no}: ceilings {top:.1f}/s, argon2 {argon2['hash_per_s']}"
                    f" hash/s, {argon2['verify_per_s']} verify/s",
                    flush=True,
                )
            else:
                print(f"round {round_no}: ceiling {top:.1f}/s", flush=True)
            for name, env in variants.items():
                measured = await measure_worker(sandbox, state, env, commands, args.seconds)
                for command, figures in measured.items():
                    ratio = figures["throughput"] / ceilings[command]
                    ratios.setdefault(f"{name} {command}", []).append(ratio)
                    print(
                        f"  {name:24} {command:16} {figures['throughput']:8.1f}/s "
                        f"{ratio:6.3f}x  worker CPU {figures['worker_cpu_ms']} ms per command",
                        flush=True,
                    )
    finally:
        await sandbox.close()
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base_tree)],
            check=False,
            capture_output=True,
        )
    print("median ratio to the round's ceiling:")
    for name, values in ratios.items():
        print(f"  {name:42} {statistics.median(values):.3f}x  ({len(values)} rounds)")


if __name__ == "__main__":
    as_deployed()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("base", help="git ref of the worker to compare with")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--commands", default="session.verify,session.end")
    uvloop.run(main(parser.parse_args()))
