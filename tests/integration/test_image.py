"""The built operator image, run: what users get, not the checkout.

`hack/image.sh build` builds it (docker where an engine runs, else buildah on the local Debian
base of hack/image-base.sh; both cached, so a warm rebuild takes seconds) and the tests run it
with `hack/image.sh engine` (podman with runc here) as the image's own user, root filesystem
read-only, no network.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import subprocess
import tarfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.markers import Marker

from celery_fleet import __version__
from celery_fleet.planning.beat_workload import ELECTOR_SOURCE
from tests.support.cluster import ROOT, Cluster
from tests.support.operator_process import OperatorProcess
from tests.support.redis_server import RedisServer
from tests.support.wait import wait_for

pytestmark = pytest.mark.integration

HACK = ROOT / "hack" / "image.sh"
# Names a compiler or build toolchain would leave on PATH.
TOOLCHAIN = re.compile(
    r"^(usr/)?(local/)?s?bin/(gcc|g\+\+|cc|c\+\+|cpp|clang|ld|as|make|rustc|cargo)(-[\d.]+)?$"
    r"|-linux-gnu-(gcc|g\+\+|ld|as)"
)
MARKER_ENV = """
import json, os, platform, sys
print(json.dumps({
    "implementation_name": sys.implementation.name,
    "implementation_version": platform.python_version(),
    "os_name": os.name,
    "platform_machine": platform.machine(),
    "platform_python_implementation": platform.python_implementation(),
    "platform_release": platform.release(),
    "platform_system": platform.system(),
    "platform_version": platform.version(),
    "python_full_version": platform.python_version(),
    "python_version": ".".join(platform.python_version_tuple()[:2]),
    "sys_platform": sys.platform,
}))
"""


@dataclass
class Image:
    ref: str
    engine: list[str]

    def run(self, *args: str, entrypoint: str | None = None, extra: tuple[str, ...] = ()) -> str:
        # Read-only root, no network, the image's own USER; ulimits set because this sandbox
        # refuses to raise them to the runtime's defaults.
        command = [*self.engine, "run", "--rm", "--read-only", "--network", "none"]
        command += ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024", *extra]
        if entrypoint:
            command += ["--entrypoint", entrypoint]
        proc = subprocess.run([*command, self.ref, *args], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"{' '.join(command)} {self.ref} {' '.join(args)}:\n{proc.stdout}{proc.stderr}"
        return proc.stdout

    def inspect(self, ref: str | None = None) -> dict:  # type: ignore[type-arg]
        out = subprocess.run(
            [*self.engine, "image", "inspect", ref or self.ref], capture_output=True, text=True, check=True
        ).stdout
        return dict(json.loads(out)[0])

    def files(self, ref: str | None = None) -> dict[str, tarfile.TarInfo | bytes]:
        """Every path of the image's filesystem; the bytes of the few files the tests read."""
        created = subprocess.run(
            [*self.engine, "create", ref or self.ref], capture_output=True, text=True, check=True
        ).stdout.strip()
        try:
            tar_bytes = subprocess.run([*self.engine, "export", created], capture_output=True, check=True).stdout
        finally:
            subprocess.run([*self.engine, "rm", created], capture_output=True, check=False)
        found: dict[str, tarfile.TarInfo | bytes] = {}
        with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
            for member in tar:
                name = member.name.lstrip("./")
                found[name] = member
                if member.isfile() and (name.endswith(("dist-info/METADATA", ".crt")) or name == "etc/pip.conf"):
                    handle = tar.extractfile(member)
                    assert handle is not None
                    found[name + "#bytes"] = handle.read()
        return found


@pytest.fixture(scope="module")
def image() -> Iterator[Image]:
    built = subprocess.run([str(HACK), "build"], capture_output=True, text=True, timeout=900)
    assert built.returncode == 0, f"hack/image.sh build failed:\n{built.stdout}{built.stderr[-5000:]}"
    engine = subprocess.run([str(HACK), "engine"], capture_output=True, text=True, check=True).stdout.split()
    yield Image(built.stdout.strip().splitlines()[-1], engine)


