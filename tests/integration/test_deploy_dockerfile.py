"""The Dockerfile's build steps, replayed in a clean virtualenv (there is no Docker engine here).

Each RUN of the build stage runs as written, with only the image paths moved under a temporary
directory and `python` being this machine's Python 3.11 (the image's is 3.11 too). The result
must start (`celery-fleet --version`), import the whole operator, and ship an elector that the
beat pod's init container can copy and that runs on the standard library alone.
"""

from __future__ import annotations

import os
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from celery_fleet import __version__
from celery_fleet.api.models import parse_beat
from celery_fleet.planning.beat_workload import ELECTOR_PATH, ELECTOR_SOURCE, beat_pod_template
from tests.support.cluster import ROOT
from tests.unit.test_dockerfile import Stage, parse

pytestmark = pytest.mark.integration

IMAGE_ROOT = "/opt/celery-fleet"


def _relocate(command: str, image_root: Path, scratch: Path) -> str:
    # /tmp/ first: the relocated paths themselves live under /tmp.
    return command.replace("/tmp/", f"{scratch}/").replace(IMAGE_ROOT, str(image_root))


@pytest.mark.timeout(300)
def test_build_steps_install_a_working_operator(tmp_path: Path) -> None:
    _, stages = parse((ROOT / "Dockerfile").read_text())
    build: Stage = stages[0]
    image_root, scratch, src = tmp_path / "opt" / "celery-fleet", tmp_path / "tmp", tmp_path / "src"
    for d in (image_root.parent, scratch, src):
        d.mkdir()
    # `python` in the image is the base interpreter; here, this test's Python 3.11.
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "python").symlink_to(sys.executable)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "VIRTUAL_ENV", "PYTHON"))}
    env["PATH"] = f"{shim}{os.pathsep}{env.get('PATH', '')}"
    for ins in build.instructions:
        if ins.keyword == "ENV":
            for pair in shlex.split(ins.value):
                key, _, value = pair.partition("=")
                # The image builds without a pip cache; reruns of this test may use one.
                if key != "PIP_NO_CACHE_DIR":
                    env[key] = value
        elif ins.keyword == "COPY":
            *sources, _dest = shlex.split(ins.value)
            for source in sources:
                target = src / source
                if (ROOT / source).is_dir():
                    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
                    shutil.copytree(ROOT / source, target, ignore=ignore, dirs_exist_ok=True)
                else:
                    shutil.copy2(ROOT / source, target)
        elif ins.keyword == "RUN":
            command = _relocate(ins.value, image_root, scratch)
            proc = subprocess.run(
                ["bash", "-euo", "pipefail", "-c", command], cwd=src, env=env, capture_output=True, text=True
            )
            assert proc.returncode == 0, f"Dockerfile line {ins.line} failed:\n{command}\n{proc.stdout}{proc.stderr}"

    venv_bin = image_root / "venv" / "bin"
    version = subprocess.run([venv_bin / "celery-fleet", "--version"], capture_output=True, text=True, check=True)
    assert version.stdout.strip() == f"celery-fleet {__version__}"
    # The whole runtime imports from the lock file's packages (kopf, kubernetes, redis, celery...).
    subprocess.run(
        [venv_bin / "python", "-c", "import celery_fleet.cli, celery_fleet.handlers.kopf_handlers, celery"],
        check=True,
        env={"PATH": str(venv_bin)},
        cwd=tmp_path,
    )

    # The elector: world-readable where the init container looks, copied by its exact command.
    elector = Path(_relocate(ELECTOR_SOURCE, image_root, scratch))
    assert stat.S_IMODE(elector.stat().st_mode) == 0o444
    pod = beat_pod_template("nightly", parse_beat({"app": "a:app", "image": "x", "broker": {"url": "redis://r"}}), "x")
    (init,) = pod["spec"]["initContainers"]
    copied = tmp_path / "emptydir" / Path(ELECTOR_PATH).name
    copied.parent.mkdir()
    command = [_relocate(arg, image_root, scratch) for arg in init["command"]]
    command = [str(copied) if arg == ELECTOR_PATH else arg for arg in command]
    assert str(elector) in command, command
    subprocess.run([venv_bin / "python3", *command[1:]], check=True)
    # -I -S: no site-packages, no environment; the user's image promises only the standard library.
    help_text = subprocess.run(
        [sys.executable, "-I", "-S", str(copied), "--help", "--", "true"], capture_output=True, text=True, check=True
    ).stdout
    assert "--lease" in help_text
