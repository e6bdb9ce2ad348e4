"""Local services for slm: a Prefect server (SQLite), process workers and an MLflow server.

  python scripts/services.py up       start them, deploy prefect.yaml, print the URLs (`make up`)
  python scripts/services.py down     stop exactly what `up` started (`make down`)
  python scripts/services.py status   which of them are running

Everything listens on 127.0.0.1 only. State lives under the project home (SLM_HOME, default
./.slm): the Prefect database and profile in PREFECT_HOME (default $SLM_HOME/prefect),
mlflow.db and mlartifacts/ for MLflow, one log per service in logs/, and services.json, the
pids `down` stops. Ports: SLM_PREFECT_PORT (default 4200), SLM_MLFLOW_PORT (default 5000).

up       1. prefect server start, waits for /api/health (bounded);
         2. `prefect config set PREFECT_API_URL=...` in PREFECT_HOME, so the CLI, `make run`
            and the workers talk to that server;
         3. one process work pool per pool named in prefect.yaml, and one worker for each;
         4. `prefect --no-prompt deploy --all` from the checkout;
         5. mlflow server on sqlite:///$SLM_HOME/mlflow.db (started next to the Prefect server,
            so both warm up at once), waits for /health.
         Every child runs in its own process session, so `down` can stop it with everything
         it started. Running `up` again while all is up says so and changes nothing.
down     stops the recorded process groups and nothing else: first the flow runs the workers
         started (their own sessions, found below the worker pids), while the server can still
         record them as Crashed; then workers and MLflow; the server last. SIGTERM, then SIGKILL
         after a grace period (10 s for flow runs, 5 s for workers, 15 s for the server). A pid
         whose start time no longer matches is someone else's and is left alone. Unsets
         PREFECT_API_URL again (so `make run` goes back to Prefect's ephemeral mode) and
         removes services.json.
Fails    with a message naming the cause and the fix: a port in use, a service that exits or is
         not healthy in time (with the tail of its log). A failed `up` stops what it started.
Memory   about 1 GB resident in all (server ~250 MB, each worker ~100 MB, MLflow ~550 MB with
         its job runner off), plus what running flows use.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]  # the checkout: prefect.yaml lives here
BIN = Path(sys.executable).parent  # the virtual environment's bin (make runs .venv/bin/python)
HOST = "127.0.0.1"
HEALTH_TIMEOUT_S = 180.0  # a first start migrates the database; 15-30 s on 2 cores
DEPLOY_TIMEOUT_S = 300.0


class ServiceError(Exception):
    """A problem the user must fix; printed as one line."""


@dataclass(frozen=True)
class Settings:
    home: Path
    prefect_home: Path
    prefect_port: int
    mlflow_port: int

    @classmethod
    def from_env(cls) -> "Settings":
        home = Path(os.environ.get("SLM_HOME") or ROOT / ".slm").expanduser().resolve()
        prefect_home = Path(os.environ.get("PREFECT_HOME") or home / "prefect").expanduser().resolve()
        return cls(home, prefect_home, _port("SLM_PREFECT_PORT", 4200), _port("SLM_MLFLOW_PORT", 5000))

    @property
    def prefect_url(self) -> str:
        return f"http://{HOST}:{self.prefect_port}"

    @property
    def api_url(self) -> str:
        return f"{self.prefect_url}/api"

    @property
    def mlflow_url(self) -> str:
        return f"http://{HOST}:{self.mlflow_port}"

    @property
    def state_file(self) -> Path:
        return self.home / "services.json"

    @property
    def logs(self) -> Path:
        return self.home / "logs"

    def env(self) -> dict[str, str]:
        """The environment of every child: absolute homes, the API URL, no telemetry."""
        env = dict(os.environ)
        env.update(
            SLM_HOME=str(self.home),
            PREFECT_HOME=str(self.prefect_home),
            PREFECT_API_URL=self.api_url,
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
        )
        env.setdefault("PREFECT_WORKER_QUERY_SECONDS", "5")  # a UI "Retry" starts within seconds
        # MLflow's server-side job runner (GenAI scoring) starts ~7 consumers of ~200 MB each;
        # the pipeline does not use it.
        env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
        env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # the server and its UI send nothing unless asked
        return env


def _port(name: str, default: int) -> int:
    raw = os.environ.get(name, str(default))
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise ServiceError(f"{name}={raw!r} is not a port number (1-65535)")
    return int(raw)


# --- processes ------------------------------------------------------------------------------
def spawn(name: str, argv: list[str], env: dict[str, str], logs: Path, cwd: Path = ROOT) -> subprocess.Popen:
    """Start `argv` in a new process session, stdout and stderr appended to logs/<name>.log."""
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / f"{name}.log", "ab") as log:
        return subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)


def start_time(pid: int) -> int | None:
    """The kernel's start time of `pid` (Linux), to tell our process from a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def alive(pid: int, started: int | None = None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False  # someone else's process now has this pid
    return started is None or start_time(pid) in (None, started)


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (children first), from `ps`, in any session."""
    out = subprocess.run(["ps", "-A", "-o", "pid=,ppid="], capture_output=True, text=True, timeout=10).stdout
    children: dict[int, list[int]] = {}
    for line in out.splitlines():
        child, parent = (int(x) for x in line.split())
        children.setdefault(parent, []).append(child)
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _group_gone(pgid: int) -> bool:
    try:
        os.waitpid(pgid, os.WNOHANG)  # reap it if it is our own child (tests); else no-op
    except ChildProcessError:
        pass
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return True
    return False


def stop_groups(pgids: list[int], grace_s: float) -> list[int]:
    """SIGTERM the process groups, SIGKILL those still there after `grace_s`; returns the killed."""
    pending = []
    for pgid in dict.fromkeys(pgids):
        try:
            os.killpg(pgid, signal.SIGTERM)
            pending.append(pgid)
        except (ProcessLookupError, PermissionError):
            pass
    deadline = time.monotonic() + grace_s
    while pending and time.monotonic() < deadline:
        time.sleep(0.2)
        pending = [pgid for pgid in pending if not _group_gone(pgid)]
    for pgid in pending:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not all(_group_gone(pgid) for pgid in pending):
        time.sleep(0.1)
    return pending


def session_children(pid: int) -> list[int]:
    """Descendants of `pid` that lead a process group of their own (a worker's flow runs)."""
    try:
        own = os.getpgid(pid)
    except ProcessLookupError:
        return []
    found = []
    for child in descendants(pid):
        try:
            if os.getpgid(child) == child != own:
                found.append(child)
        except ProcessLookupError:
            pass
    return found


def stop_tree(pid: int, grace_s: float = 10.0) -> None:
    """Stop the group led by `pid`, after the groups it started in sessions of their own.

    A process worker starts each flow run in a session of its own; those are stopped first,
    so a run is not left behind when its worker goes.
    """
    stop_groups(session_children(pid), grace_s)
    try:
        stop_groups([os.getpgid(pid)], grace_s)
    except ProcessLookupError:
        pass


# --- HTTP checks ---------------------------------------------------------------------------
def http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return 200 <= response.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def wait_healthy(name: str, url: str, proc: subprocess.Popen, log: Path, timeout_s: float = HEALTH_TIMEOUT_S) -> float:
    """Poll `url` until it answers 2xx; fail if `proc` exits or `timeout_s` passes. Returns seconds."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if http_ok(url):
            return time.monotonic() - start
        if proc.poll() is not None:
            raise ServiceError(f"{name} exited with status {proc.returncode} before {url} answered; "
                               f"see {log}:\n{tail(log)}")
        time.sleep(0.5)
    raise ServiceError(f"{name} did not answer {url} within {timeout_s:.0f} s; see {log}:\n{tail(log)}")


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def prefect(args: list[str], env: dict[str, str], timeout_s: float = 120.0, check: bool = True) -> subprocess.CompletedProcess:
    """Run the prefect CLI of this environment, non-interactive, in the checkout."""
    argv = [str(BIN / "prefect"), "--no-prompt", *args]
    try:
        done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise ServiceError(f"`prefect {' '.join(args)}` did not finish within {timeout_s:.0f} s") from None
    if check and done.returncode != 0:
        raise ServiceError(f"`prefect {' '.join(args)}` failed (status {done.returncode}):\n"
                           f"{(done.stdout + done.stderr).strip()[-2000:]}")
    return done


def work_pools(prefect_yaml: Path = ROOT / "prefect.yaml") -> list[str]:
    """The work pools prefect.yaml's deployments use, in order of appearance."""
    data = yaml.safe_load(prefect_yaml.read_text(encoding="utf-8")) or {}
    pools: list[str] = []
    for deployment in data.get("deployments") or []:
        name = ((deployment or {}).get("work_pool") or {}).get("name")
        if name and name not in pools:
            pools.append(name)
    return pools


def ensure_pool(name: str, settings: Settings, env: dict[str, str]) -> None:
    if http_ok(f"{settings.api_url}/work_pools/{name}"):
        return
    prefect(["work-pool", "create", "--type", "process", name], env)


# --- state file ----------------------------------------------------------------------------
def read_state(settings: Settings) -> dict | None:
    try:
        return json.loads(settings.state_file.read_text())
    except FileNotFoundError:
        return None
    except ValueError:
        raise ServiceError(f"{settings.state_file} is not valid JSON; stop the services listed in it "
                           f"by hand (see `ps`), then delete it") from None


def write_state(settings: Settings, state: dict) -> None:
    tmp = settings.state_file.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, settings.state_file)


