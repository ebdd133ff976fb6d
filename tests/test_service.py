"""`agentctl service` against fake launchctl and systemctl executables placed first on PATH.

The fakes record every call to calls.jsonl and keep just enough state (loaded? active?) to
answer `print`, `show` and `is-active` like the real tools. HOME points into tmp_path, so
nothing here touches the real home or the real service managers.
"""

from __future__ import annotations

import importlib.util
import json
import os
import plistlib
import shlex
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from agentctl.cli import cli as agentctl_cli  # imported before `env` hides agentctl.client
from agentctl.service import examples
from agentctl.service.cli import service
from agentctl.service.files import write_atomic
from agentctl.service.manager import Launchd
from agentctl.service.spec import STOP_TIMEOUT_SECONDS, ServiceSpec, build_spec
from agentctl.service.systemd import read_environment, read_exec_start, render_unit

UID = os.getuid()
LABEL = "com.agentd.agentd"
SERVICE = f"gui/{UID}/{LABEL}"

FAKE_LAUNCHCTL = r'''
verb = args[0] if args else ""
loaded = os.path.join(STATE, "launchd-loaded.plist")
pidfile = os.path.join(STATE, "pid")

def launch():
    # Only when told to: start ProgramArguments as launchd would, with nothing but the
    # plist's environment and launchd's bare PATH.
    if not os.path.exists(os.path.join(STATE, "launch")):
        return
    with open(loaded, "rb") as f:
        job = plistlib.load(f)
    env = {"PATH": "/usr/bin:/bin", **job["EnvironmentVariables"]}
    with open(job["StandardOutPath"], "ab") as out, open(job["StandardErrorPath"], "ab") as err:
        proc = subprocess.Popen(job["ProgramArguments"], env=env, stdout=out, stderr=err,
                                stdin=subprocess.DEVNULL, cwd="/", start_new_session=True)
    open(pidfile, "w").write(str(proc.pid))

def stop():
    if not os.path.exists(pidfile):
        return
    pid = int(open(pidfile).read())
    os.remove(pidfile)
    try:
        os.kill(pid, signal.SIGTERM)
        for _ in range(600):  # ExitTimeOut
            os.kill(pid, 0)
            try:  # reparented to a pid 1 that may not reap: a zombie has exited
                if open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z":
                    return
            except OSError:
                pass
            time.sleep(0.1)
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
if verb == "print":
    if not os.path.exists(loaded):
        fail(f'Bad request.\nCould not find service "{args[1].rsplit("/", 1)[-1]}" in domain for port', 113)
    pid = open(pidfile).read() if os.path.exists(pidfile) else "4242"
    print(f"{args[1]} = {{\n\tactive count = 1\n\tstate = running\n\n\tpid = {pid}\n"
          f"\tlast exit code = 0\n\n\tendpoints = {{\n\t\tstate = nested\n\t\tpid = 1\n\t}}\n}}")
elif verb == "bootstrap":
    if countdown("fail-bootstrap") or os.path.exists(loaded):
        fail("Bootstrap failed: 5: Input/output error", 5)
    with open(args[2], "rb") as f:
        plistlib.load(f)
    shutil.copy(args[2], loaded)
    launch()
elif verb == "bootout":
    if not os.path.exists(loaded):
        fail("Boot-out failed: 3: No such process", 3)
    stop()
    os.remove(loaded)
elif verb == "kickstart":
    if not os.path.exists(loaded):
        fail("Could not find service", 113)
    if "-k" in args:
        stop()
    launch()
elif verb != "enable":
    fail(f"Unrecognized subcommand: {verb}", 64)
'''

FAKE_SYSTEMCTL = r'''
if args[:1] != ["--user"]:
    fail("fake systemctl: only --user is expected", 2)
verb = args[1]
active = os.path.join(STATE, "systemd-active")
unit = os.path.join(os.environ["HOME"], ".config/systemd/user/agentd.service")
def touch(path):
    open(path, "w").close()
if verb == "daemon-reload":
    pass
elif verb == "enable":
    if not os.path.exists(unit):
        fail("Failed to enable unit: Unit file agentd.service does not exist.", 1)
    if "--now" in args:
        touch(active)
elif verb == "disable":
    if "--now" in args and os.path.exists(active):
        os.remove(active)
elif verb == "restart":
    if not os.path.exists(unit):
        fail("Failed to restart agentd.service: Unit agentd.service not found.", 5)
    touch(active)
elif verb == "is-active":
    on = os.path.exists(active)
    if "--quiet" not in args:
        print("active" if on else "inactive")
    sys.exit(0 if on else 3)
elif verb == "show":
    on = os.path.exists(active)
    print(f"LoadState={'loaded' if os.path.exists(unit) else 'not-found'}")
    print(f"ActiveState={'active' if on else 'inactive'}")
    print(f"SubState={'running' if on else 'dead'}")
    print(f"MainPID={4243 if on else 0}")
    print("ExecMainCode=1")
    print("ExecMainStatus=0")
else:
    fail(f"Unknown command verb {verb}.", 1)
'''

