"""Issue 13.4 against the real apiserver: replies that are lost, failed or trickled.

Each elector is the single file a beat pod runs, supervising a real `celery beat`; the one under
test reaches the apiserver through an HTTP proxy that scripts faults per request (the proxy holds
the admin credentials, the elector talks plain HTTP to it). Ticks are read off Redis.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from celery_fleet.leader import endpoint_from_kubeconfig
from tests.support.beatapp import BeatElector, Timings, analyse_ticks, overlap_seconds, read_ticks, start_beat_elector
from tests.support.cluster import Cluster
from tests.support.http_fault_proxy import HttpFaultProxy
from tests.support.redis_server import RedisServer
from tests.support.wait import wait_for

pytestmark = pytest.mark.integration

TIMINGS = Timings(duration=4, renew_deadline=3, retry_period=0.5)
SLACK = 0.75  # process scheduling and apiserver round trips on a busy 2-core machine
LEASE = "beat"


class FaultRig:
    def __init__(self, cluster: Cluster, namespace: str, redis_server: RedisServer, workdir: Path) -> None:
        self.cluster, self.namespace, self.workdir = cluster, namespace, workdir
        self.redis = redis_server.client()
        self.broker_url = redis_server.url
        endpoint, _ = endpoint_from_kubeconfig(str(cluster.kubeconfig), None)
        assert endpoint.ca_file is not None
        self.proxy = HttpFaultProxy(
            endpoint.server, endpoint.ca_file, endpoint.client_cert_file, endpoint.client_key_file
        ).start()
        self.electors: list[BeatElector] = []
        # As the beat reconciler does: the Lease exists, with an empty spec, before any pod runs.
        lease = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": LEASE}, "spec": {}}
        cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(lease))

    def start(self, identity: str, via_proxy: bool) -> BeatElector:
        elector = start_beat_elector(
            identity,
            workdir=self.workdir,
            kubeconfig=self.cluster.kubeconfig,
            namespace=self.namespace,
            lease=LEASE,
            broker_url=self.broker_url,
            timings=TIMINGS,
            connection=["--server", self.proxy.url] if via_proxy else None,
        )
        self.electors.append(elector)
        return elector

    def lease(self) -> dict[str, Any]:
        out = self.cluster.kubectl("get", "lease", LEASE, "-n", self.namespace, "-o", "json").stdout
        return dict(json.loads(out))

    def describe(self) -> str:
        parts = [analyse_ticks(read_ticks(self.redis)).describe(), f"proxy: {self.proxy.methods()[:12]}"]
        for e in self.electors:
            parts.append(f"{e.identity}: {[(round(ev.at % 100, 2), ev.event) for ev in e.events()][-10:]}")
        return "\n".join(parts)

    def close(self) -> None:
        for elector in self.electors:
            elector.stop()
        self.proxy.stop()
        self.redis.close()


@pytest.fixture
def rig(
    cluster: Cluster, namespace: str, redis_server: RedisServer, redis_db: Any, tmp_path: Path
) -> Iterator[FaultRig]:
    fault_rig = FaultRig(cluster, namespace, redis_server, tmp_path)
    yield fault_rig
    fault_rig.close()


def test_a_lost_acquire_reply_then_a_failed_renewal_still_starts_beat(rig: FaultRig) -> None:
    """The reported sequence: the acquire lands but its reply is lost; the next GET adopts it; the
    renewal in that round fails with a 500. Before the fix the elector renewed forever without
    ever starting beat: the Lease held, no beat anywhere."""
    rig.proxy.script = {2: "lose-reply", 4: "http-500"}
    elector = rig.start("beat-a", via_proxy=True)

    wait_for(lambda: len(rig.proxy.requests) >= 5, timeout=15, message=rig.describe)
    # The script hit the requests it means: read, acquire (lost), adopting read, renewal (500), renewal.
    assert rig.proxy.methods()[:5] == [
        ("GET", "pass"), ("PUT", "lose-reply"), ("GET", "pass"), ("PUT", "http-500"), ("PUT", "pass"),
    ], rig.describe()  # fmt: skip
    wait_for(lambda: elector.times("cmd-started"), timeout=10, message=rig.describe)
    assert rig.lease()["spec"]["holderIdentity"] == "beat-a"
    # One acquisition, adopted, never lost: the lease stayed ours throughout.
    assert [e.event for e in elector.events()].count("acquired") == 1
    assert "lost" not in [e.event for e in elector.events()], rig.describe()
    wait_for(lambda: len(read_ticks(rig.redis)) >= 2, timeout=15, message=rig.describe)
    assert analyse_ticks(read_ticks(rig.redis)).senders == ["beat-a"]


def test_a_trickling_apiserver_cannot_keep_beat_running_past_the_renew_deadline(rig: FaultRig) -> None:
    """Replies trickle in a byte at a time (a per-read timeout never fires): the leader must stop
    beat by its renew deadline, before the standby may take over, and never two beats at once."""
    leader = rig.start("beat-a", via_proxy=True)
    wait_for(lambda: leader.times("cmd-started"), timeout=15, message=rig.describe)
    standby = rig.start("beat-b", via_proxy=False)
    wait_for(
        lambda: any(e.event == "observed-holder" and e.fields.get("holder") == "beat-a" for e in standby.events()),
        timeout=15,
        message=rig.describe,
    )
    wait_for(lambda: len(read_ticks(rig.redis)) >= 2, timeout=15, message=rig.describe)

    rig.proxy.mode = "trickle"
    trickle_from = time.time()
    wait_for(lambda: standby.times("cmd-started"), timeout=TIMINGS.duration + 10, message=rig.describe)
    last_renewal = max(r.at for r in rig.proxy.requests if r.method == "PUT" and r.fault == "pass")
    stopped = leader.times("cmd-stopped")[0]
    started = standby.times("cmd-started")[0]
    assert stopped <= last_renewal + TIMINGS.renew_deadline + SLACK, rig.describe()
    assert stopped < started, rig.describe()
    # The trickled request itself ended by its deadline: the leader reported it, it did not hang.
    failed = leader.times("renew-failed")
    assert failed and failed[0] - trickle_from <= TIMINGS.renew_deadline + SLACK, rig.describe()

    wait_for(lambda: analyse_ticks(read_ticks(rig.redis)).senders[-1:] == ["beat-b"], timeout=15, message=rig.describe)
    now = time.time()
    assert overlap_seconds(leader.running_intervals(now), standby.running_intervals(now)) == 0, rig.describe()
    assert analyse_ticks(read_ticks(rig.redis)).duplicates == [], rig.describe()
