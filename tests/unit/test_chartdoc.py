"""The chart README: generated from Chart.yaml and values.yaml, fresh, and covering every value."""

from __future__ import annotations

from pathlib import Path

import yaml

from celery_fleet import chartdoc
from celery_fleet.api import generated

ROOT = Path(__file__).resolve().parents[2]

VALUES = """# A header comment, then a blank line: describes nothing.

# The image.
image:
  # Where from.
  repository: example/app
  tag: ""
# Off by default.
enabled: false
spread:
  - maxSkew: 1
labels: {}
"""


def test_rows_take_the_comment_above_each_value() -> None:
    assert chartdoc.value_rows(VALUES) == [
        ("image.repository", '"example/app"', "Where from."),
        ("image.tag", '""', ""),
        ("enabled", "false", "Off by default."),
        ("spread", '[{"maxSkew": 1}]', ""),
        ("labels", "{}", ""),
    ]


def test_the_committed_readme_is_fresh_and_documents_every_value() -> None:
    assert generated.stale_files(ROOT, chartdoc.generated_files(ROOT)) == [], "run make generate"
    text = (ROOT / chartdoc.README).read_text()
    values = yaml.safe_load((ROOT / chartdoc.CHART_DIR / "values.yaml").read_text())

    def leaves(node: object, prefix: str = "") -> list[str]:
        if isinstance(node, dict) and node:
            return [leaf for k, v in node.items() for leaf in leaves(v, f"{prefix}{k}.")]
        return [prefix.rstrip(".")]

    for key in leaves(values):
        assert f"| `{key}` |" in text, key


def test_check_fails_when_stale(tmp_path: Path) -> None:
    chart = tmp_path / chartdoc.CHART_DIR
    chart.mkdir(parents=True)
    for name in ("Chart.yaml", "values.yaml"):
        (chart / name).write_text((ROOT / chartdoc.CHART_DIR / name).read_text())
    files = chartdoc.generated_files(tmp_path)
    generated.write_files(tmp_path, files)
    assert generated.stale_files(tmp_path, chartdoc.generated_files(tmp_path)) == []
    (chart / "values.yaml").write_text((chart / "values.yaml").read_text() + "# New.\nnewValue: 1\n")
    assert generated.stale_files(tmp_path, chartdoc.generated_files(tmp_path)) == [tmp_path / chartdoc.README]
