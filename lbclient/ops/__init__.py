"""Operations: what an operator runs beside the balancer -- fed by what lbclient measures.

* :mod:`~lbclient.ops.recording` -- :class:`TrafficRecorder`: one record per call to a
  rotating file, off the hot path; :func:`load_trace` reads it back.
* :mod:`~lbclient.ops.planner` -- :class:`CapacityPlanner`: rates, peak hours,
  burstiness, and the replicas a latency target needs (Little's law, Erlang C).
* :mod:`~lbclient.ops.manifests` -- Kubernetes manifests: Deployment, an
  ``autoscaling/v2`` HPA (or a KEDA ScaledObject on lbclient's demand metric), a
  PodDisruptionBudget.
* :mod:`~lbclient.ops.hpa` -- the HPA's scaling :class:`Behavior` and a simulator of it.
* :mod:`~lbclient.ops.cost` -- :class:`CostModel`: the cheapest on-demand / spot /
  reserved mix for a load.

The same from a shell: ``python -m lbclient manifests | plan | cost``.  Not imported by
``import lbclient``; plots need matplotlib (the ``[bench]`` extra), YAML PyYAML (``[ops]``).
"""

from __future__ import annotations

from .cost import DEFAULT_INSTANCES, CostModel, CostPlan, InstanceType
from .hpa import Behavior, HpaSimulator, Policy, Rules
from .manifests import Manifests, manifests, to_json, to_yaml
from .planner import (
    CapacityPlan,
    CapacityPlanner,
    TrafficSummary,
    erlang_c,
    latency_quantile,
    latency_tail,
    replay,
    synthetic_trace,
)
from .recording import TrafficRecord, TrafficRecorder, load_trace

__all__ = [
    "DEFAULT_INSTANCES",
    "Behavior",
    "CapacityPlan",
    "CapacityPlanner",
    "CostModel",
    "CostPlan",
    "HpaSimulator",
    "InstanceType",
    "Manifests",
    "Policy",
    "Rules",
    "TrafficRecord",
    "TrafficRecorder",
    "TrafficSummary",
    "erlang_c",
    "latency_quantile",
    "latency_tail",
    "load_trace",
    "manifests",
    "replay",
    "synthetic_trace",
    "to_json",
    "to_yaml",
]
