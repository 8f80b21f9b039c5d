# Over 500 lines on purpose: the whole API in one set of models, the CRDs' single source.
"""The celeryfleet.io/v1alpha1 API: CeleryWorkerPool and CeleryBeat as pydantic models.

These models are the single source of the API. The CRDs in `crds/` are generated from them
(`python -m celery_fleet.api.crdgen`), including descriptions, defaults and the CEL rules
(`x-kubernetes-validations`) attached below with `_cel(...)`. Every CEL rule has a pydantic twin
with the same wording, so an object that slipped past the apiserver (stored before a CRD
upgrade, or sent with validation off) is reported by the operator in the same words.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping
from enum import StrEnum
from typing import Annotated, Any, Literal, Self, TypeVar

from pydantic import (
    AfterValidator,
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticCustomError

from celery_fleet import GROUP, VERSION
from celery_fleet.api.broker_url import QUERY_HINT, BrokerUrlError, parse_broker_url

__all__ = ["GROUP", "VERSION"]  # re-exported: the API's group and version are declared once, in celery_fleet

API_VERSION = f"{GROUP}/{VERSION}"
POOL_KIND = "CeleryWorkerPool"
BEAT_KIND = "CeleryBeat"

# Bounds that keep the apiserver's CEL cost estimate finite and the objects reviewable.
MAX_TIERS = 10
MAX_QUEUES_PER_TIER = 32
MAX_QUEUE_NAME_LENGTH = 200
MAX_REPLICAS = 1000
MAX_EXTRA_ARGS = 32
MAX_EXTRA_ARG_LENGTH = 512
MAX_URL_LENGTH = 2048

DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
_DNS_LABEL_RE = re.compile(DNS_LABEL)
# Names of Secrets, ConfigMaps, ServiceAccounts, PriorityClasses...: a DNS subdomain. `[.]`, not
# `\.`, so the same text is a valid pattern inside a CEL string literal. The operator builds
# REST paths from some of these names: `/`, `..` and `%` must never get that far.
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
_DNS_SUBDOMAIN_RE = re.compile(DNS_SUBDOMAIN)
MAX_OBJECT_NAME_LENGTH = 253
OBJECT_NAME_RULE = (
    "must be a Kubernetes object name: lowercase letters, digits, '-' and '.', "
    "starting and ending with a letter or digit (no '/')"
)
# Broker URLs may be `;` lists (kombu's failover alternates, or several Sentinels): every rule
# below holds for every segment.
_SEGMENT_SCHEMES = r"^[ ]*(rediss?|sentinel)://[^;]*(;[ ]*(rediss?|sentinel)://[^;]*)*$"
_MIXED_KINDS = (r"(^|;)[ ]*rediss?://", r"(^|;)[ ]*sentinel://")
# A password hides in the userinfo (`redis://:pw@host`, `redis://user:pw@host`) of any segment or
# in a `password=` query parameter, which redis-py also honours.
_USERINFO_PASSWORD = r"(^|;)[ ]*[a-z]+://[^/?#;@]*:[^/?#;@]*@"
_QUERY_PASSWORD = r"[?&]password="
# The only query option allowed (broker_url.ALLOWED_QUERY), per segment.
_QUERY_SHAPE = (
    r"^[^?#;]*([?]ssl_cert_reqs=(required|CERT_REQUIRED))?(;[^?#;]*([?]ssl_cert_reqs=(required|CERT_REQUIRED))?)*$"
)
_SEGMENT_SCHEMES_RE = re.compile(_SEGMENT_SCHEMES)
_MIXED_KINDS_RE = tuple(re.compile(r) for r in _MIXED_KINDS)
_USERINFO_PASSWORD_RE = re.compile(_USERINFO_PASSWORD)
_QUERY_PASSWORD_RE = re.compile(_QUERY_PASSWORD)
_QUERY_SHAPE_RE = re.compile(_QUERY_SHAPE)
_URL_SCHEME_MESSAGE = "must start with redis://, rediss:// or sentinel:// (every ';'-separated URL)"
_SENTINEL_MASTER_MESSAGE = "sentinel:// URLs need masterName (Celery's broker_transport_options.master_name)"
_URL_MIXED_MESSAGE = "do not mix sentinel:// with redis:// or rediss:// in one URL"
_URL_PASSWORD_MESSAGE = (
    "must not contain a password (in any ';'-separated URL); store the full URL in a Secret and use urlSecretRef"
)
_PERCENT = r"^(100|[1-9]?[0-9])%$"
_PERCENT_RE = re.compile(_PERCENT)
_QUEUE_NAME_RE = re.compile(r"^[^,\s]+$")

RULE_ERROR = "celeryfleet_rule"

_M = TypeVar("_M", bound="BaseModel")


def _cel(
    rule: str,
    message: str,
    *,
    field_path: str | None = None,
    reason: str | None = None,
) -> dict[str, str]:
    """One `x-kubernetes-validations` entry.

    Messages are static: a messageExpression that formats numbers (`string(int)`) has an unbounded
    estimated cost and the apiserver refuses it inside the tier list. The pydantic twin of each
    rule adds the offending values after the same words.
    """
    entry = {"rule": rule, "message": message}
    if field_path is not None:
        entry["fieldPath"] = field_path
    if reason is not None:
        entry["reason"] = reason
    return entry


def _rules(*rules: dict[str, str]) -> dict[str, Any]:
    return {"x-kubernetes-validations": list(rules)}


def _rule_error(message: str, field: str | None = None) -> PydanticCustomError:
    """A validation error whose text is used as is; `field` points below the model's own location."""
    # Braces would be read as format placeholders by pydantic-core.
    message = message.replace("{", "(").replace("}", ")")
    return PydanticCustomError(RULE_ERROR, message, {"field": field} if field else None)


class _Spec(BaseModel):
    """Spec models: camelCase on the wire, unknown fields rejected (they are typos)."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_default=False,
    )


class _Status(BaseModel):
    """Status models: written by the operator; tolerate fields other writers (Kopf) add."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")


KubeObject = dict[str, Any]


