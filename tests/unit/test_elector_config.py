"""The elector's command line, kubeconfig reading and standalone-ness."""

from __future__ import annotations

import ast
import base64
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from celery_fleet import elector
from celery_fleet.elector import (
    ElectionTimings,
    KubeconfigError,
    LeaseRecord,
    UsageError,
    endpoint_from_kubeconfig,
    parse_invocation,
    parse_kubeconfig,
)

ELECTOR_SOURCE = Path(elector.__file__)
CMD = ["--", sys.executable, "-c", "pass"]


# =========================================================================== it runs in a bare Celery image


def test_the_elector_imports_only_the_standard_library() -> None:
    tree = ast.parse(ELECTOR_SOURCE.read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            imported.add(node.module.split(".")[0])
    assert imported, "found no imports: the check is looking at the wrong file"
    assert not imported - sys.stdlib_module_names


def test_the_elector_parses_as_python_3_8() -> None:
    # Celery 5.4 still supports 3.8, and the user's image decides the interpreter.
    ast.parse(ELECTOR_SOURCE.read_text(), feature_version=(3, 8))


# =========================================================================== timings


@pytest.mark.parametrize(
    ("timings", "flag"),
    [
        pytest.param(ElectionTimings(0, 0.5, 0.1, 0.1), "--duration", id="zero-duration"),
        pytest.param(ElectionTimings(10, 10, 2, 0), "--renew-deadline", id="deadline-not-below-duration"),
        pytest.param(ElectionTimings(15, 10, 10, 1), "--retry-period", id="retry-not-below-deadline"),
        pytest.param(ElectionTimings(15, 10, 2, 5), "--stop-grace", id="grace-would-outlive-the-lease"),
        pytest.param(ElectionTimings(15, 10, 2, -1), "--stop-grace", id="negative-grace"),
    ],
)
def test_bad_timings_are_refused_naming_the_flag(timings: ElectionTimings, flag: str) -> None:
    with pytest.raises(UsageError, match=f"^{flag}"):
        timings.validate()


def test_default_timings_are_client_gos_and_leave_room_to_stop() -> None:
    invocation = parse_invocation(["--lease", "beat", "--server", "https://k:6443", "--namespace", "ns", *CMD], {})
    assert invocation.timings == ElectionTimings(duration=15, renew_deadline=10, retry_period=2, stop_grace=2.5)


# =========================================================================== the command line


@pytest.mark.parametrize(
    ("argv", "environ", "message"),
    [
        pytest.param(["--lease", "b", sys.executable], {}, "missing `-- CMD", id="no-separator"),
        pytest.param(["--lease", "b", "--"], {}, "nothing after `--`", id="no-command"),
        pytest.param(["--lease", "Beat_1", "--server", "https://k", *CMD], {}, "--lease 'Beat_1'", id="bad-lease-name"),
        pytest.param(["--lease", "b", "--server", "https://k", *CMD], {}, "no namespace", id="no-namespace"),
        pytest.param(
            ["--lease", "b", "--server", "https://k", "--namespace", "n", "--", "no-such-celery-binary"],
            {},
            "command 'no-such-celery-binary' not found",
            id="command-not-on-path",
        ),
        pytest.param(
            ["--lease", "b", "--namespace", "n", "--duration", "5", "--renew-deadline", "6", "--server", "h", *CMD],
            {},
            "--renew-deadline",
            id="deadline-too-long",
        ),
    ],
)
def test_bad_invocations_say_what_to_fix(argv: list[str], environ: dict[str, str], message: str) -> None:
    with pytest.raises(UsageError, match=message.replace("(", r"\(")):
        parse_invocation(argv, environ)


def test_pod_environment_supplies_identity_namespace_and_in_cluster_endpoint() -> None:
    environ = {
        "POD_NAME": "beat-7d9-abc",
        "POD_NAMESPACE": "jobs",
        "KUBERNETES_SERVICE_HOST": "10.96.0.1",
        "KUBERNETES_SERVICE_PORT": "443",
    }
    invocation = parse_invocation(["elect", "--lease", "beat", *CMD], environ)
    assert (invocation.identity, invocation.namespace, invocation.lease) == ("beat-7d9-abc", "jobs", "beat")
    assert invocation.endpoint.server == "https://10.96.0.1:443"
    assert invocation.endpoint.token_file == "/var/run/secrets/kubernetes.io/serviceaccount/token"
    assert invocation.endpoint.ca_file == "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"
    assert invocation.command == CMD[1:]


def test_ipv6_service_host_is_bracketed() -> None:
    environ = {"KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "443", "POD_NAMESPACE": "n"}
    assert parse_invocation(["--lease", "b", *CMD], environ).endpoint.server == "https://[fd00::1]:443"


def test_flags_override_the_kubeconfig(tmp_path: Path) -> None:
    kubeconfig = tmp_path / "config"
    kubeconfig.write_text(KWOKCTL_KUBECONFIG)
    invocation = parse_invocation(
        ["--lease", "b", "--kubeconfig", str(kubeconfig), "--server", "https://127.0.0.1:9999", *CMD], {}
    )
    endpoint = invocation.endpoint
    assert endpoint.server == "https://127.0.0.1:9999"
    assert endpoint.client_cert_file == "/root/.kwok/clusters/x/pki/admin.crt"
    assert invocation.namespace == "team-a"  # from the context


# =========================================================================== kubeconfig files

KWOKCTL_KUBECONFIG = """\
apiVersion: v1
clusters:
- cluster:
    certificate-authority: /root/.kwok/clusters/x/pki/ca.crt
    server: https://127.0.0.1:32766
  name: kwok-x
contexts:
- context:
    cluster: kwok-x
    namespace: team-a
    user: kwok-x
  name: kwok-x
current-context: kwok-x
kind: Config
preferences: {}
users:
- name: kwok-x
  user:
    client-certificate: /root/.kwok/clusters/x/pki/admin.crt
    client-key: /root/.kwok/clusters/x/pki/admin.key
"""

INDENTED_KUBECONFIG = """\
# a hand-written one: indented sequences, quotes, comments
apiVersion: "v1"
kind: Config
current-context: 'prod'   # trailing comment
clusters:
  - name: prod
    cluster:
      server: "https://api.example.com:6443/prefix"
      certificate-authority-data: {ca}
      tls-server-name: api.internal
      insecure-skip-tls-verify: false
contexts:
  - name: prod
    context: {{cluster: prod, user: bot}}
users:
  - name: bot
    user:
      token: 'it''s-a-token'
"""


def test_kubectl_style_yaml_is_read() -> None:
    document = parse_kubeconfig(KWOKCTL_KUBECONFIG, "k")
    assert document["preferences"] == {}
    assert document["clusters"] == [
        {"cluster": {"certificate-authority": "/root/.kwok/clusters/x/pki/ca.crt", "server": "https://127.0.0.1:32766"},
         "name": "kwok-x"}
    ]  # fmt: skip
    assert document["users"][0]["user"]["client-key"] == "/root/.kwok/clusters/x/pki/admin.key"


def test_yaml_and_json_forms_of_one_kubeconfig_agree() -> None:
    yaml_form = parse_kubeconfig(KWOKCTL_KUBECONFIG, "k")
    assert parse_kubeconfig(json.dumps(yaml_form), "k.json") == yaml_form


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param("a: &x 1\nb: *x\n", "anchors", id="anchor"),
        pytest.param("a: [1, 2]\n", "flow collections", id="flow-sequence"),
        pytest.param("a: |\n  text\n", "block scalars", id="block-scalar"),
        pytest.param("a:\n\tb: 1\n", "tabs", id="tab-indent"),
        pytest.param("a: 1\na: 2\n", "duplicate key 'a'", id="duplicate-key"),
        pytest.param("a: 1\n   b: 2\n", "line 2: unexpected indentation", id="bad-indent"),
        pytest.param('a: "open\n', "unterminated", id="unterminated-quote"),
        pytest.param("a: 1\n---\nb: 2\n", "one YAML document", id="two-documents"),
    ],
)
def test_unsupported_yaml_is_refused_with_the_line_and_the_json_way_out(text: str, message: str) -> None:
    with pytest.raises(KubeconfigError, match=message) as caught:
        parse_kubeconfig(text, "cfg")
    assert "kubectl config view --raw --minify --flatten -o json" in str(caught.value)


