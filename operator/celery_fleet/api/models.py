# Over 500 lines on purpose: the whole API in one set of models, the CRDs' single source.
"""The celeryfleet.io/v1alpha1 API: CeleryWorkerPool and CeleryBeat as pydantic models.

These models are the single source of the API. The CRDs in `crds/` are generated from them
(`python -m celery_fleet.api.crdgen`), including descriptions, defaults and the CEL rules
(`x-kubernetes-validations`). Each rule is declared once (`api.rules`), as a model's `RULES` or
a field's `Annotated` metadata, and yields both the CEL rule and the models' check, in the same
words, so an object that slipped past the apiserver (stored before a CRD upgrade, or sent with
validation off) is reported by the operator as the apiserver would have.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Literal, Self, TypeVar

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.alias_generators import to_camel

from celery_fleet import GROUP, VERSION
from celery_fleet.api.broker_url import QUERY_HINT, BrokerUrlError, parse_broker_url
from celery_fleet.api.rules import (
    RULE_ERROR,
    Expr,
    ListRules,
    Rule,
    Violation,
    at_most_one,
    cel_string,
    cmp,
    compare,
    exactly_one,
    is_set,
    is_true,
    judged_elsewhere,
    matches,
    max_length,
    model_schema_extra,
    no_item_with,
    none_of,
    pattern,
    re2,
    rule,
    rule_error,
    strictly_increasing,
    unique,
    unset,
    value_at,
    when_set,
)

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
# Names of Secrets, ConfigMaps, ServiceAccounts, PriorityClasses...: a DNS subdomain. `[.]`, not
# `\.`, so the same text is a valid pattern inside a CEL string literal. The operator builds
# REST paths from some of these names: `/`, `..` and `%` must never get that far.
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
MAX_OBJECT_NAME_LENGTH = 253
OBJECT_NAME_RULE = (
    "must be a Kubernetes object name: lowercase letters, digits, '-' and '.', "
    "starting and ending with a letter or digit (no '/')"
)
# Broker URLs may be `;` lists (kombu's failover alternates, or several Sentinels): every rule
# below holds for every segment.
_SEGMENT_SCHEMES = r"^[ ]*(rediss?|sentinel)://[^;]*(;[ ]*(rediss?|sentinel)://[^;]*)*$"
_REDIS_SEGMENT, _SENTINEL_SEGMENT = r"(^|;)[ ]*rediss?://", r"(^|;)[ ]*sentinel://"
# A password hides in the userinfo (`redis://:pw@host`, `redis://user:pw@host`) of any segment or
# in a `password=` query parameter, which redis-py also honours.
_USERINFO_PASSWORD = r"(^|;)[ ]*[a-z]+://[^/?#;@]*:[^/?#;@]*@"
_QUERY_PASSWORD = r"[?&]password="
# The only query option allowed (broker_url.ALLOWED_QUERY), per segment.
_QUERY_SHAPE = (
    r"^[^?#;]*([?]ssl_cert_reqs=(required|CERT_REQUIRED))?(;[^?#;]*([?]ssl_cert_reqs=(required|CERT_REQUIRED))?)*$"
)
_URL_PASSWORD_MESSAGE = (
    "must not contain a password (in any ';'-separated URL); store the full URL in a Secret and use urlSecretRef"
)
_PERCENT = r"^(100|[1-9]?[0-9])%$"
# Every character Python's str.isspace() knows (Celery strips them from -Q names), spelled out:
# RE2's `\s` is ASCII-only and has no vertical tab.
_WHITESPACE = "".join(c for c in map(chr, range(0x3001)) if c.isspace())
_QUEUE_NAME = f"^[^,{_WHITESPACE}]+$"

# Celery's task_default_queue: where tasks sent without a route go.
CELERY_DEFAULT_QUEUE = "celery"

# Names the operator sets itself in worker and beat pods; a user entry with the same name would
# be a duplicate key, which server-side apply rejects for the whole Deployment.
POD_NAME_ENV = "POD_NAME"
POD_NAMESPACE_ENV = "POD_NAMESPACE"
BROKER_URL_ENV = "CELERY_BROKER_URL"
BROKER_SECRET_URL_ENV = "CELERY_FLEET_BROKER_URL"  # with spec.broker.tls: the Secret's URL, before the TLS query
OPERATOR_ENV = (POD_NAME_ENV, POD_NAMESPACE_ENV, BROKER_URL_ENV, BROKER_SECRET_URL_ENV)
# Beat pods: the elector's volume and the schedule's, and where they are mounted.
ELECTOR_VOLUME, ELECTOR_DIR = "celery-fleet", "/celery-fleet"
SCHEDULE_VOLUME, SCHEDULE_DIR = "beat-schedule", "/celery-beat"
# Worker and beat pods with spec.broker.tls: the projected CA / client-certificate volume.
BROKER_TLS_VOLUME, BROKER_TLS_DIR = "celery-fleet-broker-tls", "/etc/celery-fleet/broker-tls"

_M = TypeVar("_M", bound="BaseModel")


class _Spec(BaseModel):
    """Spec models: camelCase on the wire, unknown fields rejected (they are typos).

    `RULES` are the model's own validation rules (api.rules): CEL on the object in the CRD, and
    checked here once the fields are valid.
    """

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_default=False,
        json_schema_extra=model_schema_extra,
    )

    RULES: ClassVar[tuple[Rule, ...]] = ()

    @model_validator(mode="after")
    def _declared_rules(self) -> Self:
        for each in self.RULES:
            each.check(self)
        return self


class _Status(BaseModel):
    """Status models: written by the operator; tolerate fields other writers (Kopf) add."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    def to_json(self) -> dict[str, Any]:
        """The status as written: wire names, unset (None) fields left out."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


KubeObject = dict[str, Any]

QueueName = Annotated[
    str,
    Field(min_length=1, max_length=MAX_QUEUE_NAME_LENGTH),
    pattern(_QUEUE_NAME, "queue names must not contain commas or whitespace", bad="a,b"),
]
PriorityStep = Annotated[int, Field(ge=0, le=9)]
ExtraArg = Annotated[str, Field(max_length=MAX_EXTRA_ARG_LENGTH)]

# `celery worker` options the operator sets from a tier's fields, and the fix for each: the scale-in
# census asks the node names we set and counts the slots we set, so an override breaks it silently.
# (short letter or "", long name, fix); `--autoscale` too: it resizes the pool behind `concurrency`.
WORKER_OPTIONS: tuple[tuple[str, str, str], ...] = (
    ("n", "hostname", "the operator names each worker celery@<pod name>, the name its census asks; remove it"),
    ("Q", "queues", "list the tier's queues in spec.tiers[].queues"),
    ("X", "exclude-queues", "list only the queues to consume in spec.tiers[].queues"),
    ("P", "pool", "use spec.tiers[].pool"),
    ("c", "concurrency", "use spec.tiers[].concurrency"),
    ("", "prefetch-multiplier", "use spec.tiers[].prefetchMultiplier"),
    ("", "disable-prefetch", "use spec.tiers[].disablePrefetch"),
    (
        "",
        "autoscale",
        "it resizes the pool scale-in counts as spec.tiers[].concurrency; spec.tiers[].replicas adds pods",
    ),
)
# Click reads a short option's value from the same token (`-c4`) and lets flags come first (`-Ec4`):
# -B, -D and -E are the worker's only short flags, so `-[BED]*c` is every way to spell -c.
_SHORT_FLAGS = "BED"


def _worker_option_rule(short: str, long: str, fix: str) -> Rule:
    spelled = f"--{long}([=]|$)"
    regex = f"^(-[{_SHORT_FLAGS}]*{short}|{spelled})" if short else f"^{spelled}"
    name = f"-{short}/--{long}" if short else f"--{long}"
    return rule(~matches(regex), f"{name} is set by the operator: {fix}", bad=f"-{short}" if short else f"--{long}=1")


WorkerExtraArg = Annotated[
    str, Field(max_length=MAX_EXTRA_ARG_LENGTH), *(_worker_option_rule(*option) for option in WORKER_OPTIONS)
]
# Click also reads a worker option from CELERY_WORKER_<OPTION> when the command line lacks it: these
# two the operator never passes, so they would take effect (the others are always on the command line).
WORKER_OPTION_ENV = {
    "CELERY_WORKER_EXCLUDE_QUEUES": "list only the queues to consume in spec.tiers[].queues",
    "CELERY_WORKER_AUTOSCALE": "the operator scales pods: use spec.tiers[].concurrency and spec.tiers[].replicas",
}

ObjectName = Annotated[
    str,
    Field(min_length=1, max_length=MAX_OBJECT_NAME_LENGTH),
    pattern(DNS_SUBDOMAIN, OBJECT_NAME_RULE, bad="Not/A/Name"),
]

_PASS_THROUGH = (
    "an unbounded list of Kubernetes objects: a CEL rule over its items would exceed the apiserver's "
    "cost budget (the apiserver validates the objects again on the Deployment)"
)


def _names_in(*paths: str, item: KubeObject, declared: KubeObject | None = None) -> tuple[tuple[Rule, ...], KubeObject]:
    """Rules and item schema for object names inside pass-through Kubernetes objects (EnvVar, Volume...).

    The objects stay free-form, but the names at `paths` (dotted, e.g. `valueFrom.secretKeyRef.name`)
    are checked at admission by an OpenAPI pattern and here, in the words of OBJECT_NAME_RULE.
    `item` is the rest of a valid item, for the rules' bad examples; `declared` more properties of
    the items, for CEL rules that read them.
    """
    schema: KubeObject = {
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": True,
        "properties": dict(declared or {}),
    }
    rules = []
    for path in paths:
        node = schema
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
        node["properties"][leaf] = {
            "description": f"Name of an object in this namespace; {OBJECT_NAME_RULE}.",
            "type": "string",
            "maxLength": MAX_OBJECT_NAME_LENGTH,
            "pattern": DNS_SUBDOMAIN,
        }
        bad: Any = "Not/A/Name"
        for part in reversed(path.split(".")):
            bad = {part: bad}
        rules.append(
            judged_elsewhere(
                OBJECT_NAME_RULE,
                functools.partial(_first_bad_name, path=path),
                admission="pattern",
                pattern=DNS_SUBDOMAIN,
                why=_PASS_THROUGH,
                bad=[{**item, **bad}],
            )
        )
    return tuple(rules), schema


_OBJECT_NAME_RE = re2(DNS_SUBDOMAIN)


def _first_bad_name(items: list[KubeObject], *, path: str) -> Violation | None:
    for index, obj in enumerate(items):
        name = value_at(obj, path)
        if name is None:
            continue
        if not (isinstance(name, str) and len(name) <= MAX_OBJECT_NAME_LENGTH and _OBJECT_NAME_RE.search(name)):
            return Violation(f"{index}.{path}")
    return None


def _env_repeated(env: list[KubeObject]) -> Violation | None:
    seen: dict[Any, int] = {}
    for index, var in enumerate(env):
        name = var.get("name")
        if name in seen:
            return Violation(f"{index}.name", f"(got {name}, as in entry {seen[name]})")
        seen[name] = index
    return None


# Per item, one name per rule: the apiserver's CEL budget allows that much in the unbounded env
# list (four names in one rule exceed it 1.9x).
_ENV_SOURCES = {
    POD_NAME_ENV: "from the downward API",
    POD_NAMESPACE_ENV: "from the downward API",
    BROKER_URL_ENV: "from spec.broker",
    BROKER_SECRET_URL_ENV: "from spec.broker",
}
EnvVar = Annotated[
    KubeObject,
    rule(
        is_set("name") & Expr("size(self.name) > 0", lambda v: bool(value_at(v, "name")), "cmp"),
        "required (an EnvVar needs a name)",
        field_path="name",
        bad={"value": "x"},
    ),
    *(
        rule(
            unset("name") | none_of("name", [name]),
            f"{name} is set by the operator ({source}); remove it from spec.env",
            field_path="name",
            bad={"name": name, "value": "x"},
        )
        for name, source in _ENV_SOURCES.items()
    ),
]
_ENV_NAMES = _names_in(
    "valueFrom.secretKeyRef.name",
    "valueFrom.configMapKeyRef.name",
    item={"name": "SOME_VAR"},
    declared={"name": {"description": "Variable name; not one the operator sets, not repeated.", "type": "string"}},
)
_ENV_RULES = ListRules(
    (
        judged_elsewhere(
            "is already set by an earlier entry of spec.env; keep one of them",
            _env_repeated,
            admission="operator",
            why="comparing every pair of an unbounded list exceeds the apiserver's CEL cost budget (over 100x)",
            bad=[{"name": "SOME_VAR", "value": "1"}, {"name": "SOME_VAR", "value": "2"}],
        ),
        *_ENV_NAMES[0],
    ),
    _ENV_NAMES[1],
)
_ENV_FROM_RULES = ListRules(*_names_in("secretRef.name", "configMapRef.name", item={}))
_VOLUME_RULES = ListRules(
    *_names_in(
        "secret.secretName",
        "configMap.name",
        "persistentVolumeClaim.claimName",
        item={"name": "data"},
        declared={"name": {"description": "Volume name.", "type": "string"}},
    )
)
# Declared so the beat's rule can read the mount paths; the mounts are passed through otherwise.
_VOLUME_MOUNT_ITEMS = ListRules(
    (),
    {
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": True,
        "properties": {"mountPath": {"description": "Where the volume is mounted.", "type": "string"}},
    },
)
_PULL_SECRET_RULES = ListRules(*_names_in("name", item={}))


def _where(spec: Any, path: str, key: str, ours: str) -> str:
    index = next(i for i, x in enumerate(value_at(spec, path) or []) if x.get(key) == ours)
    return f"(in {path}[{index}])"


# One name per rule, for the apiserver's CEL budget (two in one rule exceed it 1.4x).
def _reserved_mounts(pods: str, volumes: Sequence[str], paths: Sequence[str]) -> tuple[Rule, ...]:
    """Rules refusing the volume names and mount paths the operator uses in `pods`."""
    return (
        *(
            rule(
                no_item_with("volumes", "name", [volume]),
                f"volume name {volume} is used by the operator for the {pods}; rename the volume",
                field_path="volumes",
                details=functools.partial(_where, path="volumes", key="name", ours=volume),
                bad={"volumes": [{"name": volume, "emptyDir": {}}]},
            )
            for volume in volumes
        ),
        *(
            rule(
                no_item_with("volumeMounts", "mountPath", [path]),
                f"mount path {path} is used by the operator for the {pods}; mount the volume elsewhere",
                field_path="volumeMounts",
                details=functools.partial(_where, path="volumeMounts", key="mountPath", ours=path),
                bad={"volumeMounts": [{"name": "data", "mountPath": path}]},
            )
            for path in paths
        ),
    )


# The broker TLS volume is judged by the models alone: at admission its rules exceed the CEL cost
# budget (1.05x, measured on the apiserver) in either kind, whose budgets the other rules spend.
_BROKER_TLS_VOLUME_RULES = tuple(
    dataclasses.replace(r, cel=None, admission="operator", why="over the CRD's CEL cost budget (1.05x, measured)")
    for r in _reserved_mounts("worker and beat pods", [BROKER_TLS_VOLUME], [BROKER_TLS_DIR])
)
_BEAT_VOLUME_RULES = (
    *_reserved_mounts("beat pods", [ELECTOR_VOLUME, SCHEDULE_VOLUME], [ELECTOR_DIR, SCHEDULE_DIR]),
    *_BROKER_TLS_VOLUME_RULES,
)

# ---------------------------------------------------------------------------------------------
# Broker
# ---------------------------------------------------------------------------------------------


BrokerUrl = Annotated[
    str,
    pattern(
        _SEGMENT_SCHEMES,
        "must start with redis://, rediss:// or sentinel:// (every ';'-separated URL)",
        bad="amqp://rabbit:5672//",
    ),
    rule(
        ~(matches(_REDIS_SEGMENT) & matches(_SENTINEL_SEGMENT)),
        "do not mix sentinel:// with redis:// or rediss:// in one URL",
        bad="redis://r1:6379/0;sentinel://s1:26379",
    ),
    rule(
        ~matches(_USERINFO_PASSWORD) & ~matches(_QUERY_PASSWORD),
        _URL_PASSWORD_MESSAGE,
        bad="redis://:hunter2@redis:6379/0",
    ),
    pattern(_QUERY_SHAPE, QUERY_HINT, bad="redis://shown:6379/0?host=elsewhere"),
]


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

    RULES = (
        exactly_one("secretName", "configMapName", bad={"secretName": "ca", "configMapName": "ca", "key": "ca.crt"}),
    )

    secret_name: str | None = Field(
        default=None, min_length=1, max_length=253, pattern=DNS_SUBDOMAIN, description="A Secret in this namespace."
    )
    config_map_name: str | None = Field(
        default=None, min_length=1, max_length=253, pattern=DNS_SUBDOMAIN, description="A ConfigMap in this namespace."
    )
    key: str = Field(min_length=1, max_length=253, pattern=r"^[-._a-zA-Z0-9]+$", description="Key in it.")


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

    RULES = (
        rule(
            ~(is_true("insecureSkipVerify") & is_set("ca")),
            "set either ca or insecureSkipVerify, not both",
            bad={"ca": {"secretName": "ca", "key": "ca.crt"}, "insecureSkipVerify": True},
        ),
    )

    ca: KeySelector | None = Field(default=None, description="PEM CA bundle that signed the broker's certificate.")
    client_certificate: ClientCertificate | None = Field(default=None, description="For brokers that require mTLS.")
    insecure_skip_verify: bool = Field(
        default=False,
        description="INSECURE: do not verify the broker's certificate (anyone on the path can read the "
        "traffic and the password). The pool says so in a Warning Event and condition.",
    )


class Broker(_Spec):
    """The Redis broker the workers consume from and the operator reads queue depth from."""

    RULES = (
        exactly_one("url", "urlSecretRef", bad={"urlSecretRef": {"name": "broker", "key": "url"}}),
        rule(
            unset("url") | ~matches(_SENTINEL_SEGMENT, "url") | is_set("masterName"),
            "sentinel:// URLs need masterName (Celery's broker_transport_options.master_name)",
            field_path="masterName",
            bad={"url": "sentinel://s1:26379"},
        ),
    )

    url: BrokerUrl | None = Field(
        default=None,
        max_length=MAX_URL_LENGTH,
        description="Broker URL without credentials, redis:// or rediss:// "
        "(e.g. redis://redis.celery.svc:6379/0); a ';' list is tried in turn as kombu does "
        "(redis://a:6379/0;redis://b:6379/0), and sentinel://h1:26379;sentinel://h2:26379 reads "
        "through Redis Sentinel (set masterName). Put URLs that carry a password in a Secret "
        "and use urlSecretRef. Exactly one of url and urlSecretRef is required.",
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
    priority_steps: Annotated[list[PriorityStep], strictly_increasing(bad=[0, 6, 3])] = Field(
        default_factory=lambda: [0, 3, 6, 9],
        min_length=1,
        max_length=10,
        description="Celery's broker_transport_options.priority_steps: each step other than 0 is "
        "a separate Redis list (queue + '\\x06\\x16' + step) that counts toward queue depth. "
        "Strictly increasing, each 0-9.",
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
    visibility_timeout_seconds: int = Field(
        default=3600,
        ge=1,
        le=604_800,
        description="Celery's broker_transport_options.visibility_timeout (kombu's default 3600): an unacked "
        "message older than this is one kombu will restore (its worker is gone), so it is reported as "
        "status.tiers[].staleUnacked and not counted in flight. Set it to the app's value.",
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
    def _url_parses(cls, url: str | None) -> str | None:
        """After the declared rules (BrokerUrl), the parser's finer checks (database number, segment count)."""
        if url is None:
            return url
        try:
            parsed = parse_broker_url(url)
        except BrokerUrlError as err:
            raise rule_error(err.message) from None
        if parsed.secrets:  # a userinfo the regex cannot see (e.g. a '/' in it)
            raise rule_error(_URL_PASSWORD_MESSAGE)
        return url