def _queue_name(name: str) -> str:
    if not _QUEUE_NAME_RE.match(name):
        raise _rule_error("queue names must not contain commas or whitespace")
    return name


QueueName = Annotated[
    str,
    Field(
        min_length=1,
        max_length=MAX_QUEUE_NAME_LENGTH,
        json_schema_extra=_rules(
            _cel("self.matches('^[^,\\\\s]+$')", "queue names must not contain commas or whitespace")
        ),
    ),
    AfterValidator(_queue_name),
]
PriorityStep = Annotated[int, Field(ge=0, le=9)]
ExtraArg = Annotated[str, Field(max_length=MAX_EXTRA_ARG_LENGTH)]


def _object_name_cel() -> dict[str, str]:
    return _cel(f"self.matches('{DNS_SUBDOMAIN}')", OBJECT_NAME_RULE)


def _is_object_name(value: object) -> bool:
    return isinstance(value, str) and len(value) <= MAX_OBJECT_NAME_LENGTH and bool(_DNS_SUBDOMAIN_RE.match(value))


def _object_name(name: str) -> str:
    if not _is_object_name(name):
        raise _rule_error(OBJECT_NAME_RULE)
    return name


ObjectName = Annotated[
    str,
    Field(min_length=1, max_length=MAX_OBJECT_NAME_LENGTH, json_schema_extra=_rules(_object_name_cel())),
    AfterValidator(_object_name),
]


def _named_object_list(*paths: str) -> tuple[dict[str, Any], AfterValidator]:
    """Schema and check for object names inside pass-through Kubernetes objects (EnvVar, Volume...).

    The objects stay free-form (the apiserver validates them again on the Deployment), but the
    names at `paths` (dotted, e.g. `valueFrom.secretKeyRef.name`) are checked at admission and
    here, in the words of OBJECT_NAME_RULE.
    """
    item: dict[str, Any] = {"type": "object", "x-kubernetes-preserve-unknown-fields": True, "properties": {}}
    for path in paths:
        node = item
        *parents, leaf = path.split(".")
        for part in parents:
            node = node["properties"].setdefault(
                part,
                {
                    "description": "Passed through to the pod; celery-fleet checks only the object names in it.",
                    "type": "object",
                    "x-kubernetes-preserve-unknown-fields": True,
                    "properties": {},
                },
            )
        # `pattern`, not CEL: a rule inside these unbounded lists would exceed the CEL cost budget.
        node["properties"][leaf] = {
            "description": f"Name of an object in this namespace; {OBJECT_NAME_RULE}.",
            "type": "string",
            "maxLength": MAX_OBJECT_NAME_LENGTH,
            "pattern": DNS_SUBDOMAIN,
        }

    def check(items: list[KubeObject]) -> list[KubeObject]:
        for index, obj in enumerate(items):
            for path in paths:
                value: Any = obj
                for part in path.split("."):
                    value = value.get(part) if isinstance(value, Mapping) else None
                if value is None:
                    continue
                if not _is_object_name(value):
                    raise _rule_error(OBJECT_NAME_RULE, f"{index}.{path}")
        return items

    return {"items": item}, AfterValidator(check)


_ENV_NAMES = _named_object_list("valueFrom.secretKeyRef.name", "valueFrom.configMapKeyRef.name")
_ENV_FROM_NAMES = _named_object_list("secretRef.name", "configMapRef.name")
_VOLUME_NAMES = _named_object_list("secret.secretName", "configMap.name", "persistentVolumeClaim.claimName")
_PULL_SECRET_NAMES = _named_object_list("name")

# ---------------------------------------------------------------------------------------------
# Broker
# ---------------------------------------------------------------------------------------------


class SecretKeyRef(_Spec):
    """A key of a Secret in the object's own namespace."""

    name: ObjectName = Field(description="Name of the Secret, in the same namespace as this object.")
    key: str = Field(
        min_length=1,
        max_length=253,
        pattern=r"^[-._a-zA-Z0-9]+$",
        description="Key inside the Secret whose value is the full broker URL "
        "(it may contain the password, e.g. rediss://:secret@redis:6380/0).",
    )


class KeySelector(_Spec):
    """A key of a Secret or a ConfigMap in the object's own namespace."""

    model_config = ConfigDict(
        json_schema_extra=_rules(
            _cel("has(self.secretName) != has(self.configMapName)", "set exactly one of secretName or configMapName")
        )
    )

    secret_name: str | None = Field(
        default=None, min_length=1, max_length=253, pattern=DNS_SUBDOMAIN, description="A Secret in this namespace."
    )
    config_map_name: str | None = Field(
        default=None, min_length=1, max_length=253, pattern=DNS_SUBDOMAIN, description="A ConfigMap in this namespace."
    )
    key: str = Field(min_length=1, max_length=253, pattern=r"^[-._a-zA-Z0-9]+$", description="Key in it.")

    @model_validator(mode="after")
    def _exactly_one(self) -> Self:
        if (self.secret_name is None) == (self.config_map_name is None):
            raise _rule_error("set exactly one of secretName or configMapName")
        return self


class ClientCertificate(_Spec):
    """A client certificate and key (mutual TLS) from one Secret, e.g. a kubernetes.io/tls one."""

    secret_name: str = Field(
        min_length=1, max_length=253, pattern=DNS_SUBDOMAIN, description="A Secret in this namespace."
    )
    cert_key: str = Field(
        default="tls.crt", min_length=1, max_length=253, pattern=r"^[-._a-zA-Z0-9]+$", description="PEM certificate."
    )
    key_key: str = Field(
        default="tls.key", min_length=1, max_length=253, pattern=r"^[-._a-zA-Z0-9]+$", description="PEM private key."
    )


