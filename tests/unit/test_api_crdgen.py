"""The generated CRDs: structural, documented, defaulted like the models, bounded for CEL."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from celery_fleet.api import crdgen, generated
from celery_fleet.api.models import CeleryBeatSpec, CeleryWorkerPoolSpec, parse_beat, parse_pool

SAMPLES = Path(__file__).resolve().parents[2] / "deploy" / "samples"
CRDS = crdgen.generate_crds()
POOL = CRDS[crdgen.POOL_FILE]
BEAT = CRDS[crdgen.BEAT_FILE]


def root_schema(crd: dict[str, Any]) -> dict[str, Any]:
    schema: dict[str, Any] = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def walk(node: Any, path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every schema node with its path (properties by name, list items as [])."""
    if not isinstance(node, dict):
        return
    yield path, node
    for name, child in node.get("properties", {}).items():
        yield from walk(child, f"{path}.{name}")
    if "items" in node:
        yield from walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from walk(node["additionalProperties"], f"{path}{{}}")


def apply_defaults(value: Any, schema: dict[str, Any]) -> Any:
    """The apiserver's structural defaulting: fill missing properties, then recurse into them."""
    if isinstance(value, dict):
        for name, prop in schema.get("properties", {}).items():
            if name not in value and "default" in prop:
                value[name] = copy.deepcopy(prop["default"])
        for name, child in value.items():
            if name in schema.get("properties", {}):
                apply_defaults(child, schema["properties"][name])
    elif isinstance(value, list) and "items" in schema:
        for item in value:
            apply_defaults(item, schema["items"])
    return value


CRD_PARAMS = [pytest.param(POOL, id="pool"), pytest.param(BEAT, id="beat")]


@pytest.mark.parametrize("crd", CRD_PARAMS)
def test_schema_is_structural(crd: dict[str, Any]) -> None:
    forbidden = {"$ref", "$defs", "anyOf", "oneOf", "allOf", "title", "nullable", "const"}
    for path, node in walk(root_schema(crd)):
        assert not forbidden & node.keys(), f"{path}: {sorted(forbidden & node.keys())}"
        typed = "type" in node or node.get("x-kubernetes-int-or-string")
        assert typed, f"{path} has no type"
        if node.get("type") == "object":
            assert (
                "properties" in node
                or "additionalProperties" in node
                or node.get("x-kubernetes-preserve-unknown-fields")
                or path == ".metadata"
            ), f"{path} is an object without a shape"


@pytest.mark.parametrize("crd", CRD_PARAMS)
def test_every_spec_and_status_field_is_described(crd: dict[str, Any]) -> None:
    root = root_schema(crd)
    for top in ("spec", "status"):
        for path, node in walk(root["properties"][top], f".{top}"):
            if path.endswith("[]") or path.endswith("{}"):
                continue  # list items and map values are described by their parent
            assert node.get("description"), f"{path} has no description (kubectl explain shows nothing)"


@pytest.mark.parametrize("crd", CRD_PARAMS)
def test_cel_rules_have_messages_and_lists_under_rules_are_bounded(crd: dict[str, Any]) -> None:
    rules = 0
    for path, node in walk(root_schema(crd)["properties"]["spec"], ".spec"):
        for rule in node.get("x-kubernetes-validations", []):
            rules += 1
            assert rule["message"], f"{path}: rule {rule['rule']} has no message"
        # The cost estimator multiplies by list and string sizes; unbounded ones make rules unaffordable.
        if "x-kubernetes-validations" in node and node.get("type") == "array":
            assert "maxItems" in node, f"{path}: a list with rules needs maxItems"
            item = node["items"]
            if item.get("type") == "string":
                assert "maxLength" in item, f"{path}[]: strings in a list with rules need maxLength"
    assert rules > 0


def test_tier_list_is_bounded_and_queue_names_too() -> None:
    spec = root_schema(POOL)["properties"]["spec"]
    tiers = spec["properties"]["tiers"]
    assert tiers["maxItems"] == 10
    queues = tiers["items"]["properties"]["queues"]
    assert queues["maxItems"] == 32 and queues["items"]["maxLength"] == 200


