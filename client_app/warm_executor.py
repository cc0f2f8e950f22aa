"""Warm executor for `flower-supernode --isolation process` (flwr 1.42.0 only).

With the default `--isolation subprocess` a SuperNode's SuperExec starts a fresh
`flwr-clientapp` process for every message: seconds of imports (flwr, torch, the app)
before the handler runs. With `--isolation process` the SuperNode starts nothing and
waits for an external executor to pull tasks from its local Runtime API. This is that
executor, kept warm:

    flower-supernode --isolation process --port 9094 ...     # on the device
    python -m client_app.warm_executor --runtime-api-address 127.0.0.1:9094 --insecure

It imports flwr, torch and the app once (`--preload`), then polls the Runtime API for
ClientApp tasks and runs each one, one at a time, in a forked child that calls flwr's own
`run_clientapp` with the task's token: the child pulls the message, installs the task's
FAB, loads its ClientApp and pushes the reply exactly as `flwr-clientapp` would, minus the
imports. Only the task's FAB's code answers: a FAB whose installed files all equal the
preloaded app's (the checkout it was built from), or that shares no package with it, runs
warm. A FAB not installed yet runs
forked too, and the child compares it once it has installed it; if it differs, the child
drops the preloaded app modules so that flwr imports the FAB's own. A FAB installed and
known to differ runs in a fresh `flwr-clientapp` process. After a FAB that differs, the
executor re-executes itself bound to that FAB's folder (`--app-dir`); it also re-executes
when a preloaded app file changes on disk (that task runs in a fresh process).

A child that raises, crashes or outlives `--task-timeout` (SIGKILL) never stops the
executor; flwr then answers the message with an error reply (at once for an exception,
after its heartbeat timeout for a killed child). SIGTERM or SIGINT: stop taking tasks, give
the running child `--stop-grace` seconds, SIGKILL its process group, exit 0. Telemetry is
off for the executor and everything it starts. Standard library only until the flwr
version is checked.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Protocol

FLWR_VERSION = "1.42.0"
"""The only flwr release whose Runtime API and `run_clientapp` this executor was written for."""
DEFAULT_PRELOAD = (
    "flwr.supernode.runtime.run_clientapp",
    "client_app.app",
    "hydra",
    "hydra.core.global_hydra",
    "hydra.core.config_store",
    "torchvision.transforms",
    "safetensors.torch",
)
WARM = "warm"  # forked; the task's FAB is known to be the preloaded app
WARM_CHECKED = "warm+check"  # forked; FAB not installed yet, compared once the child installs it
COLD = "cold"  # a fresh flwr-clientapp process: the FAB is installed and differs
CLIENT_APP_TASK = "flwr-clientapp"
CLIENTAPP_COMMAND = "flwr-clientapp"
POLL_INTERVAL_S = 0.2
TASK_TIMEOUT_S = 3600.0
STOP_GRACE_S = 5.0
CODE_CHECK_INTERVAL_S = 2.0
ERROR_PAUSE_S = 5.0
CHILD_POLL_S = 0.02
REAP_TIMEOUT_S = 10.0
EXIT_VERSION = 2
APPS_DIR = (
    "apps"  # flwr installs a FAB into $FLWR_HOME/apps/<publisher>.<name>.<version>.<hash[:8]>
)
FAB_HASH_PREFIX = 8
SKIPPED_FAB_FILES = ("pyproject.toml",)  # flwr rewrites it when it builds the FAB

log = logging.getLogger("warm_executor")


class UnsupportedFlwrVersion(RuntimeError):
    """The installed flwr is not the release this executor relies on."""


class StopRequested(BaseException):
    """SIGTERM/SIGINT arrived while the executor was idle (a BaseException, so that no
    `except Exception` on the way, in flwr or httpx, swallows it)."""


def installed_flwr_version() -> str | None:
    """The installed flwr distribution's version, None if flwr is not installed."""
    try:
        return version("flwr")
    except PackageNotFoundError:
        return None


def check_flwr_version(found: str | None = None) -> None:
    """Refuse any flwr but FLWR_VERSION: the executor drives flwr internals of that release."""
    found = installed_flwr_version() if found is None else found
    if found != FLWR_VERSION:
        raise UnsupportedFlwrVersion(
            f"the warm executor supports flwr {FLWR_VERSION} only, found "
            f"{found or 'no flwr'}; run the stock executor instead "
            "(flower-supernode --isolation subprocess)"
        )


