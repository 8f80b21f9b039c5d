"""Issue 15: the operator's own credentials and transport (kube.login), without the official client.

The real apiserver side (client certificates from kwokctl's kubeconfig, a service account's token)
is every integration test that starts the operator, e.g. tests/integration/test_rbac_serviceaccount.py.
"""

from __future__ import annotations

import base64
import json
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from celery_fleet.kube.client import ApiError, Kube
from celery_fleet.kube.login import Credentials, LoginError, Transport, from_kubeconfig, load_credentials


def _kubeconfig(tmp_path: Path, user: dict[str, Any], cluster: dict[str, Any] | None = None, **extra: Any) -> Path:
    doc = {
        "current-context": "main",
        "contexts": [
            {"name": "main", "context": {"cluster": "c", "user": "u", "namespace": "team-a"}},
            {"name": "other", "context": {"cluster": "c", "user": "u2"}},
        ],
        "clusters": [{"name": "c", "cluster": cluster or {"server": "https://127.0.0.1:6443"}}],
        "users": [{"name": "u", "user": user}, {"name": "u2", "user": {"token": "second"}}],
        **extra,
    }
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_relative_paths_are_relative_to_the_kubeconfig(tmp_path: Path) -> None:
    path = _kubeconfig(
        tmp_path,
        {"client-certificate": "pki/admin.crt", "client-key": "/abs/admin.key"},
        {"server": "https://127.0.0.1:6443", "certificate-authority": "pki/ca.crt"},
    )
    creds = from_kubeconfig(str(path))
    assert creds.ca_file == str(tmp_path / "pki" / "ca.crt")
    assert creds.cert_file == str(tmp_path / "pki" / "admin.crt")
    assert creds.key_file == "/abs/admin.key"
    assert creds.namespace == "team-a"


def test_data_fields_become_private_files(tmp_path: Path) -> None:
    pem = b"-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----\n"
    path = _kubeconfig(
        tmp_path,
        {"client-certificate-data": base64.b64encode(pem).decode(), "client-key-data": base64.b64encode(b"k").decode()},
        {"server": "https://h:1", "certificate-authority-data": base64.b64encode(pem).decode()},
    )
    creds = from_kubeconfig(str(path))
    assert creds.ca_file and Path(creds.ca_file).read_bytes() == pem
    assert creds.key_file and Path(creds.key_file).read_bytes() == b"k"
    assert Path(creds.key_file).stat().st_mode & 0o077 == 0


def test_a_named_context_wins_over_the_current_one(tmp_path: Path) -> None:
    path = _kubeconfig(tmp_path, {"token": "first"})
    assert from_kubeconfig(str(path)).token() == "first"
    assert from_kubeconfig(str(path), "other").token() == "second"
    with pytest.raises(LoginError, match="'missing' not found"):
        from_kubeconfig(str(path), "missing")


@pytest.mark.parametrize(
    ("user", "match"),
    [
        pytest.param({"auth-provider": {"name": "oidc"}}, "auth-provider", id="auth-provider"),
        pytest.param({"username": "a", "password": "b"}, "basic auth", id="basic-auth"),
    ],
)
def test_unsupported_users_are_named(tmp_path: Path, user: dict[str, Any], match: str) -> None:
    with pytest.raises(LoginError, match=match):
        from_kubeconfig(str(_kubeconfig(tmp_path, user)))


def test_a_token_file_is_read_again_on_refresh(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("one\n")
    creds = from_kubeconfig(str(_kubeconfig(tmp_path, {"tokenFile": "token"})))
    assert creds.token() == "one"
    (tmp_path / "token").write_text("two")
    assert creds.token() == "one"  # within its age
    assert creds.token(refresh=True) == "two"


def test_an_exec_plugin_gives_the_token(tmp_path: Path) -> None:
    script = tmp_path / "plugin.py"
    script.write_text(
        "import json, os\n"
        "info = json.loads(os.environ['KUBERNETES_EXEC_INFO'])\n"
        "print(json.dumps({'apiVersion': info['apiVersion'], 'kind': 'ExecCredential',"
        " 'status': {'token': 'from-' + os.environ['WHO'], 'expirationTimestamp': '2999-01-01T00:00:00Z'}}))\n"
    )
    exec_ = {"apiVersion": "client.authentication.k8s.io/v1", "command": sys.executable, "args": [str(script)],
             "env": [{"name": "WHO", "value": "plugin"}]}  # fmt: skip
    assert from_kubeconfig(str(_kubeconfig(tmp_path, {"exec": exec_}))).token() == "from-plugin"


def test_in_cluster_when_the_service_host_is_set(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    monkeypatch.setattr("celery_fleet.kube.login.SERVICE_ACCOUNT_DIR", str(tmp_path))
    (tmp_path / "token").write_text("sa-token")
    (tmp_path / "namespace").write_text("celery-fleet")
    creds = load_credentials()
    assert (creds.server, creds.token(), creds.namespace) == ("https://10.0.0.1:443", "sa-token", "celery-fleet")
    assert creds.ca_file == str(tmp_path / "ca.crt")


class _Apiserver(BaseHTTPRequestHandler):
    """Answers like an apiserver: 401 for a stale token, a Status body for errors, JSON otherwise."""

    seen: list[tuple[str, str, str | None, bytes]] = []
    rotate: Path | None = None  # a token file the "kubelet" rewrites when the old token is refused

    def do_PATCH(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.seen.append((self.command, self.path, self.headers.get("Authorization"), body))
        if self.headers.get("Authorization") != "Bearer fresh":
            if self.rotate is not None:
                self.rotate.write_text("fresh")
            self._answer(401, {"kind": "Status", "reason": "Unauthorized", "message": "Unauthorized"})
        elif "missing" in self.path:
            self._answer(404, {"kind": "Status", "reason": "NotFound", "message": 'deployments "missing" not found'})
        else:
            self._answer(200, {"metadata": {"name": "x"}, "echo": json.loads(body)})

    def _answer(self, status: int, doc: dict[str, Any]) -> None:
        data = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *_: Any) -> None:
        pass


@pytest.fixture
def apiserver() -> Iterator[str]:
    server = HTTPServer(("127.0.0.1", 0), _Apiserver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Apiserver.seen, _Apiserver.rotate = [], None
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_requests_send_json_and_retry_once_with_a_rotated_token(apiserver: str, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("stale")
    kube = Kube(Transport(Credentials(server=apiserver, token_file=str(token))))
    _Apiserver.rotate = token
    applied = kube.apply({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x", "namespace": "n"}})
    assert applied["echo"]["metadata"]["name"] == "x"
    (first, second) = _Apiserver.seen
    assert first[2] == "Bearer stale" and second[2] == "Bearer fresh"
    assert second[1] == "/apis/apps/v1/namespaces/n/deployments/x?fieldManager=celery-fleet&force=true"
    assert kube.requests_by == {("PATCH", "deployments"): 1}


def test_error_answers_are_api_errors_and_silence_is_unreachable(apiserver: str) -> None:
    kube = Kube(Transport(Credentials(server=apiserver, static_token="fresh")))
    with pytest.raises(ApiError) as err:
        kube.scale("n", "missing", 2)
    assert (err.value.status, err.value.reason) == (404, "NotFound")
    assert 'deployments "missing" not found' in err.value.message
    dead = Kube(Transport(Credentials(server="http://127.0.0.1:1", static_token="fresh")))
    with pytest.raises(ApiError) as err:
        dead.scale("n", "x", 2)
    assert err.value.reason == "Unreachable"
