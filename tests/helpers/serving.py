"""The serve entry point as a process: free ports, its environment, waiting until it is healthy."""

from __future__ import annotations

import os
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve_env(instance: Path, **settings: str) -> dict[str, str]:
    """The environment of ``python serve.py``: nothing inherited from AUTH_EMAIL_* variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTH_EMAIL_")}
    env.update({"AUTH_EMAIL_INSTANCE": str(instance), "PYTHONUNBUFFERED": "1"})
    env.update({f"AUTH_EMAIL_{name}": value for name, value in settings.items()})
    return env


def start(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:  # a file, not a pipe: nothing can block on a full pipe
        return subprocess.Popen(
            [sys.executable, "serve.py"],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def wait_healthy(base: str, process: subprocess.Popen[bytes], log: Path) -> requests.Response:
    # Generous: a loaded 2-core machine may take long to start the process and to answer.
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"serve.py exited with {process.returncode}:\n{log.read_text()}")
        try:
            answer = requests.get(base + "/healthz", timeout=15)
            if answer.status_code == 200:
                return answer
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise AssertionError(f"serve.py did not become healthy:\n{log.read_text()}")


def start_limited(
    env: dict[str, str], log: Path, open_files: tuple[int, int]
) -> subprocess.Popen[bytes]:
    """``python serve.py`` with the open-file limit (soft, hard) of a default systemd service."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, open_files)

    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "serve.py"],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=limit,
        )
