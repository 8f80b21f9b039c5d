"""What the apiserver spends admitting a pool (issue 15's floor ratio): our CRD with its CEL rules,
the same schema without them, and the Deployments the floor applies instead.

    .venv/bin/python bench/admission_cost.py --pools 200

Two copies of the CeleryWorkerPool CRD under bench-only groups (no operator watches them): one as
generated, one with every `x-kubernetes-validations` rule removed. The same N pool objects are
applied to each (kubectl, 100 per request, parallel, as bench/fleet_scale.py does), and 3N floor
Deployments (300 per request); then one status write per pool. Each leg reports its wall time and
the kube-apiserver's own CPU time (/proc), the figure to read on a shared 2-core machine. The legs
run twice, in alternating order, so a trend in the machine's load shows up as disagreement.
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import threading
import time
from typing import Any

import yaml
from _harness import ROOT, Cluster, cluster_with_crds, proc_usage, write_result
from fleet_scale import apply_parallel, floor_children, fresh_namespace, load, pool
from kubernetes import client, config

GROUPS = {"rules": "rules.bench.celeryfleet.io", "no rules": "norules.bench.celeryfleet.io"}


def without_rules(node: Any) -> tuple[Any, int]:
    """The schema with every CEL rule removed, and how many there were."""
    if isinstance(node, dict):
        out, n = {}, 0
        for k, v in node.items():
            if k == "x-kubernetes-validations":
                n += len(v)
                continue
            out[k], m = without_rules(v)
            n += m
        return out, n
    if isinstance(node, list):
        items = [without_rules(v) for v in node]
        return [v for v, _ in items], sum(m for _, m in items)
    return node, 0


def bench_crd(group: str, strip: bool) -> tuple[dict[str, Any], int]:
    crd = yaml.safe_load((ROOT / "crds" / "celeryfleet.io_celeryworkerpools.yaml").read_text())
    crd["metadata"] = {"name": f"{crd['spec']['names']['plural']}.{group}"}
    crd["spec"]["group"] = group
    stripped, rules = without_rules(crd["spec"])
    if strip:
        crd["spec"] = stripped
    return crd, rules


def apiserver_pid() -> int:
    out = subprocess.run(["pgrep", "-f", "kube-apiserver"], capture_output=True, text=True, check=True).stdout
    return min(int(p) for p in out.split())


def quiet(pid: int, timeout: float = 600.0) -> None:
    """Until kube-apiserver uses under 10 % of a core over 2 s (idle, it uses about 4 %): what an earlier leg set off (the
    controllers creating ReplicaSets and pods, kwok making them Ready) has settled."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        before = proc_usage(pid)[1]
        time.sleep(2.0)  # a rate needs an interval
        if proc_usage(pid)[1] - before < 0.2:
            return
    raise SystemExit("kube-apiserver did not settle")


def measure(pid: int, fn: Any) -> tuple[float, float]:
    """(wall s of fn(), apiserver CPU s from its start until the apiserver is quiet again: what the
    leg cost the control plane, the work it set off included)."""
    quiet(pid)
    cpu0, t0 = proc_usage(pid)[1], time.monotonic()
    fn()
    wall = time.monotonic() - t0
    quiet(pid)
    return wall, proc_usage(pid)[1] - cpu0