class BrokerTls(_Spec):
    """How to trust the broker (and prove who we are) over rediss://."""

    model_config = ConfigDict(
        json_schema_extra=_rules(
            _cel(
                "!(has(self.insecureSkipVerify) && self.insecureSkipVerify && has(self.ca))",
                "set either ca or insecureSkipVerify, not both",
            )
        )
    )

    ca: KeySelector | None = Field(default=None, description="PEM CA bundle that signed the broker's certificate.")
    client_certificate: ClientCertificate | None = Field(default=None, description="For brokers that require mTLS.")
    insecure_skip_verify: bool = Field(
        default=False,
        description="INSECURE: do not verify the broker's certificate (anyone on the path can read the "
        "traffic and the password). The pool says so in a Warning Event and condition.",
    )

    @model_validator(mode="after")
    def _ca_or_insecure(self) -> Self:
        if self.insecure_skip_verify and self.ca is not None:
            raise _rule_error("set either ca or insecureSkipVerify, not both")
        return self


class Broker(_Spec):
    """The Redis broker the workers consume from and the operator reads queue depth from."""

    model_config = ConfigDict(
        json_schema_extra=_rules(
            _cel(
                "has(self.url) != has(self.urlSecretRef)",
                "set exactly one of url or urlSecretRef",
            ),
            _cel(
                f"!has(self.url) || !self.url.matches('{_MIXED_KINDS[1]}') || has(self.masterName)",
                _SENTINEL_MASTER_MESSAGE,
                field_path=".masterName",
            ),
        )
    )

    url: str | None = Field(
        default=None,
        max_length=MAX_URL_LENGTH,
        description="Broker URL without credentials, redis:// or rediss:// "
        "(e.g. redis://redis.celery.svc:6379/0); a ';' list is tried in turn as kombu does "
        "(redis://a:6379/0;redis://b:6379/0), and sentinel://h1:26379;sentinel://h2:26379 reads "
        "through Redis Sentinel (set masterName). Put URLs that carry a password in a Secret "
        "and use urlSecretRef. Exactly one of url and urlSecretRef is required.",
        json_schema_extra=_rules(
            _cel(f"self.matches('{_SEGMENT_SCHEMES}')", _URL_SCHEME_MESSAGE),
            _cel(f"!(self.matches('{_MIXED_KINDS[0]}') && self.matches('{_MIXED_KINDS[1]}'))", _URL_MIXED_MESSAGE),
            _cel(f"!self.matches('{_USERINFO_PASSWORD}') && !self.matches('{_QUERY_PASSWORD}')", _URL_PASSWORD_MESSAGE),
            _cel(f"self.matches('{_QUERY_SHAPE}')", QUERY_HINT),
        ),
    )
    url_secret_ref: SecretKeyRef | None = Field(
        default=None,
        description="Secret key holding the full broker URL (may include the password). "
        "Exactly one of url and urlSecretRef is required.",
    )
    global_keyprefix: str = Field(
        default="",
        max_length=128,
        description="Celery's broker_transport_options.global_keyprefix: a prefix on every "
        "Redis key, so queue depth is read from the right keys. Empty means none.",
    )
    priority_steps: list[PriorityStep] = Field(
        default_factory=lambda: [0, 3, 6, 9],
        min_length=1,
        max_length=10,
        description="Celery's broker_transport_options.priority_steps: each step other than 0 is "
        "a separate Redis list (queue + '\\x06\\x16' + step) that counts toward queue depth. "
        "Strictly increasing, each 0-9.",
        json_schema_extra=_rules(
            _cel(
                "self.isSorted() && self.all(s, self.exists_one(t, t == s))",
                "must be strictly increasing (e.g. [0, 3, 6, 9])",
            )
        ),
    )

    sep: str = Field(
        default="\x06\x16",
        min_length=1,
        max_length=8,
        description="Celery's broker_transport_options.sep: the separator kombu puts between a queue "
        "name and its priority step, and inside binding-table members. Default '\\x06\\x16'.",
    )
    unacked_key: str = Field(
        default="unacked",
        min_length=1,
        max_length=128,
        description="Celery's broker_transport_options.unacked_key: the hash of reserved messages "
        "(counted as in flight), under globalKeyprefix.",
    )
    ack_emulation: bool = Field(
        default=True,
        description="Celery's broker_transport_options.ack_emulation. False: kombu keeps no unacked "
        "hash, so nothing is counted in flight.",
    )
    fanout_exchanges: list[Annotated[str, Field(min_length=1, max_length=255)]] = Field(
        default_factory=list,
        max_length=32,
        description="Exchanges of type fanout (e.g. Celery Broadcast queues). Redis does not store "
        "exchange types: a reserved message of these exchanges counts for every queue bound to it.",
    )
    master_name: str | None = Field(
        default=None,
        min_length=1,
        max_length=255,
        description="Redis Sentinel: the master's name (Celery's broker_transport_options.master_name). "
        "Required with sentinel:// URLs.",
    )
    tls: BrokerTls | None = Field(
        default=None,
        description="TLS for rediss:// brokers, for the operator's reads and the worker pods alike.",
    )

    @field_validator("url")
    @classmethod
    def _url_is_redis_without_password(cls, url: str | None) -> str | None:
        if url is None:
            return url
        # The CEL rules in order, then the parser's finer checks (database number, segment count).
        if not _SEGMENT_SCHEMES_RE.match(url):
            raise _rule_error(_URL_SCHEME_MESSAGE)
        if all(r.search(url) for r in _MIXED_KINDS_RE):
            raise _rule_error(_URL_MIXED_MESSAGE)
        if _USERINFO_PASSWORD_RE.search(url) or _QUERY_PASSWORD_RE.search(url):
            raise _rule_error(_URL_PASSWORD_MESSAGE)
        if not _QUERY_SHAPE_RE.match(url):
            raise _rule_error(QUERY_HINT)
        try:
            parsed = parse_broker_url(url)
        except BrokerUrlError as err:
            raise _rule_error(err.message) from None
        if parsed.secrets:  # a userinfo the regex cannot see (e.g. a '/' in it)
            raise _rule_error(_URL_PASSWORD_MESSAGE)
        return url

    @field_validator("priority_steps")
    @classmethod
    def _steps_increase(cls, steps: list[int]) -> list[int]:
        if any(a >= b for a, b in itertools.pairwise(steps)):
            raise _rule_error("must be strictly increasing (e.g. [0, 3, 6, 9])")
        return steps

    @model_validator(mode="after")
    def _exactly_one_source(self) -> Self:
        if (self.url is None) == (self.url_secret_ref is None):
            raise _rule_error("set exactly one of url or urlSecretRef")
        if self.url is not None and _MIXED_KINDS_RE[1].search(self.url) and self.master_name is None:
            raise _rule_error(_SENTINEL_MASTER_MESSAGE, "masterName")
        return self


