"""The autoscaler, by concern; each module imports only the ones after it (an import-linter contract):

* :mod:`.loop`: :class:`~.loop.Autoscaler`, polling: pools grouped by broker, one read per broker per
  poll in its own task, the occasional key-layout check, the pools' parsed specs.
* :mod:`.pool`: one pool per poll: observe, decide (pure, ``planning.scaling.decide``), act (the scale
  subresource, Events, metrics, status); a held steady state is not decided again every poll.
* :mod:`.scale_in`: before a tier is lowered, ask its workers (census), choose idle pods
  (pod-deletion-cost), drain them, and undrain any still running after the scale-in.
* :mod:`.signals`: the pools' metric series and once-only Events.

A failed read never scales anything down: ``decide`` holds the replicas and the pool gets
BrokerReachable=False.
"""