def test_flow_mapping_of_a_context_is_refused_not_misread() -> None:
    with pytest.raises(KubeconfigError, match="flow collections"):
        parse_kubeconfig(INDENTED_KUBECONFIG.format(ca="eA=="), "cfg")


def test_indented_sequences_quotes_and_embedded_data(tmp_path: Path) -> None:
    ca_pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
    text = INDENTED_KUBECONFIG.format(ca=base64.b64encode(ca_pem.encode()).decode()).replace(
        "    context: {cluster: prod, user: bot}", "    context:\n      cluster: prod\n      user: bot"
    )
    path = tmp_path / "config"
    path.write_text(text)
    endpoint, namespace = endpoint_from_kubeconfig([str(path)], None)
    assert endpoint.server == "https://api.example.com:6443/prefix"
    assert endpoint.ca_data == ca_pem
    assert endpoint.tls_server_name == "api.internal"
    assert endpoint.insecure is False
    assert endpoint.token == "it's-a-token"
    assert namespace is None


def test_relative_paths_resolve_against_the_kubeconfig_directory(tmp_path: Path) -> None:
    path = tmp_path / "config"
    path.write_text(KWOKCTL_KUBECONFIG.replace("/root/.kwok/clusters/x/pki/", "pki/"))
    endpoint, _ = endpoint_from_kubeconfig([str(path)], None)
    assert endpoint.ca_file == str(tmp_path / "pki" / "ca.crt")
    assert endpoint.client_key_file == str(tmp_path / "pki" / "admin.key")


