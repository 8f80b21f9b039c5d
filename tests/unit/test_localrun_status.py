"""What the local runtime reports in pod status, and how it finds a worker's broker connection."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest

from celery_fleet_localrun import procfs
from celery_fleet_localrun.status import READY, STARTING, status_patch, stopped_patch
from celery_fleet_localrun.supervisor import ContainerView, Exit, PodView

NOW = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
EARLIER = dt.datetime(2026, 1, 2, 3, 0, 0, tzinfo=dt.UTC)


def container(state: str = "running", ready: bool = True, restarts: int = 0, pid: int | None = 42,
              waiting: str | None = None, last_exit: Exit | None = None) -> ContainerView:  # fmt: skip
    return ContainerView(
        name="worker", image="img", state=state, ready=ready, restarts=restarts,
        pid=pid if state == "running" else None, started_at=EARLIER, waiting_reason=waiting, waiting_message=None,
        last_exit=last_exit, probed=True,
    )  # fmt: skip


def view(*containers: ContainerView) -> PodView:
    return PodView(namespace="ns", name="p", uid="u", init=(), containers=containers)


def kwok_pod() -> dict[str, Any]:
    """A pod as kwok leaves it: Running and Ready, although nothing runs."""
    return {
        "metadata": {"name": "p", "namespace": "ns"},
        "status": {
            "phase": "Running",
            "conditions": [
                {"type": "Ready", "status": "True", "lastTransitionTime": "2026-01-02T02:00:00Z"},
                {"type": "ContainersReady", "status": "True", "lastTransitionTime": "2026-01-02T02:00:00Z"},
            ],
            "containerStatuses": [{"name": "worker", "ready": True, "restartCount": 0,
                                   "state": {"running": {"startedAt": "2026-01-02T02:00:00Z"}}}],
        },
    }  # fmt: skip


def applied(pod: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """The pod after a strategic merge of conditions by type and a replace of container statuses."""
    status = dict(pod["status"])
    conditions = {c["type"]: c for c in status.get("conditions", [])}
    for c in patch["status"]["conditions"]:
        conditions[c["type"]] = c
    status["conditions"] = list(conditions.values())
    for key in ("containerStatuses", "initContainerStatuses"):
        if key in patch["status"]:
            status[key] = patch["status"][key]
    return {**pod, "status": status}


def cond(pod: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(c for c in pod["status"]["conditions"] if c["type"] == type_)


def test_starting_process_overrides_kwoks_ready() -> None:
    patch = status_patch(kwok_pod(), view(container(ready=False)), NOW)
    assert patch is not None
    after = applied(kwok_pod(), patch)
    ready = cond(after, "Ready")
    assert (ready["status"], ready["reason"]) == ("False", STARTING)
    assert ready["message"] == "local process worker: pid 42, not connected to the broker yet"
    assert ready["lastTransitionTime"] == "2026-01-02T03:04:05Z"
    assert cond(after, "ContainersReady")["status"] == "False"
    assert after["status"]["containerStatuses"][0]["ready"] is False


def test_ready_is_reported_once_and_then_left_alone() -> None:
    pod = applied(kwok_pod(), status_patch(kwok_pod(), view(container(ready=False)), NOW) or {})
    patch = status_patch(pod, view(container()), NOW)
    assert patch is not None
    pod = applied(pod, patch)
    assert (cond(pod, "Ready")["status"], cond(pod, "Ready")["reason"]) == ("True", READY)
    assert cond(pod, "Ready")["message"] == "local process worker: pid 42, connected to the broker"
    assert status_patch(pod, view(container()), NOW + dt.timedelta(seconds=5)) is None


def test_restart_reports_backoff_last_exit_and_count() -> None:
    exit_ = Exit(code=1, started_at=EARLIER, finished_at=NOW)
    patch = status_patch(kwok_pod(), view(container(state="waiting", ready=False, restarts=3,
                                                    waiting="CrashLoopBackOff", last_exit=exit_)), NOW)  # fmt: skip
    assert patch is not None
    status = patch["status"]["containerStatuses"][0]
    assert status["restartCount"] == 3
    assert status["state"] == {"waiting": {"reason": "CrashLoopBackOff"}}
    assert status["lastState"]["terminated"]["exitCode"] == 1
    assert patch["status"]["conditions"][0]["message"] == "local process worker: CrashLoopBackOff"


def test_transition_time_kept_while_status_unchanged() -> None:
    pod = kwok_pod()
    patch = status_patch(pod, view(container()), NOW)  # kwok said True; we say True with our reason
    assert patch is not None
    assert patch["status"]["conditions"][0]["lastTransitionTime"] == "2026-01-02T02:00:00Z"


def test_stopped_patch() -> None:
    conditions = stopped_patch(NOW)["status"]["conditions"]
    assert {(c["type"], c["status"], c["reason"]) for c in conditions} == {
        ("Ready", "False", "LocalRuntimeStopped"),
        ("ContainersReady", "False", "LocalRuntimeStopped"),
    }


NET_TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:18EB 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1111 1 0 100 0 0 10 0
   1: 0100007F:A1B2 0100007F:18EB 01 00000000:00000000 00:00000000 00000000     0        0 2222 1 0 20 4 30 10 -1
   2: 0100007F:A1B3 0100007F:18EB 06 00000000:00000000 00:00000000 00000000     0        0 0 1 0 20 4 30 10 -1
   3: 0100007F:A1B4 0100007F:1F90 01 00000000:00000000 00:00000000 00000000     0        0 3333 1 0 20 4 30 10 -1
"""