# ---------------------------------------------------------------------------------------------
# Tiers
# ---------------------------------------------------------------------------------------------


class ReplicaBounds(_Spec):
    """The autoscaler keeps the tier's replica count within [min, max]."""

    model_config = ConfigDict(
        json_schema_extra=_rules(
            _cel(
                "self.min <= self.max",
                "min must be <= max",
            )
        )
    )

    min: int = Field(
        ge=0,
        le=MAX_REPLICAS,
        description="Fewest replicas of this tier (0 lets an idle tier scale to zero).",
    )
    max: int = Field(ge=1, le=MAX_REPLICAS, description="Most replicas of this tier.")

    @model_validator(mode="after")
    def _min_le_max(self) -> Self:
        if self.min > self.max:
            raise _rule_error(f"min must be <= max (got min {self.min}, max {self.max})")
        return self


class BusyWorkers(StrEnum):
    """What scale-in does with workers that run or hold tasks."""

    KEEP = "Keep"
    REMOVE = "Remove"


class Autoscaling(_Spec):
    """How the tier's replica count follows the depth of its queues."""

    target_depth_per_replica: int = Field(
        default=10,
        ge=1,
        le=1_000_000,
        description="Desired replicas = ceil(depth / targetDepthPerReplica), where depth is the "
        "tier's queued messages (all priority steps), plus in-flight ones when countInFlight.",
    )
    activation_depth: int = Field(
        default=0,
        ge=0,
        le=1_000_000,
        description="Below or at this depth the tier is idle and scales toward replicas.min; "
        "0 means any message activates it.",
    )
    count_in_flight: bool = Field(
        default=True,
        description="Count messages workers have taken but not acknowledged (Redis 'unacked') "
        "toward depth, so busy workers are not scaled away.",
    )
    scale_up_max_step: int | None = Field(
        default=None,
        ge=1,
        le=MAX_REPLICAS,
        description="Most replicas added per scaleUpPeriodSeconds; unset means no limit.",
    )
    scale_up_period_seconds: int = Field(
        default=15,
        ge=1,
        le=3600,
        description="Window, in seconds, over which scaleUpMaxStep applies.",
    )
    scale_down_stabilization_seconds: int = Field(
        default=30,
        ge=0,
        le=3600,
        description="Scale down only to the highest desired count seen in this many seconds, "
        "so short dips do not remove workers. The default 30 comes from the autoscaling "
        "simulation (bench/results/autoscale_sim.md); busy workers are kept regardless "
        "(scaleInBusyWorkers).",
    )
    scale_down_max_step: int | None = Field(
        default=None,
        ge=1,
        le=MAX_REPLICAS,
        description="Most replicas removed per scaleDownPeriodSeconds, a fixed count. When set "
        "it alone limits scale-down and scaleDownMaxPercent is ignored; unset (the default) "
        "means scaleDownMaxPercent applies.",
    )
    scale_down_max_percent: int = Field(
        default=100,
        ge=1,
        le=100,
        description="Most replicas removed per scaleDownPeriodSeconds, as a percentage of the "
        "replicas the tier had at the start of that period, rounded up (at least 1), as the "
        "HPA's scale-down policies count it; the default 100 is the HPA's default. Ignored "
        "when scaleDownMaxStep is set.",
    )
    scale_down_period_seconds: int = Field(
        default=15,
        ge=1,
        le=3600,
        description="Window, in seconds, over which scaleDownMaxStep or scaleDownMaxPercent applies.",
    )
    cooldown_seconds: int = Field(
        default=120,
        ge=0,
        le=86400,
        description="After the queues empty, wait this many seconds before scaling toward replicas.min.",
    )
    fallback_replicas: int | None = Field(
        default=None,
        ge=0,
        le=MAX_REPLICAS,
        description="Replicas to run while queue depth cannot be read (broker down); unset "
        "keeps the current count. Must lie within replicas.min..replicas.max.",
    )
    scale_in_busy_workers: BusyWorkers = Field(
        default=BusyWorkers.KEEP,
        description="Keep: before every scale-down the operator asks the tier's workers (Celery remote "
        "control: inspect active/reserved/scheduled) and never goes below the ones that run or hold "
        "tasks, or do not answer; idle pods are removed first and drained (cancel_consumer) before. "
        "Remove: follow demand even through busy workers, which then get SIGTERM (a warm shutdown "
        "within terminationGracePeriodSeconds; under early ack a task still running after it is "
        "lost). Only for tiers whose tasks outlast any grace period you would give them.",
    )


_INT_OR_PERCENT = {
    # maxLength bounds the CEL cost of matching the string form ("100%" is the longest).
    "maxLength": 4,
    **_rules(
        _cel(
            f"type(self) == int ? self >= 0 : string(self).matches('{_PERCENT}')",
            "must be a non-negative integer or a percentage like '25%'",
        )
    ),
}


class PodDisruptionBudgetSpec(_Spec):
    """A PodDisruptionBudget for the tier's workers."""

    model_config = ConfigDict(
        json_schema_extra=_rules(
            _cel(
                "!(has(self.maxUnavailable) && has(self.minAvailable))",
                "set at most one of maxUnavailable or minAvailable",
            )
        )
    )

    enabled: bool = Field(default=True, description="Create the PodDisruptionBudget.")
    max_unavailable: int | str | None = Field(
        default=None,
        description="Pods that may be evicted at once: a number or a percentage like '25%'. "
        "When neither this nor minAvailable is set the operator uses maxUnavailable 1.",
        json_schema_extra=_INT_OR_PERCENT,
    )
    min_available: int | str | None = Field(
        default=None,
        description="Pods that must stay available: a number or a percentage like '75%'.",
        json_schema_extra=_INT_OR_PERCENT,
    )

    @field_validator("max_unavailable", "min_available", mode="before")
    @classmethod
    def _int_or_percent(cls, value: object) -> object:
        if value is None:
            return value
        ok = (isinstance(value, int) and not isinstance(value, bool) and value >= 0) or (
            isinstance(value, str) and _PERCENT_RE.match(value) is not None
        )
        if not ok:
            raise _rule_error("must be a non-negative integer or a percentage like '25%'")
        return value

    @model_validator(mode="after")
    def _at_most_one(self) -> Self:
        if self.max_unavailable is not None and self.min_available is not None:
            raise _rule_error("set at most one of maxUnavailable or minAvailable")
        return self