# ---------------------------------------------------------------------------- app code identity
Stamp = tuple[int, int]  # (mtime_ns, size)


def _stamp(path: Path) -> Stamp | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


def _site_dirs() -> set[Path]:
    paths = sysconfig.get_paths()
    return {Path(paths[k]).resolve() for k in ("purelib", "platlib") if k in paths}


def fab_files(fab_dir: Path) -> list[Path]:
    """Files of an installed FAB that define the app's behaviour, relative to `fab_dir`."""
    return sorted(
        p.relative_to(fab_dir)
        for p in fab_dir.rglob("*")
        if p.is_file()
        and "__pycache__" not in p.parts
        and p.suffix != ".pyc"
        and str(p.relative_to(fab_dir)) not in SKIPPED_FAB_FILES
    )


def find_installed_fab(flwr_home: Path, fab_hash: str) -> Path | None:
    """The folder flwr installed the FAB `fab_hash` in, None if absent or ambiguous."""
    if len(fab_hash) < FAB_HASH_PREFIX:
        return None
    found = [
        p
        for p in (flwr_home / APPS_DIR).glob(f"*.{fab_hash[:FAB_HASH_PREFIX]}")
        if (p / "pyproject.toml").is_file()
    ]
    return found[0] if len(found) == 1 else None


@dataclass
class AppCode:
    """Where the preloaded app came from and what its files looked like at preload time.

    `root` is the folder the app's packages were imported from (a checkout, or a FAB folder
    after a re-exec). A FAB is *verified* when every one of its files equals the file at the
    same path under `root` and no preloaded app module changed since preload: a warm child
    then runs exactly the FAB's code. The stamps of verified files are kept so that an edit
    under `root` is noticed before the next task.
    """

    root: Path | None
    preloaded: dict[Path, Stamp] = field(default_factory=dict)
    verified: dict[str, dict[Path, Stamp]] = field(default_factory=dict)

    @classmethod
    def snapshot(cls, root: Path | None) -> AppCode:
        """Stamp every loaded module file under `root` (none when root is site-packages)."""
        if root is None or root.resolve() in _site_dirs():
            return cls(root)
        root = root.resolve()
        stamps: dict[Path, Stamp] = {}
        for module in list(sys.modules.values()):
            file = getattr(module, "__file__", None)
            if not file:
                continue
            path = Path(file).resolve()
            if path.is_relative_to(root) and (stamp := _stamp(path)) is not None:
                stamps[path] = stamp
        return cls(root, stamps)

    def changed(self) -> list[Path]:
        """Preloaded or verified files whose stamp changed since they were read."""
        watched = dict(self.preloaded)
        for stamps in self.verified.values():
            watched.update(stamps)
        return [p for p, s in watched.items() if _stamp(p) != s]

    def verify(self, fab_hash: str, fab_dir: Path) -> bool:
        """Whether the FAB installed in `fab_dir` is the preloaded code (remembered if so)."""
        if fab_hash in self.verified:
            return True
        stamps = self.matches(fab_dir)
        if stamps is None:
            return False
        self.verified[fab_hash] = stamps
        return True

    def matches(self, fab_dir: Path) -> dict[Path, Stamp] | None:
        """Whether a warm child runs exactly the FAB's code: None if not, else the stamps of
        the files under `root` it relies on.

        Either no loaded module belongs to a package of the FAB (flwr imports the FAB's own
        from its folder; nothing to stamp), or every file of the FAB equals the file at the
        same path under `root`, where all the loaded modules of its packages come from.
        """
        names = _top_level_names(fab_dir)
        if not any(m.split(".", 1)[0] in names for m in list(sys.modules)):
            return {}
        if self.root is None or self.changed() or self._loaded_elsewhere(names):
            return None
        stamps: dict[Path, Stamp] = {}
        for rel in fab_files(fab_dir):
            mine = self.root / rel
            stamp = _stamp(mine)
            if stamp is None or mine.read_bytes() != (fab_dir / rel).read_bytes():
                return None
            stamps[mine] = stamp
        return stamps

    def _loaded_elsewhere(self, names: set[str]) -> bool:
        """Whether a loaded module of the packages `names` comes from outside `root`."""
        assert self.root is not None
        root = self.root.resolve()
        for name, module in list(sys.modules.items()):
            file = getattr(module, "__file__", None)
            if file and name.split(".", 1)[0] in names:
                if not Path(file).resolve().is_relative_to(root):
                    return True
        return False


