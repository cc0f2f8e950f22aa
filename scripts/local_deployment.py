"""Rehearse a real NMoE-Flower deployment on one machine, with one command.

Starts a SuperLink (deployment runtime, not simulation) and N SuperNodes on
loopback, each on its own free port with its own state directory, writes a
`$FLWR_HOME/config.toml` connection for them, runs `flwr run .`, waits for
the run to finish and stops every process it started, by PID.

    python scripts/local_deployment.py --nodes 3 --overrides "experiment=smoke state_key=fleet1"
    python scripts/local_deployment.py --nodes 3 --tls --auth
    python scripts/local_deployment.py --nodes 3 --executor stock   # flwr's own executor

Executors (`--executor`): `warm` (default) starts every SuperNode with
`--isolation process` next to one warm executor (`python -m client_app.warm_executor
--runtime-api-address 127.0.0.1:<node port> --insecure`, log `logs/node-<i>.executor.log`):
it imports flwr, torch and the app once and forks a child per message that runs flwr's
own ClientApp runner, so a message costs no process start (a wave of messages takes 0.30x
the stock time on the 2-core machine: bench/results/waves.json). `stock` starts the
SuperNodes with `--isolation subprocess`: the SuperNode's own SuperExec starts a fresh
`flwr-clientapp` process per message. A SuperNode and its executor are started, stopped
and killed together, by PID.

`--tls` uses certificates from scripts/generate_certs.sh; `--auth` enables
SuperNode authentication: one ECDSA P-384 key pair per node, each public key
registered with `flwr supernode register` before that node starts.

This module is also the process harness of the tests: `Deployment` (SuperLink + SuperNodes
+ executors, with `start_node`, `stop_node`, `kill_node`) and `SimulationFederation` (a
simulation-runtime SuperLink for `flwr run` tests) share the process helpers below; every
process gets `FLWR_TELEMETRY_ENABLED=0`. Standard library only; run it with the Python of
the environment that has flwr.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
CERT_SCRIPT = REPO / "scripts" / "generate_certs.sh"
CONNECTION = "local-deployment"
LOOPBACK = "127.0.0.1"
TERMINAL_STATUS = "finished"
COMPLETED_STATUS = "finished:completed"
ONLINE = "online"
STARTUP_TIMEOUT_S = 60.0
NODES_TIMEOUT_S = 60.0
EXECUTOR_READY_TIMEOUT_S = 180.0  # imports of flwr, torch and the app on a loaded machine
RUN_TIMEOUT_S = 1800.0
CLI_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 15.0
POLL_S = 1.0
KEY_TYPE = ("-t", "ecdsa", "-b", "384")  # flwr accepts EC keys on NIST curves (P-384 recommended)
WARM, STOCK = "warm", "stock"
EXECUTORS = (WARM, STOCK)
WARM_EXECUTOR_MODULE = "client_app.warm_executor"
EXECUTOR_READY_MARK = "preloaded in"  # the warm executor's log line once it serves


def free_port() -> int:
    """A TCP port nothing listens on right now (loopback)."""
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, process: subprocess.Popen, timeout: float = STARTUP_TIMEOUT_S) -> None:
    """Wait until `port` accepts connections; fail early if `process` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"process {process.pid} exited with code {process.returncode} "
                f"before listening on {port}"
            )
        with socket.socket() as sock:
            if sock.connect_ex((LOOPBACK, port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on {LOOPBACK}:{port} after {timeout}s")


def descendants(pid: int) -> list[int]:
    """PIDs of every live descendant of `pid` (Linux /proc; empty elsewhere)."""
    found: list[int] = []
    stack = [pid]
    while stack:
        parent = stack.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            found.extend(children)
            stack.extend(children)
    return found


def _signal_pid(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _is_gone(pid: int) -> bool:
    """No such process, or only a zombie waiting for its parent."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def _wait_gone(pids: list[int], timeout: float) -> list[int]:
    """Wait until every PID is gone; returns the ones still alive at the timeout."""
    deadline = time.monotonic() + timeout
    alive = [p for p in pids if not _is_gone(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [p for p in alive if not _is_gone(p)]
    return alive


def stop_process(process: subprocess.Popen) -> None:
    """Stop a process this launcher started: SIGTERM to its process group (its own PID),
    then to any descendant that left the group (Flower detaches some helpers); SIGKILL on
    timeout."""
    if process.poll() is not None:
        return
    children = descendants(process.pid)
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(timeout=STOP_TIMEOUT_S)
    leftover = _wait_gone(children, STOP_TIMEOUT_S)
    for pid in leftover:
        _signal_pid(pid, signal.SIGTERM)
    for pid in _wait_gone(leftover, STOP_TIMEOUT_S):
        _signal_pid(pid, signal.SIGKILL)


def kill_process(process: subprocess.Popen) -> None:
    """Crash a process this launcher started: SIGKILL to its process group and every descendant
    by PID, no chance to say goodbye (unlike `stop_process`)."""
    children = descendants(process.pid)
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for pid in children:
        _signal_pid(pid, signal.SIGKILL)
    process.wait(timeout=STOP_TIMEOUT_S)
    _wait_gone(children, STOP_TIMEOUT_S)


def _json_payload(text: str) -> dict:
    """The JSON object in a `flwr ... --format json` output (the CLI may print a banner first)."""
    start = text.find("{")
    if start < 0:
        raise ValueError(f"no JSON in flwr output: {text!r}")
    return json.loads(text[start:])


def _json_payload(text: str) -> dict:
    """The JSON object in a `flwr ... --format json` output (the CLI may print a banner first)."""
    start = text.find("{")
    if start < 0:
        raise ValueError(f"no JSON in flwr output: {text!r}")
    return json.loads(text[start:])


def flower_env(home: Path) -> dict[str, str]:
    """Environment of every process the harness starts: its FLWR_HOME, no runtime dependency
    installation, no telemetry, and this Python's bin folder first on PATH."""
    env = dict(os.environ)
    env.update(
        {
            "FLWR_HOME": str(home),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "FLWR_TELEMETRY_ENABLED": "0",
            "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        }
    )
    return env


def spawn(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """Start `command` in its own session (process group = its PID), output appended to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as handle:
        return subprocess.Popen(
            command,
            env=env,
            cwd=REPO,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


class Federation:
    """A SuperLink on a free loopback port and the `flwr` CLI pointed at it.

    Subclasses say how the SuperLink runs (`superlink_command`) and what the connection
    holds; both share submitting, waiting, logs and stopping by PID.
    """

    connection = CONNECTION

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir.expanduser().resolve()
        self.home = self.workdir / "flwr_home"
        self.logs_dir = self.workdir / "logs"
        self.port = free_port()
        self.superlink: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def env(self, home: Path) -> dict[str, str]:
        return flower_env(home)

    def flwr(self, *args: str, timeout: float = CLI_TIMEOUT_S) -> subprocess.CompletedProcess:
        """Run the `flwr` CLI against this federation (cwd = repo root, the harness's FLWR_HOME)."""
        return subprocess.run(
            [str(BIN / "flwr"), *args],
            env=self.env(self.home),
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def _spawn(self, command: list[str], home: Path, log: Path) -> subprocess.Popen:
        return spawn(command, self.env(home), log)

    def _connection_lines(self) -> list[str]:
        return ["insecure = true"]

    def _write_connection(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        body = "\n".join([f'address = "{self.address}"', *self._connection_lines()])
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{self.connection}"\n\n[superlink.{self.connection}]\n{body}\n'
        )

    def superlink_base(self) -> list[str]:
        """The SuperLink's arguments every federation shares: loopback, its port, a fresh
        database, ServerApps in subprocesses, nothing installed at run time."""
        return [
            str(BIN / "flower-superlink"),
            "--isolation",
            "subprocess",
            "--host",
            LOOPBACK,
            "--port",
            str(self.port),
            "--database",
            str(self.workdir / "state.db"),
            "--disable-runtime-dependency-installation",
        ]

    def superlink_command(self) -> list[str]:
        raise NotImplementedError

    def start_superlink(self) -> None:
        """A fresh SuperLink database, the connection file, then the SuperLink itself."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        for stale in self.workdir.glob("state.db*"):
            stale.unlink()
        self._write_connection()
        self.superlink = self._spawn(
            self.superlink_command(), self.home, self.logs_dir / "superlink.log"
        )
        wait_for_port(self.port, self.superlink)

    def __enter__(self) -> Federation:
        """`with X(...) as f:` starts everything and stops it by PID on the way out, also
        when the start itself fails half-way."""
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> Federation:
        self.start_superlink()
        return self

    # --- runs ------------------------------------------------------------------------------
    def submit(self, overrides: str) -> str:
        """`flwr run . <conn> --run-config overrides='...'`; returns the run id."""
        out = self.flwr(
            "run",
            ".",
            self.connection,
            "--run-config",
            f"overrides='{overrides}'",
            "--format",
            "json",
        )
        payload = _json_payload(out.stdout)
        if not payload.get("success"):
            raise RuntimeError(f"flwr run failed: {out.stdout} {out.stderr}")
        return str(payload["run-id"])

    def status(self, run_id: str) -> str:
        """The run's status in `flwr ls --format json` ("" while it is not listed)."""
        out = self.flwr("ls", self.connection, "--format", "json")
        runs = _json_payload(out.stdout).get("runs", [])
        return next((str(r["status"]) for r in runs if str(r["run-id"]) == run_id), "")

    def wait(self, run_id: str, timeout: float = RUN_TIMEOUT_S) -> str:
        """Poll `flwr ls --format json` until the run's status starts with `finished`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.status(run_id)
            if status.startswith(TERMINAL_STATUS):
                return status
            time.sleep(POLL_S)
        raise TimeoutError(f"run {run_id} did not finish in {timeout}s")

    def run(self, overrides: str, timeout: float = RUN_TIMEOUT_S) -> tuple[str, str]:
        """Submit a run and wait for it; returns (final status, run id)."""
        run_id = self.submit(overrides)
        return self.wait(run_id, timeout), run_id

    def logs(self, run_id: str) -> str:
        """The run's log as the SuperLink kept it (`flwr log <id> --show`)."""
        return self.flwr("log", run_id, self.connection, "--show").stdout

    def pids(self) -> dict[str, int]:
        """PIDs of the processes still running, by name."""
        named = {"superlink": self.superlink}
        return {name: p.pid for name, p in named.items() if p is not None and p.poll() is None}

    def stop(self) -> None:
        """Stop the SuperLink by PID."""
        if self.superlink is not None:
            stop_process(self.superlink)


class SimulationFederation(Federation):
    """A SuperLink with the simulation runtime: `flwr run` simulates `num_supernodes` nodes."""

    def __init__(self, workdir: Path, num_supernodes: int) -> None:
        super().__init__(workdir)
        self.num_supernodes = num_supernodes

    def _connection_lines(self) -> list[str]:
        return ["insecure = true", f"options.num-supernodes = {self.num_supernodes}"]

    def superlink_command(self) -> list[str]:
        return [*self.superlink_base(), "--insecure", "--simulation"]

    def start(self) -> SimulationFederation:
        self.start_superlink()
        return self


@dataclass
class SuperNode:
    """One SuperNode: its partition, Runtime API port, state folder, key, process and (with
    the warm executor) the executor process that runs its ClientApp tasks."""

    index: int
    port: int
    state_dir: Path
    home: Path
    log: Path
    private_key: Path | None = None
    process: subprocess.Popen | None = None
    executor: subprocess.Popen | None = None

    @property
    def executor_log(self) -> Path:
        return self.log.with_suffix(".executor.log")

    @property
    def runtime_api_address(self) -> str:
        return f"{LOOPBACK}:{self.port}"


class Deployment(Federation):
    """A SuperLink and N SuperNodes on loopback (deployment runtime), each a real process
    stopped by PID; with `executor="warm"` every SuperNode runs in `--isolation process`
    next to its own warm executor."""

    def __init__(
        self,
        workdir: Path,
        num_nodes: int,
        tls: bool = False,
        auth: bool = False,
        certs_dir: Path | None = None,
        executor: str = WARM,
        executor_args: tuple[str, ...] = (),
        data_dirs: Path | None = None,
    ) -> None:
        if num_nodes < 1:
            raise ValueError(f"--nodes must be >= 1, got {num_nodes}")
        if auth and not tls:
            raise ValueError("SuperNode authentication needs TLS: pass --tls with --auth")
        if executor not in EXECUTORS:
            raise ValueError(f"executor must be one of {EXECUTORS}, got {executor!r}")
        super().__init__(workdir)
        self.num_nodes = num_nodes
        self.tls = tls
        self.auth = auth
        self.executor = executor
        self.executor_args = tuple(executor_args)
        self.data_dirs = data_dirs.expanduser().resolve() if data_dirs else None
        if self.data_dirs is not None:
            missing = [i for i in range(num_nodes) if not (self.data_dirs / f"device-{i}").is_dir()]
            if missing:
                raise ValueError(
                    f"--data-dirs {self.data_dirs}: no device-<i> folder for nodes {missing} "
                    "(write them with scripts/export_device_data.py)"
                )
        self.certs_dir = (certs_dir or self.workdir / "certificates").expanduser().resolve()
        self.keys_dir = self.workdir / "keys"
        self.nodes: dict[int, SuperNode] = {}
        self._extra: list[SuperNode] = []

    # --- environment ---------------------------------------------------------------
    @property
    def ca_cert(self) -> Path:
        return self.certs_dir / "ca.crt"

    @property
    def warm(self) -> bool:
        return self.executor == WARM

    # --- setup -----------------------------------------------------------------------
    def _certificates(self) -> None:
        out = subprocess.run(
            ["bash", str(CERT_SCRIPT), str(self.certs_dir)], capture_output=True, text=True
        )
        if out.returncode != 0:
            raise RuntimeError(f"{CERT_SCRIPT.name} failed: {out.stdout} {out.stderr}")

    def _connection_lines(self) -> list[str]:
        return [f'root-certificates = "{self.ca_cert}"' if self.tls else "insecure = true"]

    def make_key(self, name: str) -> Path:
        """An ECDSA P-384 key pair `keys/<name>` + `keys/<name>.pub` (kept if present)."""
        private = self.keys_dir / name
        if not private.is_file():
            self.keys_dir.mkdir(parents=True, exist_ok=True)
            subprocess.run(
                ["ssh-keygen", *KEY_TYPE, "-N", "", "-q", "-C", name, "-f", str(private)],
                check=True,
                capture_output=True,
            )
        return private

    def register(self, private_key: Path) -> str:
        """`flwr supernode register <key>.pub`; returns the node id the SuperLink assigned."""
        out = self.flwr(
            "supernode", "register", f"{private_key}.pub", self.connection, "--format", "json"
        )
        payload = _json_payload(out.stdout)
        if not payload.get("success"):
            raise RuntimeError(f"registering {private_key}.pub failed: {out.stdout} {out.stderr}")
        return str(payload["node-id"])

    def superlink_command(self) -> list[str]:
        command = self.superlink_base()
        if self.tls:
            command += [
                "--ssl-ca-certfile",
                str(self.ca_cert),
                "--ssl-certfile",
                str(self.certs_dir / "server.pem"),
                "--ssl-keyfile",
                str(self.certs_dir / "server.key"),
            ]
        else:
            command.append("--insecure")
        if self.auth:
            command.append("--enable-supernode-auth")
        return command

    def start(self) -> Deployment:
        """Start a fresh SuperLink, then every SuperNode (registering its key first with --auth)
        and its executor; returns once all nodes are online and their executors serve."""
        if self.tls:
            self.workdir.mkdir(parents=True, exist_ok=True)
            self._certificates()
        self.start_superlink()
        for index in range(self.num_nodes):
            if self.auth:
                self.register(self.make_key(f"node-{index}"))
            self.start_node(index)
        self.wait_for_nodes(self.num_nodes)
        return self

    # --- SuperNodes ----------------------------------------------------------------------
    def _node_command(self, node: SuperNode, num_partitions: int) -> list[str]:
        node_config = (
            f"partition-id={node.index} num-partitions={num_partitions} "
            f"state-dir='{node.state_dir}'"
        )
        if self.data_dirs is not None:  # the device reads only its own folder
            node_config += f" data-dir='{self.data_dirs / f'device-{node.index}'}'"
        command = [
            str(BIN / "flower-supernode"),
            "--superlink",
            self.address,
            "--port",
            str(node.port),
            "--isolation",
            "process" if self.warm else "subprocess",
            "--node-config",
            node_config,
        ]
        command += ["--root-certificates", str(self.ca_cert)] if self.tls else ["--insecure"]
        if node.private_key is not None:
            command += ["--auth-supernode-private-key", str(node.private_key)]
        return command

    def executor_command(self, node: SuperNode) -> list[str]:
        """The warm executor of `node`: its Runtime API is plain HTTP on loopback."""
        return [
            sys.executable,
            "-m",
            WARM_EXECUTOR_MODULE,
            "--runtime-api-address",
            node.runtime_api_address,
            "--insecure",
            *self.executor_args,
        ]

    def _launch(self, node: SuperNode) -> SuperNode:
        node.state_dir.mkdir(parents=True, exist_ok=True)
        node.process = self._spawn(self._node_command(node, self.num_nodes), node.home, node.log)
        if self.warm:
            node.executor = self._spawn(self.executor_command(node), node.home, node.executor_log)
        return node

    def start_node(self, index: int, private_key: Path | None = None) -> SuperNode:
        """Start (or restart) SuperNode `index` with its state dir `<workdir>/node-<index>`,
        and its warm executor. Returns at once; `wait_for_nodes` waits until it serves.

        With --auth the node uses `keys/node-<index>` unless `private_key` is given.
        """
        old = self.nodes.get(index)
        if old is not None and old.process is not None and old.process.poll() is None:
            raise RuntimeError(f"SuperNode {index} is already running (PID {old.process.pid})")
        if private_key is None and self.auth:
            private_key = self.keys_dir / f"node-{index}"
        node = SuperNode(
            index,
            free_port(),
            self.workdir / f"node-{index}",
            self.workdir / "homes" / f"node-{index}",
            self.logs_dir / f"node-{index}.log",
            private_key,
        )
        self.nodes[index] = self._launch(node)
        return node

    def start_extra_node(self, name: str, partition_id: int, private_key: Path | None) -> SuperNode:
        """Start a SuperNode outside the federation's N (e.g. with an unregistered key)."""
        node = SuperNode(
            partition_id,
            free_port(),
            self.workdir / name,
            self.workdir / "homes" / name,
            self.logs_dir / f"{name}.log",
            private_key,
        )
        self._extra.append(self._launch(node))
        return node

    def stop_node(self, index: int) -> SuperNode:
        """Stop SuperNode `index` and its executor by PID and forget it (its state dir stays);
        returns it."""
        node = self.nodes.pop(index)
        _stop_node_processes(node)
        return node

    def kill_node(self, index: int) -> SuperNode:
        """Crash SuperNode `index`: SIGKILL by PID to it, its executor and the ClientApp either
        may be running; forget it; returns it."""
        node = self.nodes.pop(index)
        for process in (node.executor, node.process):
            if process is not None:
                kill_process(process)
        return node

    def list_nodes(self) -> list[dict]:
        """`flwr supernode list --format json`: the SuperLink's view of the nodes."""
        out = self.flwr("supernode", "list", self.connection, "--format", "json")
        return list(_json_payload(out.stdout).get("nodes", []))

    def online_nodes(self) -> list[dict]:
        """The nodes the SuperLink lists as online."""
        return [n for n in self.list_nodes() if n["status"] == ONLINE]

    def executor_ready(self, node: SuperNode) -> bool:
        """Whether `node`'s warm executor finished its imports and polls for tasks."""
        if node.executor is None:
            return True
        if node.executor.poll() is not None:
            raise RuntimeError(
                f"warm executor of SuperNode {node.index} exited with code "
                f"{node.executor.returncode}; see {node.executor_log}"
            )
        try:
            return EXECUTOR_READY_MARK in node.executor_log.read_text(errors="replace")
        except FileNotFoundError:
            return False

    def wait_for_nodes(
        self, count: int, timeout: float = NODES_TIMEOUT_S + EXECUTOR_READY_TIMEOUT_S
    ) -> list[dict]:
        """Wait until exactly `count` nodes are online and every executor serves; fails if one
        of our SuperNodes or executors exits."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for node in self.nodes.values():
                if node.process is not None and node.process.poll() is not None:
                    raise RuntimeError(
                        f"SuperNode {node.index} exited with code {node.process.returncode}; "
                        f"see {node.log}"
                    )
            online = self.online_nodes()
            if len(online) == count and all(self.executor_ready(n) for n in self.nodes.values()):
                return online
            time.sleep(POLL_S)
        raise TimeoutError(
            f"not {count} SuperNodes online with their executors after {timeout}s; "
            f"see {self.logs_dir}"
        )

    def pids(self) -> dict[str, int]:
        """PIDs of the processes still running, by name."""
        named: dict[str, subprocess.Popen | None] = {"superlink": self.superlink}
        for node in [*self.nodes.values(), *self._extra]:
            named[node.log.stem] = node.process
            named[f"{node.log.stem}.executor"] = node.executor
        return {name: p.pid for name, p in named.items() if p is not None and p.poll() is None}

    def stop(self) -> None:
        """Stop every executor and SuperNode, then the SuperLink, by PID."""
        for node in [*self._extra, *self.nodes.values()]:
            _stop_node_processes(node)
        super().stop()


def _stop_node_processes(node: SuperNode) -> None:
    """The executor first (it lets a running task finish within its grace), then the node."""
    for process in (node.executor, node.process):
        if process is not None:
            stop_process(process)


def with_output_dir(overrides: str, default: Path) -> tuple[str, Path]:
    """Add `output_dir=<default>` unless the overrides name one; returns (overrides,
    results.json)."""
    for token in overrides.split():
        if token.startswith("output_dir="):
            out = Path(token.split("=", 1)[1]).expanduser()
            return overrides, (out if out.is_absolute() else REPO / out) / "results.json"
    return f"{overrides} output_dir={default}".strip(), default / "results.json"


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=(
            "Executors: 'warm' (default) runs each SuperNode with --isolation process next to "
            f"`python -m {WARM_EXECUTOR_MODULE}`, which imports flwr, torch and the app once and "
            "forks a child per message (log: <workdir>/logs/node-<i>.executor.log); 'stock' "
            "runs them with --isolation subprocess (a fresh flwr-clientapp process per message)."
        ),
    )
    parser.add_argument("--nodes", type=int, default=3, help="number of SuperNodes (= partitions)")
    parser.add_argument(
        "--workdir",
        type=Path,
        default=REPO / "outputs" / "deployment",
        help="folder for logs, FLWR_HOME, keys, certificates and node state",
    )
    parser.add_argument(
        "--overrides", default="experiment=smoke", help="Hydra overrides for the run"
    )
    parser.add_argument(
        "--tls", action="store_true", help="TLS with certificates from generate_certs.sh"
    )
    parser.add_argument(
        "--auth", action="store_true", help="SuperNode authentication (needs --tls)"
    )
    parser.add_argument(
        "--certs",
        type=Path,
        default=None,
        help="certificate folder (default: <workdir>/certificates)",
    )
    parser.add_argument(
        "--executor",
        choices=EXECUTORS,
        default=WARM,
        help="who runs the ClientApp: a warm executor per node (default) or flwr's stock "
        "SuperExec (a fresh process per message)",
    )
    parser.add_argument(
        "--data-dirs",
        type=Path,
        default=None,
        help="node i reads only DIR/device-<i> (node config data-dir; "
        "scripts/export_device_data.py writes them)",
    )
    parser.add_argument(
        "--timeout", type=float, default=RUN_TIMEOUT_S, help="seconds to wait for the run"
    )
    parser.add_argument(
        "--keep-running",
        action="store_true",
        help="leave the SuperLink, SuperNodes and executors up after the run and print their PIDs",
    )
    args = parser.parse_args(argv)

    try:
        deployment = Deployment(
            args.workdir,
            args.nodes,
            tls=args.tls,
            auth=args.auth,
            certs_dir=args.certs,
            executor=args.executor,
            data_dirs=args.data_dirs,
        )
    except ValueError as err:
        parser.error(str(err))
    signal.signal(signal.SIGTERM, _raise_interrupt)
    overrides, results = with_output_dir(
        args.overrides, deployment.workdir / "outputs" / time.strftime("%Y%m%d-%H%M%S")
    )
    keep = False
    try:
        started = time.monotonic()
        deployment.start()
        print(
            f"SuperLink {deployment.address} ({'TLS' if args.tls else 'insecure'}"
            f"{', node auth' if args.auth else ''}), {args.nodes} SuperNodes online "
            f"({args.executor} executor) in {time.monotonic() - started:.1f}s; "
            f"logs in {deployment.logs_dir}",
            flush=True,
        )
        started = time.monotonic()
        status, run_id = deployment.run(overrides, args.timeout)
        print(f"run {run_id}: {status} in {time.monotonic() - started:.1f}s")
        print(f"results: {results}")
        if args.keep_running:
            keep = True
            print(
                f"FLWR_HOME={deployment.home} (connection '{CONNECTION}'); still running, "
                "stop each with kill -TERM -<PID> (an executor before its node):"
            )
            for name, pid in deployment.pids().items():
                print(f"  {name}: {pid}")
        return 0 if status == COMPLETED_STATUS else 1
    except KeyboardInterrupt:
        print("interrupted; stopping", file=sys.stderr)
        return 130
    finally:
        if not keep:
            deployment.stop()


if __name__ == "__main__":
    sys.exit(main())