def test_names_columns_and_subresources() -> None:
    for crd, kind, plural, short in (
        (POOL, "CeleryWorkerPool", "celeryworkerpools", "cwp"),
        (BEAT, "CeleryBeat", "celerybeats", "cbeat"),
    ):
        names = crd["spec"]["names"]
        assert (names["kind"], names["plural"], names["shortNames"], names["categories"]) == (
            kind,
            plural,
            [short],
            ["celery"],
        )
        assert crd["metadata"]["name"] == f"{plural}.celeryfleet.io"
        assert crd["spec"]["scope"] == "Namespaced"
        version = crd["spec"]["versions"][0]
        assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
        assert version["subresources"] == {"status": {}}
    pool_cols = [c["name"] for c in POOL["spec"]["versions"][0]["additionalPrinterColumns"] if "priority" not in c]
    beat_cols = [c["name"] for c in BEAT["spec"]["versions"][0]["additionalPrinterColumns"]]
    assert pool_cols == ["Ready", "Pods", "Desired", "Queued", "Age"]
    assert beat_cols == ["Leader", "Ready", "Transitions", "Age"]


@pytest.mark.parametrize(
    ("crd", "spec", "parse"),
    [
        pytest.param(POOL, {"app": "a", "image": "i", "broker": {"url": "redis://r"}}, parse_pool, id="minimal-pool"),
        pytest.param(BEAT, {"app": "a", "image": "i", "broker": {"url": "redis://r"}}, parse_beat, id="minimal-beat"),
    ],
)
def test_apiserver_defaults_match_the_model_defaults(crd: dict[str, Any], spec: dict[str, Any], parse: Any) -> None:
    defaulted = apply_defaults(copy.deepcopy(spec), root_schema(crd)["properties"]["spec"])
    from_model = parse(spec)
    # What the apiserver stores already carries the model's defaults, field for field.
    assert_contains(defaulted, from_model.model_dump(by_alias=True, exclude_none=True, mode="json"))
    assert parse(defaulted) == from_model


def assert_contains(outer: Any, inner: Any, path: str = "spec") -> None:
    if isinstance(inner, dict):
        for key, value in inner.items():
            if value in ([], {}, ""):
                continue  # empty defaults are left out of the schema on purpose
            assert key in outer, f"{path}.{key} is not defaulted by the schema"
            assert_contains(outer[key], value, f"{path}.{key}")
    elif isinstance(inner, list):
        assert len(outer) == len(inner), path
        for i, (o, v) in enumerate(zip(outer, inner, strict=True)):
            assert_contains(o, v, f"{path}[{i}]")
    else:
        assert outer == inner, f"{path}: {outer!r} != {inner!r}"


def test_default_tiers_in_the_schema_are_the_documented_three() -> None:
    tiers = root_schema(POOL)["properties"]["spec"]["properties"]["tiers"]["default"]
    assert [(t["name"], t["queues"], t["concurrency"], t["replicas"]) for t in tiers] == [
        ("high", ["high_priority"], 4, {"min": 2, "max": 8}),
        ("medium", ["medium_priority", "celery"], 6, {"min": 4, "max": 12}),
        ("low", ["low_priority"], 2, {"min": 1, "max": 4}),
    ]


def test_int_or_string_and_preserved_kubernetes_objects() -> None:
    tier = root_schema(POOL)["properties"]["spec"]["properties"]["tiers"]["items"]["properties"]
    assert tier["podDisruptionBudget"]["properties"]["maxUnavailable"]["x-kubernetes-int-or-string"] is True
    assert tier["resources"]["x-kubernetes-preserve-unknown-fields"] is True
    spec = root_schema(POOL)["properties"]["spec"]["properties"]
    for name in ("affinity", "securityContext", "containerSecurityContext"):
        assert spec[name]["x-kubernetes-preserve-unknown-fields"] is True, name
    for name in ("env", "envFrom", "tolerations", "volumes", "volumeMounts", "imagePullSecrets"):
        assert spec[name]["items"]["x-kubernetes-preserve-unknown-fields"] is True, name
    assert spec["podLabels"]["additionalProperties"] == {"type": "string"}


def test_model_and_schema_list_the_same_spec_fields() -> None:
    for crd, model in ((POOL, CeleryWorkerPoolSpec), (BEAT, CeleryBeatSpec)):
        properties = root_schema(crd)["properties"]["spec"]["properties"]
        aliases = [f.alias or name for name, f in model.model_fields.items()]
        assert list(properties) == aliases