def status_writes(custom: client.CustomObjectsApi, group: str, ns: str, names: list[str], threads: int = 8) -> None:
    """One status merge-patch per pool (the operator's write), from a few threads."""
    body = {"status": {"observedGeneration": 1, "conditions": [
        {"type": "Ready", "status": "True", "reason": "Ready", "message": "bench",
         "lastTransitionTime": "2026-01-01T00:00:00Z", "observedGeneration": 1},
    ]}}  # fmt: skip

    def send(chunk: list[str]) -> None:
        for name in chunk:
            custom.patch_namespaced_custom_object_status(group, "v1alpha1", ns, "celeryworkerpools", name, body)

    workers = [threading.Thread(target=send, args=(names[i::threads],)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pools", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    cluster: Cluster = cluster_with_crds()
    cfg = client.Configuration()
    config.load_kube_config(str(cluster.kubeconfig), client_configuration=cfg)
    custom = client.CustomObjectsApi(client.ApiClient(cfg))
    rules = 0
    for label, group in GROUPS.items():
        crd, n = bench_crd(group, strip=label == "no rules")
        rules = max(rules, n)
        with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
            yaml.safe_dump(crd, f)
            f.flush()
            cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", f.name)
        cluster.kubectl("wait", "--for=condition=Established", f"crd/{crd['metadata']['name']}", "--timeout=60s")
    pid = apiserver_pid()
    names = [f"p{i:04d}" for i in range(args.pools)]
    rows: list[str] = []
    totals: dict[str, list[float]] = {}
    made: list[str] = []
    for r in range(args.rounds):
        legs = ["rules", "no rules", "deployments"]
        for leg in legs if r % 2 == 0 else legs[::-1]:
            ns = f"bench-admit-{r}-{leg.replace(' ', '')}"
            fresh_namespace(cluster, ns)
            if leg == "deployments":
                objs = [c for i in range(args.pools) for c in floor_children(pool(i, "redis://127.0.0.1:1/0"), ns)]
                objs = [o for o in objs if o["kind"] == "Deployment"]
                wall, cpu = measure(pid, lambda o=objs, n=ns: apply_parallel(cluster, n, o, 300))
                status = None
            else:
                group = GROUPS[leg]
                objs = []
                for i in range(args.pools):
                    o = pool(i, "redis://127.0.0.1:1/0")
                    o["apiVersion"] = f"{group}/v1alpha1"
                    objs.append(o)
                wall, cpu = measure(pid, lambda o=objs, n=ns: apply_parallel(cluster, n, o, 100))
                status = measure(pid, lambda g=group, n=ns: status_writes(custom, g, n, names))
            totals.setdefault(leg, []).append(cpu / len(objs) * 1000)
            st = (
                f"{status[0]:.1f} s / {status[1]:.1f} s ({status[1] / len(objs) * 1000:.1f} ms each)" if status else "-"
            )
            rows.append(f"| {r + 1} | {leg} | {len(objs)} | {wall:.1f} s | {cpu:.1f} s ({cpu / len(objs) * 1000:.1f} ms "
                        f"each) | {st} | {load()} |")  # fmt: skip
            made.append(ns)
    for ns in made:  # at the end: deleting hundreds of objects would load the legs after it
        cluster.kubectl("delete", "ns", ns, "--wait=false")
    for group in GROUPS.values():
        cluster.kubectl("delete", "crd", f"celeryworkerpools.{group}", "--wait=false", check=False)
    mean = {k: sum(v) / len(v) for k, v in totals.items()}
    body = (
        f"The CeleryWorkerPool CRD as generated carries {rules} CEL rules (`x-kubernetes-validations`). "
        f"{args.pools} pools and {3 * args.pools} floor Deployments, applied with kubectl as bench/fleet_scale.py "
        "applies them. Apiserver CPU is kube-apiserver's own CPU time from the leg's start until it is quiet again "
        "(under 10 % of a core over 2 s; each leg also starts from quiet), so a Deployment's figure includes the "
        "ReplicaSet and pod writes the controllers and kwok make for it.\n\n"
        "| round | objects | count | apply wall | apply: apiserver CPU | status write per pool: wall / apiserver "
        "CPU | load after |\n|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n\n"
        "| mean apiserver CPU per object (ms) | value |\n|---|---|\n"
        + "\n".join(f"| {k} | {v:.1f} |" for k, v in mean.items())
        + f"\n| a pool with its rules / a pool without | {mean['rules'] / mean['no rules']:.2f} |"
        f"\n| a pool with its rules / its 3 Deployments | {mean['rules'] / (3 * mean['deployments']):.2f} |\n"
    )
    write_result(f"admission_cost_{args.pools}", f"Admission cost of a pool: {args.pools} pools", body)


if __name__ == "__main__":
    main()