@pytest.fixture(scope="module")
def image_files(image: Image) -> dict[str, tarfile.TarInfo | bytes]:
    return image.files()


def test_runs_as_the_fixed_non_root_user(image: Image) -> None:
    assert image.inspect()["Config"]["User"] == "65532:65532"
    assert image.run("-c", "id -u; id -g", entrypoint="sh").split() == ["65532", "65532"]


def test_version_matches_the_package(image: Image) -> None:
    assert image.run("--version").strip() == f"celery-fleet {__version__}"
    labels = image.inspect()["Config"]["Labels"]
    assert labels["org.opencontainers.image.version"] == __version__


def test_read_only_root_runs_the_operator_cli_and_the_elector(image: Image) -> None:
    assert "--kubeconfig" in image.run("run", "--help")
    help_text = image.run("-I", "-S", ELECTOR_SOURCE, "--help", "--", "true", entrypoint="python3")
    assert "--lease" in help_text


def test_elector_is_standard_library_only_in_a_bare_python(image: Image) -> None:
    # The base interpreter, not the venv's, with -I -S: no site-packages, no environment.
    probe = (
        "import runpy, sys\n"
        f"sys.argv = ['elector', '--help', '--', 'true']\n"
        "try:\n"
        f"    runpy.run_path({ELECTOR_SOURCE!r}, run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    assert e.code in (0, None), e.code\n"
        "std = set(sys.stdlib_module_names) | set(sys.builtin_module_names) | {'__main__'}\n"
        # Modules from inside the one file are its own code; anything else must be stdlib.
        f"inside = lambda m: (getattr(m, '__file__', None) or '').startswith({ELECTOR_SOURCE!r})\n"
        "print('FOREIGN', sorted(n for n, m in list(sys.modules.items()) if n.split('.')[0] not in std"
        " and not inside(m)))\n"
    )
    out = image.run(
        "-c", 'exec "$(readlink -f /opt/celery-fleet/venv/bin/python3)" -I -S -c "$0"', probe, entrypoint="sh"
    )
    assert "FOREIGN []" in out, out
    assert "--lease" in out


def test_no_compilers_pip_cache_or_build_configuration_left(
    image: Image, image_files: dict[str, tarfile.TarInfo | bytes]
) -> None:
    paths = [p for p in image_files if not p.endswith("#bytes")]
    assert not [p for p in paths if TOOLCHAIN.match(p)], "a compiler or build tool is in the image"
    assert not [p for p in paths if re.search(r"(^|/)\.cache/pip(/|$)|^root/\.cache", p)], "a pip cache is left"
    for config in ("etc/pip.conf", "etc/xdg/pip/pip.conf", "root/.config/pip/pip.conf", "root/.pip/pip.conf"):
        assert config not in image_files, f"build-time pip configuration {config} is in the image"
    assert not [p for p in paths if p.startswith(("src/", "tmp/build-venv", "tmp/wheels"))], "build leftovers"
    # No pip or setuptools in the operator's venv: nothing installs anything at run time.
    site = "opt/celery-fleet/venv/lib/python3.11/site-packages/"
    tools = [p for p in paths if re.match(re.escape(site) + r"(pip|setuptools|wheel)(-[^/]+\.dist-info)?/?$", p)]
    assert not tools, tools
    # The CA bundle is the base image's own, byte for byte, not the build host's.
    base = image.inspect()["Config"]["Labels"]["org.opencontainers.image.base.name"]
    bundle = "etc/ssl/certs/ca-certificates.crt#bytes"
    base_files = image.files(base)
    if bundle in base_files or bundle in image_files:
        assert _digest(image_files.get(bundle)) == _digest(base_files.get(bundle)), "the build host's CA bundle leaked"


def _digest(content: object) -> str | None:
    return hashlib.sha256(content).hexdigest() if isinstance(content, bytes) else None


