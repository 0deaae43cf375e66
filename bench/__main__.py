"""`python -m bench`: start the fake OpenAI server and the service on 127.0.0.1, run every
measurement, print a table of medians, p99s and ratios, and write it as JSON."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import measure
from bench.procs import ROOT, Fake, Service, export_commit

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Variant:
    """A build of the service to measure: the source (this tree, or a commit) and the loop
    and HTTP parser uvicorn runs it with."""

    label: str
    source: Path
    loop: str
    http: str


def parse_variant(spec: str) -> Variant:
    """`label=REF:LOOP:HTTP`; REF `.` is this tree (e.g. `before=835bde4:asyncio:h11`)."""
    label, _, rest = spec.partition("=")
    ref, loop, http = (rest.split(":") + ["auto", "auto"])[:3]
    source = ROOT if ref in {"", "."} else export_commit(ref)
    return Variant(label or ref, source, loop or "auto", http or "auto")


def run_async(make: Callable[[], Coroutine[Any, Any, dict[str, Any]]]) -> dict[str, Any]:
    """Run one client-side measurement on uvloop (a cheap client loop) if installed."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(make())
    result: dict[str, Any] = uvloop.run(make())
    return result


@contextlib.contextmanager
def profiled(pid: int, target: Path | None) -> Iterator[None]:
    """py-spy records the service while the block runs (when a target is given)."""
    if target is None:
        yield
        return
    spy = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "py-spy"),
            "record",
            "--pid",
            str(pid),
            "--rate",
            "250",
            # Without it py-spy stops the process for every sample, and on this VM the stops
            # land mostly at system calls: os.getpid() under asyncio.current_task() looked like
            # a quarter of the CPU in blocking profiles, and ~1 % in non-blocking ones.
            "--nonblocking",
            "--output",
            str(target),
        ]
        + (["--format", "raw"] if target.suffix == ".txt" else []),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(1.0)  # let it attach
    try:
        yield
    finally:
        spy.send_signal(2)
        spy.wait(30)


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of y over x."""
    if len(points) < 2:
        return 0.0
    mx = sum(x for x, _ in points) / len(points)
    my = sum(y for _, y in points) / len(points)
    den = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / den if den else 0.0


def measure_variant(variant: Variant, args: argparse.Namespace) -> dict[str, Any]:
    """Every measurement for one variant; each group has a fake and a service of its own."""
    out: dict[str, Any] = {}
    kw = {"source": variant.source, "loop": variant.loop, "http": variant.http}
    only = set(args.only.split(",")) if args.only else None

    def wanted(name: str) -> bool:
        return only is None or name in only

    def profile_target(group: str) -> Path | None:
        if not args.profile:
            return None
        return RESULTS / f"profile-{variant.label}-{group}.{args.profile}"

    if wanted("throughput"):
        with Fake(args.chunks) as fake, Service(fake.base_url, **kw) as service:  # type: ignore[arg-type]
            with profiled(service.pid, profile_target("throughput")):
                out["throughput"] = run_async(
                    lambda: measure.throughput(
                        fake.base_url, service, args.runs, args.budget, args.chunks
                    )
                )
        print(f"  [{variant.label}] throughput {out['throughput']}", file=sys.stderr)
    if wanted("ttft") or wanted("messages"):
        # The long chat also takes sends: room for them past its `--messages`.
        room = {"MAX_MESSAGES_PER_CHAT": str(args.messages + 1000)}
        with (
            Fake(5) as fake,
            Service(fake.base_url, env=room, **kw) as service,  # type: ignore[arg-type]
            profiled(service.pid, profile_target("short")),
        ):
            if wanted("ttft"):
                out["ttft"] = run_async(
                    lambda: measure.first_token(
                        fake.base_url, service, args.ttft_sends, args.budget
                    )
                )
                print(f"  [{variant.label}] ttft {out['ttft']}", file=sys.stderr)
            if wanted("messages"):
                start = time.monotonic()
                chat_id, middle = measure.fill_chat(service.db_path, args.messages)
                fill_seconds = time.monotonic() - start
                out["messages"] = run_async(
                    lambda: measure.read_messages(
                        service, chat_id, middle, args.messages, args.runs * 4, args.runs * 40
                    )
                )
                out["messages"]["fill_seconds"] = fill_seconds
                print(f"  [{variant.label}] messages {out['messages']}", file=sys.stderr)
                out["long_sends"] = run_async(
                    lambda: measure.long_chat_sends(service, chat_id, args.runs * 4)
                )
                print(f"  [{variant.label}] long_sends {out['long_sends']}", file=sys.stderr)
    if wanted("concurrent"):
        chunks = round(args.stream_seconds * 20)
        levels: list[dict[str, Any]] = []
        with Fake(chunks, delay=0.05, stamp=True) as fake:
            for streams in args.streams:
                runs: list[dict[str, Any]] = []
                for _ in range(args.stream_repeats):  # a new service each time
                    with (
                        Service(fake.base_url, **kw) as service,  # type: ignore[arg-type]
                        profiled(service.pid, profile_target(f"concurrent-{streams}")),
                    ):
                        procs = max(1, -(-streams // args.streams_per_process))
                        run = measure.concurrent(
                            service, streams, args.stream_seconds, args.ramp, procs
                        )
                    runs.append(run)
                    print(f"  [{variant.label}] concurrent {run}", file=sys.stderr)
                level = measure.median_level(runs)
                levels.append(level)
                if level["errors"] > streams // 10 and level["lateness_ms_p99"] > 1000:
                    break  # far past the limit: larger N only takes longer to fail
        ok = [lv["streams"] for lv in levels if lv["errors"] == 0 and lv["lateness_ms_p99"] <= 100]
        points = [(lv["streams"], lv["peak_rss_mb"] * 1024) for lv in levels]
        out["concurrent"] = {"levels": levels, "max_streams_ok": max(ok, default=0)}
        if len(points) >= 2:  # a slope needs two levels; one would read as 0 KB, "met"
            out["concurrent"]["rss_kb_per_stream"] = slope(points)
    return out


def measure_sends(variants: list[Variant], args: argparse.Namespace) -> dict[str, Any]:
    """The sends measurement, `--send-repeats` times for each variant, the variants taking
    turns (and turns about who goes first), each run with a fake and a service of its own:
    of all the rows, sends per second moves most with the machine's speed, which drifts over
    the minutes a whole variant takes. Each variant's medians, and its rate over the first
    variant's pair by pair."""
    runs: dict[str, list[dict[str, Any]]] = {v.label: [] for v in variants}
    for repeat in range(args.send_repeats):
        for variant in variants if repeat % 2 == 0 else variants[::-1]:
            kw = {"source": variant.source, "loop": variant.loop, "http": variant.http}
            target = None  # py-spy (--profile) records each variant's first run
            if args.profile and repeat == 0:
                target = RESULTS / f"profile-{variant.label}-sends.{args.profile}"
            with (
                Fake(5) as fake,
                Service(fake.base_url, **kw) as service,  # type: ignore[arg-type]
                profiled(service.pid, target),
            ):
                run = run_async(
                    lambda: measure.sends_per_second(service, args.send_clients, args.send_seconds)
                )
            runs[variant.label].append(run)
            print(f"  [{variant.label}] sends {run}", file=sys.stderr)
    baseline = runs[variants[0].label]
    return {
        label: measure.median_sends(own) | {"paired_ratio": measure.paired_ratio(own, baseline)}
        for label, own in runs.items()
    }