class Shutdown(_Spec):
    """How a tier's workers stop on SIGTERM (scale-in, rollout, node drain)."""

    soft_shutdown_timeout_seconds: int | None = Field(
        default=None,
        ge=1,
        le=86400,
        description="Celery 5.5+ soft shutdown (worker_soft_shutdown_timeout): on a cold shutdown running "
        "tasks get this many seconds, then they are cut; with task_acks_late on Redis they go back to the "
        "queue at once instead of after the visibility timeout. Unset: no soft shutdown.",
    )
    remap_sigterm: bool = Field(
        default=False,
        description="Set REMAP_SIGTERM=SIGQUIT, so the kubelet's SIGTERM starts the soft shutdown "
        "(needs softShutdownTimeoutSeconds); the grace period is then derived to cover it.",
    )
    soft_shutdown_on_idle: bool = Field(
        default=False,
        description="worker_enable_soft_shutdown_on_idle: also wait the soft timeout when no task runs, "
        "so reserved and ETA messages are handed back before the worker stops.",
    )

    @model_validator(mode="after")
    def _remap_needs_timeout(self) -> Self:
        if self.remap_sigterm and self.soft_shutdown_timeout_seconds is None:
            raise _rule_error("remapSigterm needs softShutdownTimeoutSeconds", "remapSigterm")
        return self


WorkerPoolKind = Literal["prefork", "threads", "gevent", "eventlet", "solo"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]


class Tier(_Spec):
    """One priority tier: its own Deployment consuming its own queues, scaled on their depth."""

    model_config = ConfigDict(
        json_schema_extra=_rules(
            _cel(
                "!has(self.softTimeLimitSeconds) || !has(self.timeLimitSeconds) "
                "|| self.softTimeLimitSeconds < self.timeLimitSeconds",
                "softTimeLimitSeconds must be < timeLimitSeconds",
                field_path=".softTimeLimitSeconds",
            ),
            _cel(
                "!has(self.terminationGracePeriodSeconds) || !has(self.timeLimitSeconds) "
                "|| self.terminationGracePeriodSeconds >= self.timeLimitSeconds",
                "terminationGracePeriodSeconds must be >= timeLimitSeconds so scale-in never cuts a running task short",
                field_path=".terminationGracePeriodSeconds",
            ),
            _cel(
                "!has(self.shutdown) || !has(self.shutdown.softShutdownTimeoutSeconds) "
                "|| !has(self.terminationGracePeriodSeconds) "
                "|| self.terminationGracePeriodSeconds >= self.shutdown.softShutdownTimeoutSeconds",
                "terminationGracePeriodSeconds must be >= shutdown.softShutdownTimeoutSeconds",
                field_path=".terminationGracePeriodSeconds",
            ),
            _cel(
                "!has(self.shutdown) || !has(self.shutdown.remapSigterm) || !self.shutdown.remapSigterm "
                "|| has(self.shutdown.softShutdownTimeoutSeconds)",
                "remapSigterm needs softShutdownTimeoutSeconds",
                field_path=".shutdown.remapSigterm",
            ),
            _cel(
                "!has(self.autoscaling) || !has(self.autoscaling.fallbackReplicas) "
                "|| (self.autoscaling.fallbackReplicas >= self.replicas.min "
                "&& self.autoscaling.fallbackReplicas <= self.replicas.max)",
                "fallbackReplicas must lie within replicas.min..replicas.max",
                field_path=".autoscaling.fallbackReplicas",
            ),
        )
    )

    name: str = Field(
        min_length=1,
        max_length=63,
        description="Tier name, a DNS label (lowercase letters, digits, '-'); part of the "
        "Deployment name <pool>-<name>.",
        json_schema_extra=_rules(
            _cel(
                f"self.matches('{DNS_LABEL}')",
                "must be a DNS label: lowercase letters, digits and '-', starting and ending with a letter or digit",
            )
        ),
    )
    queues: list[QueueName] = Field(
        min_length=1,
        max_length=MAX_QUEUES_PER_TIER,
        description="Celery queues this tier consumes (-Q); a queue belongs to at most one tier.",
        json_schema_extra=_rules(
            _cel("self.all(q, self.exists_one(r, r == q))", "must not list a queue twice"),
        ),
    )
    concurrency: int = Field(ge=1, le=1024, description="Worker processes/threads per pod (--concurrency); at least 1.")
    pool: WorkerPoolKind = Field(default="prefork", description="Celery execution pool (--pool).")
    prefetch_multiplier: int = Field(
        default=1,
        ge=1,
        le=128,
        description="Messages each worker process reserves ahead (--prefetch-multiplier); 1 "
        "keeps queued work visible to the autoscaler.",
    )
    max_tasks_per_child: int | None = Field(
        default=None,
        ge=1,
        description="Recycle a worker process after this many tasks (--max-tasks-per-child).",
    )
    max_memory_per_child_kib: int | None = Field(
        default=None,
        ge=1,
        alias="maxMemoryPerChildKiB",
        validation_alias=AliasChoices("maxMemoryPerChildKiB", "max_memory_per_child_kib"),
        description="Recycle a worker process above this resident memory in KiB (--max-memory-per-child).",
    )
    soft_time_limit_seconds: int | None = Field(
        default=None,
        ge=1,
        description="Task soft time limit (--soft-time-limit); must be < timeLimitSeconds.",
    )
    time_limit_seconds: int | None = Field(
        default=None,
        ge=1,
        description="Task hard time limit (--time-limit). terminationGracePeriodSeconds must cover it.",
    )
    log_level: LogLevel = Field(default="INFO", description="Worker --loglevel.")
    extra_args: list[ExtraArg] = Field(
        default_factory=list,
        max_length=MAX_EXTRA_ARGS,
        description="Extra arguments appended to `celery worker`.",
    )
    resources: KubeObject | None = Field(
        default=None,
        description="Container resources (requests/limits) of this tier's worker pods.",
    )
    replicas: ReplicaBounds = Field(description="Replica bounds for the autoscaler.")
    autoscaling: Autoscaling = Field(
        default_factory=Autoscaling,
        description="How replicas follow queue depth; every field has a default.",
    )
    termination_grace_period_seconds: int | None = Field(
        default=None,
        ge=0,
        le=86400,
        description="Pod termination grace period: a SIGTERM'd worker finishes running tasks "
        "(warm shutdown) within it. Must be >= timeLimitSeconds when both are set; unset lets "
        "the operator derive it from timeLimitSeconds.",
    )
    pod_disruption_budget: PodDisruptionBudgetSpec | None = Field(
        default=None,
        description="PodDisruptionBudget for this tier; unset means none.",
    )
    shutdown: Shutdown | None = Field(
        default=None,
        description="Soft shutdown (Celery 5.5+) on SIGTERM; unset: Celery's warm shutdown only.",
    )
    disable_prefetch: bool = Field(
        default=False,
        description="--disable-prefetch (Celery 5.6+, Redis only): a worker takes a message only when a "
        "process is free, so nothing waits reserved behind a running task.",
    )

    @field_validator("name")
    @classmethod
    def _name_is_dns_label(cls, name: str) -> str:
        if not _DNS_LABEL_RE.match(name):
            raise _rule_error(
                "must be a DNS label: lowercase letters, digits and '-', starting and ending with a letter or digit"
            )
        return name

    @field_validator("queues")
    @classmethod
    def _queue_names(cls, queues: list[str]) -> list[str]:
        if len(set(queues)) != len(queues):
            raise _rule_error("must not list a queue twice")
        return queues

    @model_validator(mode="after")
    def _cross_field(self) -> Self:
        soft, hard = self.soft_time_limit_seconds, self.time_limit_seconds
        if soft is not None and hard is not None and soft >= hard:
            raise _rule_error(
                f"softTimeLimitSeconds must be < timeLimitSeconds (got {soft} and {hard})",
                "softTimeLimitSeconds",
            )
        grace = self.termination_grace_period_seconds
        if grace is not None and hard is not None and grace < hard:
            raise _rule_error(
                "terminationGracePeriodSeconds must be >= timeLimitSeconds so scale-in never cuts a running task "
                f"short (got {grace} and {hard})",
                "terminationGracePeriodSeconds",
            )
        soft = self.shutdown.soft_shutdown_timeout_seconds if self.shutdown else None
        if grace is not None and soft is not None and grace < soft:
            raise _rule_error(
                "terminationGracePeriodSeconds must be >= shutdown.softShutdownTimeoutSeconds "
                f"(got {grace} and {soft})",
                "terminationGracePeriodSeconds",
            )
        fallback = self.autoscaling.fallback_replicas
        if fallback is not None and not self.replicas.min <= fallback <= self.replicas.max:
            raise _rule_error(
                "fallbackReplicas must lie within replicas.min..replicas.max "
                f"(got {fallback}, bounds {self.replicas.min}..{self.replicas.max})",
                "autoscaling.fallbackReplicas",
            )
        return self


