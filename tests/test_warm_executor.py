"""The warm executor (client_app/warm_executor.py) next to `flower-supernode --isolation process`.

Unit part (a fake Runtime API; a fake app preloaded from a fake checkout; tasks forked from the
test process): children that raise, crash or hang never stop the executor, nor do errors of
the Runtime API; a FAB installed with files that differ from the preloaded app runs cold and
plans a re-exec bound to it; a FAB installed by its first task is compared then, and the child
drops the preloaded modules when it differs; a FAB sharing no package with the preloaded app
runs warm; an app file changed on disk means cold, then restart; the flwr version pin refuses
any other release; SIGTERM kills a running task's process group and leaves no child.

Deployment part (a SuperLink and two SuperNodes with warm executors, by PID): the smoke run of
the app completes with the structure and numbers of a reference run of the same job started
beside it (default: Flower's simulation runtime; NMOE_WARM_REFERENCE=stock: SuperNodes with
flwr's stock executor, minutes more on a loaded machine); a second app, whose own `client_app`
package shadows the preloaded one and whose handler raises, gets an error reply while the
executor lives on, re-executes itself bound to that app's FAB and answers its next message
warm with that FAB's code; SIGTERM stops every executor with status 0 and no process left
behind.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from client_app import warm_executor
from client_app.warm_executor import (
    COLD,
    EXIT_VERSION,
    FLWR_VERSION,
    WARM_CHECKED,
    ExecutorConfig,
    UnsupportedFlwrVersion,
    WarmExecutor,
    check_flwr_version,
    forget_modules,
    preload,
)
from scripts.local_deployment import (
    COMPLETED_STATUS,
    STOCK,
    WARM,
    Deployment,
    _is_gone,
    descendants,
    flower_env,
    spawn,
    stop_process,
)

REPO = Path(__file__).resolve().parent.parent
FAB_HASH = "ab" * 32
FAKE_PACKAGE = "warm_probe_pkg"
TASK_TIMEOUT_S = 2.0
STOP_GRACE_S = 1.0
GONE_TIMEOUT_S = 10.0
NUM_NODES = 2
RUN_TIMEOUT_S = 600.0
SMOKE = "experiment=smoke fe.rounds=1 gate=rangate expert.epochs=1 partition=iid"
PROBE_MARKER = "probe-app-v1"
PROBE_ERROR = "probe handler failed on purpose"


# ---------------------------------------------------------------------------- fakes
@dataclass
class _Task:
    task_id: int
    run_id: int
    fab_hash: str


@dataclass
class _Response:
    task: _Task | None = None
    token: str = ""

    def HasField(self, name: str) -> bool:
        return name == "task" and self.task is not None


class FakeRuntime:
    """A SuperNode's Runtime API as the executor sees it: hands out `count` tasks (running
    `before[n]` first), then stops the executor the way SIGTERM would."""

    def __init__(
        self,
        count: int,
        before: dict[int, Callable[[], None]] | None = None,
        failures: int = 0,
    ) -> None:
        self.count = count
        self.handed = 0
        self.before = before or {}
        self.failures = failures
        self.executor: WarmExecutor | None = None
        self.closed = False

    def AcquireTask(self, request: Any) -> _Response:
        assert list(request.supported_task_types) == ["flwr-clientapp"]
        if self.failures:
            self.failures -= 1
            raise ConnectionError("Runtime API unavailable")
        if self.handed == self.count:
            assert self.executor is not None
            self.executor.request_stop()
            return _Response()
        self.handed += 1
        self.before.get(self.handed, lambda: None)()
        return _Response(_Task(self.handed, 7, FAB_HASH), f"token-{self.handed}")

    def close(self) -> None:
        self.closed = True


def fab_layout(tmp: Path, same: bool = True) -> tuple[Path, Path, Path]:
    """An app checkout and an installed FAB of it in `<tmp>/home/apps` (pyproject.toml differs
    as flwr rewrites it; app.py differs unless `same`): (checkout, FLWR_HOME, FAB folder)."""
    root, home = tmp / "src", tmp / "home"
    fab = home / "apps" / f"pub.app.1.0.0.{FAB_HASH[:8]}"
    for folder, value in ((root, 1), (fab, 1 if same else 2)):
        (folder / FAKE_PACKAGE).mkdir(parents=True)
        (folder / FAKE_PACKAGE / "__init__.py").write_text("")
        (folder / FAKE_PACKAGE / "app.py").write_text(f"VALUE = {value}\n")
        (folder / "pyproject.toml").write_text(f"# {folder.name}\n")
    return root, home, fab


def make_executor(
    tmp: Path,
    runtime: FakeRuntime,
    runner: Callable[[str], int],
    same: bool = True,
    task_timeout_s: float = TASK_TIMEOUT_S,
) -> WarmExecutor:
    """An executor that preloaded the fake app from its checkout `<tmp>/src` (as a re-executed
    executor preloads from `--app-dir`); restore sys.path and sys.modules with `isolated`."""
    root, home, _ = fab_layout(tmp, same)
    code = preload([f"{FAKE_PACKAGE}.app"], root)
    config = ExecutorConfig(
        "127.0.0.1:9",
        insecure=True,
        poll_interval_s=0.01,
        task_timeout_s=task_timeout_s,
        stop_grace_s=STOP_GRACE_S,
    )
    executor = WarmExecutor(config, client=runtime, runner=runner, code=code, flwr_home=home)
    runtime.executor = executor
    return executor


@pytest.fixture
def isolated() -> Iterator[None]:
    """Undo what `make_executor`'s preload did to sys.path and sys.modules."""
    saved = list(sys.path)
    try:
        yield
    finally:
        sys.path[:] = saved
        forget_modules({FAKE_PACKAGE})