# name, goal text, how to read the value from a variant's results, unit, met?
Row = tuple[str, str, Callable[[dict[str, Any]], float], str, Callable[[float], bool]]
ROWS: list[Row] = [
    (
        "single stream: service / direct rate",
        ">= 0.7x",
        lambda r: r["throughput"]["ratio"],
        "x",
        lambda v: v >= 0.7,
    ),
    (
        "  direct SDK rate (chunks/s)",
        "",
        lambda r: r["throughput"]["direct_chunks_per_s"],
        "/s",
        lambda v: True,
    ),
    (
        "  service rate (chunks/s)",
        "",
        lambda r: r["throughput"]["service_chunks_per_s"],
        "/s",
        lambda v: True,
    ),
    (
        "  service delta events/s",
        "",
        lambda r: r["throughput"]["service_events_per_s"],
        "/s",
        lambda v: True,
    ),
    (
        "first token added, median",
        "<= 5 ms",
        lambda r: r["ttft"]["added_ms_median"],
        "ms",
        lambda v: v <= 5,
    ),
    (
        "first token added, p99",
        "<= 20 ms",
        lambda r: r["ttft"]["added_ms_p99"],
        "ms",
        lambda v: v <= 20,
    ),
    (
        "server CPU per relayed chunk",
        "<= 40 us",
        lambda r: r["throughput"]["cpu_us_per_chunk"],
        "us",
        lambda v: v <= 40,
    ),
    (
        "concurrent 20/s streams, largest N ok",
        ">= 500",
        lambda r: r["concurrent"]["max_streams_ok"],
        "",
        lambda v: v >= 500,
    ),
    (
        "memory per open stream (RSS slope)",
        "<= 100 KB",
        lambda r: r["concurrent"]["rss_kb_per_stream"],
        "KB",
        lambda v: v <= 100,
    ),
    (
        "GET all messages (10,000), median",
        "<= 50 ms",
        lambda r: r["messages"]["all_ms_median"],
        "ms",
        lambda v: v <= 50,
    ),
    (
        "  server CPU per GET of all",
        "",
        lambda r: r["messages"]["all_cpu_ms"],
        "ms",
        lambda v: True,
    ),
    (
        "GET a page of 100, median",
        "<= 5 ms",
        lambda r: r["messages"]["page_ms_median"],
        "ms",
        lambda v: v <= 5,
    ),
    (
        "send in the 10,000-msg chat, 1st token",
        "",
        lambda r: r["long_sends"]["first_ms_median"],
        "ms",
        lambda v: True,
    ),
    (
        "  server CPU per such send",
        "",
        lambda r: r["long_sends"]["cpu_ms_per_send"],
        "ms",
        lambda v: True,
    ),
    (
        "sends per second, 50 clients",
        ">= 300",
        lambda r: r["sends"]["sends_per_s"],
        "/s",
        lambda v: v >= 300,
    ),
    (
        "  server CPU per send",
        "",
        lambda r: r["sends"]["cpu_ms_per_send"],
        "ms",
        lambda v: True,
    ),
    (
        "  sends/s over the first variant's, paired",
        "",
        lambda r: r["sends"]["paired_ratio"],
        "x",
        lambda v: True,
    ),
]


