"""The local runtime is a development tool: not in the wheel (so not in the image), yet
`celery-fleet localrun` works from a checkout after `make install`."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from setuptools import find_packages

from celery_fleet import cli

ROOT = Path(__file__).resolve().parents[2]


def test_the_wheel_holds_no_local_runtime() -> None:
    shipped = find_packages(str(ROOT / "operator"))  # what [tool.setuptools.packages.find] ships
    assert "celery_fleet" in shipped
    assert not [p for p in shipped if "localrun" in p], shipped


def test_localrun_runs_from_a_checkout(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        cli.main(["localrun", "--help"])
    assert done.value.code == 0
    assert "--namespace" in capsys.readouterr().out


def test_localrun_without_the_checkout_says_so(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "celery_fleet_localrun", None)  # as in the image: not importable
    assert cli.main(["localrun", "--namespace", "x"]) == 2
    assert "development tool" in capsys.readouterr().err
