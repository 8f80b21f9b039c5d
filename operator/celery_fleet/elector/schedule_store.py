"""Beat's shared schedule state on the Lease: read it at start, record each run through the fence.

Runs inside `celery beat` (celery_fleet.beat.scheduler), not in the elector's process: the elector
only hands over where the Lease is and the paths of its credential files (`StoreConfig`, in the
environment). Every record is GET, the fence decision, then a PUT that is a compare-and-swap on the
resourceVersion just read (docs/beat.md says why that refuses a deposed leader's write).
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from celery_fleet.elector.election import Lease, LeaseApiError, LeaseConflict, UsageError
from celery_fleet.elector.lease_client import ApiEndpoint, HttpLeaseApi
from celery_fleet.elector.schedule_state import (
    ANNOTATION,
    EntryState,
    Term,
    encode_state,
    may_write,
    parse_state,
    record_run,
    term_at_start,
)

# The configuration is a few paths and names; anything longer was not written by the elector.
MAX_CONFIG_BYTES = 8192
# Each request's wall-clock budget; a record is at most ATTEMPTS reads and writes.
REQUEST_TIMEOUT_SECONDS = 2.0
ATTEMPTS = 4


class Deposed(Exception):
    """The Lease no longer shows this process's term: it must never record or send again."""


@dataclass(frozen=True)
class StoreConfig:
    namespace: str
    lease: str
    identity: str
    server: str
    ca_file: str | None = None
    client_cert_file: str | None = None
    client_key_file: str | None = None
    token_file: str | None = None
    insecure: bool = False
    tls_server_name: str | None = None

    @classmethod
    def for_endpoint(cls, endpoint: ApiEndpoint, namespace: str, lease: str, identity: str) -> StoreConfig:
        if endpoint.token_source is not None and endpoint.token_file is None and endpoint.client_cert_file is None:
            # A token held in this process's memory cannot be handed to beat without putting it
            # in the environment.
            raise UsageError("--schedule-state needs credentials in files (a token file or a client certificate)")
        return cls(
            namespace,
            lease,
            identity,
            endpoint.server,
            endpoint.ca_file,
            endpoint.client_cert_file,
            endpoint.client_key_file,
            endpoint.token_file,
            endpoint.insecure,
            endpoint.tls_server_name,
        )

    def to_env(self) -> str:
        return json.dumps(self.__dict__, sort_keys=True)

    @classmethod
    def from_env(cls, raw: str) -> StoreConfig:
        if len(raw) > MAX_CONFIG_BYTES:
            raise UsageError(f"schedule state configuration larger than {MAX_CONFIG_BYTES} bytes")
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise UsageError(f"schedule state configuration is not JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise UsageError("schedule state configuration is not a JSON object")
        required = ("namespace", "lease", "identity", "server")
        if not all(isinstance(data.get(k), str) and data.get(k) for k in required):
            raise UsageError(f"schedule state configuration needs {', '.join(required)}")
        optional = ("ca_file", "client_cert_file", "client_key_file", "token_file", "tls_server_name")
        return cls(
            namespace=data["namespace"],
            lease=data["lease"],
            identity=data["identity"],
            server=data["server"],
            insecure=data.get("insecure") is True,
            **{k: data[k] if isinstance(data.get(k), str) else None for k in optional},
        )

    def endpoint(self) -> ApiEndpoint:
        return ApiEndpoint(
            server=self.server,
            ca_file=self.ca_file,
            client_cert_file=self.client_cert_file,
            client_key_file=self.client_key_file,
            token_file=self.token_file,
            insecure=self.insecure,
            tls_server_name=self.tls_server_name,
        )


class AnnotatedLeaseApi(Protocol):
    def get(self, timeout: float) -> Lease | None: ...

    def replace_annotation(self, lease: Lease, key: str, value: str, timeout: float) -> Lease: ...


def _annotation(lease: Lease) -> str | None:
    metadata: Mapping[str, Any] = lease.body.get("metadata") or {}
    value = (metadata.get("annotations") or {}).get(ANNOTATION)
    return value if isinstance(value, str) else None


class ScheduleStore:
    """The state of one beat process's term: `load` once at start, then `record` before each send."""

    def __init__(self, api: AnnotatedLeaseApi, identity: str, timeout: float = REQUEST_TIMEOUT_SECONDS) -> None:
        self.api = api
        self.identity = identity
        self.timeout = timeout
        self.term: Term | None = None

    @classmethod
    def from_config(cls, config: StoreConfig) -> ScheduleStore:
        return cls(HttpLeaseApi(config.endpoint(), config.namespace, config.lease), config.identity)

    def load(self) -> tuple[dict[str, EntryState], str | None]:
        """The stored runs and why any were ignored; fixes the term. Raises Deposed, LeaseApiError."""
        lease = self.api.get(self.timeout)
        if lease is None:
            raise Deposed("the lease does not exist")
        term = term_at_start(self.identity, lease.record.holder, lease.record.acquire_time)
        if term is None:
            raise Deposed(f"the lease is held by {lease.record.holder or '<nobody>'}, not {self.identity}")
        self.term = term
        return parse_state(_annotation(lease))

    def record(self, name: str, run: EntryState, keep: Collection[str] | None = None) -> None:
        """Store `run` of `name`, or raise: Deposed (never send), LeaseApiError (not recorded, retry)."""
        self.record_runs({name: run}, keep)

    def record_runs(self, runs: Mapping[str, EntryState], keep: Collection[str] | None = None) -> None:
        """Store several runs in one write; raises as `record`."""
        if self.term is None:
            raise LeaseApiError("the schedule state was never loaded")
        for _ in range(ATTEMPTS):
            lease = self.api.get(self.timeout)
            if lease is None or not may_write(self.term, lease.record.holder, lease.record.acquire_time):
                holder = lease.record.holder if lease is not None else "<deleted>"
                raise Deposed(f"the lease now shows {holder or '<nobody>'}, not this term of {self.identity}")
            raw = _annotation(lease)
            merged, _ = parse_state(raw)
            for name, run in runs.items():
                merged = record_run(merged, name, run, keep)
            value = encode_state(merged)
            if value == raw:
                return  # already there (or not shareable): the fence check above was the point
            try:
                self.api.replace_annotation(lease, ANNOTATION, value, self.timeout)
                return
            except LeaseConflict:
                continue  # usually the elector's own renewal: read again
        raise LeaseApiError(f"the lease changed under each of {ATTEMPTS} attempts to record {sorted(runs)}")