def _running(state: dict) -> list[dict]:
    return [s for s in state.get("services", []) if alive(s["pid"], s.get("started"))]


def running_urls(settings: Settings) -> dict[str, str] | None:
    """The URLs ("prefect", "prefect_api", "mlflow") of the services `up` started, while every one of
    them still runs (for `slm run`'s closing hints); None otherwise."""
    state = read_state(settings)
    if not state or not state.get("services") or len(_running(state)) != len(state["services"]):
        return None
    return state.get("urls")


# --- commands ------------------------------------------------------------------------------
def up(settings: Settings) -> int:
    state = read_state(settings)
    if state is not None:
        running = _running(state)
        if running and len(running) == len(state.get("services", [])):
            print(f"already up ({settings.state_file}):")
            print_urls(state)
            return 0
        if running:
            names = ", ".join(s["name"] for s in running)
            raise ServiceError(f"only some services from {settings.state_file} are running ({names}); "
                               f"run `make down` then `make up`")
        settings.state_file.unlink()  # every recorded process is gone (e.g. after a reboot)

    for name, port in (("SLM_PREFECT_PORT", settings.prefect_port), ("SLM_MLFLOW_PORT", settings.mlflow_port)):
        if not port_free(port):
            raise ServiceError(f"port {port} on {HOST} is in use; stop what uses it or set {name} to a free port")
    settings.home.mkdir(parents=True, exist_ok=True)
    settings.prefect_home.mkdir(parents=True, exist_ok=True)
    env = settings.env()
    state = {
        "home": str(settings.home),
        "prefect_home": str(settings.prefect_home),
        "urls": {"prefect": settings.prefect_url, "prefect_api": settings.api_url, "mlflow": settings.mlflow_url},
        "services": [],
    }
    procs: dict[str, subprocess.Popen] = {}

    def start(name: str, argv: list[str]) -> subprocess.Popen:
        proc = spawn(name, argv, env, settings.logs)
        procs[name] = proc
        state["services"].append({"name": name, "pid": proc.pid, "started": start_time(proc.pid),
                                  "log": str(settings.logs / f"{name}.log")})
        write_state(settings, state)  # recorded at once: `down` can stop a half-finished `up`
        return proc

    try:
        clock = time.monotonic()
        server = start("prefect-server", [str(BIN / "prefect"), "server", "start", "--host", HOST,
                                          "--port", str(settings.prefect_port)])
        # MLflow starts while the Prefect server migrates its database.
        mlflow = start("mlflow", [str(BIN / "mlflow"), "server", "--host", HOST, "--port", str(settings.mlflow_port),
                                  "--backend-store-uri", f"sqlite:///{settings.home / 'mlflow.db'}",
                                  "--artifacts-destination", str(settings.home / "mlartifacts"),
                                  "--workers", "1"])
        seconds = wait_healthy("prefect server", f"{settings.api_url}/health", server,
                               settings.logs / "prefect-server.log")
        print(f"prefect server healthy in {seconds:.0f} s")
        prefect(["config", "set", f"PREFECT_API_URL={settings.api_url}"], env)
        state["api_url_set"] = True
        write_state(settings, state)
        for pool in work_pools():
            ensure_pool(pool, settings, env)
            start(f"worker-{pool}", [str(BIN / "prefect"), "worker", "start", "--pool", pool, "--type", "process"])
        prefect(["deploy", "--all"], env, timeout_s=DEPLOY_TIMEOUT_S)
        print("deployed prefect.yaml")
        wait_healthy("mlflow server", f"{settings.mlflow_url}/health", mlflow, settings.logs / "mlflow.log")
        for name, proc in procs.items():
            if proc.poll() is not None:
                log = settings.logs / f"{name}.log"
                raise ServiceError(f"{name} exited with status {proc.returncode}; see {log}:\n{tail(log)}")
        print(f"up in {time.monotonic() - clock:.0f} s")
    except BaseException:
        print("starting failed; stopping what was started", file=sys.stderr)
        down(settings, quiet=True)
        raise
    print_urls(state)
    return 0


