"""The measurements, each bounded in time; each returns a dict of numbers for the table."""

from __future__ import annotations

import asyncio
import json
import secrets
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionMessageParam

from bench.client import Connection, create_chat
from bench.procs import ROOT, Service, cpu_seconds, rss_bytes

MODEL = "gpt-4o-mini"
PROMPT: list[ChatCompletionMessageParam] = [{"role": "user", "content": "go"}]


def median(values: list[float]) -> float:
    """The median (0 for nothing)."""
    return statistics.median(values) if values else 0.0


def p99(values: list[float]) -> float:
    """The 99th percentile, nearest rank."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def sdk_client(base_url: str) -> AsyncOpenAI:
    """The SDK as the service makes it."""
    return AsyncOpenAI(api_key="sk-bench", base_url=base_url, max_retries=0, timeout=60)


async def direct_stream(client: AsyncOpenAI) -> tuple[float, float, int]:
    """The SDK reading the fake: (seconds to the first text, seconds in all, characters)."""
    start = time.perf_counter()
    first = 0.0
    chars = 0
    stream = await client.chat.completions.create(
        model=MODEL, messages=PROMPT, stream=True, stream_options={"include_usage": True}
    )
    async for chunk in stream:
        for choice in chunk.choices:
            if choice.delta.content:
                if not chars:
                    first = time.perf_counter() - start
                chars += len(choice.delta.content)
    return first, time.perf_counter() - start, chars


async def service_stream(conn: Connection, chat_id: str) -> tuple[float, float, int, int]:
    """A send through the service, read to `message.done`: (seconds to the first delta,
    seconds in all, characters of text, delta events)."""
    start = time.perf_counter()
    first = 0.0
    chars = events = 0
    response = await conn.request("POST", f"/chats/{chat_id}/messages", {"content": "go"})
    assert response.status == 200, await response.body()
    async for event in response.events():
        if event.name == "message.delta":
            if not events:
                first = event.at - start
            events += 1
            chars += len(event.data["delta"])
        elif event.name == "message.done":
            assert event.data["status"] == "completed", event.data
    return first, time.perf_counter() - start, chars, events


async def throughput(
    fake_url: str, service: Service, runs: int, budget: float, chunks: int
) -> dict[str, Any]:
    """One long stream at a time, as fast as the fake sends it: the SDK reading the fake, and
    a client reading the service, alternately. Rates count the model's text (chunks of
    "tok "), since the service merges deltas a reader has not yet taken. Also the service's
    CPU time per relayed chunk."""
    client = sdk_client(fake_url)
    conn = Connection("127.0.0.1", service.port)
    direct_rates: list[float] = []
    service_rates: list[float] = []
    event_rates: list[float] = []
    cpu = 0.0
    relayed = 0
    deadline = time.monotonic() + budget
    await direct_stream(client)  # warm up both paths
    await service_stream(conn, await create_chat(conn))
    for _ in range(runs):
        _, seconds, chars = await direct_stream(client)
        direct_rates.append(chars / 4 / seconds)
        chat_id = await create_chat(conn)
        before = cpu_seconds(service.pid)
        _, seconds, chars, events = await service_stream(conn, chat_id)
        cpu += cpu_seconds(service.pid) - before
        relayed += chars // 4
        service_rates.append(chars / 4 / seconds)
        event_rates.append(events / seconds)
        if time.monotonic() > deadline:
            break
    await conn.close()
    await client.close()
    return {
        "chunks": chunks,
        "runs": len(service_rates),
        "direct_chunks_per_s": median(direct_rates),
        "service_chunks_per_s": median(service_rates),
        "service_events_per_s": median(event_rates),
        "ratio": median(service_rates) / median(direct_rates),
        "cpu_us_per_chunk": cpu / max(1, relayed) * 1e6,
    }


async def first_token(fake_url: str, service: Service, sends: int, budget: float) -> dict[str, Any]:
    """Time to the first text: the SDK reading the fake vs POST → first `message.delta`,
    alternately; each service send in a fresh chat (no history to load)."""
    client = sdk_client(fake_url)
    conn = Connection("127.0.0.1", service.port)
    direct: list[float] = []
    through: list[float] = []
    await direct_stream(client)
    await service_stream(conn, await create_chat(conn))
    deadline = time.monotonic() + budget
    for _ in range(sends):
        first, _, _ = await direct_stream(client)
        direct.append(first * 1000)
        chat_id = await create_chat(conn)
        first, _, _, _ = await service_stream(conn, chat_id)
        through.append(first * 1000)
        if time.monotonic() > deadline:
            break
    await conn.close()
    await client.close()
    return {
        "sends": len(through),
        "direct_ms_median": median(direct),
        "direct_ms_p99": p99(direct),
        "service_ms_median": median(through),
        "service_ms_p99": p99(through),
        "added_ms_median": median(through) - median(direct),
        "added_ms_p99": p99(through) - p99(direct),
    }


async def sends_per_second(service: Service, clients: int, seconds: float) -> dict[str, Any]:
    """`clients` clients, each in its own chat on a keep-alive connection, sending a message
    and reading its short reply to `message.done`, over and over for `seconds`."""
    conns = [Connection("127.0.0.1", service.port) for _ in range(clients)]
    chats = [await create_chat(c) for c in conns]
    latencies: list[float] = []
    errors = 0
    stop_at = 0.0

    async def loop(conn: Connection, chat_id: str) -> None:
        nonlocal errors
        while time.monotonic() < stop_at:
            start = time.perf_counter()
            try:
                await service_stream(conn, chat_id)
            except (AssertionError, OSError, asyncio.IncompleteReadError):
                errors += 1
                await conn.close()
                continue
            latencies.append((time.perf_counter() - start) * 1000)

    stop_at = time.monotonic() + 1.0  # warm-up, not counted
    await asyncio.gather(*(loop(c, chat) for c, chat in zip(conns, chats, strict=True)))
    latencies.clear()
    errors = 0
    begin = time.monotonic()
    cpu_before = cpu_seconds(service.pid)
    stop_at = begin + seconds
    await asyncio.gather(*(loop(c, chat) for c, chat in zip(conns, chats, strict=True)))
    elapsed = time.monotonic() - begin
    cpu = cpu_seconds(service.pid) - cpu_before
    for conn in conns:
        await conn.close()
    return {
        "clients": clients,
        "sends": len(latencies),
        "errors": errors,
        "sends_per_s": len(latencies) / elapsed,
        # The service's CPU time per send: robust to other load on the machine, unlike the rate.
        "cpu_ms_per_send": cpu / max(1, len(latencies)) * 1000,
        "latency_ms_median": median(latencies),
        "latency_ms_p99": p99(latencies),
    }


def fill_chat(db_path: Path, messages: int) -> tuple[str, str]:
    """A chat of `messages` messages, written through db.py's Database directly (far quicker
    than as many sends); returns its id and the id of the message in its middle."""
    sys.path.insert(0, str(ROOT))
    from db import Database

    db = Database(db_path)
    db.migrate()
    chat = db.create_chat(f"chat_{secrets.token_urlsafe(16)}", "long chat", None, MODEL)
    question = (
        "What is the difference between a list and a tuple in Python, and when should I use each? "
    )
    answer = (
        "A list is mutable: you can append, remove and change items. A tuple is immutable, "
        "hashable when its items are, and a little smaller. Use a tuple for fixed records "
        "(a point, a row) and as dictionary keys; use a list for collections that grow or "
        "change. " * 2
    )
    middle = ""
    for i in range(messages // 2):
        outcome = db.start_exchange(
            chat_id=chat.id,
            user_message_id=f"msg_{secrets.token_urlsafe(16)}",
            reply_id=f"msg_{secrets.token_urlsafe(16)}",
            content=question,
            idempotency_key=None,
            max_messages=messages + 10,
        )
        reply = outcome.reply  # type: ignore[union-attr]
        db.finish_reply(
            reply.id,
            status="completed",
            content=answer,
            finish_reason="stop",
            usage={"prompt_tokens": 40, "completion_tokens": 80, "total_tokens": 120},
            tool_calls=[],
            error=None,
            last_event_id=3,
        )
        if i == messages // 4:
            middle = reply.id
    db.close()
    return chat.id, middle


async def read_messages(
    service: Service, chat_id: str, middle: str, total: int, runs: int, page_runs: int
) -> dict[str, Any]:
    """`GET /chats/{id}/messages` of the whole long chat, and a page of 100 from its middle,
    timed to the last byte of the body."""
    conn = Connection("127.0.0.1", service.port)

    async def timed(path: str, count: int) -> tuple[list[float], int]:
        times: list[float] = []
        size = 0
        for _ in range(count + 1):
            start = time.perf_counter()
            response = await conn.request("GET", path)
            body = await response.body()
            times.append((time.perf_counter() - start) * 1000)
            assert response.status == 200, body[:200]
            size = len(body)
        return times[1:], size  # the first one warms caches

    cpu_before = cpu_seconds(service.pid)
    full, full_size = await timed(f"/chats/{chat_id}/messages?limit={total}", runs)
    full_cpu = cpu_seconds(service.pid) - cpu_before
    page, _ = await timed(f"/chats/{chat_id}/messages?limit=100&after={middle}", page_runs)
    check = await conn.request("GET", f"/chats/{chat_id}/messages?limit={total}")
    count = len((await check.json())["data"])
    await conn.close()
    return {
        "messages": count,
        "body_bytes": full_size,
        "all_ms_median": median(full),
        "all_ms_p99": p99(full),
        "all_cpu_ms": full_cpu / (runs + 1) * 1000,
        "page_ms_median": median(page),
        "page_ms_p99": p99(page),
    }


async def long_chat_sends(service: Service, chat_id: str, sends: int) -> dict[str, Any]:
    """Sends in the long chat, one at a time: POST → first `message.delta` (the history is
    loaded and the prompt built before the model is asked), and the service's CPU per send."""
    conn = Connection("127.0.0.1", service.port)
    await service_stream(conn, chat_id)  # warms caches
    firsts: list[float] = []
    cpu_before = cpu_seconds(service.pid)
    for _ in range(sends):
        first, _, _, _ = await service_stream(conn, chat_id)
        firsts.append(first * 1000)
    cpu = cpu_seconds(service.pid) - cpu_before
    await conn.close()
    return {
        "sends": sends,
        "first_ms_median": median(firsts),
        "first_ms_p99": p99(firsts),
        "cpu_ms_per_send": cpu / max(1, sends) * 1000,
    }