PRELUDE = r'''
import json, os, plistlib, shutil, signal, subprocess, sys, time
STATE = {state!r}
args = sys.argv[1:]
with open(os.path.join(STATE, "calls.jsonl"), "a") as f:
    f.write(json.dumps([{name!r}, *args]) + "\n")
def fail(message, code):
    sys.stderr.write(message + "\n")
    sys.exit(code)
def countdown(name):
    path = os.path.join(STATE, name)
    if not os.path.exists(path):
        return False
    left = int(open(path).read())
    if left <= 0:
        return False
    open(path, "w").write(str(left - 1))
    return True
refusal = os.path.join(STATE, "refuse-" + (args[0] if args[0] != "--user" else args[1]))
if os.path.exists(refusal):
    code, _, message = open(refusal).read().partition(" ")
    fail(message, int(code))
'''


class Fakes:
    """Fake launchctl/systemctl on PATH; the calls they saw and switches to make them fail."""

    def __init__(self, root: Path):
        self.bin = root / "bin"
        self.state = root / "state"
        self.bin.mkdir()
        self.state.mkdir()
        for name, body in (("launchctl", FAKE_LAUNCHCTL), ("systemctl", FAKE_SYSTEMCTL)):
            script = self.bin / name
            script.write_text(f"#!{sys.executable}\n" + PRELUDE.format(state=str(self.state), name=name) + body)
            script.chmod(0o755)

    def calls(self) -> list[list[str]]:
        log = self.state / "calls.jsonl"
        if not log.exists():
            return []
        return [json.loads(line) for line in log.read_text().splitlines()]

    def reset_calls(self) -> None:
        (self.state / "calls.jsonl").unlink(missing_ok=True)

    def fail_bootstrap(self, times: int) -> None:
        (self.state / "fail-bootstrap").write_text(str(times))

    def launch_for_real(self) -> None:
        """bootstrap/kickstart start ProgramArguments; bootout sends SIGTERM and waits."""
        (self.state / "launch").touch()

    def refuse(self, verb: str, code: int, message: str) -> None:
        (self.state / f"refuse-{verb}").write_text(f"{code} {message}")


@pytest.fixture
def short_dir():
    # Socket paths are length-limited; pytest's tmp_path can be long.
    path = Path(tempfile.mkdtemp(prefix="agsvc-", dir="/tmp"))
    yield path
    for child in sorted(path.rglob("*"), reverse=True):
        child.unlink() if not child.is_dir() or child.is_symlink() else child.rmdir()
    path.rmdir()


