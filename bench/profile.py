"""Where Turnout spends its time: py-spy samples the gateway during a c=16 non-streaming run.

The gateway (features on, as in `make bench`) runs on core 0; the fast upstream, the load and
py-spy on core 1. Prints the top self-time frames (the innermost Python frame of each sample,
idle samples left out) and the self time grouped by module (httpx/httpcore, litestar, msgspec,
uvicorn/httptools, turnout, prometheus_client, logging, asyncio, ...); writes the folded
stacks and both tables to bench/results/profile-<timestamp>.json.

Needs py-spy in the project venv, for yourself only (not a dependency): .venv/bin/pip install
py-spy. Run: .venv/bin/python -m bench.profile [--seconds 15] [--server uvicorn|granian]
[--native] [--nonblocking] [--top 15]
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bench.client import Kind, request_bytes, run_load
from bench.systems import (
    HOST,
    ROOT,
    VENV_BIN,
    Unavailable,
    cpus,
    fast_upstream,
    pinned,
    started,
    workdir,
)

RESULTS = Path(__file__).resolve().parent / "results"
console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)

# (group, pattern on the frame's file name), first match wins.
GROUPS: tuple[tuple[str, str], ...] = (
    ("httpx/httpcore", r"/(httpx|httpcore|h11|h2)/"),
    ("anyio", r"/anyio/"),
    ("litestar", r"/litestar/"),
    ("msgspec", r"/msgspec/"),
    ("uvicorn/httptools", r"/(uvicorn|httptools)/"),
    ("granian", r"/granian/"),
    ("prometheus_client", r"/prometheus_client/"),
    ("tiktoken", r"/tiktoken"),
    ("logging", r"/logging/"),
    ("asyncio/uvloop", r"/(asyncio|uvloop)/|uvloop"),
    ("turnout", r"(^|/)(gateway|router|serving)/"),
)
_FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^()]*)\)$")


def group_of(filename: str) -> str:
    if filename.startswith(str(ROOT) + "/"):
        relative = filename[len(str(ROOT)) + 1 :]
        if relative.split("/", 1)[0] in ("gateway", "router", "serving"):
            return "turnout"
    for group, pattern in GROUPS:
        if re.search(pattern, filename):
            return group
    if "site-packages/" in filename:
        return filename.split("site-packages/", 1)[1].split("/", 1)[0]
    if re.search(r"/lib/python3\.\d+/", filename):
        return "stdlib:" + Path(filename).stem
    return Path(filename).name or filename


def short(filename: str) -> str:
    for marker in ("site-packages/", str(ROOT) + "/"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    match = re.search(r"/lib/python3\.\d+/(.*)$", filename)
    return match.group(1) if match else filename


def parse_folded(text: str) -> collections.Counter[str]:
    """Stacks and their sample counts; the `process N:"..."` frame that py-spy puts first
    with --subprocesses is dropped (and samples with nothing else in them)."""
    stacks: collections.Counter[str] = collections.Counter()
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        frames = [f for f in stack.split(";") if f and not f.startswith("process ")]
        if frames and count.isdigit():
            stacks[";".join(frames)] += int(count)
    return stacks


def leaf(stack: str) -> tuple[str, str]:
    """(function, file) of the innermost frame."""
    frame = stack.rsplit(";", 1)[-1]
    match = _FRAME.match(frame)
    return (match.group("function"), match.group("file")) if match else (frame, "")


def summarise(
    stacks: collections.Counter[str], top: int
) -> tuple[list[dict[str, object]], list[dict[str, object]], int]:
    total = sum(stacks.values())
    frames: collections.Counter[tuple[str, str]] = collections.Counter()
    groups: collections.Counter[str] = collections.Counter()
    for stack, count in stacks.items():
        function, filename = leaf(stack)
        frames[(function, filename)] += count
        groups[group_of(filename)] += count
    top_frames = [
        {
            "function": function,
            "file": short(filename),
            "group": group_of(filename),
            "samples": count,
            "share": count / total,
        }
        for (function, filename), count in frames.most_common(top)
    ]
    by_group = [
        {"group": group, "samples": count, "share": count / total}
        for group, count in groups.most_common()
    ]
    return top_frames, by_group, total


def inclusive(stacks: collections.Counter[str], top: int) -> list[dict[str, object]]:
    """Frames by the share of samples they are on the stack of (the entry chain that every
    sample shares, above 95%, left out)."""
    total = sum(stacks.values())
    counts: collections.Counter[str] = collections.Counter()
    for stack, count in stacks.items():
        for frame in set(stack.split(";")):
            counts[frame] += count
    rows = []
    for frame, count in counts.most_common():
        if count / total > 0.95:
            continue
        function, filename = leaf(frame)
        rows.append(
            {
                "function": function,
                "file": short(filename),
                "group": group_of(filename),
                "samples": count,
                "share": count / total,
            }
        )
        if len(rows) == top:
            break
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--server", choices=("uvicorn", "granian"), default="uvicorn")
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--native", action="store_true", help="py-spy --native (C frames too)")
    parser.add_argument(
        "--nonblocking",
        action="store_true",
        help="py-spy --nonblocking: less overhead, but torn (often truncated) stacks",
    )
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()

    py_spy = VENV_BIN / "py-spy"
    found = str(py_spy) if py_spy.exists() else shutil.which("py-spy")
    if found is None:
        console.print("[red]py-spy not found: .venv/bin/pip install py-spy (not a dependency)[/]")
        return 2
    gateway_cpu, load_cpu = cpus()
    if load_cpu is not None:
        os.sched_setaffinity(0, {load_cpu})
    name = "turnout" if args.server == "uvicorn" else "turnout-granian"
    with workdir() as work, fast_upstream(load_cpu, work) as upstream_port:
        try:
            with started(name, upstream_port, gateway_cpu, work) as running:
                assert running.process is not None
                plain = request_bytes(HOST, running.port, running.model, api_key=running.api_key)
                kinds = [Kind("plain", plain)]
                run_load(HOST, running.port, kinds, concurrency=args.concurrency, seconds=1.0)
                folded = work / "profile.folded"
                command = [
                    found,
                    "record",
                    "--pid",
                    str(running.process.pid),
                    "--duration",
                    str(max(1, round(args.seconds))),
                    "--rate",
                    str(args.rate),
                    "--format",
                    "raw",
                    "--full-filenames",
                    "--nolineno",
                    "--output",
                    str(folded),
                    *(["--subprocesses"] if args.server == "granian" else []),  # its worker
                    *(["--nonblocking"] if args.nonblocking else []),
                    *(["--native"] if args.native else []),
                ]
                spy = subprocess.Popen(
                    pinned(load_cpu, command), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
                )
                load = run_load(
                    HOST,
                    running.port,
                    kinds,
                    concurrency=args.concurrency,
                    seconds=args.seconds + 0.5,
                )
                _, errors = spy.communicate(timeout=args.seconds + 60)
                if spy.returncode != 0 or not folded.exists():
                    console.print(f"[red]py-spy failed: {errors.decode(errors='replace')[-400:]}")
                    return 1
                stacks = parse_folded(folded.read_text())
        except Unavailable as exc:
            console.print(f"[red]{name} did not start: {exc}[/]")
            return 1

    top_frames, by_group, total = summarise(stacks, args.top)
    shown = " ".join(c if " " not in c else repr(c) for c in command[:1] + command[1:])
    console.print(f"command: {shown}")
    console.print(
        f"load: c={args.concurrency} non-streaming, {load.rate:,.0f} req/s during sampling "
        f"(sampling costs some); {total:,} samples of a busy gateway ({name})"
    )
    table = Table(title=f"Top {args.top} self-time frames")
    for column in ("share", "function", "file", "group"):
        table.add_column(column, justify="right" if column == "share" else "left")
    for frame in top_frames:
        table.add_row(
            f"{frame['share']:.1%}", str(frame["function"]), str(frame["file"]), str(frame["group"])
        )
    console.print(table)
    on_stack = inclusive(stacks, args.top)
    table = Table(title=f"Top {args.top} frames by inclusive time (on the stack)")
    for column in ("share", "function", "file", "group"):
        table.add_column(column, justify="right" if column == "share" else "left")
    for frame in on_stack:
        table.add_row(
            f"{frame['share']:.1%}", str(frame["function"]), str(frame["file"]), str(frame["group"])
        )
    console.print(table)
    groups = Table(title="Self time by module")
    groups.add_column("group")
    groups.add_column("share", justify="right")
    for row in by_group:
        groups.add_row(str(row["group"]), f"{row['share']:.1%}")
    console.print(groups)
    output = RESULTS / f"profile-{dt.datetime.now():%Y%m%d-%H%M%S}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "command": command,
        "server": args.server,
        "concurrency": args.concurrency,
        "rate_during_sampling": load.rate,
        "samples": total,
        "top_frames": top_frames,
        "by_group": by_group,
        "inclusive": on_stack,
        "folded": dict(stacks.most_common()),
    }
    output.write_text(json.dumps(report, indent=2) + "\n")
    console.print(f"results: {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
