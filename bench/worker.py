"""One client process of the concurrent-streams measurement: `python -m bench.worker ARGS`
opens its share of the streams, staggered, and prints one JSON line of what it saw.

The fake runs with `--stamp`: every chunk's text is the time the fake sent it, so each piece
of text that reaches us says how late it is (same machine, same clock)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

from bench.client import Connection, create_chat


async def one_stream(
    port: int, chat_id: str, start_at: float, expected: int, lateness: list[float]
) -> str | None:
    """Send one message and read its stream; None if it went well, else what went wrong."""
    await asyncio.sleep(max(0.0, start_at - time.monotonic()))
    conn = Connection("127.0.0.1", port)
    try:
        response = await conn.request("POST", f"/chats/{chat_id}/messages", {"content": "go"})
        if response.status != 200:
            return f"status {response.status}"
        seen = 0
        async for event in response.events():
            if event.name == "message.delta":
                for stamp in event.data["delta"].split():
                    lateness.append(event.wall - float(stamp))
                    seen += 1
            elif event.name == "message.done":
                status = event.data["status"]
                if status != "completed":
                    return f"reply {status}: {event.data.get('error')}"
                if seen != expected:
                    return f"{seen} of {expected} chunks"
                return None
        return "stream ended without message.done"
    except (OSError, asyncio.IncompleteReadError, ValueError) as error:
        return f"{type(error).__name__}: {error}"
    finally:
        await conn.close()


async def run(
    port: int, streams: int, ramp: float, expected: int, timeout: float
) -> dict[str, Any]:
    """Open `streams` streams spread over `ramp` seconds; what each saw."""
    setup = Connection("127.0.0.1", port)
    chats = [await create_chat(setup) for _ in range(streams)]
    await setup.close()
    print("ready", flush=True)
    sys.stdin.readline()  # the parent starts every worker at once
    begin = time.monotonic()
    lateness: list[float] = []
    tasks = [
        one_stream(port, chat, begin + ramp * i / max(1, streams), expected, lateness)
        for i, chat in enumerate(chats)
    ]
    try:
        outcomes = await asyncio.wait_for(asyncio.gather(*tasks), timeout)
    except TimeoutError:
        outcomes = ["timed out"] * streams
    errors = [o for o in outcomes if o is not None]
    return {
        "streams": streams,
        "errors": len(errors),
        "error_samples": errors[:3],
        "lateness_ms": [round(x * 1000, 2) for x in lateness],
        "seconds": time.monotonic() - begin,
    }


def main() -> None:
    """Parse the arguments, run, print the JSON line."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--streams", type=int, required=True)
    parser.add_argument("--ramp", type=float, default=2.0)
    parser.add_argument("--expected", type=int, required=True)
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--uvloop", action="store_true")
    parser.add_argument("--output", type=Path, required=True, help="where the JSON goes")
    args = parser.parse_args()
    coro = run(args.port, args.streams, args.ramp, args.expected, args.timeout)
    if args.uvloop:
        import uvloop

        result = uvloop.run(coro)
    else:
        result = asyncio.run(coro)
    # A file, not stdout: the parent reads it after the exit, and a pipe would fill first.
    args.output.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