def default_tiers() -> list[Tier]:
    """The three tiers teams run by hand today; used when a pool names no tiers."""
    return [
        Tier(name="high", queues=["high_priority"], concurrency=4, replicas=ReplicaBounds(min=2, max=8)),
        Tier(name="medium", queues=["medium_priority"], concurrency=6, replicas=ReplicaBounds(min=4, max=12)),
        Tier(name="low", queues=["low_priority"], concurrency=2, replicas=ReplicaBounds(min=1, max=4)),
    ]


# ---------------------------------------------------------------------------------------------
# Shared workload fields and the two kinds
# ---------------------------------------------------------------------------------------------


class WorkloadSpec(_Spec):
    """Fields shared by CeleryWorkerPool and CeleryBeat: what to run and how its pods look."""

    app: str = Field(
        min_length=1,
        max_length=253,
        description="The Celery application, as passed to `celery -A` (e.g. 'proj.celery:app').",
    )
    image: str = Field(
        min_length=1,
        max_length=512,
        description="Container image with the application and Celery installed.",
    )
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = Field(
        default=None, description="Image pull policy; unset uses the Kubernetes default."
    )
    image_pull_secrets: Annotated[list[KubeObject], _PULL_SECRET_NAMES[1]] = Field(
        default_factory=list,
        description="Secrets for pulling the image (LocalObjectReference: {name}).",
        json_schema_extra=_PULL_SECRET_NAMES[0],
    )
    broker: Broker = Field(description="The Redis broker.")
    env: Annotated[list[KubeObject], _ENV_NAMES[1]] = Field(
        default_factory=list,
        description="Extra environment variables (EnvVar) for the container.",
        json_schema_extra=_ENV_NAMES[0],
    )
    env_from: Annotated[list[KubeObject], _ENV_FROM_NAMES[1]] = Field(
        default_factory=list,
        description="Extra environment sources (EnvFromSource) for the container.",
        json_schema_extra=_ENV_FROM_NAMES[0],
    )
    service_account_name: ObjectName | None = Field(default=None, description="ServiceAccount the pods run as.")
    pod_labels: dict[str, str] = Field(
        default_factory=dict, description="Extra labels on the pods (operator labels win on conflict)."
    )
    pod_annotations: dict[str, str] = Field(default_factory=dict, description="Extra annotations on the pods.")
    node_selector: dict[str, str] = Field(default_factory=dict, description="Pod nodeSelector.")
    tolerations: list[KubeObject] = Field(default_factory=list, description="Pod tolerations.")
    affinity: KubeObject | None = Field(default=None, description="Pod affinity (Affinity).")
    topology_spread_constraints: list[KubeObject] = Field(
        default_factory=list, description="Pod topologySpreadConstraints."
    )
    priority_class_name: ObjectName | None = Field(default=None, description="Pod priorityClassName.")
    security_context: KubeObject | None = Field(
        default=None, description="Pod-level securityContext (PodSecurityContext)."
    )
    container_security_context: KubeObject | None = Field(
        default=None, description="Container-level securityContext (SecurityContext)."
    )
    volumes: Annotated[list[KubeObject], _VOLUME_NAMES[1]] = Field(
        default_factory=list, description="Extra pod volumes.", json_schema_extra=_VOLUME_NAMES[0]
    )
    volume_mounts: list[KubeObject] = Field(
        default_factory=list, description="Extra volume mounts of the main container."
    )