@pytest.fixture
def env(tmp_path, short_dir, monkeypatch):
    """HOME in tmp_path, fakes first on PATH, a pinned short socket, no stray AGENTD_*/XDG_*."""
    fakes = Fakes(tmp_path)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("PATH", f"{fakes.bin}{os.pathsep}{os.environ['PATH']}")
    for var in ("AGENTD_HOME", "AGENTD_MODEL", "XDG_STATE_HOME", "XDG_RUNTIME_DIR", "XDG_CONFIG_HOME", "NOTIFY_SOCKET"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AGENTD_SOCKET", str(short_dir / "agentd.sock"))
    # The fallback ping ("accepts a connect()") is what these tests exercise.
    monkeypatch.setitem(sys.modules, "agentctl.client", None)
    fakes.home = home
    fakes.socket = short_dir / "agentd.sock"
    return fakes


def invoke(*args: str):
    return CliRunner().invoke(service, list(args), catch_exceptions=False)


def plist_file(home: Path) -> Path:
    return home / "Library" / "LaunchAgents" / f"{LABEL}.plist"


def unit_file(home: Path) -> Path:
    return home / ".config" / "systemd" / "user" / "agentd.service"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ---------------------------------------------------------------- launchd


def test_launchd_install_writes_plist_and_bootstraps(env):
    model = env.home / "models" / "tiny"
    model.mkdir(parents=True)
    data = env.home / "data"
    result = invoke("install", "--target", "launchd", "--no-wait", "--model", str(model), "--home", str(data))
    assert result.exit_code == 0, result.output
    assert env.calls() == [
        ["launchctl", "print", SERVICE],
        ["launchctl", "enable", SERVICE],
        ["launchctl", "bootstrap", f"gui/{UID}", str(plist_file(env.home))],
    ]
    path = plist_file(env.home)
    assert mode(path) == 0o644
    with path.open("rb") as f:
        plist = plistlib.load(f)
    logs = env.home / "Library" / "Logs" / "agentd"
    assert set(plist) == {
        "Label", "ProgramArguments", "RunAtLoad", "KeepAlive", "ThrottleInterval", "ProcessType",
        "ExitTimeOut", "StandardOutPath", "StandardErrorPath", "EnvironmentVariables",
    }
    assert plist["Label"] == LABEL
    assert plist["ProgramArguments"] == [
        sys.executable, "-m", "agentd",
        "--home", str(data), "--socket", str(env.socket), "--model", str(model),
    ]
    assert Path(plist["ProgramArguments"][0]).is_absolute()
    assert plist["RunAtLoad"] is True
    assert plist["KeepAlive"] == {"SuccessfulExit": False}
    assert isinstance(plist["ThrottleInterval"], int) and plist["ThrottleInterval"] >= 5
    assert plist["ProcessType"] == "Interactive"
    assert plist["ExitTimeOut"] == STOP_TIMEOUT_SECONDS >= 30
    assert plist["StandardOutPath"] == str(logs / "stdout.log")
    assert plist["StandardErrorPath"] == str(logs / "stderr.log")
    assert plist["EnvironmentVariables"] == {
        "PYTHONUNBUFFERED": "1",
        "HOME": str(env.home),
        "AGENTD_HOME": str(data),
        "AGENTD_SOCKET": str(env.socket),
        "AGENTD_MODEL": str(model),
    }
    assert logs.is_dir()  # launchd will not create it
    assert not data.exists()  # the daemon creates its own home
    assert not any(p.name.endswith(".partial") for p in path.parent.iterdir())


def test_launchd_model_is_optional_and_env_defaults_apply(env, monkeypatch):
    monkeypatch.setenv("AGENTD_HOME", str(env.home / "from-env"))
    assert invoke("install", "--target", "launchd", "--no-wait").exit_code == 0
    with plist_file(env.home).open("rb") as f:
        plist = plistlib.load(f)
    assert "--model" not in plist["ProgramArguments"]
    assert "AGENTD_MODEL" not in plist["EnvironmentVariables"]
    assert plist["EnvironmentVariables"]["AGENTD_HOME"] == str(env.home / "from-env")


def test_launchd_install_waits_until_the_socket_answers(env):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(env.socket))
        listener.listen(8)
        result = invoke("install", "--target", "launchd", "--timeout", "5")
    assert result.exit_code == 0, result.output
    assert f"agentd is running and answering on {env.socket}" in result.output


def test_launchd_install_reports_a_daemon_that_never_answers(env):
    result = CliRunner().invoke(service, ["install", "--target", "launchd", "--timeout", "0.3"])
    assert result.exit_code == 1
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("Error: agentd did not answer on")
    assert str(env.home / "Library" / "Logs" / "agentd" / "stderr.log") in last


def test_launchd_retries_bootstrap_failed_5(env):
    env.fail_bootstrap(1)
    result = invoke("install", "--target", "launchd", "--no-wait")
    assert result.exit_code == 0, result.output
    bootstrap = ["launchctl", "bootstrap", f"gui/{UID}", str(plist_file(env.home))]
    assert env.calls() == [
        ["launchctl", "print", SERVICE],
        ["launchctl", "enable", SERVICE],
        bootstrap,  # fails: 5
        ["launchctl", "bootout", SERVICE],
        ["launchctl", "print", SERVICE],  # waits until launchd has forgotten it
        bootstrap,
    ]