def test_several_kubeconfig_files_merge_first_wins(tmp_path: Path) -> None:
    first = tmp_path / "a"
    first.write_text("current-context: kwok-x\nusers:\n- name: kwok-x\n  user:\n    token: from-a\n")
    second = tmp_path / "b"
    second.write_text(KWOKCTL_KUBECONFIG)
    endpoint, _ = endpoint_from_kubeconfig([str(first), str(second)], None)
    assert endpoint.token == "from-a"
    assert endpoint.server == "https://127.0.0.1:32766"


@pytest.mark.parametrize(
    ("user_yaml", "message"),
    [
        pytest.param("    exec:\n      command: aws\n", "user.exec is not supported", id="exec-plugin"),
        pytest.param("    username: admin\n", "user.username is not supported", id="basic-auth"),
    ],
)
def test_credential_kinds_we_cannot_speak_are_refused(tmp_path: Path, user_yaml: str, message: str) -> None:
    path = tmp_path / "config"
    path.write_text(KWOKCTL_KUBECONFIG.split("    client-certificate")[0] + user_yaml)
    with pytest.raises(KubeconfigError, match=message):
        endpoint_from_kubeconfig([str(path)], None)


def test_a_missing_context_is_named(tmp_path: Path) -> None:
    path = tmp_path / "config"
    path.write_text(KWOKCTL_KUBECONFIG)
    with pytest.raises(KubeconfigError, match="no context named 'nope'"):
        endpoint_from_kubeconfig([str(path)], "nope")


# =========================================================================== log lines


def test_log_lines_carry_a_utc_timestamp_and_key_values(capsys: pytest.CaptureFixture[str]) -> None:
    from tests.unit.test_elector import EPOCH

    emit = elector.stderr_log({"lease": "ns/beat", "identity": "pod-a"}, lambda: EPOCH)
    emit("lost", reason="renew-deadline", detail="no renewal for 10s")
    line = capsys.readouterr().err
    assert line == (
        "2025-01-01T00:00:00.000000Z elector event=lost lease=ns/beat identity=pod-a "
        'reason=renew-deadline detail="no renewal for 10s"\n'
    )


# =========================================================================== request bodies