def _tier_queue_owners(tiers: list[Tier]) -> str | None:
    """The first queue claimed by two tiers, as a message; None when every queue has one tier."""
    owner: dict[str, str] = {}
    for tier in tiers:
        for queue in tier.queues:
            if queue in owner and owner[queue] != tier.name:
                where = f"got {queue!r} in tiers {owner[queue]!r} and {tier.name!r}"
                return f"a queue may belong to at most one tier ({where})"
            owner.setdefault(queue, tier.name)
    return None


class CeleryWorkerPoolSpec(WorkloadSpec):
    """A fleet of Celery workers: one Deployment per tier, scaled on its queues' depth."""

    model_config = ConfigDict(
        json_schema_extra=_rules(
            _cel(
                "self.tiers.all(t, self.tiers.exists_one(u, u.name == t.name))",
                "tier names must be unique",
                field_path=".tiers",
            ),
            _cel(
                "self.tiers.all(t, self.tiers.all(u, t.name == u.name || t.queues.all(q, !(q in u.queues))))",
                "a queue may belong to at most one tier",
                field_path=".tiers",
            ),
            _cel(
                "!has(self.maxTotalReplicas) || self.maxTotalReplicas >= self.tiers.map(t, t.replicas.min).sum()",
                "maxTotalReplicas must be >= the sum of the tiers' replicas.min",
                field_path=".maxTotalReplicas",
            ),
        )
    )

    tiers: list[Tier] = Field(
        default_factory=default_tiers,
        min_length=1,
        max_length=MAX_TIERS,
        description="Worker tiers, highest priority first. Omitted: high (queue high_priority, "
        "concurrency 4, 2-8 replicas), medium (medium_priority, 6, 4-12), low (low_priority, "
        "2, 1-4).",
    )
    max_total_replicas: int | None = Field(
        default=None,
        ge=1,
        le=MAX_REPLICAS * MAX_TIERS,
        description="Replica budget across all tiers; when desired replicas exceed it, higher "
        "tiers are served first. Must be >= the sum of the tiers' replicas.min. Unset: no budget.",
    )
    paused: bool = Field(
        default=False,
        description="Stop autoscaling and leave the Deployments as they are.",
    )

    @model_validator(mode="after")
    def _tiers_consistent(self) -> Self:
        names = [t.name for t in self.tiers]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise _rule_error(f"tier names must be unique (got {', '.join(duplicates)} more than once)", "tiers")
        clash = _tier_queue_owners(self.tiers)
        if clash:
            raise _rule_error(clash, "tiers")
        floor = sum(t.replicas.min for t in self.tiers)
        if self.max_total_replicas is not None and self.max_total_replicas < floor:
            raise _rule_error(
                "maxTotalReplicas must be >= the sum of the tiers' replicas.min "
                f"(got {self.max_total_replicas}, sum {floor})",
                "maxTotalReplicas",
            )
        return self


class LeaseSpec(_Spec):
    """Timing of the Kubernetes Lease that elects the single running beat."""

    model_config = ConfigDict(
        json_schema_extra=_rules(
            _cel(
                "self.renewDeadlineSeconds < self.durationSeconds",
                "renewDeadlineSeconds must be < durationSeconds",
                field_path=".renewDeadlineSeconds",
            ),
            _cel(
                "self.retryPeriodSeconds < self.renewDeadlineSeconds",
                "retryPeriodSeconds must be < renewDeadlineSeconds",
                field_path=".retryPeriodSeconds",
            ),
        )
    )

    duration_seconds: int = Field(
        default=15,
        ge=2,
        le=3600,
        description="Lease duration: a standby takes over at most this long after the leader stops renewing.",
    )
    renew_deadline_seconds: int = Field(
        default=10,
        ge=1,
        le=3600,
        description="The leader stops beat if it cannot renew within this many seconds; must be "
        "< durationSeconds so it stops before anyone else may start.",
    )
    retry_period_seconds: int = Field(
        default=2,
        ge=1,
        le=3600,
        description="Seconds between renew/acquire attempts; must be < renewDeadlineSeconds.",
    )

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if self.renew_deadline_seconds >= self.duration_seconds:
            raise _rule_error(
                "renewDeadlineSeconds must be < durationSeconds "
                f"(got {self.renew_deadline_seconds} and {self.duration_seconds})",
                "renewDeadlineSeconds",
            )
        if self.retry_period_seconds >= self.renew_deadline_seconds:
            raise _rule_error(
                "retryPeriodSeconds must be < renewDeadlineSeconds "
                f"(got {self.retry_period_seconds} and {self.renew_deadline_seconds})",
                "retryPeriodSeconds",
            )
        return self


class CeleryBeatSpec(WorkloadSpec):
    """The single Celery Beat scheduler of an application, fenced by a Kubernetes Lease."""

    scheduler: str = Field(
        default="celery.beat:PersistentScheduler",
        min_length=1,
        max_length=253,
        description="Beat scheduler class (--scheduler), e.g. django_celery_beat.schedulers:DatabaseScheduler.",
    )
    lease: LeaseSpec = Field(
        default_factory=LeaseSpec,
        description="Leader-election timing; every field has a default.",
    )
    standby: int = Field(
        default=1,
        ge=0,
        le=1,
        description="Hot standby pods waiting for the lease (0 or 1).",
    )
    extra_args: list[ExtraArg] = Field(
        default_factory=list,
        max_length=MAX_EXTRA_ARGS,
        description="Extra arguments appended to `celery beat`.",
    )
    resources: KubeObject | None = Field(
        default=None, description="Container resources (requests/limits) of the beat container."
    )
    elector_image: str | None = Field(
        default=None,
        max_length=512,
        description="Image carrying the lease elector; unset uses the operator's own image.",
    )
    paused: bool = Field(default=False, description="Stop reconciling the beat pods.")


