"""The chart's alerts judged by Prometheus itself: `promtool test rules` (Debian's prometheus package,
`make install-system`) with series fixtures per alert in tests/unit/promtool/alerts.test.yaml."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.unit.test_chart import one, rendered

FIXTURES = Path(__file__).parent / "promtool" / "alerts.test.yaml"


def test_alerts_fire_when_they_should_and_not_otherwise(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is missing: run `make install-system` (Debian's prometheus package)")
    rule = one(rendered("--set", "prometheusRule.enabled=true"), "PrometheusRule")
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    shutil.copy(FIXTURES, tmp_path / "alerts.test.yaml")
    check = subprocess.run([promtool, "check", "rules", str(tmp_path / "rules.yaml")], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    tested = {t["alertname"] for case in yaml.safe_load(FIXTURES.read_text())["tests"] for t in case["alert_rule_test"]}
    alerts = {r["alert"] for g in rule["spec"]["groups"] for r in g["rules"]}
    assert tested == alerts, f"alerts without fixtures: {alerts - tested}"
    proc = subprocess.run(
        [promtool, "test", "rules", str(tmp_path / "alerts.test.yaml")], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