def table(runs: list[dict[str, dict[str, Any]]]) -> tuple[str, list[dict[str, Any]]]:
    """The table as text, and as rows for the JSON: of one run's results, or of several
    runs' (`--combine`), each cell then the median of the runs' values."""
    labels = list(runs[0])
    header = f"{'measurement':42} {'goal':>10} " + " ".join(f"{lb:>14}" for lb in labels)
    lines = [header, "-" * len(header)]
    rows: list[dict[str, Any]] = []
    for name, goal, get, unit, met in ROWS:
        cells: list[str] = []
        row: dict[str, Any] = {"measurement": name.strip(), "goal": goal or None}
        for label in labels:
            values: list[float] = []
            for results in runs:
                with contextlib.suppress(KeyError):
                    values.append(float(get(results[label])))
            if not values:
                cells.append(f"{'-':>14}")
                continue
            value = measure.median(values)
            mark = (" ok" if met(value) else " NO") if goal else "   "
            text = f"{value:,.2f}" if value < 100 else f"{value:,.0f}"
            cells.append(f"{text + unit + mark:>14}")
            row[label] = {"value": value, "unit": unit, "met": met(value) if goal else None}
            if len(runs) > 1:
                row[label]["runs"] = values
        lines.append(f"{name:42} {goal:>10} " + " ".join(cells))
        rows.append(row)
    return "\n".join(lines), rows