# ---------------------------------------------------------------------------------------------
# Status (written by the operator)
# ---------------------------------------------------------------------------------------------


class Condition(_Status):
    """A standard Kubernetes condition; `Ready` is always present once reconciled."""

    type: str = Field(max_length=316, description="Condition type, e.g. Ready.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(default="", max_length=1024, description="CamelCase reason.")
    message: str = Field(default="", max_length=32768, description="Human-readable detail.")
    last_transition_time: str | None = Field(
        default=None,
        description="When status last changed (RFC 3339).",
        json_schema_extra={"format": "date-time"},
    )
    observed_generation: int | None = Field(
        default=None, ge=0, description="metadata.generation the condition was computed for."
    )


class TierStatus(_Status):
    """Observed state of one tier."""

    name: str = Field(description="Tier name.")
    replicas: int = Field(default=0, description="Pods of the tier's Deployment.")
    ready_replicas: int = Field(default=0, description="Ready pods.")
    desired_replicas: int = Field(default=0, description="Replicas the autoscaler wants now.")
    queue_depth: int = Field(default=0, description="Queued messages over the tier's queues.")
    in_flight: int = Field(default=0, description="Messages taken by workers, not yet acknowledged.")
    last_scale_time: str | None = Field(
        default=None,
        description="When the autoscaler last changed replicas (RFC 3339).",
        json_schema_extra={"format": "date-time"},
    )
    last_scale_reason: str | None = Field(default=None, description="Why it last scaled.")
    scheduled: int | None = Field(
        default=None,
        description="ETA / countdown tasks the tier's workers hold until due (scheduled work, not demand), "
        "as they answered at the last scale-down decision.",
    )
    busy_workers: int | None = Field(
        default=None,
        description="Workers that ran or held tasks, or did not answer, at the last scale-down decision.",
    )


class CeleryWorkerPoolStatus(_Status):
    """Observed state of a pool, with totals for `kubectl get`."""

    observed_generation: int | None = Field(default=None, description="metadata.generation last reconciled.")
    conditions: list[Condition] = Field(default_factory=list, description="Ready and others.")
    tiers: list[TierStatus] = Field(default_factory=list, description="Per-tier state.")
    replicas: int = Field(default=0, description="Pods over all tiers.")
    desired_replicas: int = Field(default=0, description="Desired replicas over all tiers.")
    queued: int = Field(default=0, description="Queued messages over all tiers.")
    ready: str = Field(default="", description="Ready pods over pods, e.g. '7/8'.")


class CeleryBeatStatus(_Status):
    """Observed state of a beat."""

    observed_generation: int | None = Field(default=None, description="metadata.generation last reconciled.")
    conditions: list[Condition] = Field(default_factory=list, description="Ready and others.")
    leader: str | None = Field(default=None, description="Pod holding the lease (running beat).")
    lease_transitions: int = Field(default=0, description="Times the lease changed holder.")
    renew_time: str | None = Field(
        default=None,
        description="Last lease renewal (RFC 3339).",
        json_schema_extra={"format": "date-time"},
    )


# ---------------------------------------------------------------------------------------------
# Parsing objects read from the apiserver
# ---------------------------------------------------------------------------------------------


class InvalidSpec(ValueError):
    """A spec the operator cannot act on; `message` names each offending field."""

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.problems = problems if problems is not None else [message]


def _path(loc: tuple[int | str, ...], root: str) -> str:
    path = root
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return path


def describe_errors(error: ValidationError, root: str = "spec") -> list[str]:
    """One 'path: problem' line per pydantic error, in the words the CEL rules use."""
    problems = []
    for item in error.errors(include_url=False):
        loc = tuple(item["loc"])
        ctx = item.get("ctx") or {}
        if item["type"] == RULE_ERROR and ctx.get("field"):
            loc = (*loc, *(int(p) if p.isdigit() else p for p in str(ctx["field"]).split(".")))
        message = item["msg"]
        if item["type"] == "missing":
            message = "required field is missing"
        elif item["type"] == "extra_forbidden":
            message = "unknown field (check its spelling and the API version)"
        problems.append(f"{_path(loc, root)}: {message}")
    return problems


def _spec_of(body_or_spec: Mapping[str, Any]) -> Mapping[str, Any]:
    # Specs have no `spec` field, so its presence means a whole object was passed.
    if "spec" in body_or_spec:
        spec = body_or_spec["spec"]
        if not isinstance(spec, Mapping):
            raise InvalidSpec("spec: must be an object")
        return spec
    return body_or_spec


def _parse(model: type[_M], body_or_spec: Mapping[str, Any]) -> _M:
    spec = _spec_of(body_or_spec)
    try:
        return model.model_validate(dict(spec))
    except ValidationError as error:
        problems = describe_errors(error)
        raise InvalidSpec("; ".join(problems), problems) from None


def parse_pool(body_or_spec: Mapping[str, Any]) -> CeleryWorkerPoolSpec:
    """Validate a CeleryWorkerPool (whole object or its spec); raises InvalidSpec."""
    return _parse(CeleryWorkerPoolSpec, body_or_spec)


def parse_beat(body_or_spec: Mapping[str, Any]) -> CeleryBeatSpec:
    """Validate a CeleryBeat (whole object or its spec); raises InvalidSpec."""
    return _parse(CeleryBeatSpec, body_or_spec)


def pool_name_rule() -> dict[str, str]:
    """Object names become label values and Deployment name prefixes, so keep them DNS labels."""
    return _cel(
        "size(self.metadata.name) <= 63",
        "metadata.name must be at most 63 characters (it is used in label values)",
        field_path=".metadata.name",
    )
