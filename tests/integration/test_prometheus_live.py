"""Issue 16.4, live: a real Prometheus scrapes the real operator, loaded with the chart's alert rules, and
CeleryFleetQueueBacklog fires on a real Redis backlog.

Prometheus is Debian's `prometheus` package (`make install-system`, the same one that brings promtool).
The chart's backlog alert holds for 10 minutes (`prometheusRule.queueBacklog.for`); the test renders
the chart with that one value at 1s, through the same template, and checks the rendered rule is the
default one in everything but `for`. Scrapes and rule evaluations every second: seconds, not minutes.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from celery import Celery
from kubernetes import client

from tests.support.cluster import ROOT, Cluster
from tests.support.operator_process import OperatorProcess
from tests.support.redis_server import RedisServer, free_port
from tests.support.tools import tool
from tests.support.wait import wait_for

pytestmark = pytest.mark.integration

GROUP, VERSION = "celeryfleet.io", "v1alpha1"
CHART = ROOT / "charts" / "celery-fleet"
ALERT = "CeleryFleetQueueBacklog"
BACKLOG, UNDER = 150, 50  # over and under the chart's default threshold of 100


def _rules(*values: str) -> list[dict[str, Any]]:
    out = subprocess.run(
        [str(tool("helm")), "template", "celery-fleet", str(CHART), "--namespace", "celery-fleet",
         "--set", "prometheusRule.enabled=true", *values, "--show-only", "templates/prometheusrule.yaml"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    return list(yaml.safe_load(out)["spec"]["groups"])


def _backlog_rule(groups: list[dict[str, Any]]) -> dict[str, Any]:
    return next(r for g in groups for r in g["rules"] if r.get("alert") == ALERT)


class Prometheus:
    def __init__(self, workdir: Path, target: str | list[str], groups: list[dict[str, Any]]) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            pytest.fail("prometheus is missing: run `make install-system` (Debian's prometheus package)")
        (workdir / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}))
        targets = [target] if isinstance(target, str) else target
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
            "rule_files": [str(workdir / "rules.yaml")],
            "scrape_configs": [{"job_name": "celery-fleet-metrics", "static_configs": [{"targets": targets}]}],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = workdir / "prometheus.log"
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [binary, f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'data'}",
                 f"--web.listen-address={self.url.removeprefix('http://')}"],
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        wait_for(self._ready, timeout=60, message=lambda: f"prometheus ready; log:\n{self.logs()}")

    def logs(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited with {self.proc.returncode}:\n{self.logs()}")
        with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r:
            return bool(r.status == 200)

    def api(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}{query}", timeout=5) as r:
            body = json.loads(r.read())
        assert body["status"] == "success", body
        return body["data"]

    def evaluated_since(self, moment: float) -> bool:
        """Every rule group was evaluated after `moment` (unix time)."""
        groups = self.api("rules")["groups"]
        return bool(groups) and all(
            dt.datetime.fromisoformat(g["lastEvaluation"].replace("Z", "+00:00")).timestamp() > moment for g in groups
        )

    def alerts(self, namespace: str) -> list[dict[str, Any]]:
        return [a for a in self.api("alerts")["alerts"]
                if a["labels"].get("alertname") == ALERT and a["labels"].get("namespace") == namespace]  # fmt: skip

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def prometheus(operator: OperatorProcess, tmp_path: Path) -> Iterator[Prometheus]:
    short = _rules("--set", "prometheusRule.queueBacklog.for=1s")
    rule, default = _backlog_rule(short), _backlog_rule(_rules())
    assert default["for"] == "10m" and rule["for"] == "1s"
    assert {k: v for k, v in rule.items() if k not in ("for", "annotations")} == {
        k: v for k, v in default.items() if k not in ("for", "annotations")
    }, "only `for` differs from the chart's default rule"
    server = Prometheus(tmp_path, f"127.0.0.1:{operator.metrics_port}", short)
    yield server
    server.stop()


def test_queue_backlog_alert_fires_on_a_real_backlog(
    cluster: Cluster, k8s_api: client.ApiClient, operator: OperatorProcess, namespace: str,
    redis_server: RedisServer, prometheus: Prometheus,
) -> None:  # fmt: skip
    queue = f"backlog-{namespace[-6:]}"
    client.CoreV1Api(k8s_api).create_namespaced_secret(
        namespace, {"metadata": {"name": "broker"}, "stringData": {"url": redis_server.url}}
    )
    pool = {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "CeleryWorkerPool", "metadata": {"name": "shop"},
        "spec": {"app": "shop.celery:app", "image": "example/shop:1",
                 "broker": {"urlSecretRef": {"name": "broker", "key": "url"}},
                 # Nothing consumes (kwok pods, no local runtime): what is sent stays queued.
                 "tiers": [{"name": "high", "queues": [queue], "concurrency": 1, "replicas": {"min": 1, "max": 1}}]},
    }  # fmt: skip
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(pool))

    app = Celery("producer", broker=redis_server.url)
    app.conf.broker_connection_retry_on_startup = False

    def send(count: int) -> None:
        with app.connection_for_write() as conn:
            for i in range(count):
                app.send_task("shop.tasks.work", args=[i], queue=queue, connection=conn)

    # Under the threshold: once Prometheus has the depth and evaluated the rules after it, no alert.
    send(UNDER)
    selector = f'sum(celery_fleet_queue_depth{{namespace="{namespace}",pool="shop",tier="high"}})'
    wait_for(lambda: [r for r in prometheus.api("query", query=selector)["result"] if float(r["value"][1]) == UNDER],
             timeout=60, message=lambda: f"{selector} == {UNDER}; prometheus log:\n{prometheus.logs()}")  # fmt: skip
    seen_at = time.time()
    wait_for(lambda: prometheus.evaluated_since(seen_at), timeout=30, message="a rule evaluation after that")
    assert prometheus.alerts(namespace) == []

    send(BACKLOG - UNDER)
    firing = wait_for(
        lambda: [a for a in prometheus.alerts(namespace) if a["state"] == "firing"], timeout=60,
        message=lambda: f"{ALERT} firing; alerts: {prometheus.api('alerts')}",
    )  # fmt: skip
    (alert,) = firing
    assert {k: alert["labels"][k] for k in ("namespace", "pool", "tier", "severity")} == {
        "namespace": namespace, "pool": "shop", "tier": "high", "severity": "warning",
    }  # fmt: skip
    assert float(alert["value"]) == BACKLOG
    assert f"has {BACKLOG} messages waiting" in alert["annotations"]["description"]
