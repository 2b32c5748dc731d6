"""Profile the worker under load with py-spy (py-spy comes with the `bench` extra).

    .venv/bin/python bench/profile.py session.verify [SECONDS] [--out FILE]

Starts a fresh vhost, database and worker like bench/run.py, drives COMMAND in a closed loop
and records the worker with `py-spy record --format raw` (collapsed stacks, one per line,
with sample counts), then prints the functions with the most samples (own and total).
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
from collections import Counter
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))

from env import BIN, as_deployed
from scenarios import window_for, worker_under_load


def summarize(path: Path, top: int = 25) -> str:
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        samples += n
        frames = stack.split(";")
        own[frames[-1]] += n
        for frame in set(frames):
            total[frame] += n
    rows = [f"{samples} samples", "", "own:"]
    rows += [f"{100 * n / samples:6.1f}%  {f}" for f, n in own.most_common(top)]
    rows += ["", "total:"]
    rows += [f"{100 * n / samples:6.1f}%  {f}" for f, n in total.most_common(top)]
    return "\n".join(rows)


async def main(command: str, seconds: float, out: Path) -> None:
    async with worker_under_load("prof") as (state, worker, gen):
        load = asyncio.create_task(
            gen.closed_loop(
                state.maker(command), window=window_for(command), warmup=1, seconds=seconds + 2
            )
        )
        await asyncio.sleep(1.5)
        spy = await asyncio.create_subprocess_exec(
            str(BIN / "py-spy"),
            "record",
            "--pid",
            str(worker.pid),
            "--duration",
            str(int(seconds)),
            "--rate",
            "200",
            "--format",
            "raw",
            "--nonblocking",
            "--output",
            str(out),
            stdout=subprocess.DEVNULL,
        )
        await spy.wait()
        sample = await load
        print(f"{command}: {sample.summary()}")
    print(summarize(out))


if __name__ == "__main__":
    as_deployed()
    parser = argparse.ArgumentParser()
    parser.add_argument("command")
    parser.add_argument("seconds", type=float, nargs="?", default=10)
    parser.add_argument("--out", default="bench/results/profile-stacks.txt")
    args = parser.parse_args()
    uvloop.run(main(args.command, args.seconds, Path(args.out)))
