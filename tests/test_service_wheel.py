"""The built wheel, installed in a fresh venv with only the thin client's dependencies, renders a
plist that names *that* environment's interpreter (and runs without mlx)."""

from __future__ import annotations

import os
import plistlib
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CLIENT_DEPS = ["click", "platformdirs", "msgpack", "rich"]


def run(argv: list[str], **kwargs) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, **kwargs)
    assert proc.returncode == 0, f"{argv}\n{proc.stdout}\n{proc.stderr}"
    return proc


def build_wheel(tmp_path: Path) -> Path:
    # Build from a copy: building in the shared tree would write build/ and *.egg-info there.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (REPO / name).exists():
            shutil.copy(REPO / name, src / name)
    for folder in ("daemon", "client", "launchd"):
        shutil.copytree(REPO / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp_path / "dist"
    try:
        import build  # noqa: F401  (in the test extra)

        run([sys.executable, "-m", "build", "--wheel", "--outdir", str(dist), str(src)])
    except ImportError:
        run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", str(dist), str(src)])
    (wheel,) = dist.glob("agentd-*.whl")
    return wheel


def test_wheel_in_a_fresh_venv_renders_its_own_interpreter(tmp_path):
    wheel = build_wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    for expected in (
        "agentctl/service/cli.py",
        "agentctl/service/__main__.py",
        "agentctl/service/com.agentd.agentd.plist",
        "agentctl/service/agentd.service",
        "agentd/notify.py",
    ):
        assert expected in names

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)])
    python = venv / "bin" / "python"
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    run([*pip, "--no-deps", str(wheel)])
    run([*pip, *CLIENT_DEPS])

    home = tmp_path / "home"
    home.mkdir()
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("AGENTD_", "PYTHON", "VIRTUAL_ENV", "XDG_"))
    }
    env.update(HOME=str(home), PATH="/usr/bin:/bin", AGENTD_SOCKET="/tmp/agentd-wheel-test/agentd.sock")
    proc = run(
        [str(python), "-m", "agentctl.service", "install", "--dry-run", "--target", "launchd"],
        env=env,
        cwd=tmp_path,  # not the repo: the source tree must not shadow the installed wheel
    )
    body = proc.stdout.split("\n", 1)[1].partition("# would run:\n")[0]
    plist = plistlib.loads(body.encode())
    assert plist["ProgramArguments"][:3] == [str(python), "-m", "agentd"]
    assert plist["EnvironmentVariables"]["HOME"] == str(home)

    # The client side works where mlx is not even installed.
    probe = run([str(python), "-c", "import importlib.util as u, agentctl.service.cli as c; "
                 "print(u.find_spec('mlx') is None, c.__file__)"], env=env, cwd=tmp_path)
    no_mlx, location = probe.stdout.split()
    assert no_mlx == "True"
    assert location.startswith(str(venv))
