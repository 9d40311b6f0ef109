"""Start real `edit_serve serve` processes on loopback for tests (and benchmarks)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

TOKEN = "test-admin-token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, url: str, proc: subprocess.Popen, log: Path, store: Path):
        self.url, self.proc, self.log, self.store = url, proc, log, store

    def admin(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"authorization": f"Bearer {TOKEN}"}, timeout=120, **kw)

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=120, **kw)

    def openai(self):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=120)

    def complete(self, prompt: str, max_tokens: int = 8) -> tuple[str, str]:
        """Greedy completion text and the patch-set version header."""
        r = httpx.post(self.url + "/v1/completions", timeout=120, json={
            "model": "smollm2-135m", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
        r.raise_for_status()
        return r.json()["choices"][0]["text"], r.headers["x-edit-serve-patchset"]

    def output(self) -> str:
        return self.log.read_text() if self.log.exists() else ""


@contextmanager
def run_server(store: Path, *args: str, token: str | None = TOKEN, timeout: float = 180.0, env: dict | None = None):
    """`edit_serve serve` in a subprocess; yields a Server once /health answers."""
    port = free_port()
    store = Path(store)
    store.mkdir(parents=True, exist_ok=True)
    log = store.parent / f"server-{port}.log"
    environ = {**os.environ, **(env or {}), "HF_HUB_OFFLINE": "1"}
    environ.pop("EDIT_SERVE_ADMIN_TOKEN", None)
    if token:
        environ["EDIT_SERVE_ADMIN_TOKEN"] = token
    cmd = [sys.executable, "-m", "edit_serve", "serve", "--port", str(port), "--patch-store", str(store), *args]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=environ, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    server = Server(url, proc, log, store)
    try:
        wait_ready(proc, url + "/health", "server", timeout, server.output)
        yield server
    finally:
        stop(proc)


def wait_ready(proc: subprocess.Popen, url: str, what: str, timeout: float, output) -> None:
    """Poll `url` until it answers 200; fail with the tail of `output()` if the process exits
    or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{output()[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start in {timeout} s:\n{output()[-3000:]}")
        time.sleep(0.3)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