def test_launchd_retry_is_bounded(env, monkeypatch):
    monkeypatch.setattr(Launchd, "RETRY_DELAY", 0.0)
    env.fail_bootstrap(100)
    result = CliRunner().invoke(service, ["install", "--target", "launchd", "--no-wait"])
    assert result.exit_code == 1
    assert [c[1] for c in env.calls()].count("bootstrap") == Launchd.ATTEMPTS
    lines = result.output.strip().splitlines()
    assert lines[-1].startswith("Error: `launchctl bootstrap")
    assert "Bootstrap failed: 5: Input/output error" in lines[-1]


def test_launchd_reinstall_boots_out_the_loaded_job_first(env):
    assert invoke("install", "--target", "launchd", "--no-wait").exit_code == 0
    env.reset_calls()
    assert invoke("install", "--target", "launchd", "--no-wait").exit_code == 0
    assert env.calls() == [
        ["launchctl", "print", SERVICE],
        ["launchctl", "bootout", SERVICE],
        ["launchctl", "print", SERVICE],
        ["launchctl", "enable", SERVICE],
        ["launchctl", "bootstrap", f"gui/{UID}", str(plist_file(env.home))],
    ]


def test_launchd_other_refusals_are_one_line_and_not_retried(env):
    env.refuse("bootstrap", 125, "Bootstrap failed: 125: Domain does not support specified action")
    result = CliRunner().invoke(service, ["install", "--target", "launchd", "--no-wait"])
    assert result.exit_code == 1
    assert [c[1] for c in env.calls()].count("bootstrap") == 1
    assert result.output.strip().splitlines()[-1] == (
        f"Error: `launchctl bootstrap gui/{UID} {plist_file(env.home)}` failed (exit 125): "
        "Bootstrap failed: 125: Domain does not support specified action"
    )