def wait_gone(pids: list[int], timeout: float = GONE_TIMEOUT_S) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not all(_is_gone(p) for p in pids):
        time.sleep(0.05)
    return [p for p in pids if not _is_gone(p)]


# ---------------------------------------------------------------------------- unit
pytestmark = pytest.mark.usefixtures("isolated")


def test_children_that_raise_crash_or_hang_never_stop_the_executor(tmp_path: Path) -> None:
    kinds = ["ok", "raise", "crash", "exit", "hang", "ok"]
    grandchild = tmp_path / "grandchild.pid"

    def runner(token: str) -> int:
        kind = kinds[int(token.split("-")[1]) - 1]
        if kind == "raise":
            raise ValueError("handler bug")
        if kind == "crash":
            os.kill(os.getpid(), signal.SIGKILL)
        if kind == "exit":
            sys.exit(4)  # flwr_exit ends the ClientApp process this way
        if kind == "hang":
            grandchild.write_text(str(subprocess.Popen(["sleep", "60"]).pid))
            time.sleep(60)
        return 0

    runtime = FakeRuntime(len(kinds))
    executor = make_executor(tmp_path, runtime, runner)
    started = time.monotonic()
    assert executor.serve() == 0
    outcomes = executor.outcomes
    assert [o.mode for o in outcomes] == [warm_executor.WARM] * len(kinds)  # FAB == checkout
    assert [o.returncode for o in outcomes] == [0, 1, -signal.SIGKILL, 4, -signal.SIGKILL, 0]
    assert [o.timed_out for o in outcomes] == [k == "hang" for k in kinds]
    assert outcomes[-1].ok and time.monotonic() - started < 30
    assert runtime.closed and executor.restart is None
    assert not wait_gone([o.pid for o in outcomes] + [int(grandchild.read_text())])


def test_runtime_api_errors_only_pause_the_executor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(warm_executor, "ERROR_PAUSE_S", 0.01)
    executor = make_executor(tmp_path, FakeRuntime(1, failures=3), lambda token: 0)
    assert executor.serve() == 0
    assert [o.returncode for o in executor.outcomes] == [0]