def _top_level_names(folder: Path) -> set[str]:
    """Importable top-level names a folder provides (packages and modules)."""
    names = {p.name for p in folder.iterdir() if (p / "__init__.py").is_file()}
    return names | {p.stem for p in folder.glob("*.py")}


def forget_modules(names: set[str]) -> list[str]:
    """Drop every loaded module of the top-level packages `names`; the next import of one
    reads it again from `sys.path` (where flwr puts the task's FAB first)."""
    dropped = [m for m in sys.modules if m.split(".", 1)[0] in names]
    for name in dropped:
        del sys.modules[name]
    importlib.invalidate_caches()
    return dropped


def preload(modules: Iterable[str], app_dir: Path | None) -> AppCode:
    """Import `modules` once; with `app_dir`, the app's packages come from that folder.

    The executor module itself lives in `client_app`, so the app packages already imported
    from elsewhere are dropped from `sys.modules` first to be imported again from `app_dir`.
    """
    if app_dir is not None:
        app_dir = app_dir.resolve()
        forget_modules(_top_level_names(app_dir))
        sys.path.insert(0, str(app_dir))
    roots: list[Path] = []
    for name in modules:
        started = time.perf_counter()
        try:
            module = importlib.import_module(name)
        except Exception as err:  # a missing optional module only costs warmth
            log.warning("preload of %s failed: %s", name, err)
            continue
        log.debug("preloaded %s in %.2fs", name, time.perf_counter() - started)
        if not name.startswith("flwr") and getattr(module, "__file__", None) and not roots:
            top = sys.modules[name.split(".", 1)[0]]
            if getattr(top, "__file__", None):
                roots.append(Path(top.__file__).resolve().parent.parent)
    root = app_dir if app_dir is not None else (roots[0] if roots else None)
    return AppCode.snapshot(root)


# ---------------------------------------------------------------------------- tasks and children
class RuntimeClient(Protocol):
    """The part of flwr's RuntimeHttpClient the executor uses."""

    def AcquireTask(self, request: Any) -> Any: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class TaskRef:
    """What AcquireTask told us about a claimed task."""

    token: str
    task_id: int
    run_id: int
    fab_hash: str


@dataclass(frozen=True)
class TaskOutcome:
    """How one task ended, from the executor's point of view."""

    task: TaskRef
    mode: str  # WARM, WARM_CHECKED or COLD
    pid: int
    returncode: int | None  # exit status; negative: killed by that signal
    seconds: float
    timed_out: bool = False
    stopped: bool = False

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out and not self.stopped


@dataclass(frozen=True)
class Restart:
    """Why the executor must re-execute itself, and the app folder to bind to (None: same)."""

    reason: str
    app_dir: Path | None = None


@dataclass(frozen=True)
class ExecutorConfig:
    """Settings of one warm executor (see `--help`)."""

    runtime_api_address: str
    insecure: bool = False
    root_certificates: str | None = None
    superexec_auth_secret_file: str | None = None
    poll_interval_s: float = POLL_INTERVAL_S
    task_timeout_s: float = TASK_TIMEOUT_S
    stop_grace_s: float = STOP_GRACE_S
    preload: tuple[str, ...] = DEFAULT_PRELOAD
    app_dir: Path | None = None
    parent_pid: int | None = None


def _exit_code(value: object) -> int:
    if value is None:
        return 0
    return value if isinstance(value, int) else 1


def _flush_output() -> None:
    for handler in logging.getLogger().handlers + logging.getLogger("flwr").handlers:
        try:
            handler.flush()
        except Exception:
            pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass


def _returncode(status: int) -> int:
    """waitpid status -> Popen-style return code (negative signal number if killed)."""
    if os.WIFSIGNALED(status):
        return -os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