def combine(paths: list[Path], output: Path) -> int:
    """Several runs' JSON reports (the same variants) as one table of medians."""
    reports = [json.loads(path.read_text()) for path in paths]
    text, rows = table([report["results"] for report in reports])
    print(f"medians of {len(reports)} runs: " + ", ".join(r["machine"]["date"] for r in reports))
    print(text)
    combined = {"runs": [str(path) for path in paths], "table": rows}
    output.write_text(json.dumps(combined, indent=2) + "\n")
    print(f"\nwritten to {output}")
    return 0


def machine() -> dict[str, Any]:
    """Where the numbers come from."""
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        # Other work on the machine skews latencies (CPU times less): say how busy it was.
        "load_average": os.getloadavg(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The knobs; --quick shrinks everything to a smoke test of under a minute."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="everything small (< 1 min)")
    parser.add_argument("--runs", type=int, default=7, help="single-stream runs per side")
    parser.add_argument("--chunks", type=int, default=2000, help="chunks of the single stream")
    parser.add_argument("--ttft-sends", type=int, default=200)
    parser.add_argument("--send-clients", type=int, default=50)
    parser.add_argument("--send-seconds", type=float, default=10.0)
    parser.add_argument(
        "--send-repeats", type=int, default=3, help="sends runs per variant, taking turns"
    )
    parser.add_argument("--messages", type=int, default=10_000, help="size of the long chat")
    parser.add_argument(
        "--streams", default="100,250,500,1000", help="concurrent stream counts to try"
    )
    parser.add_argument("--stream-seconds", type=float, default=10.0, help="length of each")
    parser.add_argument("--ramp", type=float, default=3.0, help="seconds to open them over")
    parser.add_argument("--streams-per-process", type=int, default=350, help="client processes")
    parser.add_argument(
        "--stream-repeats", type=int, default=3, help="runs of each stream count (medians kept)"
    )
    parser.add_argument("--budget", type=float, default=60.0, help="seconds per measurement")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        help="label=REF:LOOP:HTTP to measure side by side (REF . is this tree); "
        "default: after=.:auto:auto",
    )
    parser.add_argument("--only", default="", help="throughput,ttft,sends,messages,concurrent")
    parser.add_argument(
        "--profile", choices=["svg", "txt"], help="py-spy the service in each group"
    )
    parser.add_argument("--output", type=Path, default=RESULTS / "latest.json")
    parser.add_argument(
        "--combine",
        type=Path,
        nargs="+",
        metavar="JSON",
        help="measure nothing: the medians of these runs' reports, written to --output",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.runs, args.chunks, args.ttft_sends = 2, 500, 10
        args.send_clients, args.send_seconds, args.messages = 10, 1.0, 400
        args.streams, args.stream_seconds, args.ramp = "10,30", 1.0, 0.2
        args.stream_repeats = args.send_repeats = 1
        args.budget = 10.0
    args.streams = [int(n) for n in str(args.streams).split(",") if n]
    return args


def main(argv: list[str]) -> int:
    """Run, print, write."""
    args = parse_args(argv)
    if args.combine:
        return combine(args.combine, args.output)
    variants = [parse_variant(v) for v in args.variant or ["after=.:auto:auto"]]
    results: dict[str, dict[str, Any]] = {}
    started = time.monotonic()
    for variant in variants:
        print(f"measuring {variant.label} ({variant.loop}/{variant.http})", file=sys.stderr)
        results[variant.label] = measure_variant(variant, args)
    if not args.only or "sends" in args.only.split(","):
        print("measuring sends, the variants taking turns", file=sys.stderr)
        for label, sends in measure_sends(variants, args).items():
            results[label]["sends"] = sends
    text, rows = table([results])
    info = machine()
    print(
        f"\n{info['nproc']} cores, {info['cpu']}, Python {info['python']}, {info['date']}, "
        f"{time.monotonic() - started:.0f} s\n"
    )
    print(text)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    settings = {
        k: v for k, v in vars(args).items() if k not in {"output", "variant"} and v is not None
    }
    report = {
        "machine": info,
        "settings": settings,
        "variants": {v.label: {"loop": v.loop, "http": v.http} for v in variants},
        "table": rows,
        "results": results,
    }
    args.output.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"\nwritten to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