def print_urls(state: dict) -> None:
    urls = state["urls"]
    print(f"  Prefect UI   {urls['prefect']}")
    print(f"  Prefect API  {urls['prefect_api']}")
    print(f"  MLflow UI    {urls['mlflow']}")
    print(f"  logs         {Path(state['home']) / 'logs'}")
    print("Run the pipeline on the worker (or use the UI's Run button):")
    print(f"  export PREFECT_API_URL={urls['prefect_api']}")
    print(f"  {BIN / 'prefect'} deployment run slm/full-pipeline -p profile=demo")
    print("Stop everything: make down")


def down(settings: Settings, quiet: bool = False) -> int:
    state = read_state(settings)
    if state is None:
        if not quiet:
            print(f"nothing to stop: no {settings.state_file}")
        return 0
    running, gone = [], []
    for service in state.get("services", []):
        (running if alive(service["pid"], service.get("started")) else gone).append(service)
    # Each service leads its own process group (pgid == pid). Flow runs a worker started (in
    # sessions of their own) go first, while the server can still record how they ended; the
    # server goes last.
    flow_runs = [child for s in running for child in session_children(s["pid"])]
    killed = stop_groups(flow_runs, grace_s=10.0)
    if flow_runs and not quiet:
        print(f"stopped {len(flow_runs)} running flow run(s)"
              + (f"; {len(killed)} did not stop in 10 s and were killed" if killed else ""))
    others = [s for s in running if s["name"] != "prefect-server"]
    server = [s for s in running if s["name"] == "prefect-server"]
    for group, grace in ((others, 5.0), (server, 15.0)):
        stop_groups([s["pid"] for s in group], grace_s=grace)
        for service in group:
            if not quiet:
                print(f"stopped {service['name']} (pid {service['pid']})")
    for service in gone:
        if not quiet:
            print(f"{service['name']} (pid {service['pid']}) was not running")
    if state.get("api_url_set"):
        env = settings.env()
        env.pop("PREFECT_API_URL")
        prefect(["config", "unset", "PREFECT_API_URL"], env, check=False)
    settings.state_file.unlink(missing_ok=True)
    return 0


def status(settings: Settings) -> int:
    state = read_state(settings)
    if state is None:
        print("not running (no services.json)")
        return 1
    for service in state.get("services", []):
        up_now = alive(service["pid"], service.get("started"))
        print(f"  {service['name']:<22} pid {service['pid']:<8} {'running' if up_now else 'stopped'}")
    print_urls(state)
    return 0 if len(_running(state)) == len(state.get("services", [])) else 1


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    commands = {"up": up, "down": down, "status": status}
    if len(args) != 1 or args[0] not in commands:
        print(f"usage: {Path(__file__).name} up|down|status", file=sys.stderr)
        return 2
    try:
        return commands[args[0]](Settings.from_env())
    except ServiceError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