def test_a_different_fab_runs_cold_then_the_executor_rebinds_to_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first task of a FAB that differs from the preloaded app never runs warm: it gets
    a fresh process (flwr-clientapp; here a stand-in) and the executor plans a re-exec."""
    cold: list[str] = []

    def spawn_cold(token: str) -> int:
        cold.append(token)
        return os.posix_spawn(sys.executable, [sys.executable, "-c", "pass"], dict(os.environ))

    executor = make_executor(tmp_path, FakeRuntime(2), lambda token: 0, same=False)
    monkeypatch.setattr(executor, "_spawn_cold", spawn_cold)
    executor.serve()
    (outcome,) = executor.outcomes
    assert outcome.mode == COLD and outcome.returncode == 0 and cold == ["token-1"]
    _, _, fab = fab_layout(tmp_path / "again", same=False)
    assert executor.restart is not None
    assert executor.restart.app_dir == tmp_path / "home" / "apps" / fab.name
    assert warm_executor._with_app_dir(["--insecure", "--app-dir", "/old"], fab) == [
        "--insecure",
        "--app-dir",
        str(fab),
    ]


def test_an_app_file_changed_on_disk_means_cold_then_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    app_file = tmp_path / "src" / FAKE_PACKAGE / "app.py"

    def edit() -> None:
        app_file.write_text("VALUE = 3\n")
        os.utime(app_file, ns=(time.time_ns(), time.time_ns() + 10**9))

    executor = make_executor(tmp_path, FakeRuntime(3, before={2: edit}), lambda token: 0)
    monkeypatch.setattr(
        executor,
        "_spawn_cold",
        lambda token: os.posix_spawn(sys.executable, [sys.executable, "-c", "pass"], {}),
    )
    executor.serve()
    assert [o.mode for o in executor.outcomes] == [warm_executor.WARM, COLD]
    assert executor.restart is not None and executor.restart.app_dir is None
    assert "changed on disk" in executor.restart.reason


@pytest.mark.parametrize("same", [True, False])
def test_a_fab_installed_by_its_first_task_is_checked_then_bound(
    tmp_path: Path, same: bool
) -> None:
    """A FAB that is not installed yet runs forked; once its first task installed it, the
    executor runs its next tasks warm (same files) or plans a re-exec bound to it."""
    fab = tmp_path / "home" / "apps" / f"pub.app.1.0.0.{FAB_HASH[:8]}"
    hidden = tmp_path / "not-yet"

    def runner(token: str) -> int:  # flwr's runner installs the FAB in the child
        if not fab.exists():
            hidden.rename(fab)
        return 0

    executor = make_executor(tmp_path, FakeRuntime(2), runner, same)
    fab.rename(hidden)
    executor.serve()
    modes = [o.mode for o in executor.outcomes]
    if same:
        assert modes == [WARM_CHECKED, warm_executor.WARM] and executor.restart is None
    else:
        assert modes == [WARM_CHECKED] and executor.restart is not None
        assert executor.restart.app_dir == fab


def test_a_child_drops_the_preloaded_app_when_its_fab_differs(tmp_path: Path) -> None:
    """`adopt` in a child whose FAB differs: the FAB's own module is imported, not the
    preloaded one; with an equal FAB the preloaded module stays."""
    executor = make_executor(tmp_path, FakeRuntime(0), lambda token: 0, same=False)
    root, fab = tmp_path / "src", tmp_path / "home" / "apps" / f"pub.app.1.0.0.{FAB_HASH[:8]}"
    assert importlib.import_module(f"{FAKE_PACKAGE}.app").VALUE == 1
    executor.adopt(root)  # the same files: nothing to drop
    assert f"{FAKE_PACKAGE}.app" in sys.modules
    executor.adopt(fab)
    assert f"{FAKE_PACKAGE}.app" not in sys.modules
    sys.path.insert(0, str(fab))  # what flwr's loader does for the task's FAB
    assert importlib.import_module(f"{FAKE_PACKAGE}.app").VALUE == 2


def test_a_fab_sharing_no_package_with_the_preloaded_app_runs_warm(tmp_path: Path) -> None:
    """Nothing preloaded can shadow such a FAB's code: flwr imports it from the FAB's folder."""
    executor = make_executor(tmp_path, FakeRuntime(0), lambda token: 0, same=False)
    other = tmp_path / "other"
    (other / "other_app").mkdir(parents=True)
    (other / "other_app" / "__init__.py").write_text("")
    assert executor.code.verify("cd" * 32, other)
    fab = tmp_path / "home" / "apps" / f"pub.app.1.0.0.{FAB_HASH[:8]}"
    assert not executor.code.verify(FAB_HASH, fab)


def test_version_pin_refuses_any_other_flwr(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    check_flwr_version(FLWR_VERSION)
    with pytest.raises(UnsupportedFlwrVersion, match=f"supports flwr {FLWR_VERSION} only"):
        check_flwr_version("1.41.1")
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    monkeypatch.setattr(warm_executor, "installed_flwr_version", lambda: "1.43.0")
    code = warm_executor.main(["--runtime-api-address", "127.0.0.1:9", "--insecure"])
    assert code == EXIT_VERSION
    err = capsys.readouterr().err
    assert f"supports flwr {FLWR_VERSION} only, found 1.43.0" in err
    assert "--isolation subprocess" in err


SIGTERM_SCRIPT = """
import os, subprocess, sys, time
from pathlib import Path
from client_app.warm_executor import install_signal_handlers
from tests.test_warm_executor import FakeRuntime, make_executor