class RecordingLeaseApi(elector.HttpLeaseApi):
    def __init__(self, replies: list[tuple[int, dict[str, Any]]]) -> None:
        super().__init__(elector.ApiEndpoint(server="http://apiserver:8080/base"), "jobs", "beat")
        self.replies = replies
        self.sent: list[tuple[str, str, Any]] = []

    def _request(
        self, method: str, path: str, body: Mapping[str, Any] | None, timeout: float
    ) -> tuple[int, dict[str, Any]]:
        self.sent.append((method, path, None if body is None else json.loads(json.dumps(body))))
        return self.replies.pop(0)


STORED = {
    "apiVersion": "coordination.k8s.io/v1",
    "kind": "Lease",
    "metadata": {
        "name": "beat",
        "namespace": "jobs",
        "resourceVersion": "41",
        "labels": {"app.kubernetes.io/managed-by": "celery-fleet"},
        "ownerReferences": [{"kind": "CeleryBeat", "name": "nightly", "uid": "u-1"}],
        "managedFields": [{"manager": "celery-fleet"}],
    },
    "spec": {
        "holderIdentity": "",
        "leaseDurationSeconds": 1,
        "leaseTransitions": 2,
        "strategy": "OldestEmulationVersion",
    },
}


def test_replace_keeps_what_others_own_and_swaps_on_the_resource_version() -> None:
    api = RecordingLeaseApi([(200, STORED), (200, STORED)])
    lease = api.get(timeout=1)
    assert lease is not None and lease.record == LeaseRecord("", 1, None, None, 2)
    api.replace(lease, LeaseRecord("pod-a", 15, "t", "t", 3), timeout=1)

    method, path, body = api.sent[-1]
    assert (method, path) == ("PUT", "/base/apis/coordination.k8s.io/v1/namespaces/jobs/leases/beat")
    assert body["metadata"]["resourceVersion"] == "41"
    assert body["metadata"]["ownerReferences"] == STORED["metadata"]["ownerReferences"]  # type: ignore[index]
    assert body["metadata"]["labels"] == {"app.kubernetes.io/managed-by": "celery-fleet"}
    assert "managedFields" not in body["metadata"]
    assert body["spec"] == {
        "holderIdentity": "pod-a",
        "leaseDurationSeconds": 15,
        "leaseTransitions": 3,
        "acquireTime": "t",
        "renewTime": "t",
        "strategy": "OldestEmulationVersion",
    }


@pytest.mark.parametrize(
    ("call", "status", "raised", "message"),
    [
        pytest.param("replace", 409, elector.LeaseConflict, "changed since it was read", id="replace-stale"),
        pytest.param("replace", 404, elector.LeaseConflict, "deleted", id="replace-gone"),
        pytest.param("create", 409, elector.LeaseConflict, "created by someone else", id="create-race"),
        pytest.param("get", 403, elector.LeaseApiError, "HTTP 403: forbidden .*RBAC", id="forbidden-hints-rbac"),
        pytest.param("get", 500, elector.LeaseApiError, "HTTP 500: forbidden", id="server-error"),
    ],
)
def test_api_replies_map_to_conflict_or_error(call: str, status: int, raised: type[Exception], message: str) -> None:
    api = RecordingLeaseApi([(status, {"message": "forbidden"})])
    lease = elector.Lease.from_body(STORED)
    with pytest.raises(raised, match=message):
        if call == "replace":
            api.replace(lease, LeaseRecord("pod-a", 15), timeout=1)
        elif call == "create":
            api.create(LeaseRecord("pod-a", 15), timeout=1)
        else:
            api.get(timeout=1)


def test_a_missing_lease_reads_as_none() -> None:
    assert RecordingLeaseApi([(404, {})]).get(timeout=1) is None


def test_main_turns_usage_errors_into_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert elector.main(["--lease", "b"]) == 2
    assert "elector: missing `-- CMD" in capsys.readouterr().err


def test_main_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert elector.main(["--help"]) == 0
    assert "--renew-deadline" in capsys.readouterr().out
