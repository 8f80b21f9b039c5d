"""Issue 13 item 1: names from specs cannot add path segments, and a GET's answer must be the object
asked for (the real-apiserver side is in tests/integration/test_tenancy.py)."""

from __future__ import annotations

from typing import Any

import pytest

from celery_fleet.kube.client import ApiError, Kube, resource_path


class RecordingApi:
    """Stands in for kubernetes.client.ApiClient: records paths, answers with a canned object."""

    def __init__(self, answer: Any) -> None:
        self.answer = answer
        self.paths: list[str] = []

    def call_api(self, path: str, method: str, **_: Any) -> tuple[Any, int, dict[str, str]]:
        self.paths.append(path)
        return self.answer, 200, {}


@pytest.mark.parametrize(
    ("name", "escaped"),
    [
        pytest.param("../../team-b/secrets/redis", "..%2F..%2Fteam-b%2Fsecrets%2Fredis", id="traversal"),
        pytest.param("s?watch=true", "s%3Fwatch%3Dtrue", id="query"),
        pytest.param("s#x", "s%23x", id="fragment"),
        pytest.param("s%2F..", "s%252F..", id="pre-encoded"),
        pytest.param("plain.name", "plain.name", id="plain"),
    ],
)
def test_names_are_one_escaped_segment(name: str, escaped: str) -> None:
    path = resource_path("v1", "Secret", "team-a", name)
    assert path == f"/api/v1/namespaces/team-a/secrets/{escaped}"
    assert path.count("/") == 6


@pytest.mark.parametrize("name", [".", ".."])
def test_dot_segments_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="not an object name"):
        resource_path("v1", "Secret", "team-a", name)
    with pytest.raises(ValueError, match="not an object name"):
        resource_path("v1", "Secret", name)


def test_a_namespace_is_escaped_too() -> None:
    assert resource_path("apps/v1", "Deployment", "a/b") == "/apis/apps/v1/namespaces/a%2Fb/deployments"


def _secret(namespace: str, name: str) -> dict[str, Any]:
    return {"metadata": {"namespace": namespace, "name": name}, "data": {"url": "cmVkaXM6Ly86c0BiOjYzNzkvMA=="}}


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(_secret("team-b", "redis"), id="other-namespace"),
        pytest.param(_secret("team-a", "other"), id="other-name"),
        pytest.param({"kind": "Status"}, id="no-metadata"),
    ],
)
def test_an_answer_for_another_object_is_an_error_never_data(answer: dict[str, Any]) -> None:
    api = RecordingApi(answer)
    kube = Kube(api)  # type: ignore[arg-type]  # only call_api is used
    with pytest.raises(ApiError, match="WrongObject"):
        kube.secret_value("team-a", "redis", "url")
    assert api.paths == ["/api/v1/namespaces/team-a/secrets/redis"]


def test_the_asked_for_object_is_returned() -> None:
    api = RecordingApi(_secret("team-a", "redis"))
    assert Kube(api).secret_value("team-a", "redis", "url") == "redis://:s@b:6379/0"  # type: ignore[arg-type]


def test_a_list_with_another_namespaces_items_is_an_error() -> None:
    api = RecordingApi({"items": [_secret("team-a", "x"), _secret("team-b", "y")]})
    with pytest.raises(ApiError, match="WrongObject"):
        Kube(api).list("v1", "Secret", "team-a")  # type: ignore[arg-type]
    assert len(Kube(RecordingApi({"items": [_secret("team-a", "x")]})).list("v1", "Secret", "team-a")) == 1  # type: ignore[arg-type]