class WarmExecutor:
    """Pulls ClientApp tasks from one SuperNode's Runtime API and runs each in a warm child.

    `client` and `runner` default to flwr's RuntimeHttpClient and `run_clientapp`; tests
    pass their own. `runner(token)` runs in the forked child and returns its exit code.
    `serve` returns when the executor must restart (`restart` says why); `main` re-executes.
    """

    def __init__(
        self,
        config: ExecutorConfig,
        client: RuntimeClient | None = None,
        runner: Callable[[str], int] | None = None,
        code: AppCode | None = None,
        flwr_home: Path | None = None,
    ) -> None:
        self.config = config
        self.client = client if client is not None else self._make_client()
        self.runner = runner if runner is not None else self._run_clientapp
        self.code = code if code is not None else AppCode(None)
        self.flwr_home = flwr_home if flwr_home is not None else self._flwr_home()
        self.outcomes: list[TaskOutcome] = []
        self.restart: Restart | None = None
        self._stop = False
        self._idle = False
        self._child_pgid: int | None = None
        self._cold: subprocess.Popen | None = None
        self._check_fab = False

    # --- flwr plumbing (flwr 1.42.0) ------------------------------------------------------
    def _make_client(self) -> RuntimeClient:
        from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
        from flwr.supercore.retry import make_simple_http_retry_invoker
        from flwr.supercore.runtime import RuntimeHttpClient
        from flwr.supercore.runtime.tracing import RuntimeTracingInterceptor
        from flwr.supercore.tls import validate_and_resolve_root_certificates

        interceptors: list[Any] = [
            RuntimeTracingInterceptor(),
            RuntimeVersionHttpInterceptor(component_name="SuperExec"),
        ]
        if self.config.superexec_auth_secret_file is not None:
            from flwr.supercore.auth import load_superexec_auth_secret
            from flwr.supercore.interceptors import SuperExecAuthHttpInterceptor

            secret = load_superexec_auth_secret(self.config.superexec_auth_secret_file)
            interceptors.append(
                SuperExecAuthHttpInterceptor(
                    master_secret=secret,
                    protected_methods=frozenset({"/flwr.proto.Runtime/AcquireTask"}),
                )
            )
        return RuntimeHttpClient.from_server_address(
            server_address=self.config.runtime_api_address,
            insecure=self.config.insecure,
            root_certificates=validate_and_resolve_root_certificates(
                self.config.root_certificates, self.config.insecure
            ),
            interceptors=interceptors,
            retry_invoker=make_simple_http_retry_invoker(),
        )

    @staticmethod
    def _flwr_home() -> Path:
        from flwr.supercore.utils import get_flwr_home

        return Path(get_flwr_home())

    def _run_clientapp(self, token: str) -> int:
        """In the child: flwr's own ClientApp process body for this token."""
        from flwr.supercore.tls import validate_and_resolve_root_certificates
        from flwr.supernode.runtime import run_clientapp as runtime
        from flwr.supernode.runtime.run_clientapp import run_clientapp

        if self._check_fab:
            install = runtime.install_from_fab

            def install_and_compare(*args: Any, **kwargs: Any) -> Path:
                fab_dir = Path(install(*args, **kwargs))
                self.adopt(fab_dir)
                return fab_dir

            runtime.install_from_fab = install_and_compare

        # No parent_pid: flwr would SIGINT the task if the executor died, which finishes it
        # without a reply and leaves the SuperNode waiting for one; an orphan finishes instead.
        run_clientapp(
            runtime_api_address=self.config.runtime_api_address,
            token=token,
            insecure=self.config.insecure,
            certificates=validate_and_resolve_root_certificates(
                self.config.root_certificates, self.config.insecure
            ),
            parent_pid=None,
            runtime_dependency_install=False,
        )
        return 0

    def adopt(self, fab_dir: Path) -> None:
        """In a child, once its task's FAB is installed: keep the preloaded app if it is the
        FAB's code, else forget the app's modules so that flwr imports the FAB's own."""
        if self.code.matches(fab_dir) is not None:
            return
        dropped = forget_modules(_top_level_names(fab_dir))
        log.info(
            "task FAB in %s differs from the preloaded app: %d modules reloaded from it",
            fab_dir,
            len(dropped),
        )

    def acquire(self) -> TaskRef | None:
        """Claim the oldest pending ClientApp task of the SuperNode, if any."""
        from flwr.proto.runtime_pb2 import AcquireTaskRequest

        response = self.client.AcquireTask(
            AcquireTaskRequest(supported_task_types=[CLIENT_APP_TASK], agentapp_fab_hashes=[])
        )
        if not response.HasField("task") or not response.token:
            return None
        task = response.task
        return TaskRef(response.token, int(task.task_id), int(task.run_id), str(task.fab_hash))

    # --- running one task -----------------------------------------------------------------
    def execute(self, task: TaskRef) -> TaskOutcome:
        """Run one claimed task: WARM if its FAB is known to be the preloaded code,
        WARM_CHECKED if the FAB is not installed yet, COLD if it is and differs (or the
        preloaded code changed on disk)."""
        mode = COLD
        if changed := self.code.changed():
            log.info("app code changed on disk (%s): restart after this task", changed[0])
            self.restart = Restart(f"changed on disk: {changed[0]}")
            self.code.verified.clear()
        elif task.fab_hash:
            fab_dir = find_installed_fab(self.flwr_home, task.fab_hash)
            if fab_dir is None:
                mode = WARM_CHECKED
            elif self.code.verify(task.fab_hash, fab_dir):
                mode = WARM
        started = time.monotonic()
        try:
            pid = self._spawn_cold(task.token) if mode == COLD else self._fork(task.token, mode)
        except OSError as err:  # flwr lets the claim expire and offers the task again
            log.error("task %d: could not start its process: %s", task.task_id, err)
            outcome = TaskOutcome(task, mode, 0, None, time.monotonic() - started)
            self.outcomes.append(outcome)
            return outcome
        returncode, timed_out, stopped = self._wait(pid, started)
        outcome = TaskOutcome(
            task, mode, pid, returncode, time.monotonic() - started, timed_out, stopped
        )
        self.outcomes.append(outcome)
        level = logging.INFO if outcome.ok else logging.WARNING
        log.log(
            level,
            "task %d (run %d) %s: exit %s in %.2fs%s%s",
            task.task_id,
            task.run_id,
            mode,
            returncode,
            outcome.seconds,
            " (timed out, killed)" if timed_out else "",
            " (stopped)" if stopped else "",
        )
        if mode != WARM and task.fab_hash and not self._stop:
            self._bind(task.fab_hash)
        return outcome

    def _bind(self, fab_hash: str) -> None:
        """After a task of an unverified FAB: warm from now on if the FAB is the preloaded
        code, else plan a re-exec bound to the FAB's folder."""
        fab_dir = find_installed_fab(self.flwr_home, fab_hash)
        if fab_dir is None or self.restart is not None:
            return
        if self.code.verify(fab_hash, fab_dir):
            log.info("FAB %s equals the preloaded app: its next tasks run warm", fab_hash[:12])
            return
        self.restart = Restart(f"FAB {fab_hash[:12]} differs from the preloaded app", fab_dir)
        log.info(
            "FAB %s differs from the preloaded app: re-exec bound to %s", fab_hash[:12], fab_dir
        )

    def _fork(self, token: str, mode: str) -> int:
        executor_pid = os.getpid()
        _flush_output()
        pid = os.fork()
        if pid == 0:  # the child: never returns
            code = 1
            try:
                os.setpgid(0, 0)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                self._orphan_watchdog(executor_pid)
                self._check_fab = mode == WARM_CHECKED
                code = self.runner(token)
            except SystemExit as err:  # flwr_exit ends with sys.exit
                code = _exit_code(err.code)
            except BaseException:
                traceback.print_exc()
                code = 1
            finally:
                _flush_output()
                os._exit(code)
        try:
            os.setpgid(pid, pid)
        except (ProcessLookupError, PermissionError):
            pass  # the child set it already, or is gone
        return pid

    def _orphan_watchdog(self, executor_pid: int) -> None:
        """If the executor dies, the orphaned child still ends by the task timeout."""
        deadline = time.monotonic() + self.config.task_timeout_s

        def watch() -> None:
            while time.monotonic() < deadline or os.getppid() == executor_pid:
                time.sleep(1.0)
            os.killpg(0, signal.SIGKILL)

        threading.Thread(target=watch, name="orphan-watchdog", daemon=True).start()

    def _spawn_cold(self, token: str) -> int:
        command = [self._clientapp_command(), "--runtime-api-address"]
        command += [self.config.runtime_api_address, "--token", token]
        if self.config.insecure:
            command.append("--insecure")
        elif self.config.root_certificates is not None:
            command += ["--root-certificates", self.config.root_certificates]
        env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0")
        _flush_output()
        self._cold = subprocess.Popen(command, env=env, start_new_session=True)
        return self._cold.pid

    @staticmethod
    def _clientapp_command() -> str:
        sibling = Path(sys.executable).parent / CLIENTAPP_COMMAND
        if sibling.is_file():
            return str(sibling)
        found = shutil.which(CLIENTAPP_COMMAND)
        if found is None:
            raise FileNotFoundError(
                f"{CLIENTAPP_COMMAND} is not installed next to {sys.executable}"
            )
        return found

    def _wait(self, pid: int, started: float) -> tuple[int | None, bool, bool]:
        """Wait for child `pid` (its own process group); kill the group on timeout or stop.
        Returns (return code, timed out, stopped)."""
        self._child_pgid = pid
        deadline = started + self.config.task_timeout_s
        stop_deadline: float | None = None
        timed_out = stopped = False
        try:
            while os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
                now = time.monotonic()
                if self._stop and stop_deadline is None:
                    stop_deadline = now + self.config.stop_grace_s
                if not timed_out and now > deadline:
                    timed_out = True
                    _kill_group(pid)
                if not stopped and stop_deadline is not None and now > stop_deadline:
                    stopped = True
                    _kill_group(pid)
                time.sleep(CHILD_POLL_S)
            _kill_group(pid)  # what the task left in its group (the exited pid is not reused yet)
            returncode = _returncode(os.waitpid(pid, 0)[1])
        finally:
            self._child_pgid = None
        if self._cold is not None:  # reaped here: Popen must not reap it again
            self._cold.returncode = returncode
            self._cold = None
        return returncode, timed_out, stopped

    # --- the loop -------------------------------------------------------------------------
    def request_stop(self, signum: int = signal.SIGTERM, frame: object = None) -> None:
        """Signal handler: stop taking tasks; interrupt the poll if idle."""
        first = not self._stop
        self._stop = True
        if first:
            log.info("signal %d: stopping", signum)
        if self._idle and first:
            raise StopRequested

    def serve(self) -> int:
        """Poll and run tasks until stopped or a restart is due (`restart`); returns 0."""
        last_check = time.monotonic()
        try:
            while not self._stop and self.restart is None:
                try:
                    task = self._poll_once()
                    if task is not None:
                        self.execute(task)
                except Exception as err:  # flwr lets a lost claim expire and offers it again
                    log.error("%s: %s; retrying in %.0fs", type(err).__name__, err, ERROR_PAUSE_S)
                    self._pause(ERROR_PAUSE_S)
                if time.monotonic() - last_check > CODE_CHECK_INTERVAL_S:
                    last_check = time.monotonic()
                    if changed := self.code.changed():
                        log.info("app code changed on disk (%s): restarting", changed[0])
                        self.restart = Restart(f"changed on disk: {changed[0]}")
        except StopRequested:
            pass
        finally:
            self.close()
        if self._stop:
            self.restart = None
        return 0

    def _poll_once(self) -> TaskRef | None:
        self._idle = True
        try:
            if self._stop:
                return None
            task = self.acquire()
            if task is None:
                time.sleep(self.config.poll_interval_s)
            return task
        finally:
            self._idle = False

    def _pause(self, seconds: float) -> None:
        self._idle = True
        try:
            if not self._stop:
                time.sleep(seconds)
        finally:
            self._idle = False

    def close(self) -> None:
        """Kill a running child's group (if any) and close the Runtime API client."""
        if self._child_pgid is not None:
            _kill_group(self._child_pgid)
        try:
            self.client.close()
        except Exception:
            pass