tmp = Path(sys.argv[1])

def runner(token):
    grandchild = subprocess.Popen(["sleep", "600"])
    (tmp / "pids").write_text(f"{os.getpid()} {grandchild.pid}")
    time.sleep(600)
    return 0

executor = make_executor(tmp, FakeRuntime(1), runner, task_timeout_s=600.0)
install_signal_handlers(executor)
sys.exit(executor.serve())
"""


def test_sigterm_kills_the_running_task_and_leaves_no_children(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO), FLWR_TELEMETRY_ENABLED="0")
    process = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(SIGTERM_SCRIPT), str(tmp_path)],
        cwd=REPO,
        env=env,
        start_new_session=True,
    )
    try:
        pids_file = tmp_path / "pids"
        deadline = time.monotonic() + 120
        while not pids_file.is_file() and time.monotonic() < deadline:
            assert process.poll() is None, "the executor exited before its task started"
            time.sleep(0.1)
        pids = [int(p) for p in pids_file.read_text().split()]
        tree = descendants(process.pid)
        assert set(pids) <= set(tree)
        sent = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=GONE_TIMEOUT_S + STOP_GRACE_S) == 0
        assert time.monotonic() - sent >= STOP_GRACE_S * 0.9  # the task had its grace
        assert not wait_gone(tree)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)


# ---------------------------------------------------------------------------- deployment
PROBE_PYPROJECT = """
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "warm-probe"
version = "1.0.0"
description = "Probe app of tests/test_warm_executor.py"
license = "Apache-2.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "nmoetest"

[tool.flwr.app.components]
serverapp = "probe_server:app"
clientapp = "client_app.probe:app"