def test_installed_packages_are_the_lock_for_the_image_python(
    image: Image, image_files: dict[str, tarfile.TarInfo | bytes]
) -> None:
    """The lock is universal: its markers pick what the image's Python needs, whichever it is.

    The local base carries Debian's Python 3.11.2 and the upstream base 3.11.13, so
    `python_full_version < '3.11.3'` entries (async-timeout, which redis needs before 3.11.3)
    are in one image and not the other. The expected set is computed from the image's own
    interpreter, so both are checked exactly.
    """
    env = json.loads(image.run("-I", "-c", MARKER_ENV, entrypoint="python3"))
    expected: dict[str, str] = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;\\]+)\s*(?:;\s*([^\\]+?))?\s*\\?$", line)
        if m and (m[3] is None or Marker(m[3]).evaluate(env)):
            expected[_norm(m[1])] = m[2]
    expected["celery-fleet"] = __version__
    site = "opt/celery-fleet/venv/lib/python3.11/site-packages/"
    installed: dict[str, str] = {}
    for path, content in image_files.items():
        if path.startswith(site) and path.endswith("dist-info/METADATA#bytes") and isinstance(content, bytes):
            meta = content.decode(errors="replace")
            name = re.search(r"^Name: (.+)$", meta, re.M)
            version = re.search(r"^Version: (.+)$", meta, re.M)
            assert name and version, path
            installed[_norm(name[1].strip())] = version[1].strip()
    assert installed == expected


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_image_config_matches_the_deployment(image: Image) -> None:
    config = image.inspect()["Config"]
    assert config["Entrypoint"] == ["celery-fleet"]
    assert config["Cmd"] == ["run"]
    assert Path(ELECTOR_SOURCE).is_absolute()


def test_operator_from_the_image_reconciles_and_scales_a_pool(
    image: Image, cluster: Cluster, crds_installed: list[str], unwatched_namespace: str, redis_server: RedisServer,
    redis_db: object, tmp_path: Path,
) -> None:  # fmt: skip
    """The shipped artifact against the local cluster: host network (the apiserver and Redis are on
    loopback), the kubeconfig mounted read-only, root filesystem read-only, as 65532."""
    import redis

    name = f"celery-fleet-it-{uuid.uuid4().hex[:6]}"
    command = [*image.engine, "run", "--rm", "--name", name, "--read-only", "--network", "host"]
    command += ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]
    command += ["-v", f"{cluster.kubeconfig}:{cluster.kubeconfig}:ro", image.ref]
    operator = OperatorProcess(cluster.kubeconfig, [unwatched_namespace], tmp_path / "operator.log", command=command)
    ns = unwatched_namespace
    try:
        operator.start()
        pool = {
            "apiVersion": "celeryfleet.io/v1alpha1",
            "kind": "CeleryWorkerPool",
            "metadata": {"name": "shipped"},
            "spec": {
                "app": "tasks:app",
                "image": "ghcr.io/example/celery-app:1.0",
                "broker": {"url": redis_server.url},
                "tiers": [{"name": "high", "queues": ["high_priority"], "concurrency": 4,
                           "replicas": {"min": 1, "max": 8}, "autoscaling": {"targetDepthPerReplica": 100}}],
            },
        }  # fmt: skip
        cluster.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(pool))

        def replicas() -> int | None:
            got = cluster.kubectl("get", "deployment", "shipped-high", "-n", ns, "-o", "json", check=False)
            return int(json.loads(got.stdout)["spec"]["replicas"]) if got.returncode == 0 else None

        wait_for(
            lambda: replicas() == 1, timeout=120, message=lambda: f"tier at min 1; log:\n{operator.logs()[-3000:]}"
        )
        # 300 messages as a Celery producer at its defaults writes them (a plain list, no priority).
        client = redis.Redis.from_url(redis_server.url)
        client.lpush("high_priority", *[json.dumps({"body": i}) for i in range(300)])
        wait_for(lambda: replicas() == 3, timeout=60, message=lambda: f"scaled to 3; log:\n{operator.logs()[-3000:]}")
        # No worker runs here (kwok plays the kubelet): nothing consumed, nothing lost.
        assert client.llen("high_priority") == 300
    finally:
        operator.stop()
        subprocess.run([*image.engine, "rm", "-f", name], capture_output=True, check=False)