def reexec(argv: list[str], restart: Restart) -> None:
    """Replace this process by a fresh executor: the same command, `--app-dir` from `restart`."""
    args = _with_app_dir(argv, restart.app_dir)
    prefix = sys.orig_argv[: len(sys.orig_argv) - (len(sys.argv) - 1)]  # python [-m mod|script]
    log.info("re-exec (%s): %s", restart.reason, " ".join([*prefix, *args]))
    _flush_output()
    os.execv(sys.executable, [*prefix, *args])


def _with_app_dir(argv: list[str], app_dir: Path | None) -> list[str]:
    """`argv` with its `--app-dir` replaced by `app_dir` (kept if None)."""
    if app_dir is None:
        return list(argv)
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--app-dir":
            skip = True
            continue
        if arg.startswith("--app-dir="):
            continue
        out.append(arg)
    return [*out, "--app-dir", str(app_dir)]


# ---------------------------------------------------------------------------- command line
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m client_app.warm_executor",
        description=__doc__.split("\n\n")[0]
        + ": runs the SuperNode's ClientApp tasks in children forked from a process that "
        "already imported flwr, torch and the app.",
    )
    parser.add_argument(
        "--runtime-api-address",
        required=True,
        help="the SuperNode's Runtime API, host:port (its --port, e.g. 127.0.0.1:9094)",
    )
    security = parser.add_mutually_exclusive_group(required=True)
    security.add_argument(
        "--insecure", action="store_true", help="plain HTTP to the Runtime API (loopback)"
    )
    security.add_argument(
        "--root-certificates", help="CA certificate of the Runtime API's TLS (--ssl-certfile)"
    )
    parser.add_argument(
        "--superexec-auth-secret-file",
        help="the SuperNode's --superexec-auth-secret-file, if it requires SuperExec auth",
    )
    parser.add_argument(
        "--poll-interval",
        type=float,
        default=POLL_INTERVAL_S,
        help=f"seconds between polls for a task when idle (default {POLL_INTERVAL_S})",
    )
    parser.add_argument(
        "--task-timeout",
        type=float,
        default=TASK_TIMEOUT_S,
        help=f"SIGKILL a task's process group after this many seconds (default {TASK_TIMEOUT_S:g})",
    )
    parser.add_argument(
        "--stop-grace",
        type=float,
        default=STOP_GRACE_S,
        help="on SIGTERM, seconds a running task may still finish before it is killed "
        f"(default {STOP_GRACE_S:g})",
    )
    parser.add_argument(
        "--preload",
        action="append",
        default=None,
        metavar="MODULE",
        help="module to import once (repeatable; default: " + ", ".join(DEFAULT_PRELOAD) + ")",
    )
    parser.add_argument(
        "--app-dir",
        type=Path,
        default=None,
        help="import the app's packages from this folder (an installed FAB); the executor "
        "sets it itself when it re-executes for a FAB that differs from the preloaded app",
    )
    parser.add_argument(
        "--parent-pid",
        type=int,
        default=None,
        help="exit when this process (e.g. the SuperNode) exits",
    )
    parser.add_argument("--log-level", default="INFO", help="executor log level (default INFO)")
    return parser.parse_args(argv)


