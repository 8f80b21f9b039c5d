"""Queue depth and in-flight work from a Redis broker, the way kombu's Redis transport lays them out.

One poll is ONE round trip carrying one ``EVAL`` of the poll script per key prefix (almost
always exactly one command), which runs inside Redis:

* ``LLEN`` of every priority list of every queue: step 0 is the bare queue name, step ``s`` is
  ``queue + "\x06\x16" + str(s)``; ``global_keyprefix`` prefixes every key. Done server-side
  because redis-py's asyncio pipeline spends ~50 µs of operator CPU per reply: 1,200 LLEN replies
  (100 pools x 3 tiers x 4 steps) cost ~65 ms per poll as a pipeline, ~2 ms as one array reply.
* the in-flight count: a walk over the prefix's ``unacked`` hash (values are JSON
  ``[payload, exchange, routing_key]``) that returns only counts per (exchange, routing key), plus
  the binding tables (``_kombu.binding.<exchange>``) of the exchanges it saw. Payloads never cross
  the network. The walk stops after ``scan_limit`` entries; beyond that the counts are scaled up
  to the hash size and flagged approximate (``UnackedSummary.exact``). Cost: see
  ``bench/results/redis_depth.md``.

``EVAL`` rather than ``EVALSHA``: Redis caches the compiled script by its SHA anyway, and ``EVALSHA``
would need a NOSCRIPT retry (a second round trip after every Redis restart). The script only reads.

Routing keys map to queues as kombu routes them (:mod:`celery_fleet.brokers.routing`: equality for
direct exchanges, kombu's word rules for topic ones, every bound queue for fanout ones, nowhere
without a binding), never with a regex taken from Redis. What the script sends back is bounded
(:class:`~celery_fleet.brokers.redis.scripts.ReplyBounds`), and a big reply is parsed in a worker
thread, off the event loop.

The modules, each importing only the ones after it (an import-linter contract):

* :mod:`.connection`: every redis.asyncio client (TLS, ``;`` failover, Sentinel): :func:`open_clients`;
  the poll source on them: :func:`connect`.
* :mod:`.pidbox`: Celery remote control (kombu's pidbox wire format) on those clients, bounded in bytes.
* :mod:`.source`: :class:`RedisDepthSource`, the ``QueueDepthSource`` (in-flight scan budget, layout checks).
* :mod:`.poll`: pure: the commands of one poll and the parsing of their replies.
* :mod:`.target`: the broker URL (safe to show, safe to connect with) and failures named without secrets.
* :mod:`.scripts`: the Lua that runs inside Redis, its bounds, and the smallest ACL it needs.

The I/O is a single injected coroutine ``RoundTrip(commands) -> replies``; everything but
:mod:`.connection` is unit-tested without Redis.
"""
