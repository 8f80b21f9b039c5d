"""Trace-driven simulation of Celery queues and worker fleets under different autoscalers.

Public surface: traces (`step_burst`, `poisson_bursts`, `diurnal`), the simulator (`simulate`,
`FleetParams`), the autoscalers (`OperatorScaler` = the operator's real `decide`, `KedaHpaScaler`,
`StaticFleet`), summaries, the scaling Events a run writes (`scaling_events`), and the closed-loop check helpers (`predict_waits`,
`compare_waits`, `closed_loop_trace`, `write_trace`, `read_trace`). Plots live in `_sim.plots`
(matplotlib), imported only by the benchmark, so the simulator and its tests do without it.
"""

from .closed_loop import (
    CLOSED_LOOP_TIER,
    Agreement,
    Prediction,
    Tolerance,
    closed_loop_trace,
    compare_waits,
    predict_waits,
    read_trace,
    write_trace,
)
from .engine import PRIORITY_SEP, FleetParams, Samples, SimResult, list_key, percentile, simulate
from .events import ScalingEvents, scaling_events
from .keda_hpa import (
    HorizontalPodAutoscaler,
    HpaBehavior,
    HpaPolicy,
    KedaHpaConfig,
    KedaHpaScaler,
    KedaRedisListsTrigger,
)
from .oracle import OracleResult, oracle
from .scalers import OperatorScaler, StaticFleet
from .summary import Summary, summarize
from .traces import (
    DEFAULT_PRIORITY_STEPS,
    Durations,
    Task,
    Trace,
    diurnal,
    drift,
    poisson_bursts,
    priority_step,
    read_csv_startups,
    read_csv_trace,
    step_burst,
    write_csv_trace,
)
from .view import Autoscaler, FleetView

__all__ = [
    "CLOSED_LOOP_TIER",
    "DEFAULT_PRIORITY_STEPS",
    "PRIORITY_SEP",
    "Agreement",
    "Autoscaler",
    "Durations",
    "FleetParams",
    "FleetView",
    "HorizontalPodAutoscaler",
    "HpaBehavior",
    "HpaPolicy",
    "KedaHpaConfig",
    "KedaHpaScaler",
    "KedaRedisListsTrigger",
    "OperatorScaler",
    "OracleResult",
    "Prediction",
    "Samples",
    "ScalingEvents",
    "SimResult",
    "StaticFleet",
    "Summary",
    "Task",
    "Tolerance",
    "Trace",
    "closed_loop_trace",
    "compare_waits",
    "diurnal",
    "drift",
    "list_key",
    "oracle",
    "percentile",
    "poisson_bursts",
    "predict_waits",
    "priority_step",
    "read_csv_startups",
    "read_csv_trace",
    "read_trace",
    "scaling_events",
    "simulate",
    "step_burst",
    "summarize",
    "write_csv_trace",
    "write_trace",
]
