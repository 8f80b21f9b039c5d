"""Send a burst of demo tasks with `apply_async`: mixed priorities, durations around a mean.

python demo/produce.py --broker redis://127.0.0.1:6379/0 --queue high_priority=360:1.0 --queue low_priority=80:2.0
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from demoapp import PRIORITY_STEPS, QUEUES, app
from demoapp.tasks import work


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--broker", required=True)
    parser.add_argument(
        "--queue", action="append", default=[], metavar="QUEUE=COUNT:SECONDS",
        help="send COUNT tasks of about SECONDS each (+-50%%) into QUEUE (repeatable)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=8)
    args = parser.parse_args(argv)
    app.conf.broker_url = args.broker
    rng = random.Random(args.seed)
    plan = []
    for item in args.queue:
        queue, _, rest = item.partition("=")
        count, _, seconds = rest.partition(":")
        if queue not in QUEUES or not count.isdigit():
            parser.error(f"--queue {item!r}: expected one of {', '.join(QUEUES)}=COUNT:SECONDS")
        plan += [(queue, float(seconds or 1.0)) for _ in range(int(count))]
    rng.shuffle(plan)  # interleave the queues, as a real burst would
    with app.producer_or_acquire() as producer:
        for queue, mean in plan:
            work.apply_async(
                (round(mean * rng.uniform(0.5, 1.5), 2),),
                {"sent_at": time.time()},
                queue=queue,
                priority=rng.choice(PRIORITY_STEPS),
                producer=producer,
            )
    print(f"sent {len(plan)} tasks: " + ", ".join(f"{q} {sum(1 for p in plan if p[0] == q)}" for q in QUEUES))
    return 0


if __name__ == "__main__":
    sys.exit(main())
