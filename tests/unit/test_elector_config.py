"""The elector's command line, its HTTP Lease client, and its standalone single file."""

from __future__ import annotations

import ast
import json
import socket
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from celery_fleet.elector import bundle
from celery_fleet.elector.cli import main, parse_invocation
from celery_fleet.elector.election import ElectionTimings, Lease, LeaseApiError, LeaseConflict, LeaseRecord, UsageError
from celery_fleet.elector.lease_client import ApiEndpoint, HttpLeaseApi
from celery_fleet.elector.process import stderr_log

CMD = ["--", sys.executable, "-c", "pass"]


# =========================================================================== it runs in a bare Celery image


def _bundled_sources() -> list[tuple[str, str]]:
    return [(name, content.decode()) for name, content in bundle.members()]


def test_the_bundled_modules_import_only_the_standard_library_and_each_other() -> None:
    """And Celery, from beat's scheduler only (celery_fleet/beat runs inside `celery beat`)."""
    imported: set[str] = set()
    from_beat: set[str] = set()
    for name, source in _bundled_sources():
        for node in ast.walk(ast.parse(source, name)):
            found: set[str] = set()
            if isinstance(node, ast.Import):
                found = {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found = {node.module}
            (from_beat if name.startswith("celery_fleet/beat/") else imported).update(found)
    ours = {m for m in imported | from_beat if m.split(".")[0] == "celery_fleet"}
    assert ours, "found no imports of the package: the check is looking at the wrong files"
    bundled = {name.removesuffix(".py").removesuffix("/__init__").replace("/", ".") for name, _ in _bundled_sources()}
    assert ours <= bundled, f"imports outside the single file: {ours - bundled}"
    assert not {m.split(".")[0] for m in imported - ours} - sys.stdlib_module_names
    assert not {m.split(".")[0] for m in from_beat - ours} - sys.stdlib_module_names - {"celery"}


def test_every_module_of_the_package_is_bundled_or_deliberately_left_out() -> None:
    modules = {p.stem for p in bundle.package_dir().glob("*.py")}
    assert modules - set(bundle.BUNDLED_MODULES) == {"bundle"}
    beat = {p.stem for p in (bundle.package_dir().parent / "beat").glob("*.py")}
    assert beat == set(bundle.BUNDLED_BEAT_MODULES)  # beat's scheduler reaches pods in the same file


@pytest.mark.parametrize("name", [name for name, _ in bundle.members()])
def test_the_bundled_modules_parse_as_python_3_8(name: str) -> None:
    # Celery 5.4 still supports 3.8, and the user's image decides the interpreter.
    ast.parse(dict(_bundled_sources())[name], name, feature_version=(3, 8))


def test_the_single_file_is_reproducible() -> None:
    assert bundle.build_bytes() == bundle.build_bytes()
    with zipfile.ZipFile(__import__("io").BytesIO(bundle.build_bytes().split(b"\n", 1)[1])) as archive:
        assert {i.date_time for i in archive.infolist()} == {(1980, 1, 1, 0, 0, 0)}


def test_the_single_file_runs_as_pods_run_it(tmp_path: Path) -> None:
    """`python3 -I -S`: no site-packages, no PYTHONPATH, no current directory: only the standard library."""
    target = bundle.build(tmp_path / "elector.pyz")
    assert target.stat().st_mode & 0o777 == 0o444
    bare = {"PATH": "/usr/bin:/bin"}
    help_run = subprocess.run(
        [sys.executable, "-I", "-S", str(target), "--help"], capture_output=True, text=True, env=bare, cwd="/"
    )
    assert help_run.returncode == 0, help_run.stderr
    assert "--renew-deadline" in help_run.stdout and "--service-account-dir" in help_run.stdout
    usage = subprocess.run(
        [sys.executable, "-I", "-S", str(target), "--lease", "b", "--", "true"],
        capture_output=True, text=True, env=bare, cwd="/",
    )  # fmt: skip
    assert usage.returncode == 2
    assert "not in a pod" in usage.stderr and "celery-fleet elect" in usage.stderr


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
    invocation = parse_invocation(["--lease", "beat", *CMD], environ)
    assert (invocation.identity, invocation.namespace, invocation.lease) == ("beat-7d9-abc", "jobs", "beat")
    assert invocation.endpoint.server == "https://10.96.0.1:443"
    assert invocation.endpoint.token_file == "/var/run/secrets/kubernetes.io/serviceaccount/token"
    assert invocation.endpoint.ca_file == "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"
    assert invocation.command == CMD[1:]


def test_ipv6_service_host_is_bracketed() -> None:
    environ = {"KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "443", "POD_NAMESPACE": "n"}
    assert parse_invocation(["--lease", "b", *CMD], environ).endpoint.server == "https://[fd00::1]:443"


# =========================================================================== log lines


def test_log_lines_carry_a_utc_timestamp_and_key_values(capsys: pytest.CaptureFixture[str]) -> None:
    from tests.unit.test_elector import EPOCH

    emit = stderr_log({"lease": "ns/beat", "identity": "pod-a"}, lambda: EPOCH)
    emit("lost", reason="renew-deadline", detail="no renewal for 10s")
    line = capsys.readouterr().err
    assert line == (
        "2025-01-01T00:00:00.000000Z elector event=lost lease=ns/beat identity=pod-a "
        'reason=renew-deadline detail="no renewal for 10s"\n'
    )


# =========================================================================== request bodies


class RecordingLeaseApi(HttpLeaseApi):
    def __init__(self, replies: list[tuple[int, dict[str, Any]]]) -> None:
        super().__init__(ApiEndpoint(server="http://apiserver:8080/base"), "jobs", "beat")
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
        pytest.param("replace", 409, LeaseConflict, "changed since it was read", id="replace-stale"),
        pytest.param("replace", 404, LeaseConflict, "deleted", id="replace-gone"),
        pytest.param("create", 409, LeaseConflict, "created by someone else", id="create-race"),
        pytest.param("get", 403, LeaseApiError, "HTTP 403: forbidden .*RBAC", id="forbidden-hints-rbac"),
        pytest.param("get", 500, LeaseApiError, "HTTP 500: forbidden", id="server-error"),
    ],
)
def test_api_replies_map_to_conflict_or_error(call: str, status: int, raised: type[Exception], message: str) -> None:
    api = RecordingLeaseApi([(status, {"message": "forbidden"})])
    lease = Lease.from_body(STORED)
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
    assert main(["--lease", "b"]) == 2
    assert "elector: missing `-- CMD" in capsys.readouterr().err