def test_render_is_deterministic_and_round_trips() -> None:
    text = crdgen.render(POOL)
    assert text.startswith("# Generated by `make crds`")
    assert text == crdgen.render(crdgen.generate_crds()[crdgen.POOL_FILE])
    assert yaml.safe_load(text) == POOL


def test_check_reports_stale_and_missing_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert crdgen.main(["--root", str(tmp_path)]) == 0
    assert crdgen.main(["--check", "--root", str(tmp_path)]) == 0
    assert generated.stale_files(tmp_path, crdgen.generated_files()) == []

    chart_copy = tmp_path / crdgen.CHART_CRD_DIR / crdgen.BEAT_FILE
    chart_copy.write_text(chart_copy.read_text().replace("cbeat", "cb"))
    (tmp_path / crdgen.CRD_DIR / crdgen.POOL_FILE).unlink()
    capsys.readouterr()
    assert crdgen.main(["--check", "--root", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "CRDs are stale: run make crds" in err
    stale = set(generated.stale_files(tmp_path, crdgen.generated_files()))
    assert stale == {chart_copy, tmp_path / crdgen.CRD_DIR / crdgen.POOL_FILE}


def test_ready_columns_read_the_ready_condition_not_pod_counts() -> None:
    pool_cols = {c["name"]: c for c in POOL["spec"]["versions"][0]["additionalPrinterColumns"]}
    beat_cols = {c["name"]: c for c in BEAT["spec"]["versions"][0]["additionalPrinterColumns"]}
    ready = '.status.conditions[?(@.type=="Ready")].status'
    assert pool_cols["Ready"]["jsonPath"] == beat_cols["Ready"]["jsonPath"] == ready
    assert pool_cols["Pods"]["jsonPath"] == ".status.ready"
    # Wide output (-o wide): busy workers per tier and why the pool is (not) ready.
    assert (pool_cols["Busy"]["jsonPath"], pool_cols["Busy"]["priority"]) == (".status.tiers[*].busyWorkers", 1)
    assert (pool_cols["Scheduled"]["jsonPath"], pool_cols["Scheduled"]["priority"]) == (".status.tiers[*].scheduled", 1)
    assert pool_cols["Reason"]["jsonPath"] == '.status.conditions[?(@.type=="Ready")].reason'
    status = POOL["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    assert "busyWorkers" in status["tiers"]["items"]["properties"]


@pytest.mark.parametrize("crd", [POOL, BEAT], ids=["pool", "beat"])
def test_every_crd_copy_tells_helm_argo_and_flux_to_keep_it(crd: dict[str, Any]) -> None:
    assert crd["metadata"]["annotations"] == {
        "helm.sh/resource-policy": "keep",
        "argocd.argoproj.io/sync-options": "Prune=false,Delete=false",
        "kustomize.toolkit.fluxcd.io/prune": "disabled",
    }


def test_chart_template_is_the_crd_behind_crds_install() -> None:
    text = crdgen.render_chart_template(POOL)
    lines = text.splitlines()
    assert lines[1] == "{{- if .Values.crds.install }}" and lines[-1] == "{{- end }}"
    assert "    helm.sh/resource-policy: keep" in lines
    # Without the template actions it is the same CRD, with the chart's labels added by Helm.
    plain = "\n".join(line for line in lines if "{{" not in line)
    assert {**yaml.safe_load(plain), "metadata": None} == {**POOL, "metadata": None}
    assert set(crdgen.chart_crd_files()) == {
        crdgen.CHART_CRD_DIR / crdgen.POOL_FILE,
        crdgen.CHART_CRD_DIR / crdgen.BEAT_FILE,
    }
    assert crdgen.CHART_CRD_DIR.parts[:3] == ("charts", "celery-fleet", "templates")


def test_chart_template_refuses_a_crd_helm_would_read_as_a_template() -> None:
    crd = {**POOL, "spec": {**POOL["spec"], "group": "{{ .Values.x }}"}}
    with pytest.raises(ValueError, match="escape it"):
        crdgen.render_chart_template(crd)