# ---------------------------------------------------------------------------------------------
# Tiers
# ---------------------------------------------------------------------------------------------


class ReplicaBounds(_Spec):
    """The autoscaler keeps the tier's replica count within [min, max]."""

    RULES = (compare("min", "<=", "max", bad={"min": 5, "max": 3}),)

    min: int = Field(
        ge=0,
        le=MAX_REPLICAS,
        description="Fewest replicas of this tier (0 lets an idle tier scale to zero).",
    )
    max: int = Field(ge=1, le=MAX_REPLICAS, description="Most replicas of this tier.")


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
    target_wait_seconds: int | None = Field(
        default=None,
        ge=1,
        le=86_400,
        description="Scale on the queue wait users feel: the targetWaitPercentile of the time from "
        "enqueue to start stays within this many seconds. The operator staffs the tier from the "
        "arrival rate, run-time distribution and pod start-up it measures (Erlang C for steady load, "
        "drains a backlog within the target minus the start-up, holds idle pods 3 start-ups when "
        "start-up is slow). When set it replaces targetDepthPerReplica, which then only applies "
        "until the first run times are measured. Run times are read from kombu's unacked_index, so "
        "the app must run task_acks_late=True (under early ack a running task leaves unacked as it "
        "starts and its run time cannot be seen). Unset: scale on depth.",
    )
    target_wait_percentile: int = Field(
        default=95,
        ge=50,
        le=99,
        description="The percentile of the queue wait that targetWaitSeconds bounds (50-99).",
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


_PERCENT_RE = re2(_PERCENT)
# Judged as written (`raw`): the CEL sees the JSON value, before pydantic would turn True into 1.
_INT_OR_PERCENT = rule(
    Expr(
        f"type(self) == int ? self >= 0 : string(self).matches('{_PERCENT}')",
        lambda v: (
            v is None
            or (isinstance(v, int) and not isinstance(v, bool) and v >= 0)
            or (isinstance(v, str) and _PERCENT_RE.search(v) is not None)
        ),
    ),
    "must be a non-negative integer or a percentage like '25%'",
    bad="half",
    raw=True,
)
# maxLength bounds the CEL cost of matching the string form ("100%" is the longest).
IntOrPercent = Annotated[int | str | None, _INT_OR_PERCENT, Field(json_schema_extra={"maxLength": 4})]


class PodDisruptionBudgetSpec(_Spec):
    """A PodDisruptionBudget for the tier's workers."""

    RULES = (at_most_one("maxUnavailable", "minAvailable", bad={"maxUnavailable": 1, "minAvailable": 1}),)

    enabled: bool = Field(default=True, description="Create the PodDisruptionBudget.")
    max_unavailable: IntOrPercent = Field(
        default=None,
        description="Pods that may be evicted at once: a number or a percentage like '25%'. "
        "When neither this nor minAvailable is set the operator uses maxUnavailable 1.",
    )
    min_available: IntOrPercent = Field(
        default=None,
        description="Pods that must stay available: a number or a percentage like '75%'.",
    )


class Shutdown(_Spec):
    """How a tier's workers stop on SIGTERM (scale-in, rollout, node drain)."""

    RULES = (
        rule(
            ~is_true("remapSigterm") | is_set("softShutdownTimeoutSeconds"),
            "remapSigterm needs softShutdownTimeoutSeconds",
            field_path="remapSigterm",
            bad={"remapSigterm": True},
        ),
    )

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


# ---------------------------------------------------------------------------------------------
# Per-tier pods: rollout, monitoring, the pod-template overlay
# ---------------------------------------------------------------------------------------------

# Names the worker pods' scale-in model depends on; the overlay may not touch them.
WORKER_CONTAINER = "worker"
POOL_LABEL = f"{GROUP}/pool"
TIER_LABEL = f"{GROUP}/tier"
MAX_OVERLAY_CONTAINERS = 16
MAX_TIER_ENV = 64  # a tier's env is a list inside the tiers list: bounded for the apiserver's CEL cost
MAX_COMMAND_PREFIX = 8
# The merge rule, stated once for every per-tier pod field (and the tests that hold the builder to it).
MERGE_RULE = (
    "Merged over the pool's value: maps (nodeSelector, podLabels, podAnnotations) and env (keyed by name) "
    "are merged key by key, the tier winning; envFrom is appended; other lists and objects (tolerations, "
    "affinity, topologySpreadConstraints) and scalars replace the pool's whole ([] clears a list); unset inherits."
)


def _zero(value: Any) -> bool:
    return value in (0, "0%") and not isinstance(value, bool)


class RolloutStrategy(_Spec):
    """The tier Deployment's RollingUpdate parameters."""

    RULES = (
        rule(
            Expr(
                "!(has(self.maxSurge) && string(self.maxSurge) in ['0', '0%']) || "
                "(has(self.maxUnavailable) && !(string(self.maxUnavailable) in ['0', '0%']))",
                lambda s: not _zero(s.max_surge) or (s.max_unavailable is not None and not _zero(s.max_unavailable)),
                "||",
            ),
            "maxSurge and maxUnavailable must not both be 0 (the rollout could never replace a pod)",
            field_path="maxSurge",
            bad={"maxSurge": 0},
        ),
    )

    max_surge: IntOrPercent = Field(
        default=None,
        description="Pods started above the replica count during a rollout: a number or a percentage "
        "like '25%'. Unset: 1.",
    )
    max_unavailable: IntOrPercent = Field(
        default=None,
        description="Pods that may be stopped before their replacements are ready: a number or a "
        "percentage. Unset: 0, so a rolling tier never runs below its replica count; raise both for "
        "large tiers (e.g. maxSurge '25%').",
    )


class Monitoring(_Spec):
    """Worker events and broadcasts that Flower and celery-exporter read; all off by default."""

    events: bool = Field(
        default=False,
        description="Send task events (`-E`): Flower's and celery-exporter's task metrics "
        "(celery_worker_tasks_active, task states) come from them. Cost: one Redis PUBLISH per task "
        "state change (about 3 per task) to the celeryev exchange.",
    )
    heartbeat: bool = Field(
        default=False,
        description="Send worker heartbeats (drops `--without-heartbeat`): Flower's flower_worker_online "
        "and celery-exporter's celery_worker_up come from them. Cost: one PUBLISH per worker every 2 s.",
    )
    gossip: bool = Field(
        default=False,
        description="Worker gossip (drops `--without-gossip`): each worker consumes every other worker's "
        "events, a cost that grows with the square of the pod count. Flower does not need it.",
    )
    mingle: bool = Field(
        default=False,
        description="Mingle at start (drops `--without-mingle`): a broadcast to every worker and a wait "
        "for replies on each pod start (revoked-task sync). Flower does not need it.",
    )


def _worker_field_unset(field: str, fix: str, bad: Any) -> Rule:
    return rule(
        Expr(
            f"self.name != '{WORKER_CONTAINER}' || !has(self.{field})",
            lambda c: c.name != WORKER_CONTAINER or value_at(c, field) is None,
            "||",
        ),
        f"{field} of the {WORKER_CONTAINER} container is set by the operator: {fix}",
        field_path=field,
        bad={"name": WORKER_CONTAINER, field: bad},
    )


def _free_form_schema(schema: dict[str, Any], model: type[Any]) -> None:
    # Only the declared fields are judged (and visible to CEL); the rest is passed to the pod.
    model_schema_extra(schema, model)
    schema["x-kubernetes-preserve-unknown-fields"] = True


_FREE_FORM = ConfigDict(extra="allow", json_schema_extra=_free_form_schema)


class ContainerOverlay(_Spec):
    """A container of the overlay (any Container field), merged by name into the generated ones."""

    model_config = _FREE_FORM

    RULES = (
        _worker_field_unset(
            "command",
            "the scale-in census depends on it; wrap it with commandPrefix (e.g. ['ddtrace-run'])",
            ["python"],
        ),
        _worker_field_unset(
            "args",
            "node name, queues, pool, concurrency and prefetch come from the tier's fields; add options with "
            "spec.tiers[].extraArgs",
            ["-n", "x"],
        ),
        _worker_field_unset("image", "use spec.image or spec.tiers[].image", "other:1"),
        _worker_field_unset(
            "env",
            "set the worker's variables in spec.env or spec.tiers[].env, where the operator's own names are refused",
            [{"name": "X", "value": "1"}],
        ),
    )

    name: Annotated[str, Field(min_length=1, max_length=63)] = Field(
        description=f"Container name, the merge key: '{WORKER_CONTAINER}' is the Celery worker (its command, "
        "args, env and image may not be set here); another name adds a sidecar."
    )
    command: list[str] | None = Field(default=None, description="Container command (not for the worker).")
    args: list[str] | None = Field(default=None, description="Container args (not for the worker).")
    env: list[KubeObject] | None = Field(
        default=None, description="Container env, merged by name (not for the worker: use spec.env)."
    )
    image: str | None = Field(default=None, description="Container image (not for the worker: use spec.image).")


class PodSpecOverlay(_Spec):
    """Pod fields of the overlay (any PodSpec field): merged as a strategic merge patch would."""

    model_config = _FREE_FORM

    RULES = (
        rule(
            unset("terminationGracePeriodSeconds"),
            "terminationGracePeriodSeconds is derived from the tier's time limits: set "
            "spec.tiers[].terminationGracePeriodSeconds, which is checked against them",
            field_path="terminationGracePeriodSeconds",
            bad={"terminationGracePeriodSeconds": 5},
        ),
    )

    containers: list[ContainerOverlay] | None = Field(
        default=None,
        max_length=MAX_OVERLAY_CONTAINERS,
        description="Merged by name: fields of the 'worker' container (lifecycle, startupProbe, ports, "
        "volumeMounts...) or new sidecars.",
    )
    init_containers: list[KubeObject] | None = Field(
        default=None, max_length=MAX_OVERLAY_CONTAINERS, description="Init containers, merged by name."
    )
    termination_grace_period_seconds: int | None = Field(
        default=None, description="Not settable here: use spec.tiers[].terminationGracePeriodSeconds."
    )


def _selector_label_unset(label: str) -> Rule:
    return rule(
        Expr(
            f"!has(self.labels) || !({cel_string(label)} in self.labels)",
            lambda m: label not in (m.labels or {}),
            "||",
        ),
        f"label {label} selects the tier's pods and is set by the operator; remove it",
        field_path="labels",
        bad={"labels": {label: "x"}},
    )


class PodMetadataOverlay(_Spec):
    """Labels and annotations added to the pods."""

    RULES = (_selector_label_unset(POOL_LABEL), _selector_label_unset(TIER_LABEL))

    labels: dict[str, str] | None = Field(default=None, description="Pod labels, merged by key.")
    annotations: dict[str, str] | None = Field(default=None, description="Pod annotations, merged by key.")


class PodTemplateOverlay(_Spec):
    """A strategic merge onto the generated pod template, the escape hatch for what has no field."""

    metadata: PodMetadataOverlay | None = Field(default=None, description="Labels and annotations.")
    spec: PodSpecOverlay | None = Field(
        default=None,
        description="PodSpec fields. Maps are merged by key; containers, initContainers, volumes, "
        "imagePullSecrets (by name), env (by name), volumeMounts (by mountPath), ports (by containerPort) "
        "and hostAliases (by ip) are merged by key; other lists replace.",
    )


WorkerPoolKind = Literal["prefork", "threads", "gevent", "eventlet", "solo"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]


def _worker_option_in_env(spec: Any) -> Violation | None:
    for index, var in enumerate(spec.env):
        if var.get("name") in WORKER_OPTION_ENV:
            return Violation(f"env.{index}.name", f"({WORKER_OPTION_ENV[var['name']]})")
    return None


# On the pool's env and on each tier's.
_WORKER_OPTION_IN_ENV = judged_elsewhere(
    "sets a `celery worker` option the operator owns (Click reads CELERY_WORKER_<OPTION>); remove it",
    _worker_option_in_env,
    admission="operator",
    why="a rule over every item of the unbounded env list exceeds the apiserver's CEL cost budget, "
    "which the per-item env rules spend",
    bad={"env": [{"name": "CELERY_WORKER_EXCLUDE_QUEUES", "value": "low_priority"}]},
)


_FALLBACK = "autoscaling.fallbackReplicas"


class Tier(_Spec):
    """One priority tier: its own Deployment consuming its own queues, scaled on their depth."""

    RULES = (
        compare(
            "softTimeLimitSeconds", "<", "timeLimitSeconds", bad={"softTimeLimitSeconds": 60, "timeLimitSeconds": 60}
        ),
        compare(
            "terminationGracePeriodSeconds",
            ">=",
            "timeLimitSeconds",
            why="so scale-in never cuts a running task short",
            bad={"timeLimitSeconds": 300, "terminationGracePeriodSeconds": 30},
        ),
        compare(
            "terminationGracePeriodSeconds",
            ">=",
            "shutdown.softShutdownTimeoutSeconds",
            bad={"terminationGracePeriodSeconds": 30, "shutdown": {"softShutdownTimeoutSeconds": 60}},
        ),
        rule(
            when_set([_FALLBACK], cmp(_FALLBACK, ">=", "replicas.min") & cmp(_FALLBACK, "<=", "replicas.max")),
            "fallbackReplicas must lie within replicas.min..replicas.max",
            field_path=_FALLBACK,
            details=lambda t: f"(got {t.autoscaling.fallback_replicas}, bounds {t.replicas.min}..{t.replicas.max})",
            bad={"autoscaling": {"fallbackReplicas": 20}},
        ),
        _WORKER_OPTION_IN_ENV,
    )

    name: Annotated[
        str,
        pattern(
            DNS_LABEL,
            "must be a DNS label: lowercase letters, digits and '-', starting and ending with a letter or digit",
            bad="High_Tier",
        ),
    ] = Field(
        min_length=1,
        max_length=63,
        description="Tier name, a DNS label (lowercase letters, digits, '-'); part of the "
        "Deployment name <pool>-<name>.",
    )
    queues: Annotated[list[QueueName], unique("must not list a queue twice", bad=["a", "a"])] = Field(
        min_length=1,
        max_length=MAX_QUEUES_PER_TIER,
        description="Celery queues this tier consumes (-Q); a queue belongs to at most one tier.",
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
    extra_args: list[WorkerExtraArg] = Field(
        default_factory=list,
        max_length=MAX_EXTRA_ARGS,
        description="Extra arguments appended to `celery worker`. Options the operator sets from the tier "
        "are refused, with the field to use instead: -n/--hostname, -Q/--queues, -X/--exclude-queues, "
        "-P/--pool, -c/--concurrency, --prefetch-multiplier, --disable-prefetch, --autoscale. Celery "
        "settings go after '--' (e.g. ['--', 'worker_max_tasks_per_child=100']).",
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
        default=True,
        description="Celery's worker_disable_prefetch (5.6+, Redis only): a worker takes a message only when "
        "a process is free, so nothing waits reserved behind a running task where a new pod could run it. "
        "Passed as the setting `worker_disable_prefetch=(bool)true` after '--', which Celery before 5.6 "
        "ignores (workers start and prefetch as before) rather than the flag, which it refuses. "
        "False: Celery's prefetch (prefetchMultiplier messages per process).",
    )
    # Per-tier pods: each overrides the pool's field of the same name (MERGE_RULE).
    image: str | None = Field(
        default=None, min_length=1, max_length=512, description="Container image of this tier; unset: spec.image."
    )
    env: Annotated[list[EnvVar], _ENV_RULES] = Field(
        default_factory=list,
        max_length=MAX_TIER_ENV,
        description="Environment variables (EnvVar) of this tier, merged over spec.env by name (the tier wins).",
    )
    env_from: Annotated[list[KubeObject], _ENV_FROM_RULES] = Field(
        default_factory=list,
        description="Environment sources (EnvFromSource) of this tier, after spec.envFrom (Kubernetes lets a "
        "later source win on a key both define).",
    )
    pod_labels: dict[str, str] = Field(
        default_factory=dict, description="Pod labels, merged over spec.podLabels by key (operator labels win)."
    )
    pod_annotations: dict[str, str] = Field(
        default_factory=dict, description="Pod annotations, merged over spec.podAnnotations by key."
    )
    node_selector: dict[str, str] = Field(
        default_factory=dict, description="Pod nodeSelector, merged over spec.nodeSelector by key (the tier wins)."
    )
    tolerations: list[KubeObject] | None = Field(
        default=None, description="Pod tolerations; replace spec.tolerations when set ([] clears them)."
    )
    affinity: KubeObject | None = Field(
        default=None, description="Pod affinity (Affinity); replaces spec.affinity when set ({} clears it)."
    )
    topology_spread_constraints: list[KubeObject] | None = Field(
        default=None, description="Pod topologySpreadConstraints; replace the pool's when set ([] clears them)."
    )
    priority_class_name: ObjectName | None = Field(
        default=None, description="Pod priorityClassName; replaces spec.priorityClassName when set."
    )
    rollout: RolloutStrategy | None = Field(
        default=None, description="RollingUpdate maxSurge/maxUnavailable; unset: 1 and 0."
    )
    command_prefix: list[Annotated[str, Field(min_length=1, max_length=MAX_EXTRA_ARG_LENGTH)]] | None = Field(
        default=None,
        max_length=MAX_COMMAND_PREFIX,
        description="Wrapper run before `celery`, e.g. ['ddtrace-run'] or ['newrelic-admin', 'run-program']; "
        "replaces spec.commandPrefix when set. It must exec its arguments unchanged, so SIGTERM still "
        "reaches Celery's main process.",
    )
    monitoring: Monitoring | None = Field(
        default=None,
        description="Turn worker events, heartbeats, gossip or mingle back on (for Flower or "
        "celery-exporter); unset: all off.",
    )
    pod_template: PodTemplateOverlay | None = Field(
        default=None,
        description="Overlay merged onto this tier's generated pod template after spec.podTemplate.",
    )


def default_tiers() -> list[Tier]:
    """The three tiers teams run by hand today; used when a pool names no tiers."""
    return [
        Tier(name="high", queues=["high_priority"], concurrency=4, replicas=ReplicaBounds(min=2, max=8)),
        # Celery's default queue: tasks sent without a route go there, and would never run otherwise.
        Tier(
            name="medium",
            queues=["medium_priority", CELERY_DEFAULT_QUEUE],
            concurrency=6,
            replicas=ReplicaBounds(min=4, max=12),
        ),
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
    image_pull_secrets: Annotated[list[KubeObject], _PULL_SECRET_RULES] = Field(
        default_factory=list,
        description="Secrets for pulling the image (LocalObjectReference: {name}).",
    )
    broker: Broker = Field(description="The Redis broker.")
    env: Annotated[list[EnvVar], _ENV_RULES] = Field(
        default_factory=list,
        description="Extra environment variables (EnvVar) for the container.",
    )
    env_from: Annotated[list[KubeObject], _ENV_FROM_RULES] = Field(
        default_factory=list,
        description="Extra environment sources (EnvFromSource) for the container.",
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
    volumes: Annotated[list[KubeObject], _VOLUME_RULES] = Field(default_factory=list, description="Extra pod volumes.")
    volume_mounts: Annotated[list[KubeObject], _VOLUME_MOUNT_ITEMS] = Field(
        default_factory=list, description="Extra volume mounts of the main container."
    )


def _queue_in_two_tiers(tiers: list[Tier]) -> str | None:
    """The first queue claimed by two (differently named) tiers, as details; None when there is none."""
    owner: dict[str, str] = {}
    for tier in tiers:
        for queue in tier.queues:
            if queue in owner and owner[queue] != tier.name:
                return f"(got {queue!r} in tiers {owner[queue]!r} and {tier.name!r})"
            owner.setdefault(queue, tier.name)
    return None


def _budget_covers_minimums(spec: Any) -> bool:
    return spec.max_total_replicas is None or spec.max_total_replicas >= sum(t.replicas.min for t in spec.tiers)


def _tier(name: str, queue: str, low: int = 0) -> KubeObject:
    return {"name": name, "queues": [queue], "concurrency": 1, "replicas": {"min": low, "max": 4}}


class CeleryWorkerPoolSpec(WorkloadSpec):
    """A fleet of Celery workers: one Deployment per tier, scaled on its queues' depth."""

    RULES = (
        *_BROKER_TLS_VOLUME_RULES,
        _WORKER_OPTION_IN_ENV,
        unique(
            "tier names must be unique",
            path="tiers",
            key="name",
            bad={"tiers": [_tier("a", "q1"), _tier("a", "q2")]},
        ),
        rule(
            Expr(
                "self.tiers.all(t, self.tiers.all(u, t.name == u.name || t.queues.all(q, !(q in u.queues))))",
                lambda spec: _queue_in_two_tiers(spec.tiers) is None,
            ),
            "a queue may belong to at most one tier",
            field_path="tiers",
            details=lambda spec: _queue_in_two_tiers(spec.tiers) or "",
            bad={"tiers": [_tier("a", "q"), _tier("b", "q")]},
        ),
        rule(
            Expr(
                "!has(self.maxTotalReplicas) || self.maxTotalReplicas >= self.tiers.map(t, t.replicas.min).sum()",
                _budget_covers_minimums,
                "||",
            ),
            "maxTotalReplicas must be >= the sum of the tiers' replicas.min",
            field_path="maxTotalReplicas",
            details=lambda spec: f"(got {spec.max_total_replicas}, sum {sum(t.replicas.min for t in spec.tiers)})",
            bad={"tiers": [_tier("a", "q", low=2)], "maxTotalReplicas": 1},
        ),
    )

    tiers: list[Tier] = Field(
        default_factory=default_tiers,
        min_length=1,
        max_length=MAX_TIERS,
        description="Worker tiers, highest priority first. Omitted: high (queue high_priority, "
        "concurrency 4, 2-8 replicas), medium (medium_priority and celery, 6, 4-12), low (low_priority, "
        "2, 1-4). Tasks sent without a route go to Celery's default queue `celery`: when no tier lists "
        "it and messages wait there, the pool says so (condition QueuesConsumed=False, Event UnconsumedQueue). "
        "A tier's pod fields (image, env, envFrom, podLabels, podAnnotations, nodeSelector, tolerations, "
        "affinity, topologySpreadConstraints, priorityClassName, commandPrefix) override the pool's. " + MERGE_RULE,
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
    command_prefix: list[Annotated[str, Field(min_length=1, max_length=MAX_EXTRA_ARG_LENGTH)]] = Field(
        default_factory=list,
        max_length=MAX_COMMAND_PREFIX,
        description="Wrapper run before `celery` in every tier, e.g. ['ddtrace-run'], ['newrelic-admin', "
        "'run-program'] or ['opentelemetry-instrument']. It must exec its arguments unchanged, so SIGTERM "
        "still reaches Celery's main process.",
    )
    pod_template: PodTemplateOverlay | None = Field(
        default=None,
        description="Overlay merged onto every tier's generated pod template (then the tier's own "
        "podTemplate): sidecars, initContainers, lifecycle hooks, startupProbe, hostAliases, dnsConfig, "
        "runtimeClassName... The worker container's command, args, env and image, the selector labels "
        "and terminationGracePeriodSeconds are refused: the fields that set them keep scale-in correct.",
    )


class LeaseSpec(_Spec):
    """Timing of the Kubernetes Lease that elects the single running beat."""

    RULES = (
        compare(
            "renewDeadlineSeconds",
            "<",
            "durationSeconds",
            bad={"durationSeconds": 10, "renewDeadlineSeconds": 10, "retryPeriodSeconds": 2},
        ),
        compare("retryPeriodSeconds", "<", "renewDeadlineSeconds", bad={"retryPeriodSeconds": 10}),
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


class CeleryBeatSpec(WorkloadSpec):
    """The single Celery Beat scheduler of an application, fenced by a Kubernetes Lease."""

    RULES = _BEAT_VOLUME_RULES

    scheduler: str | None = Field(
        default=None,
        min_length=1,
        max_length=253,
        description="Beat scheduler class (--scheduler), e.g. django_celery_beat.schedulers:DatabaseScheduler. "
        "Unset: the operator's own, which keeps each entry's last run on the beat's Lease so a failover "
        "neither skips nor repeats a run (docs/beat.md); it ships with the elector, not in your image.",
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
    queue_depth: int | None = Field(default=None, description="Queued messages over the tier's queues.")
    in_flight: int | None = Field(default=None, description="Messages taken by workers, not yet acknowledged.")
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
    stale_unacked: int | None = Field(
        default=None,
        description="Messages of the tier's queues in `unacked` longer than spec.broker.visibilityTimeoutSeconds: "
        "left by workers that died; kombu puts them back on the queue when a worker of the broker next checks "
        "(every 10-100 s). Not counted in inFlight.",
    )
    orphaned: int | None = Field(
        default=None,
        description="In-flight messages no live worker of the tier held when a census last covered all of them: "
        "left by workers that died before the visibility timeout. Not demand; the tier keeps one worker (at "
        "least) so kombu can restore them. Unset until such a census.",
    )
    limited_by: str | None = Field(
        default=None,
        description="What keeps the tier from the replicas its demand asks for now, as the last decision's reason "
        "(AtMaximum, BudgetLimited, BusyWorkers, StabilizationWindow, Cooldown, ScaleUpLimited, ScaleDownLimited, "
        "BrokerUnreachable, FallbackReplicas, InFlightApproximate, Paused, BelowActivation, AboveMaximum, "
        "BelowMinimum): the HPA's ScalingLimited. Unset when nothing limits it.",
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
    if "spec" in body_or_spec:
        for each in OBJECT_RULES:
            if each.find(body_or_spec) is not None:
                raise InvalidSpec(f"{each.field_path}: {each.message}")
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


# Rules on the whole object (CEL at the schema's root; checked by parse_pool/parse_beat when given one).
OBJECT_RULES = (
    max_length(
        "metadata.name",
        63,
        "metadata.name must be at most 63 characters (it is used in label values)",
        bad={"metadata": {"name": "x" * 70}},
    ),
)