def test_main_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    assert "--renew-deadline" in capsys.readouterr().out


def test_the_service_account_dir_gives_credentials_and_namespace(tmp_path: Path) -> None:
    (tmp_path / "namespace").write_text("jobs\n")
    environ = {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": "6443"}
    invocation = parse_invocation(["--lease", "b", "--service-account-dir", str(tmp_path), *CMD], environ)
    assert invocation.endpoint.server == "https://127.0.0.1:6443"
    assert invocation.endpoint.token_file == str(tmp_path / "token")
    assert invocation.endpoint.ca_file == str(tmp_path / "ca.crt")
    assert invocation.namespace == "jobs"


def test_explicit_server_flags_win_over_in_cluster() -> None:
    environ = {"KUBERNETES_SERVICE_HOST": "10.0.0.1", "POD_NAMESPACE": "n"}
    argv = ["--lease", "b", "--server", "https://127.0.0.1:9999", "--client-cert", "c.crt", "--client-key", "c.key"]
    endpoint = parse_invocation([*argv, *CMD], environ).endpoint
    assert (endpoint.server, endpoint.client_cert_file, endpoint.client_key_file) == (
        "https://127.0.0.1:9999",
        "c.crt",
        "c.key",
    )
    assert endpoint.token_file is None


# =========================================================================== a wall-clock budget per request


class TricklingServer:
    """An HTTP peer that answers one byte at a time, for as long as the client listens."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        reply = b'HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n{"spec": {' + b" " * 100000
        with conn:
            conn.recv(65536)
            for byte in reply:
                if self.stop.wait(0.02):  # the peer's pace, not the test's
                    return
                try:
                    conn.sendall(bytes([byte]))
                except OSError:
                    return

    def close(self) -> None:
        self.stop.set()
        self.listener.close()


@pytest.fixture
def trickling() -> Iterator[TricklingServer]:
    server = TricklingServer()
    yield server
    server.close()


def test_a_trickling_reply_cannot_stretch_a_request_past_its_budget(trickling: TricklingServer) -> None:
    api = HttpLeaseApi(ApiEndpoint(server=f"http://127.0.0.1:{trickling.port}"), "jobs", "beat")
    started = time.monotonic()
    with pytest.raises(LeaseApiError, match="within the request deadline"):
        api.get(timeout=0.5)
    # http.client's per-read timeout would wait ~2,000 s for this reply; the budget ends it at 0.5 s.
    assert time.monotonic() - started < 0.5 + 1.5


def test_chunked_and_keep_alive_replies_are_read_whole() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    body = json.dumps(STORED).encode()
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (body[:10], body[10:])) + b"0\r\n\r\n"

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            for reply in (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked,
                          b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\n{}"):  # fmt: skip
                conn.recv(65536)
                conn.sendall(reply)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    api = HttpLeaseApi(ApiEndpoint(server=f"http://127.0.0.1:{listener.getsockname()[1]}"), "jobs", "beat")
    lease = api.get(timeout=5)
    assert lease is not None and lease.resource_version == "41"
    assert api.get(timeout=5) is None  # the same connection, kept alive
    thread.join(timeout=5)
    listener.close()


def test_a_token_source_that_fails_is_one_failed_request_not_a_crash() -> None:
    def broken() -> str | None:
        raise RuntimeError("exec plugin exited 1")

    api = HttpLeaseApi(ApiEndpoint(server="http://127.0.0.1:1", token_source=broken), "jobs", "beat")
    with pytest.raises(LeaseApiError, match="cannot get a token: RuntimeError: exec plugin exited 1"):
        api.get(timeout=1)
