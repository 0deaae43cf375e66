"""The processes a benchmark runs: the fake OpenAI server (its CLI) and the service (a real
uvicorn process on its own temporary SQLite file), and what /proc says about them."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

import httpx2

ROOT = Path(__file__).resolve().parent.parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def free_port() -> int:
    """A port that was free a moment ago on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process has used so far (threads included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def rss_bytes(pid: int) -> int:
    """The process's resident set size."""
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_SIZE


class Fake:
    """`python tests/fake_openai.py` in its own process (its own GIL, not the client's)."""

    def __init__(self, chunks: int, delay: float = 0.0, stamp: bool = False) -> None:
        self.args = ["--port", "0", "--chunks", str(chunks), "--chunk-text", "tok "]
        self.args += ["--delay", str(delay)] + (["--stamp"] if stamp else [])
        self.process: subprocess.Popen[str] | None = None
        self.base_url = ""

    def __enter__(self) -> Fake:
        self.process = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "fake_openai.py"), *self.args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        self.base_url = self.process.stdout.readline().strip()
        if not self.base_url.startswith("http"):
            self.process.kill()
            raise RuntimeError("the fake OpenAI server did not start")
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        stop(self.process)


def stop(process: subprocess.Popen[str] | subprocess.Popen[bytes] | None) -> None:
    """SIGTERM, then SIGKILL if it lingers."""
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class Service:
    """The service as `uvicorn main:app` from `source` (this tree, or an older commit's)."""

    def __init__(
        self,
        base_url: str,
        *,
        source: Path = ROOT,
        loop: str = "auto",
        http: str = "auto",
        env: dict[str, str] | None = None,
    ) -> None:
        self.source = source
        self.fake_url = base_url
        self.loop = loop
        self.http = http
        self.extra_env = env or {}
        self.dir = Path(tempfile.mkdtemp(prefix="bench-"))
        self.db_path = self.dir / "chat.db"
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        """The uvicorn process id."""
        assert self.process is not None
        return self.process.pid

    def env(self) -> dict[str, str]:
        """The service's environment: the fake, no retries, quiet logs, tools offered as by
        default, titles off (a title is one more model call for each new chat, and the
        streams' levels open a new chat for every stream)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "DATABASE_"))}
        return env | {
            "OPENAI_BASE_URL": self.fake_url,
            "OPENAI_API_KEY": "sk-bench-not-a-real-key-0123456789",
            "OPENAI_MAX_RETRIES": "0",
            "OPENAI_TIMEOUT": "60",
            "TOOLS_ENABLED": "true",  # as by default: the tools' schemas go with every request
            "GENERATE_TITLES": "false",
            "MAX_ACTIVE_REPLIES": "100000",
            "LOG_LEVEL": "WARNING",
            "DATABASE_URL": f"sqlite:///{self.db_path}",
            **self.extra_env,
        }

    def __enter__(self) -> Service:
        self.port = free_port()
        log = (self.dir / "service.log").open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "main:app", "--host", "127.0.0.1"]
            + ["--port", str(self.port), "--no-access-log", "--log-level", "warning"]
            + ["--loop", self.loop, "--http", self.http, "--backlog", "4096"],
            cwd=self.source,
            env=self.env(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the service exited at start-up:\n{self.log()}")
            try:
                if (
                    httpx2.get(f"http://127.0.0.1:{self.port}/healthz", timeout=1).status_code
                    == 200
                ):
                    return self
            except httpx2.TransportError:
                pass
            time.sleep(0.05)
        stop(self.process)
        raise RuntimeError(f"the service did not start:\n{self.log()}")

    def log(self) -> str:
        """What the service printed (warnings and errors only)."""
        path = self.dir / "service.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        stop(self.process)
        shutil.rmtree(self.dir, ignore_errors=True)


def export_commit(ref: str) -> Path:
    """The service's files at an older commit, in a temporary directory (for before/after)."""
    target = Path(tempfile.mkdtemp(prefix="bench-src-"))
    archive = subprocess.run(
        ["git", "archive", "--format=tar", ref], cwd=ROOT, check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return target
