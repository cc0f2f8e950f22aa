"""Start Flower processes for tests: loopback only, free ports, stopped by PID."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parent.parent
TERMINAL_STATUS = "finished"
STARTUP_TIMEOUT_S = 30
POLL_S = 2


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout: float = STARTUP_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def stop(process: subprocess.Popen) -> None:
    """Stop a process we started, and its process group (its own PID), by PID."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=15)


@dataclass
class LocalFederation:
    """A SuperLink in simulation mode on a free loopback port, with its own FLWR_HOME."""

    home: Path
    num_supernodes: int
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "FLWR_HOME": str(self.home),
                "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
            }
        )
        return env

    def start(self) -> LocalFederation:
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "config.toml").write_text(
            '[superlink]\ndefault = "test"\n\n[superlink.test]\n'
            f'address = "127.0.0.1:{self.port}"\ninsecure = true\n'
            f"options.num-supernodes = {self.num_supernodes}\n"
        )
        log = (self.home / "superlink.log").open("w")
        self.process = subprocess.Popen(
            [
                str(BIN / "flower-superlink"),
                "--insecure",
                "--simulation",
                "--isolation",
                "subprocess",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--database",
                str(self.home / "state.db"),
                "--disable-runtime-dependency-installation",
            ],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_for_port(self.port)
        return self

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process)

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(BIN / "flwr"), *args],
            env=self.env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def run_app(self, overrides: str) -> str:
        """`flwr run . test --run-config overrides=...`; returns the run id."""
        out = self.flwr(
            "run", ".", "test", "--run-config", f"overrides='{overrides}'", "--format", "json"
        )
        payload = json.loads(out.stdout[out.stdout.index("{") :])
        if not payload.get("success"):
            raise RuntimeError(f"flwr run failed: {out.stdout} {out.stderr}")
        return str(payload["run-id"])

    def wait(self, run_id: str, timeout: float) -> str:
        """Poll `flwr ls --format json` until the run finishes; returns its status."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = self.flwr("ls", "test", "--format", "json")
            runs = json.loads(out.stdout[out.stdout.index("{") :]).get("runs", [])
            status = next((r["status"] for r in runs if str(r["run-id"]) == run_id), "")
            if status.startswith(TERMINAL_STATUS):
                return status
            time.sleep(POLL_S)
        raise TimeoutError(f"run {run_id} did not finish in {timeout}s")

    def logs(self, run_id: str) -> str:
        return self.flwr("log", run_id, "test", "--show", timeout=60).stdout