def _configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s [warm-executor] %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(level.upper())
    log.propagate = False


def install_signal_handlers(executor: WarmExecutor) -> None:
    """SIGTERM and SIGINT stop `executor` (see `WarmExecutor.request_stop`)."""
    signal.signal(signal.SIGTERM, executor.request_stop)
    signal.signal(signal.SIGINT, executor.request_stop)


def _watch_parent(parent_pid: int) -> None:
    def watch() -> None:
        while True:
            time.sleep(0.5)
            try:
                os.kill(parent_pid, 0)
            except ProcessLookupError:
                os.kill(os.getpid(), signal.SIGTERM)
                return
            except PermissionError:
                pass

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    """Entry point: check flwr, preload, serve until SIGTERM."""
    os.environ["FLWR_TELEMETRY_ENABLED"] = "0"  # before flwr is imported; children inherit it
    raw = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(raw)
    _configure_logging(args.log_level)
    try:
        check_flwr_version()
    except UnsupportedFlwrVersion as err:
        print(f"warm executor: {err}", file=sys.stderr)
        return EXIT_VERSION
    config = ExecutorConfig(
        runtime_api_address=args.runtime_api_address,
        insecure=args.insecure,
        root_certificates=args.root_certificates,
        superexec_auth_secret_file=args.superexec_auth_secret_file,
        poll_interval_s=args.poll_interval,
        task_timeout_s=args.task_timeout,
        stop_grace_s=args.stop_grace,
        preload=tuple(args.preload) if args.preload else DEFAULT_PRELOAD,
        app_dir=args.app_dir,
        parent_pid=args.parent_pid,
    )
    started = time.perf_counter()
    code = preload(config.preload, config.app_dir)
    executor = WarmExecutor(config, code=code)
    install_signal_handlers(executor)
    if config.parent_pid is not None:
        _watch_parent(config.parent_pid)
    log.info(
        "flwr %s, app from %s, preloaded in %.1fs; serving %s (pid %d)",
        FLWR_VERSION,
        code.root,
        time.perf_counter() - started,
        config.runtime_api_address,
        os.getpid(),
    )
    status = executor.serve()
    if executor.restart is not None:
        reexec(raw, executor.restart)
    _flush_output()
    os._exit(status)  # no interpreter teardown of torch & co.: a stop takes milliseconds


if __name__ == "__main__":
    sys.exit(main())
