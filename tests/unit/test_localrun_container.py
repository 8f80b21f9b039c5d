"""The local runtime's reading of pods: $(VAR) expansion, env, volumes, paths, grace."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from celery_fleet.api.models import BROKER_URL_ENV, parse_beat, parse_pool
from celery_fleet.planning.beat_workload import ELECTOR_SOURCE, beat_deployment
from celery_fleet.planning.workload import tier_deployment
from celery_fleet_localrun.container import (
    ContainerConfigError,
    PodLayout,
    broker_port,
    container_env,
    grace_seconds,
    mount_table,
    pod_volumes,
    process_spec,
    rewrite_path,
)
from celery_fleet_localrun.expansion import expand


class Objects:
    def __init__(self, secrets: Mapping[str, Mapping[str, str]] | None = None,
                 maps: Mapping[str, Mapping[str, str]] | None = None) -> None:  # fmt: skip
        self.secrets, self.maps = secrets or {}, maps or {}
        self.reads: list[str] = []

    def secret_data(self, namespace: str, name: str) -> Mapping[str, str] | None:
        self.reads.append(f"secret {namespace}/{name}")
        return self.secrets.get(name)

    def config_map_data(self, namespace: str, name: str) -> Mapping[str, str] | None:
        self.reads.append(f"configmap {namespace}/{name}")
        return self.maps.get(name)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("celery@$(POD_NAME)", "celery@pod-1", id="defined"),
        pytest.param("$(MISSING)-x", "$(MISSING)-x", id="undefined-kept"),
        pytest.param("$$(POD_NAME)", "$(POD_NAME)", id="escaped"),
        pytest.param("a$$b", "a$b", id="escaped-dollar"),
        pytest.param("cost $5", "cost $5", id="plain-dollar"),
        pytest.param("end$", "end$", id="trailing-dollar"),
        pytest.param("$(POD_NAME", "$(POD_NAME", id="unterminated"),
        pytest.param("$()", "$()", id="empty-name"),
        pytest.param("$(A)$(A)", "11", id="repeated"),
    ],
)
def test_expansion_follows_kubernetes(text: str, expected: str) -> None:
    assert expand(text, {"POD_NAME": "pod-1", "A": "1"}) == expected


def _pod(containers: list[dict[str, Any]], **spec: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": "w-1", "namespace": "ns", "uid": "uid-1", "labels": {"tier": "high"},
                     "annotations": {"a/b": "c"}},
        "spec": {"containers": containers, "nodeName": "node-0", "serviceAccountName": "sa", **spec},
        "status": {"podIP": "10.0.0.7", "hostIP": "192.0.2.1"},
    }  # fmt: skip


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        pytest.param([{"name": "A", "value": "1"}, {"name": "B", "value": "$(A)-2"}], {"A": "1", "B": "1-2"},
                     id="references-earlier"),
        pytest.param([{"name": "B", "value": "$(A)"}, {"name": "A", "value": "1"}], {"A": "1", "B": "$(A)"},
                     id="later-not-visible"),
        pytest.param([{"name": "P", "value": "$(PATH)"}], {"P": "$(PATH)"}, id="image-env-not-visible"),
        pytest.param([{"name": "N", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                      {"name": "S", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                      {"name": "U", "valueFrom": {"fieldRef": {"fieldPath": "metadata.uid"}}},
                      {"name": "L", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['tier']"}}},
                      {"name": "AN", "valueFrom": {"fieldRef": {"fieldPath": "metadata.annotations['a/b']"}}},
                      {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                      {"name": "SA", "valueFrom": {"fieldRef": {"fieldPath": "spec.serviceAccountName"}}}],
                     {"N": "w-1", "S": "ns", "U": "uid-1", "L": "high", "AN": "c", "IP": "10.0.0.7", "SA": "sa"},
                     id="downward-api"),
        pytest.param([{"name": "URL", "valueFrom": {"secretKeyRef": {"name": "broker", "key": "url"}}}],
                     {"URL": "redis://:pw@127.0.0.1:6390/0"}, id="secret-key"),
        pytest.param([{"name": "X", "valueFrom": {"secretKeyRef": {"name": "nope", "key": "k", "optional": True}}}],
                     {}, id="optional-secret-missing"),
        pytest.param([{"name": "M", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "mode"}}}],
                     {"M": "fast"}, id="configmap-key"),
    ],
)  # fmt: skip
def test_container_env(env: list[dict[str, Any]], expected: dict[str, str]) -> None:
    objects = Objects({"broker": {"url": "redis://:pw@127.0.0.1:6390/0"}}, {"settings": {"mode": "fast"}})
    assert container_env(_pod([{"name": "c", "env": env}]), {"name": "c", "env": env}, objects) == expected


def test_env_from_comes_first_with_prefix() -> None:
    container = {
        "name": "c",
        "envFrom": [{"configMapRef": {"name": "settings"}, "prefix": "APP_"}, {"secretRef": {"name": "broker"}}],
        "env": [{"name": "APP_mode", "value": "slow"}],
    }
    objects = Objects({"broker": {"url": "u"}}, {"settings": {"mode": "fast", "n": "1"}})
    assert container_env(_pod([container]), container, objects) == {"APP_mode": "slow", "APP_n": "1", "url": "u"}


@pytest.mark.parametrize(
    ("env", "message"),
    [
        pytest.param([{"name": "X", "valueFrom": {"secretKeyRef": {"name": "nope", "key": "k"}}}],
                     'secret "nope" not found in namespace ns', id="missing-secret"),
        pytest.param([{"name": "X", "valueFrom": {"secretKeyRef": {"name": "broker", "key": "nokey"}}}],
                     "couldn't find key nokey in secret ns/broker", id="missing-key"),
        pytest.param([{"name": "X", "valueFrom": {"fieldRef": {"fieldPath": "metadata.generation"}}}],
                     "fieldRef.fieldPath 'metadata.generation' is not supported", id="unsupported-field"),
        pytest.param([{"name": "X", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu"}}}],
                     "env X: valueFrom ['resourceFieldRef'] is not supported", id="resource-field"),
    ],
)  # fmt: skip
def test_env_errors_name_the_problem(env: list[dict[str, Any]], message: str) -> None:
    with pytest.raises(ContainerConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        container_env(_pod([{"name": "c", "env": env}]), {"name": "c", "env": env}, Objects({"broker": {"url": "u"}}))


@pytest.mark.parametrize(
    ("arg", "expected"),
    [
        pytest.param("/celery-fleet/elector.pyz", "/pod/v/elector/elector.pyz", id="under-mount"),
        pytest.param("/celery-beat", "/pod/v/schedule", id="mount-itself"),
        pytest.param("--schedule=/celery-beat/s", "--schedule=/pod/v/schedule/s", id="option-value"),
        pytest.param("/celery-fleet-other/x", "/celery-fleet-other/x", id="prefix-not-a-directory"),
        pytest.param("/opt/celery-fleet/elector.pyz", "/repo/elector.pyz", id="image-file"),
        pytest.param("/data/inner/f", "/pod/v/inner/f", id="longest-mount-wins"),
        pytest.param("celery", "celery", id="not-a-path"),
    ],
)
def test_rewrite_path(arg: str, expected: str) -> None:
    paths = {
        "/celery-fleet": Path("/pod/v/elector"),
        "/celery-beat": Path("/pod/v/schedule"),
        "/opt/celery-fleet/elector.pyz": Path("/repo/elector.pyz"),
        "/data": Path("/pod/v/data"),
        "/data/inner": Path("/pod/v/inner"),
    }
    assert rewrite_path(arg, paths) == expected


def test_volumes_and_mounts(tmp_path: Path) -> None:
    pod = _pod(
        [],
        volumes=[
            {"name": "scratch", "emptyDir": {}},
            {"name": "conf", "configMap": {"name": "settings", "items": [{"key": "mode", "path": "mode.txt"}]}},
            {"name": "creds", "secret": {"secretName": "broker"}},
            {"name": "kube-api-access-x", "projected": {"sources": [
                {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                {"downwardAPI": {"items": [{"path": "namespace",
                                            "fieldRef": {"fieldPath": "metadata.namespace"}}]}},
            ]}},
        ],
    )  # fmt: skip
    objects = Objects({"broker": {"url": "u"}}, {"settings": {"mode": "fast"}, "kube-root-ca.crt": {"ca.crt": "CA"}})
    volumes = pod_volumes(pod, PodLayout(tmp_path), objects)
    by_name = {v.name: v for v in volumes}
    assert by_name["scratch"].files == {}
    assert by_name["conf"].files == {"mode.txt": b"fast"}
    assert by_name["creds"].files == {"url": b"u"}
    sa = by_name["kube-api-access-x"]
    assert sa.files == {"ca.crt": b"CA", "namespace": b"ns"}
    assert (sa.token_path, sa.token_expiration_seconds) == ("token", 3607)
    container = {"volumeMounts": [{"name": "scratch", "mountPath": "/work/"},
                                  {"name": "conf", "mountPath": "/etc/mode", "subPath": "mode.txt"}]}  # fmt: skip
    assert mount_table(container, volumes) == {"/work": tmp_path / "volumes/scratch",
                                               "/etc/mode": tmp_path / "volumes/conf/mode.txt"}  # fmt: skip


@pytest.mark.parametrize(
    ("volume", "message"),
    [
        pytest.param({"name": "h", "hostPath": {"path": "/x"}}, r"volume h: \['hostPath'\] volumes are not supported",
                     id="host-path"),
        pytest.param({"name": "c", "configMap": {"name": "nope"}}, 'volume c: configmap "nope" not found',
                     id="missing-configmap"),
    ],
)  # fmt: skip
def test_volume_errors(tmp_path: Path, volume: dict[str, Any], message: str) -> None:
    with pytest.raises(ContainerConfigError, match=message):
        pod_volumes(_pod([], volumes=[volume]), PodLayout(tmp_path), Objects())


@pytest.mark.parametrize(
    ("url", "port"),
    [
        pytest.param("redis://127.0.0.1:6390/0", 6390, id="redis"),
        pytest.param("rediss://:pw@host/0", 6379, id="tls-default-port"),
        pytest.param("redis://a:1/0;redis://b:2/0", 1, id="failover-list-first"),
        pytest.param("amqp://guest@host//", None, id="not-redis"),
        pytest.param(None, None, id="unset"),
    ],
)
def test_broker_port_matches_the_operator_probe(url: str | None, port: int | None) -> None:
    assert broker_port(url) == port


@pytest.mark.parametrize(
    ("spec_grace", "deletion_grace", "expected"),
    [
        pytest.param(45, None, 45.0, id="pod-grace"),
        pytest.param(None, None, 30.0, id="default"),
        pytest.param(45, 5, 5.0, id="shorter-deletion-grace"),
        pytest.param(45, 0, 45.0, id="kwok-forced-delete-ignored"),
        pytest.param(45, 300, 45.0, id="longer-deletion-grace-capped"),
    ],
)
def test_grace_seconds(spec_grace: int | None, deletion_grace: int | None, expected: float) -> None:
    pod: dict[str, Any] = {"metadata": {}, "spec": {}}
    if spec_grace is not None:
        pod["spec"]["terminationGracePeriodSeconds"] = spec_grace
    if deletion_grace is not None:
        pod["metadata"]["deletionGracePeriodSeconds"] = deletion_grace
    assert grace_seconds(pod) == expected


def _as_pod(deployment: dict[str, Any], name: str) -> dict[str, Any]:
    """What the apiserver would create from the Deployment's template."""
    template = deployment["spec"]["template"]
    return {
        "metadata": {**template["metadata"], "name": name, "namespace": "demo", "uid": "u-1"},
        "spec": {**template["spec"], "nodeName": "node-0"},
        "status": {"phase": "Running"},
    }