def test_missing_launchctl_is_a_clear_message(env, monkeypatch, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    for command in (["install", "--no-wait"], ["uninstall"], ["restart"]):
        result = CliRunner().invoke(service, [*command, "--target", "launchd"])
        assert result.exit_code == 1, command
        assert result.output.startswith("Error: launchctl not found on PATH: launchd services need macOS")
        assert len(result.output.strip().splitlines()) == 1
    assert not (env.home / "Library").exists()  # nothing written when launchctl is missing
    # status still reports what it can see, with the reason for the rest.
    result = CliRunner().invoke(service, ["status", "--target", "launchd"])
    assert result.exit_code == 0
    assert result.output.strip().splitlines()[-1].startswith("error      launchctl not found on PATH")


def test_launchd_uninstall_boots_out_and_keeps_data(env):
    data = env.home / "data"
    assert invoke("install", "--target", "launchd", "--no-wait", "--home", str(data)).exit_code == 0
    data.mkdir()
    (data / "agent.safetensors").write_bytes(b"kv")
    env.reset_calls()
    result = invoke("uninstall", "--target", "launchd")
    assert result.exit_code == 0
    assert "removed" in result.output
    assert env.calls() == [
        ["launchctl", "print", SERVICE],
        ["launchctl", "bootout", SERVICE],
        ["launchctl", "print", SERVICE],
    ]
    assert not plist_file(env.home).exists()
    assert (data / "agent.safetensors").read_bytes() == b"kv"
    assert invoke("uninstall", "--target", "launchd").output == f"{LABEL} was not installed\n"


def test_launchd_status(env):
    result = invoke("status", "--target", "launchd", "--json")
    report = json.loads(result.output)
    assert report["installed"] is False and report["loaded"] is False and report["running"] is False
    assert report["pid"] is None and report["answering"] is False

    assert invoke("install", "--target", "launchd", "--no-wait").exit_code == 0
    report = json.loads(invoke("status", "--target", "launchd", "--json").output)
    logs = env.home / "Library" / "Logs" / "agentd"
    assert report == {
        "target": "launchd",
        "name": LABEL,
        "file": str(plist_file(env.home)),
        "installed": True,
        "loaded": True,
        "running": True,
        "pid": 4242,
        "last_exit": "0",
        "logs": [str(logs / "stderr.log"), str(logs / "stdout.log")],
        "socket": str(env.socket),
        "answering": False,
        "error": None,
    }
    text = invoke("status", "--target", "launchd").output
    assert "running    yes (pid 4242)" in text
    assert "last exit  0" in text
    assert str(logs / "stderr.log") in text


def test_launchd_restart_kickstarts(env):
    result = CliRunner().invoke(service, ["restart", "--target", "launchd", "--no-wait"])
    assert result.exit_code == 1
    assert "is not loaded; run `agentctl service install` first" in result.output
    assert invoke("install", "--target", "launchd", "--no-wait").exit_code == 0
    env.reset_calls()
    assert invoke("restart", "--target", "launchd", "--no-wait").exit_code == 0
    assert env.calls() == [["launchctl", "print", SERVICE], ["launchctl", "kickstart", "-k", SERVICE]]


# ---------------------------------------------------------------- systemd


def expected_unit(python: str, home: Path, data: Path, sock: Path, model: Path | None) -> list[str]:
    model_args = f" --model {model}" if model else ""
    return [
        "[Unit]",
        "Description=agentd: LLM agents whose KV caches survive restarts",
        "",
        "[Service]",
        "Type=notify",
        f"ExecStart={python} -m agentd --home {data} --socket {sock}{model_args}",
        "Environment=PYTHONUNBUFFERED=1",
        f"Environment=HOME={home}",
        f"Environment=AGENTD_HOME={data}",
        f"Environment=AGENTD_SOCKET={sock}",
        *([f"Environment=AGENTD_MODEL={model}"] if model else []),
        "Restart=on-failure",
        "RestartSec=10",
        "RestartPreventExitStatus=78",
        "TimeoutStartSec=300",
        f"TimeoutStopSec={STOP_TIMEOUT_SECONDS}",
        "",
        "[Install]",
        "WantedBy=default.target",
    ]


def test_systemd_install_writes_unit_and_enables(env):
    model = env.home / "tiny"
    data = env.home / "data"
    result = invoke("install", "--target", "systemd", "--no-wait", "--model", str(model), "--home", str(data))
    assert result.exit_code == 0, result.output
    assert env.calls() == [
        ["systemctl", "--user", "is-active", "--quiet", "agentd.service"],
        ["systemctl", "--user", "daemon-reload"],
        ["systemctl", "--user", "enable", "--now", "agentd.service"],
    ]
    path = unit_file(env.home)
    assert mode(path) == 0o644
    assert path.read_text().splitlines() == expected_unit(sys.executable, env.home, data, env.socket, model)


def test_systemd_reinstall_restarts_a_running_unit(env):
    assert invoke("install", "--target", "systemd", "--no-wait").exit_code == 0
    env.reset_calls()
    assert invoke("install", "--target", "systemd", "--no-wait").exit_code == 0
    assert env.calls() == [
        ["systemctl", "--user", "is-active", "--quiet", "agentd.service"],
        ["systemctl", "--user", "daemon-reload"],
        ["systemctl", "--user", "enable", "--now", "agentd.service"],
        ["systemctl", "--user", "restart", "agentd.service"],
    ]


def test_systemd_uninstall_status_restart(env):
    report = json.loads(invoke("status", "--target", "systemd", "--json").output)
    assert (report["installed"], report["loaded"], report["running"], report["pid"]) == (False, False, False, None)
    assert CliRunner().invoke(service, ["restart", "--target", "systemd"]).exit_code == 1

    data = env.home / "data"
    assert invoke("install", "--target", "systemd", "--no-wait", "--home", str(data)).exit_code == 0
    report = json.loads(invoke("status", "--target", "systemd", "--json").output)
    assert report["installed"] and report["loaded"] and report["running"]
    assert report["pid"] == 4243 and report["last_exit"] == "0"
    assert report["logs"] == ["journalctl --user -u agentd.service", str(data / "log")]
    assert report["socket"] == str(env.socket)

    env.reset_calls()
    assert invoke("restart", "--target", "systemd", "--no-wait").exit_code == 0
    assert env.calls() == [["systemctl", "--user", "restart", "agentd.service"]]

    env.reset_calls()
    assert invoke("uninstall", "--target", "systemd").exit_code == 0
    assert env.calls() == [
        ["systemctl", "--user", "disable", "--now", "agentd.service"],
        ["systemctl", "--user", "daemon-reload"],
    ]
    assert not unit_file(env.home).exists()


def test_systemd_refusal_is_one_line(env):
    env.refuse("daemon-reload", 1, "Failed to connect to bus: No medium found")
    result = CliRunner().invoke(service, ["install", "--target", "systemd", "--no-wait"])
    assert result.exit_code == 1
    assert result.output == (
        "Error: `systemctl --user daemon-reload` failed (exit 1): Failed to connect to bus: No medium found\n"
    )


def test_status_survives_a_refusing_service_manager(env):
    assert invoke("install", "--target", "systemd", "--no-wait").exit_code == 0
    env.refuse("show", 1, "Failed to connect to bus: No medium found")
    result = invoke("status", "--target", "systemd")
    assert result.exit_code == 0
    assert "loaded     unknown" in result.output
    assert "file       " + str(unit_file(env.home)) + " (installed)" in result.output
    assert result.output.strip().splitlines()[-1].endswith("Failed to connect to bus: No medium found")


def test_missing_systemctl_is_a_clear_message(env, monkeypatch, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    result = CliRunner().invoke(service, ["install", "--target", "systemd", "--no-wait"])
    assert result.exit_code == 1
    assert result.output.startswith("Error: systemctl not found on PATH:")


def test_exec_start_quoting_round_trips():
    spec = ServiceSpec(
        python="/Users/a b/.venv/bin/python",
        user_home=Path("/Users/a b"),
        home=Path("/Users/a b/Library/Application Support/agentd 100%"),
        socket=Path("/tmp/$x/agentd.sock"),
        log_dir=Path("/Users/a b/Library/Logs/agentd"),
        model=Path('/m/it\'s "q"\\x'),
    )
    unit = render_unit(spec)
    assert read_exec_start(unit) == spec.program_arguments()
    assert read_environment(unit) == spec.environment()
    assert "100%%" in unit and "$$x" in unit
    # Environment= expands no variables, so "$" stays single there.
    assert "Environment=AGENTD_SOCKET=/tmp/$x/agentd.sock" in unit.splitlines()


# ---------------------------------------------------------------- both


@pytest.mark.parametrize("target", ["launchd", "systemd"])
def test_dry_run_prints_the_file_and_commands_and_touches_nothing(env, monkeypatch, tmp_path, target):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))  # dry-run must not need launchctl/systemctl
    result = invoke("install", "--target", target, "--dry-run")
    assert result.exit_code == 0, result.output
    assert not (env.home / "Library").exists() and not (env.home / ".config").exists()
    out = result.output
    path = plist_file(env.home) if target == "launchd" else unit_file(env.home)
    assert out.startswith(f"# would write {path} (mode 0644):\n")
    body, _, commands = out.partition("# would run:\n")
    body = body.split("\n", 1)[1]
    spec = build_spec(target)
    if target == "launchd":
        assert plistlib.loads(body.encode())["ProgramArguments"] == spec.program_arguments()
        assert commands.splitlines() == [
            f"launchctl bootout {SERVICE}  # only if already loaded",
            f"launchctl enable {SERVICE}",
            f"launchctl bootstrap gui/{UID} {path}",
        ]
    else:
        assert body == render_unit(spec)
        assert commands.splitlines() == [
            "systemctl --user daemon-reload",
            "systemctl --user enable --now agentd.service",
            "systemctl --user restart agentd.service  # only if it was already running",
        ]
    # What dry-run shows is what install writes.
    monkeypatch.setenv("PATH", f"{env.bin}{os.pathsep}{os.environ['PATH']}")
    assert invoke("install", "--target", target, "--no-wait").exit_code == 0
    assert path.read_text() == body