def concurrent(
    service: Service, streams: int, seconds: float, ramp: float, procs: int
) -> dict[str, Any]:
    """`streams` streams at once (the fake sends 20 chunks/s, each stamped with its send
    time), read by `procs` client processes; how late each chunk reached its reader, and
    the service's peak RSS meanwhile."""
    expected = round(seconds * 20)
    shares = [streams // procs + (1 if i < streams % procs else 0) for i in range(procs)]
    outputs = [service.dir / f"worker-{i}.json" for i in range(procs)]
    workers = [
        subprocess.Popen(
            [sys.executable, "-m", "bench.worker", "--port", str(service.port)]
            + ["--streams", str(share), "--ramp", str(ramp), "--expected", str(expected)]
            + ["--timeout", str(seconds * 3 + ramp + 30), "--uvloop", "--output", str(out)],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for share, out in zip(shares, outputs, strict=True)
        if share
    ]
    for worker in workers:
        assert worker.stdout is not None
        assert worker.stdout.readline().strip() == "ready"
    idle_rss = rss_bytes(service.pid)
    cpu_before = cpu_seconds(service.pid)
    begin = time.monotonic()
    for worker in workers:
        assert worker.stdin is not None
        worker.stdin.write("go\n")
        worker.stdin.flush()
    peak = idle_rss
    while any(w.poll() is None for w in workers):
        peak = max(peak, rss_bytes(service.pid))
        time.sleep(0.1)
    elapsed = time.monotonic() - begin
    cpu = cpu_seconds(service.pid) - cpu_before
    results = [json.loads(out.read_text()) if out.exists() else {} for out in outputs]
    lateness = [x for r in results for x in r.get("lateness_ms", [])]
    errors = sum(r.get("errors", streams) for r in results)
    samples = [s for r in results for s in r.get("error_samples", [])]
    return {
        "streams": streams,
        "client_processes": len(workers),
        "chunks_per_stream": expected,
        "errors": errors,
        "error_samples": samples[:3],
        "lateness_ms_median": median(lateness),
        "lateness_ms_p99": p99(lateness),
        "chunks_received": len(lateness),
        "idle_rss_mb": idle_rss / 2**20,
        "peak_rss_mb": peak / 2**20,
        "service_cpu_share": cpu / elapsed,
        "cpu_us_per_chunk": cpu / max(len(lateness), 1) * 1e6,
    }


def median_level(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Several runs of one concurrency level as one: the median of each run's numbers, every
    run's errors (the goal allows none), and each run's p99 and errors as they were."""
    level = dict(runs[0])
    for key in (
        "lateness_ms_median",
        "lateness_ms_p99",
        "idle_rss_mb",
        "peak_rss_mb",
        "service_cpu_share",
        "cpu_us_per_chunk",
    ):
        level[key] = median([run[key] for run in runs])
    level["errors"] = sum(run["errors"] for run in runs)
    level["error_samples"] = [s for run in runs for s in run["error_samples"]][:3]
    level["chunks_received"] = sum(run["chunks_received"] for run in runs)
    level["runs"] = [
        {"lateness_ms_p99": run["lateness_ms_p99"], "errors": run["errors"]} for run in runs
    ]
    return level


def median_sends(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Several runs of the sends measurement as one: the median of each number, every run's
    errors, and each run's rate and CPU per send as they were."""
    merged = dict(runs[0])
    for key in ("sends_per_s", "cpu_ms_per_send", "latency_ms_median", "latency_ms_p99"):
        merged[key] = median([run[key] for run in runs])
    merged["sends"] = sum(run["sends"] for run in runs)
    merged["errors"] = sum(run["errors"] for run in runs)
    merged["runs"] = [
        {key: run[key] for key in ("sends_per_s", "cpu_ms_per_send", "errors")} for run in runs
    ]
    return merged


def paired_ratio(runs: list[dict[str, Any]], baseline: list[dict[str, Any]]) -> float:
    """The median, over pairs measured one right after the other, of this variant's sends/s
    over the baseline's: the machine's speed drifts by minutes, a pair shares its minute."""
    return median(
        [run["sends_per_s"] / base["sends_per_s"] for run, base in zip(runs, baseline, strict=True)]
    )