def test_worker_pod_from_the_operators_template() -> None:
    """The operator's own worker Deployment turns into a `celery worker` argv with the pod's name."""
    spec = parse_pool({"spec": {
        "app": "demoapp", "image": "local/demoapp:dev",
        "broker": {"urlSecretRef": {"name": "demo-broker", "key": "url"}},
        "tiers": [{"name": "high", "queues": ["high_priority"], "concurrency": 4, "pool": "threads",
                   "replicas": {"min": 1, "max": 6}}],
    }})  # fmt: skip
    pod = _as_pod(tier_deployment("demo", "demo", "uid", spec, spec.tiers[0]), "demo-high-abc")
    container = pod["spec"]["containers"][0]
    objects = Objects({"demo-broker": {"url": "redis://127.0.0.1:6390/0"}})
    env = container_env(pod, container, objects)
    process = process_spec(pod, container, env=env, base_env={"PATH": "/venv/bin"}, paths={}, cwd=Path("/pod"),
                           broker_probe=True, broker_url_env=BROKER_URL_ENV)  # fmt: skip
    assert process.argv[:4] == ("celery", "-A", "demoapp", "worker")
    assert "celery@demo-high-abc" in process.argv
    assert process.env[BROKER_URL_ENV] == "redis://127.0.0.1:6390/0"
    assert process.env["PATH"] == "/venv/bin"
    assert process.env["POD_NAMESPACE"] == "demo"
    assert (process.broker_port, process.probe_period, process.probe_failure_threshold) == (6390, 10.0, 3)