def test_socket_path_too_long_is_refused(env):
    long = "/tmp/" + "s" * 120 + "/agentd.sock"
    result = CliRunner().invoke(service, ["install", "--dry-run", "--socket", long])
    assert result.exit_code == 1
    assert "is longer than" in result.output


def test_examples_match_the_renderers():
    for path, data in examples.examples().items():
        assert path.read_bytes() == data, f"{path.name} drifted: run python -m agentctl.service.examples"


def test_write_atomic_sets_mode_despite_umask(tmp_path):
    target = tmp_path / "a" / "file.plist"
    old = os.umask(0o077)
    try:
        write_atomic(target, b"one")
        write_atomic(target, b"two")
    finally:
        os.umask(old)
    assert target.read_bytes() == b"two"
    assert mode(target) == 0o644
    assert [p.name for p in target.parent.iterdir()] == ["file.plist"]


def subprocess_env(env) -> dict[str, str]:
    return {**os.environ, "HOME": str(env.home), "AGENTD_SOCKET": str(env.socket)}


def test_as_a_subprocess(env):
    """The real entry point, `python -m agentctl.service`, in its own process."""
    run = [sys.executable, "-m", "agentctl.service"]
    proc = subprocess.run([*run, "install", "--target", "launchd", "--no-wait"],
                          env=subprocess_env(env), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert f"installed {plist_file(env.home)}" in proc.stderr
    with plist_file(env.home).open("rb") as f:
        assert plistlib.load(f)["ProgramArguments"][0] == sys.executable
    proc = subprocess.run([*run, "status", "--target", "launchd", "--json"],
                          env=subprocess_env(env), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["pid"] == 4242
    proc = subprocess.run([*run, "uninstall", "--target", "launchd"],
                          env=subprocess_env(env), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert [c[1] for c in env.calls()] == [
        "print", "enable", "bootstrap", "print", "print", "bootout", "print",
    ]
    proc = subprocess.run([*run, "restart", "--target", "launchd", "--no-wait"],
                          env=subprocess_env(env), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"Error: {LABEL} is not loaded; run `agentctl service install` first"
    ]


def test_the_service_commands_never_import_mlx(env):
    code = textwrap.dedent("""
        import sys
        from click.testing import CliRunner
        from agentctl.service.cli import service
        import agentctl.service.__main__, agentctl.service.examples
        for target in ("launchd", "systemd"):
            result = CliRunner().invoke(service, ["install", "--dry-run", "--target", target])
            assert result.exit_code == 0, result.output
        CliRunner().invoke(service, ["status", "--target", "systemd"])
        from pathlib import Path
        from agentctl.service.ready import ping
        assert ping(Path("/nonexistent/agentd.sock")) is False  # imports agentctl.client if present
        loaded = sorted(m for m in sys.modules if m == "mlx" or m.startswith(("mlx.", "mlx_lm")))
        assert not loaded, loaded
    """)
    proc = subprocess.run([sys.executable, "-c", code], env=subprocess_env(env),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def daemon_available() -> bool:
    try:
        return importlib.util.find_spec("agentd.cli") is not None
    except ImportError:
        return False


@pytest.mark.skipif(not daemon_available(), reason="the daemon (agentd.cli) is not written yet")
def test_launchd_end_to_end_with_the_real_daemon(env, monkeypatch, request):
    """The fake launchctl starts ProgramArguments with only the plist's environment, as launchd
    does; install waits for a real ping, restart brings up a new pid, uninstall stops it."""
    model = os.environ.get("AGENTD_TEST_TINY_MODEL")
    if not model:
        try:
            model = str(request.getfixturevalue("tiny_llama_dir"))  # tests/conftest.py
        except pytest.FixtureLookupError:
            pytest.skip("no tiny model: set AGENTD_TEST_TINY_MODEL or provide tiny_llama_dir")
    monkeypatch.delitem(sys.modules, "agentctl.client")  # the real client this time
    env.launch_for_real()
    data = env.home / "data"
    try:
        result = invoke("install", "--target", "launchd", "--model", model, "--home", str(data), "--timeout", "120")
        assert result.exit_code == 0, result.output
        assert f"agentd is running and answering on {env.socket}" in result.output
        first = json.loads(invoke("status", "--target", "launchd", "--json").output)
        assert first["running"] and first["answering"] and first["pid"] != 4242

        result = invoke("restart", "--target", "launchd", "--timeout", "120")
        assert result.exit_code == 0, result.output
        second = json.loads(invoke("status", "--target", "launchd", "--json").output)
        assert second["answering"] and second["pid"] != first["pid"]
    finally:
        result = invoke("uninstall", "--target", "launchd")
    assert result.exit_code == 0
    assert not env.socket.exists()  # the daemon shut down cleanly and removed it
    report = json.loads(invoke("status", "--target", "launchd", "--json").output)
    assert not report["installed"] and not report["loaded"] and not report["answering"]


def test_issue16_item14_agentctl_json_service_status_prints_one_json_object(env):
    """issue 16 item 14: `agentctl --json service status` printed the text table."""
    result = CliRunner().invoke(agentctl_cli, ["--json", "service", "status", "--target", "systemd"],
                                catch_exceptions=False)
    assert result.exit_code == 0
    report = json.loads(result.stdout)
    assert report["target"] == "systemd" and report["installed"] is False
