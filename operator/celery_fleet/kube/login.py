"""Reaching the apiserver without the official client: credentials and one HTTP transport.

Importing `kubernetes` loads its ~900 generated model classes: about 60 MiB of the operator's
resident memory, for a process that only ever sends JSON it builds itself. So the operator
resolves its credentials here (in-cluster service account, else a kubeconfig: certificates,
tokens, token files and exec plugins) and sends requests over urllib3; Kopf logs in with the
same credentials (`kopf_handlers.login`).
"""

from __future__ import annotations

import atexit
import base64
import datetime as dt
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import urllib3
import yaml

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
TOKEN_FILE_MAX_AGE = 60.0  # bound service-account tokens rotate: read the file again this often
EXEC_TIMEOUT = 60.0


class LoginError(Exception):
    pass


@dataclass
class Credentials:
    """Where the apiserver is and how to prove who we are. Token values are never logged."""

    server: str
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    insecure: bool = False
    tls_server_name: str | None = None
    static_token: str | None = None
    token_file: str | None = None
    exec_plugin: Mapping[str, Any] | None = None
    namespace: str | None = None
    _token: str | None = field(default=None, repr=False)
    _token_until: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def token(self, *, refresh: bool = False) -> str | None:
        """The bearer token to send now (read again from its file or plugin when due)."""
        if self.token_file is None and self.exec_plugin is None:
            return self.static_token
        with self._lock:
            if refresh or self._token is None or time.monotonic() >= self._token_until:
                if self.exec_plugin is not None:
                    self._token, self._token_until = _run_exec(self.exec_plugin, self)
                else:
                    assert self.token_file is not None
                    self._token = Path(self.token_file).read_text(encoding="utf-8").strip() or None
                    self._token_until = time.monotonic() + TOKEN_FILE_MAX_AGE
            return self._token

    @property
    def refreshable(self) -> bool:
        return self.token_file is not None or self.exec_plugin is not None


def load_credentials(kubeconfig: str | None = None, context: str | None = None) -> Credentials:
    """In-cluster when running in a pod (and no kubeconfig is given), else the kubeconfig."""
    if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
        return in_cluster()
    return from_kubeconfig(kubeconfig or os.environ.get("KUBECONFIG") or "~/.kube/config", context)


def in_cluster() -> Credentials:
    host, port = os.environ["KUBERNETES_SERVICE_HOST"], os.environ.get("KUBERNETES_SERVICE_PORT", "443")
    host = f"[{host}]" if ":" in host else host
    sa = Path(SERVICE_ACCOUNT_DIR)
    namespace = (sa / "namespace").read_text(encoding="utf-8").strip() if (sa / "namespace").exists() else None
    return Credentials(
        server=f"https://{host}:{port}", ca_file=str(sa / "ca.crt"), token_file=str(sa / "token"), namespace=namespace
    )


def from_kubeconfig(paths: str, context: str | None = None) -> Credentials:
    """The chosen (else current) context of a kubeconfig; several files merge as kubectl merges them."""
    merged: dict[str, dict[str, Any]] = {"contexts": {}, "clusters": {}, "users": {}}
    current: str | None = None
    base: dict[str, Path] = {}  # relative paths in an entry are relative to the file that holds it
    for raw in filter(None, paths.split(os.pathsep)):
        path = Path(raw).expanduser()
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        current = current or doc.get("current-context")
        for section, inner in (("contexts", "context"), ("clusters", "cluster"), ("users", "user")):
            for item in doc.get(section) or []:
                if item.get("name") not in merged[section]:
                    merged[section][item["name"]] = item.get(inner) or {}
                    base[f"{section}/{item['name']}"] = path.parent
    name = context or current
    if not name or name not in merged["contexts"]:
        raise LoginError(f"kubeconfig {paths}: context {name!r} not found")
    ctx = merged["contexts"][name]
    cluster, user = merged["clusters"].get(ctx.get("cluster"), {}), merged["users"].get(ctx.get("user"), {})
    if "auth-provider" in user:
        raise LoginError(f"kubeconfig {paths}: auth-provider users are not supported; use an exec plugin or a token")
    if "username" in user or "password" in user:
        raise LoginError(f"kubeconfig {paths}: basic auth is not supported; use a token or a client certificate")
    cdir, udir = base.get(f"clusters/{ctx.get('cluster')}", Path()), base.get(f"users/{ctx.get('user')}", Path())
    return Credentials(
        server=str(cluster.get("server") or ""),
        ca_file=_file(cluster, "certificate-authority", cdir),
        cert_file=_file(user, "client-certificate", udir),
        key_file=_file(user, "client-key", udir),
        insecure=bool(cluster.get("insecure-skip-tls-verify")),
        tls_server_name=cluster.get("tls-server-name"),
        static_token=user.get("token"),
        token_file=str(udir / user["tokenFile"]) if user.get("tokenFile") else None,
        exec_plugin=user.get("exec"),
        namespace=ctx.get("namespace"),
    )