def test_parse_net_tcp_and_established_to_port() -> None:
    rows = procfs.parse_net_tcp(NET_TCP)
    assert [(r.remote_port, r.state, r.inode) for r in rows] == [(0, "0A", 1111), (6379, "01", 2222),
                                                                 (6379, "06", 0), (8080, "01", 3333)]  # fmt: skip
    assert procfs.connected_inodes(rows, 6379) == {2222}


@pytest.mark.parametrize(
    ("link", "inode"),
    [
        pytest.param("socket:[2222]", 2222, id="socket"),
        pytest.param("pipe:[5]", None, id="pipe"),
        pytest.param("/dev/null", None, id="file"),
        pytest.param("socket:[x]", None, id="garbage"),
    ],
)
def test_socket_inode(link: str, inode: int | None) -> None:
    assert procfs.socket_inode(link) == inode


def _fake_proc(root: Path, tree: dict[int, list[int]], sockets: dict[int, list[int]]) -> Path:
    (root / "net").mkdir(parents=True)
    (root / "net" / "tcp").write_text(NET_TCP)
    for pid, children in tree.items():
        task = root / str(pid) / "task" / str(pid)
        task.mkdir(parents=True)
        (task / "children").write_text(" ".join(map(str, children)))
        fd = root / str(pid) / "fd"
        fd.mkdir()
        for n, inode in enumerate(sockets.get(pid, [])):
            (fd / str(n)).symlink_to(f"socket:[{inode}]")
    return root


@pytest.mark.parametrize(
    ("sockets", "connected"),
    [
        pytest.param({10: [2222]}, True, id="main-process"),
        pytest.param({12: [2222]}, True, id="grandchild"),
        pytest.param({10: [3333]}, False, id="other-port"),
        pytest.param({99: [2222]}, False, id="another-process-tree"),
        pytest.param({}, False, id="no-sockets"),
    ],
)
def test_connected_to_port_looks_at_the_process_tree(tmp_path: Path, sockets: dict[int, list[int]],
                                                     connected: bool) -> None:  # fmt: skip
    proc = _fake_proc(tmp_path, {10: [11], 11: [12], 12: [], 99: []}, sockets)
    assert procfs.connected_to_port(10, 6379, proc) is connected


def test_killed_process_reports_exit_code_as_the_kubelet_does() -> None:
    exit_ = Exit(code=-9, started_at=EARLIER, finished_at=NOW)
    patch = status_patch(kwok_pod(), view(container(restarts=1, last_exit=exit_)), NOW)
    assert patch is not None
    terminated = patch["status"]["containerStatuses"][0]["lastState"]["terminated"]
    assert (terminated["exitCode"], terminated["signal"], terminated["reason"]) == (137, 9, "Error")
