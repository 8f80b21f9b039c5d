"""Run a command only while this process holds a Kubernetes Lease: the fence around Celery Beat.

Exactly one pod runs `celery beat`, a hot standby takes over when it dies, and the old leader
stops beat *before* anyone else may acquire, even when it is cut off from the apiserver.

It runs inside the user's Celery image, which has Python and Celery and nothing of ours, so it
uses the standard library only and stays runnable on Python 3.8+. It reaches pods as ONE file,
a zipapp built from this package (`bundle`; the operator image carries it, an init container
copies it into the beat pod, which runs `python3 elector.pyz --lease NAME -- celery beat ...`).
The operator's own `celery-fleet run --leader-elect` and `celery-fleet elect` run it in-process.

Modules, each one concern:
- `election`: lease records and the election state machine (pure, time passed in);
- `loop`: the elector loop, level-triggered: leading and not running -> start, and so on;
- `process`: the child process, signals, the clock, log lines and the fence thread;
- `lease_client`: the Lease endpoints over HTTP with a wall-clock deadline per request;
- `schedule_state` (pure) and `schedule_store`: beat's shared schedule state on the Lease, read
  and written from inside `celery beat` by celery_fleet.beat.scheduler (`--schedule-state`);
- `cli`: flags and in-cluster credentials; `__main__`: the entry point;
- `bundle`: builds the single file (not part of it).

This package imports nothing of the rest of celery_fleet (an import contract says so), and
importing any of its modules has no side effects.
"""

# The single file's name, in the operator image and in beat pods.
BUNDLE_FILE_NAME = "elector.pyz"
# Where a pod's service account credentials are mounted (token, ca.crt, namespace).
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