_secret_dir: str | None = None


def _private_file(data: bytes) -> str:
    """PEM data from a kubeconfig, as a file only we can read (TLS libraries take paths)."""
    global _secret_dir
    if _secret_dir is None:
        _secret_dir = tempfile.mkdtemp(prefix="celery-fleet-")
        atexit.register(shutil.rmtree, _secret_dir, True)
    fd, path = tempfile.mkstemp(dir=_secret_dir)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


def _file(entry: Mapping[str, Any], key: str, base: Path) -> str | None:
    if entry.get(f"{key}-data"):
        return _private_file(base64.b64decode(entry[f"{key}-data"]))
    return str(base / entry[key]) if entry.get(key) else None


def _run_exec(plugin: Mapping[str, Any], creds: Credentials) -> tuple[str | None, float]:
    """Run a kubeconfig exec plugin (client.authentication.k8s.io); returns (token, valid until)."""
    api = plugin.get("apiVersion", "client.authentication.k8s.io/v1beta1")
    env = dict(os.environ, **{e["name"]: e["value"] for e in plugin.get("env") or []})
    env["KUBERNETES_EXEC_INFO"] = json.dumps(
        {"apiVersion": api, "kind": "ExecCredential", "spec": {"interactive": False}}
    )
    try:
        out = subprocess.run(
            [plugin["command"], *(plugin.get("args") or [])],
            env=env, capture_output=True, timeout=EXEC_TIMEOUT, check=True, stdin=subprocess.DEVNULL,
        ).stdout  # fmt: skip
        status = json.loads(out).get("status") or {}
    except (OSError, subprocess.SubprocessError, ValueError) as err:
        raise LoginError(f"kubeconfig exec plugin {plugin.get('command')!r} failed: {type(err).__name__}") from None
    if status.get("clientCertificateData") and status.get("clientKeyData"):
        creds.cert_file = _private_file(status["clientCertificateData"].encode())
        creds.key_file = _private_file(status["clientKeyData"].encode())
    until = time.monotonic() + 3600.0
    if status.get("expirationTimestamp"):
        expires = dt.datetime.fromisoformat(status["expirationTimestamp"].replace("Z", "+00:00"))
        until = time.monotonic() + max(0.0, (expires - dt.datetime.now(dt.UTC)).total_seconds() - 30.0)
    return status.get("token"), until


class HttpError(Exception):
    """An answer with an error status (status, reason and body, as the official client's ApiException has)."""

    def __init__(self, status: int, reason: str, body: str) -> None:
        super().__init__(f"{status} {reason}")
        self.status, self.reason, self.body = status, reason, body


class Transport:
    """JSON over one urllib3 connection pool, with the `call_api` shape Kube sends through."""

    def __init__(self, credentials: Credentials, *, maxsize: int = 32) -> None:
        self.credentials = credentials
        if credentials.exec_plugin is not None:
            credentials.token()  # a plugin may answer with a client certificate: known before the pool is built
        tls: dict[str, Any] = {}
        if credentials.server.startswith("https"):
            tls = {
                "cert_reqs": "CERT_NONE" if credentials.insecure else "CERT_REQUIRED",
                "ca_certs": credentials.ca_file,
                "cert_file": credentials.cert_file,
                "key_file": credentials.key_file,
                "server_hostname": credentials.tls_server_name,
            }
        self._http = urllib3.PoolManager(num_pools=2, maxsize=maxsize, block=False, retries=False, **tls)

    def call_api(
        self,
        resource_path: str,
        method: str,
        *,
        query_params: list[tuple[str, str]] | None = None,
        header_params: Mapping[str, str] | None = None,
        body: Any = None,
        _request_timeout: float = 30,
        **_: Any,
    ) -> tuple[Any, int, Mapping[str, str]]:
        url = self.credentials.server.rstrip("/") + resource_path
        if query_params:
            url += "?" + urllib.parse.urlencode(query_params)
        data = None if body is None else json.dumps(body).encode()
        for attempt in (0, 1):
            headers = dict(header_params or {})
            token = self.credentials.token(refresh=attempt == 1)
            if token:
                headers["Authorization"] = f"Bearer {token}"
            resp = self._http.request(method, url, body=data, headers=headers, timeout=_request_timeout)
            if resp.status == 401 and attempt == 0 and self.credentials.refreshable:
                continue  # a rotated token: read it again once
            break
        if resp.status >= 400:
            raise HttpError(resp.status, resp.reason or "", resp.data.decode("utf-8", errors="replace"))
        return (json.loads(resp.data) if resp.data else None), resp.status, dict(resp.headers)