def test_beat_pod_runs_the_elector_copied_by_its_init_container() -> None:
    spec = parse_beat({"spec": {"app": "demoapp", "image": "local/demoapp:dev", "broker": {"url": "redis://h:1/0"}}})
    pod = _as_pod(beat_deployment("demo", "demo", "uid", spec, "local/celery-fleet:dev"), "demo-beat-xyz")
    volumes = pod_volumes(pod, PodLayout(Path("/pod")), Objects())
    paths_of = {}
    for c in [*pod["spec"]["initContainers"], *pod["spec"]["containers"]]:
        paths = {ELECTOR_SOURCE: Path("/repo/elector.pyz"), **mount_table(c, volumes)}
        env = container_env(pod, c, Objects())
        paths_of[c["name"]] = process_spec(pod, c, env=env, base_env={}, paths=paths, cwd=Path("/pod"),
                                           broker_probe=False, broker_url_env=BROKER_URL_ENV)  # fmt: skip
    install = paths_of["install-elector"].argv
    assert install[-2:] == ("/repo/elector.pyz", "/pod/volumes/celery-fleet/elector.pyz")
    beat = paths_of["beat"].argv
    assert beat[:2] == ("python3", "/pod/volumes/celery-fleet/elector.pyz")
    assert beat[beat.index("--identity") + 1] == "demo-beat-xyz"
    assert beat[beat.index("--namespace") + 1] == "demo"
    assert beat[beat.index("--schedule") + 1] == "/pod/volumes/beat-schedule/celerybeat-schedule"
    assert paths_of["beat"].broker_port is None


def test_no_command_is_a_config_error() -> None:
    with pytest.raises(ContainerConfigError, match="no command; the local runtime cannot read an image's ENTRYPOINT"):
        process_spec(_pod([]), {"name": "c"}, env={}, base_env={}, paths={}, cwd=Path("/"), broker_probe=False,
                     broker_url_env=BROKER_URL_ENV)  # fmt: skip