[tool.flwr.app.config]
out = ""
nodes = 2
"""

PROBE_CLIENT = f'''
"""Probe ClientApp: `query.raise` raises; `query.where` says which code and process answered."""

import os
import sys

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

MARKER = "{PROBE_MARKER}"
app = ClientApp()


@app.query("raise")
def fail(msg: Message, context: Context) -> Message:
    raise ValueError("{PROBE_ERROR}")


@app.query("where")
def where(msg: Message, context: Context) -> Message:
    info = {{"file": __file__, "marker": MARKER, "pid": os.getpid()}}
    info["torch"] = "torch" in sys.modules
    return Message(RecordDict({{"info": ConfigRecord(info)}}), reply_to=msg)
'''

PROBE_SERVER = '''
"""Probe ServerApp: one wave of `query.raise`, then one of `query.where`; writes the replies."""

import json
import time
from pathlib import Path

from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


def wave(grid: Grid, nodes: list[int], action: str) -> list[dict]:
    sent = [Message(RecordDict(), dst_node_id=n, message_type=f"query.{action}") for n in nodes]
    pending = set(grid.push_messages(sent))
    replies, deadline = [], time.monotonic() + 300
    while pending and time.monotonic() < deadline:
        for reply in grid.pull_messages(list(pending)):
            if reply.metadata.reply_to_message_id in pending:
                pending.discard(reply.metadata.reply_to_message_id)
                replies.append(reply)
        time.sleep(0.1)
    return [
        {"error": r.error.reason} if r.has_error() else dict(r.content["info"]) for r in replies
    ]


@app.main()
def main(grid: Grid, context: Context) -> None:
    nodes: list[int] = []
    while len(nodes) < int(context.run_config["nodes"]):
        nodes = list(grid.get_node_ids())
        time.sleep(0.5)
    report = {action: wave(grid, nodes, action) for action in ("raise", "where")}
    Path(str(context.run_config["out"])).write_text(json.dumps(report))
'''


def structure(value: Any) -> Any:
    """The shape of a JSON document: keys, list lengths and leaf types, not the values."""
    if isinstance(value, dict):
        return {k: structure(v) for k, v in value.items()}
    if isinstance(value, list):
        return [structure(v) for v in value]
    return (
        "number"
        if isinstance(value, (int, float)) and not isinstance(value, bool)
        else type(value).__name__
    )


class Reference:
    """The reference run of SMOKE, started beside the warm federation and left running.

    `simulation` (default): the `nmoe` CLI, Flower's simulation runtime in one process (the
    same ServerApp and ClientApp code; a few CPU-seconds). `stock`: a deployment of NUM_NODES
    SuperNodes with flwr's own executor (`--isolation subprocess`), the literal stock run;
    several minutes on a loaded 2-core machine, so opt-in (NMOE_WARM_REFERENCE=stock).
    bench/waves.py compares stock and warm deployments on every run.
    """

    def __init__(self, kind: str, tmp: Path) -> None:
        self.kind, self.out = kind, tmp / "out"
        self.deployment: Deployment | None = None
        self.process: subprocess.Popen | None = None
        self.run_id = ""
        self.tmp = tmp

    def start(self) -> None:
        if self.kind == STOCK:
            self.deployment = Deployment(self.tmp / "stock", NUM_NODES, executor=STOCK)
            self.deployment.start()
            self.run_id = self.deployment.submit(f"{SMOKE} output_dir={self.out}")
            return
        command = [
            str(Path(sys.executable).parent / "nmoe"),
            *SMOKE.split(),
            f"simulation.num_clients={NUM_NODES}",
            f"output_dir={self.out}",
            f"hydra.run.dir={self.tmp / 'hydra'}",
        ]
        self.process = spawn(command, flower_env(self.tmp / "flwr_home"), self.tmp / "nmoe.log")

    def results(self) -> dict[str, Any]:
        if self.deployment is not None:
            status = self.deployment.wait(self.run_id, RUN_TIMEOUT_S)
            assert status == COMPLETED_STATUS, self.deployment.logs(self.run_id)[-3000:]
        elif self.process is not None:
            code = self.process.wait(timeout=RUN_TIMEOUT_S)
            assert code == 0, (self.tmp / "nmoe.log").read_text()[-3000:]
        return json.loads((self.out / "results.json").read_text())

    def stop(self) -> None:
        if self.deployment is not None:
            self.deployment.stop()
        if self.process is not None:
            stop_process(self.process)


@pytest.fixture(scope="module")
def federations(tmp_path_factory: pytest.TempPathFactory):
    """The warm federation (SuperNodes in --isolation process, one warm executor each) and the
    reference run of the same job, started side by side."""
    reference = Reference(
        os.environ.get("NMOE_WARM_REFERENCE", "simulation"), tmp_path_factory.mktemp("reference")
    )
    warm = Deployment(
        tmp_path_factory.mktemp("warm"),
        NUM_NODES,
        executor=WARM,
        executor_args=("--task-timeout", "300", "--stop-grace", "2"),
    )
    try:
        warm.start_superlink()
        for index in range(NUM_NODES):
            warm.start_node(index)
        reference.start()
        warm.wait_for_nodes(NUM_NODES)
        yield {"warm": warm, "reference": reference}
    finally:
        warm.stop()
        reference.stop()


@pytest.fixture(scope="module")
def warm(federations: dict[str, Any]) -> Deployment:
    return federations["warm"]


@pytest.fixture(scope="module")
def warm_smoke(warm: Deployment, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("warm_out")
    pids = {i: n.executor.pid for i, n in warm.nodes.items() if n.executor is not None}
    status, run_id = warm.run(f"{SMOKE} output_dir={out}", RUN_TIMEOUT_S)
    assert status == COMPLETED_STATUS, warm.logs(run_id)[-3000:]
    return {"results": json.loads((out / "results.json").read_text()), "pids": pids}


def executor_log(deployment: Deployment, index: int) -> str:
    return deployment.nodes[index].executor_log.read_text(errors="replace")


@pytest.mark.deployment
def test_smoke_run_gives_the_results_of_the_reference_run(
    warm_smoke: dict[str, Any], federations: dict[str, Any]
) -> None:
    """Same structure as the reference (stock or simulation), and the same numbers: same seeds,
    same data, same code."""
    reference = federations["reference"].results()
    results = warm_smoke["results"]
    assert structure(results) == structure(reference)
    for key in ("accuracy", "accuracy_global", "routing_counts"):
        assert results[key] == reference[key], key
    for row, expected in zip(results["history"], reference["history"], strict=True):
        numbers = {k for k, v in expected.items() if isinstance(v, float)}
        assert {k: v for k, v in row.items() if k not in numbers} == {
            k: v for k, v in expected.items() if k not in numbers
        }  # stage, round, replies
        assert {k: row[k] for k in numbers} == pytest.approx(
            {k: expected[k] for k in numbers}, rel=1e-6
        )  # losses, scores: averaged in reply arrival order
    assert len(results["accuracy"]["nmoe"]["per_client"]) == NUM_NODES
    assert results["status"] == "completed"


@pytest.mark.deployment
def test_smoke_run_was_served_warm(warm: Deployment, warm_smoke: dict[str, Any]) -> None:
    """Every task forked: each node's first compared the FAB it installed with the checkout
    (equal), the others ran warm."""
    for index in range(NUM_NODES):
        log = executor_log(warm, index)
        assert log.count(f") {WARM_CHECKED}: exit 0") == 1, log[-3000:]
        assert "equals the preloaded app" in log and f") {COLD}:" not in log
        assert log.count(") warm: exit 0") >= 5


@pytest.mark.deployment
def test_a_raising_task_gets_an_error_reply_and_the_executor_lives_on(
    warm: Deployment, warm_smoke: dict[str, Any], tmp_path: Path
) -> None:
    app = tmp_path / "probe"
    app.mkdir()
    (app / "pyproject.toml").write_text(PROBE_PYPROJECT)
    (app / "client_app").mkdir()
    (app / "client_app" / "__init__.py").write_text("")
    (app / "client_app" / "probe.py").write_text(PROBE_CLIENT)
    (app / "probe_server.py").write_text(PROBE_SERVER)
    out = tmp_path / "probe.json"
    submitted = warm.flwr(
        "run",
        str(app),
        warm.connection,
        "--run-config",
        f"out='{out}' nodes={NUM_NODES}",
        "--format",
        "json",
    )
    run_id = str(json.loads(submitted.stdout[submitted.stdout.index("{") :])["run-id"])
    assert warm.wait(run_id, RUN_TIMEOUT_S) == COMPLETED_STATUS, warm.logs(run_id)[-3000:]
    report = json.loads(out.read_text())
    assert len(report["raise"]) == NUM_NODES
    assert all(PROBE_ERROR in r.get("error", "") for r in report["raise"]), report
    for reply in report["where"]:
        assert reply["marker"] == PROBE_MARKER  # the probe FAB's code answered
        assert "/apps/nmoetest.warm-probe.1.0.0." in reply["file"]  # its own client_app
        assert reply["torch"], "answered by a fresh process, not a warm child"
    for index, pid in warm_smoke["pids"].items():
        node = warm.nodes[index]
        assert node.executor is not None and node.executor.pid == pid
        assert node.executor.poll() is None  # the same executor, re-executed in place
        log = executor_log(warm, index)
        assert "differs from the preloaded app" in log and "re-exec" in log


@pytest.mark.deployment
def test_sigterm_stops_every_executor_with_nothing_left(warm: Deployment) -> None:
    executors = [n.executor for n in warm.nodes.values() if n.executor is not None]
    assert len(executors) == NUM_NODES
    trees = [descendants(e.pid) for e in executors]
    for executor in executors:
        executor.send_signal(signal.SIGTERM)
    for executor, tree in zip(executors, trees, strict=True):
        assert executor.wait(timeout=GONE_TIMEOUT_S + STOP_GRACE_S) == 0
        assert not wait_gone(tree)
