"""The Dockerfile installs what `make setup` installs: the Makefile's Debian packages (minus those its
header says it leaves out, each with a reason), `pip install -e .` with torch at pyproject's pin, and the
generated protobuf stubs; `testbed` is the entrypoint. Built when a container builder answers here."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    out, buf = [], ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        buf += line.rstrip("\\").rstrip() + " " if line.rstrip().endswith("\\") else line
        if not line.rstrip().endswith("\\"):
            word, _, rest = buf.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            buf = ""
    return out


def run_commands() -> list[list[str]]:
    """Every shell command of the RUN instructions, split on && into argument lists."""
    cmds = []
    for word, rest in instructions():
        if word == "RUN":
            cmds += [shlex.split(c) for c in rest.split("&&")]
    return cmds


def makefile_var(name: str) -> list[str]:
    text = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    m = re.search(rf"^{name}\s*:=\s*(.*)$", text, re.M)
    assert m, f"{name} not in the Makefile"
    return m.group(1).split()


def left_out() -> dict[str, str]:
    """Debian packages the Dockerfile's header says it does not install, with the reason."""
    return dict(re.findall(r"^#\s+not installed:\s+(\S+)\s+-\s+(.+)$", (ROOT / "Dockerfile").read_text(), re.M))


def test_debian_packages_are_the_makefiles_minus_the_justified():
    apt = [c for c in run_commands() if "apt-get" in c and "install" in c]
    assert len(apt) == 1
    installed = {w for w in apt[0][apt[0].index("install") + 1:] if not w.startswith("-")}
    deb, skipped = set(makefile_var("DEB_PKGS")), left_out()
    assert set(skipped) <= deb, "a left-out package that the Makefile does not install"
    assert all(len(reason) > 20 for reason in skipped.values())
    assert installed == deb - set(skipped)


def test_package_installed_as_make_setup_does():
    cmds = run_commands()
    # the Makefile: $(PY) -m pip install -q $$extra -e . 2>&1 | ...: its target, options aside
    targets = re.findall(r"pip install (?:(?:-\S+|\$\$\w+) )*?(-e \S+)", (ROOT / "Makefile").read_text())
    assert targets == ["-e ."]
    assert ["pip", "install", *targets[0].split()] in cmds
    pin = re.search(r'"torch==([^"]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", (ROOT / "Dockerfile").read_text(), re.M))
    assert args["TORCH_VERSION"] == pin and args["TORCH_INDEX"] == "https://download.pytorch.org/whl/cpu"
    torch = next(c for c in cmds if any(w.startswith("torch==") for w in c))
    assert torch[:2] == ["pip", "install"] and "--index-url" in torch
    # torch before the package, so that pip finds the pin satisfied by the CPU wheel
    assert cmds.index(torch) < cmds.index(["pip", "install", "-e", "."])


def test_protos_generated_and_entrypoint():
    cmds = run_commands()
    make_protos = re.search(r"^protos:.*\n\t@?\$\(PY\) (-m testbed\.protogen)", (ROOT / "Makefile").read_text(), re.M)
    assert make_protos and ["python", "-m", "testbed.protogen"] in cmds
    ins = dict(instructions())
    assert ins["FROM"] in ("python:3.11-slim-bookworm", "debian:bookworm-slim")
    assert ins["ENTRYPOINT"] == '["testbed"]'
    copied = {w for word, rest in instructions() if word == "COPY" for w in rest.split()[:-1]}
    assert {"pyproject.toml", "protos", "testbed"} <= copied
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert ".venv" in ignored and ".git" in ignored and "testbed/proto/*_pb2.py" in ignored


def _builder() -> str | None:
    """Why no image can be built here, or None."""
    if shutil.which("docker") is None:
        return "no docker client"
    r = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        return "docker info fails (no daemon reachable): " + (r.stderr.strip().splitlines() or ["?"])[-1][:200]
    return None


@pytest.mark.slow
def test_image_builds_and_runs():
    reason = _builder()
    if reason:
        pytest.skip(f"no container builder here: {reason}")
    tag = "testbed-test:latest"
    subprocess.run(["docker", "build", "-t", tag, str(ROOT)], check=True, timeout=3600)
    r = subprocess.run(["docker", "run", "--rm", "--network", "none", tag, "--help"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "usage: testbed COMMAND" in r.stdout
