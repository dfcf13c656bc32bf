"""Kubernetes manifests for a fleet of LLM replicas, autoscaled on the right signals.

::

    python -m lbclient manifests --name llm --image vllm/vllm-openai:v0.6.3 --gpus 1 \\
        --min-replicas 2 --max-replicas 10 > llm.yaml
    kubectl apply -f llm.yaml

or from Python: ``to_yaml(manifests(Manifests(name="llm", image="...")))``.

What comes out (``autoscaler="hpa"``, the default):

* a **Deployment** (``apps/v1``): GPU requests and limits (``nvidia.com/gpu``) and a
  toleration for GPU nodes; a startup probe (loading weights takes minutes, so the
  liveness probe must not kill a replica that is still loading), liveness and
  readiness probes on the health path; Prometheus scrape annotations; a ``preStop``
  hook that sleeps ``drain_seconds`` -- the pod leaves the Service's endpoints (and the
  clients' discovery) *before* the server is told to stop, so no new call reaches a
  replica going away -- and ``terminationGracePeriodSeconds`` covering that sleep plus
  the longest call (``drain_seconds + max_call_seconds + 5``; 110 s by default, within
  a spot instance's 2-minute notice); rolling updates that never take a serving replica
  away first (``maxUnavailable: 0``);
* a **HorizontalPodAutoscaler** (``autoscaling/v2``) on three signals, none of them
  CPU: the server's **queue length** per pod (``vllm:num_requests_waiting``, exposed to
  the HPA by prometheus-adapter as ``vllm_num_requests_waiting``), the callers' **p95
  latency** (an External metric computed from lbclient's
  ``lbclient_call_duration_seconds`` histogram) and **GPU utilization** (DCGM's
  ``DCGM_FI_DEV_GPU_UTIL``); the HPA follows whichever asks for the most replicas; the
  playbook's behaviour (:class:`lbclient.ops.Behavior`: up fast, down slowly);
* a **PodDisruptionBudget** (``policy/v1``): voluntary evictions (node drains,
  upgrades) take at most one replica at a time.

``autoscaler="keda"`` replaces the HPA with a **KEDA ScaledObject** (``keda.sh/v1alpha1``;
KEDA makes the HPA itself) that can **scale from zero** (``idleReplicaCount: 0``; while
there is demand, ``min_replicas`` still holds): its first trigger is lbclient's
*demand* (``lbclient_demand_calls``: calls queued + in flight in the applications that
embed lbclient), which exists even when no replica does -- the queue-length, p95 and GPU
metrics all vanish with the last replica.  The same three signals follow as Prometheus
triggers, with the same behaviour.

Metric names, targets and the Prometheus address are parameters: the defaults fit vLLM,
dcgm-exporter and lbclient's :class:`~lbclient.metrics.PrometheusCollector`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from typing import Any

import attrs

from .._errors import ConfigError
from .._numbers import is_int, is_number
from .hpa import Behavior

__all__ = ["Manifests", "manifests", "to_json", "to_yaml"]

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


def _name(_i: object, a: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, str) or len(value) > 53 or not _DNS_LABEL.fullmatch(value):
        raise ConfigError(
            f"{a.name} must be a DNS label (lower-case letters, digits and '-', starting "
            f"and ending alphanumeric, at most 53 characters), got {value!r}"
        )


def _text(_i: object, a: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{a.name} must be a non-empty str, got {value!r}")


def _int(low: int, high: int | None = None) -> Any:
    def check(_i: object, a: attrs.Attribute[Any], value: object) -> None:
        if not is_int(value) or value < low or (high is not None and value > high):
            bound = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise ConfigError(f"{a.name} must be an int {bound}, got {value!r}")

    return check


def _positive(_i: object, a: attrs.Attribute[Any], value: object) -> None:
    if not is_number(value) or value <= 0:
        raise ConfigError(f"{a.name} must be a finite number > 0, got {value!r}")


@attrs.frozen(kw_only=True)
class Manifests:
    """What the manifests say (see the module docstring for what each part is for).

    * ``name`` / ``image`` / ``namespace`` / ``port`` -- the replicas' Deployment.
    * ``gpus`` -- GPUs per replica (``nvidia.com/gpu``; 0 for a CPU model).
    * ``min_replicas`` (>= 2, for availability) / ``max_replicas``.
    * ``args`` -- the container's arguments (e.g. vLLM's ``--model ...``).
    * ``cpu`` / ``memory`` -- requests (and the memory limit), Kubernetes quantities.
    * ``health_path`` / ``metrics_path`` -- probes and scraping.
    * ``startup_seconds`` -- the longest a replica may take to load before it is
      restarted (the startup probe's budget).
    * ``drain_seconds`` -- the preStop sleep: longer than your clients' discovery
      refresh (DNS TTL, ``lbclient.DnsDiscovery`` interval) so they stop calling first.
    * ``max_call_seconds`` -- the longest call a replica must be allowed to finish.
    * ``queue_metric`` / ``queue_target`` -- per-pod queue length to hold (default 5,
      GKE's guidance for LLM servers: scale before requests wait long).
    * ``latency_metric`` / ``p95_target`` -- the p95 latency (seconds) to hold.
    * ``gpu_metric`` / ``gpu_target`` -- average GPU utilization % to hold.
    * ``behavior`` -- :class:`~lbclient.ops.Behavior` (default: the playbook's).
    * ``autoscaler`` -- ``"hpa"`` or ``"keda"`` (scale from zero on lbclient's demand).
    * ``scale_to_zero`` -- with KEDA: no replica at all while there is no demand
      (``idleReplicaCount: 0``); ``min_replicas`` still holds whenever there is.
    * ``demand_target`` -- calls queued + in flight per replica (KEDA's demand trigger).
    * ``balancer`` -- the ``balancer`` label of lbclient's metrics (default: ``name``).
    * ``prometheus`` -- Prometheus's address, for KEDA's triggers.
    """

    name: str = attrs.field(validator=_name)
    image: str = attrs.field(validator=_text)
    namespace: str = attrs.field(default="default", validator=_name)
    port: int = attrs.field(default=8000, validator=_int(1, 65535))
    gpus: int = attrs.field(default=1, validator=_int(0))
    min_replicas: int = attrs.field(default=2, validator=_int(1))
    max_replicas: int = attrs.field(default=10, validator=_int(1))
    args: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    cpu: str = attrs.field(default="4", validator=_text)
    memory: str = attrs.field(default="32Gi", validator=_text)
    health_path: str = attrs.field(default="/health", validator=_text)
    metrics_path: str = attrs.field(default="/metrics", validator=_text)
    startup_seconds: int = attrs.field(default=600, validator=_int(10))
    drain_seconds: int = attrs.field(default=15, validator=_int(0))
    max_call_seconds: int = attrs.field(default=90, validator=_int(1))
    queue_metric: str = attrs.field(default="vllm_num_requests_waiting", validator=_text)
    queue_target: float = attrs.field(default=5.0, validator=_positive)
    latency_metric: str = attrs.field(default="lbclient_call_duration_p95_seconds", validator=_text)
    p95_target: float = attrs.field(default=2.0, validator=_positive)
    gpu_metric: str = attrs.field(default="DCGM_FI_DEV_GPU_UTIL", validator=_text)
    gpu_target: float = attrs.field(default=80.0, validator=_positive)
    behavior: Behavior = attrs.field(factory=Behavior)
    autoscaler: str = attrs.field(default="hpa")
    scale_to_zero: bool = attrs.field(default=True)
    demand_target: float = attrs.field(default=8.0, validator=_positive)
    balancer: str | None = None
    prometheus: str = attrs.field(
        default="http://prometheus-operated.monitoring.svc:9090", validator=_text
    )

    @autoscaler.validator
    def _check_autoscaler(self, _a: object, value: object) -> None:
        if value not in ("hpa", "keda"):
            raise ConfigError(f"autoscaler must be 'hpa' or 'keda', got {value!r}")

    @behavior.validator
    def _check_behavior(self, _a: object, value: object) -> None:
        if not isinstance(value, Behavior):
            raise ConfigError(f"behavior must be an lbclient.ops.Behavior, got {value!r}")

    def __attrs_post_init__(self) -> None:
        if self.min_replicas < 2:
            raise ConfigError(
                f"min_replicas must be >= 2 for availability (one replica is down during "
                f"every restart, upgrade and node drain), got {self.min_replicas!r}"
            )
        if self.max_replicas < self.min_replicas:
            raise ConfigError(
                f"max_replicas ({self.max_replicas}) must be >= min_replicas ({self.min_replicas})"
            )
        if not isinstance(self.scale_to_zero, bool):
            raise ConfigError(f"scale_to_zero must be a bool, got {self.scale_to_zero!r}")
        if self.grace_seconds > 3600:
            raise ConfigError(
                f"drain_seconds + max_call_seconds must stay under an hour, got "
                f"{self.grace_seconds!r} s"
            )

    @property
    def grace_seconds(self) -> int:
        """terminationGracePeriodSeconds: the preStop sleep, the longest call, 5 s slack."""
        return self.drain_seconds + self.max_call_seconds + 5

    @property
    def labels(self) -> dict[str, str]:
        return {"app.kubernetes.io/name": self.name, "app.kubernetes.io/managed-by": "lbclient"}

    @property
    def selector(self) -> dict[str, str]:
        return {"app.kubernetes.io/name": self.name}

    @property
    def balancer_label(self) -> str:
        return self.balancer or self.name


def _quantity(x: float) -> str:
    """A Kubernetes quantity: integers as is, fractions in milli-units (``2.5`` -> ``2500m``)."""
    if float(x).is_integer():
        return str(int(x))
    return f"{round(x * 1000)}m"


def _meta(m: Manifests, name: str | None = None) -> dict[str, Any]:
    return {"name": name or m.name, "namespace": m.namespace, "labels": dict(m.labels)}


def deployment(m: Manifests) -> dict[str, Any]:
    """The replicas' Deployment (no ``replicas``: the autoscaler owns the count)."""
    resources: dict[str, Any] = {
        "requests": {"cpu": m.cpu, "memory": m.memory},
        "limits": {"memory": m.memory},
    }
    if m.gpus:
        resources["requests"]["nvidia.com/gpu"] = str(m.gpus)
        resources["limits"]["nvidia.com/gpu"] = str(m.gpus)

    def probe() -> dict[str, Any]:
        return {"httpGet": {"path": m.health_path, "port": "http"}}

    container: dict[str, Any] = {
        "name": m.name,
        "image": m.image,
        "ports": [{"name": "http", "containerPort": m.port, "protocol": "TCP"}],
        "resources": resources,
        "startupProbe": {
            **probe(),
            "periodSeconds": 10,
            "failureThreshold": max(1, math.ceil(m.startup_seconds / 10)),
        },
        "readinessProbe": {
            **probe(),
            "periodSeconds": 5,
            "timeoutSeconds": 2,
            "failureThreshold": 2,
        },
        "livenessProbe": {
            **probe(),
            "periodSeconds": 10,
            "timeoutSeconds": 5,
            "failureThreshold": 6,
        },
        "lifecycle": {
            "preStop": {"exec": {"command": ["/bin/sh", "-c", f"sleep {m.drain_seconds}"]}}
        },
    }
    if m.args:
        container["args"] = list(m.args)
    pod_spec: dict[str, Any] = {
        "terminationGracePeriodSeconds": m.grace_seconds,
        "containers": [container],
    }
    if m.gpus:
        pod_spec["tolerations"] = [
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
        ]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(m),
        "spec": {
            "selector": {"matchLabels": dict(m.selector)},
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
            },
            "template": {
                "metadata": {
                    "labels": dict(m.labels),
                    "annotations": {
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": str(m.port),
                        "prometheus.io/path": m.metrics_path,
                    },
                },
                "spec": pod_spec,
            },
        },
    }


def hpa(m: Manifests) -> dict[str, Any]:
    """The autoscaling/v2 HorizontalPodAutoscaler: queue length, p95 latency and GPU
    utilization, the playbook's behaviour."""
    metrics: list[dict[str, Any]] = [
        {
            "type": "Pods",
            "pods": {
                "metric": {"name": m.queue_metric},
                "target": {"type": "AverageValue", "averageValue": _quantity(m.queue_target)},
            },
        },
        {
            "type": "External",
            "external": {
                "metric": {
                    "name": m.latency_metric,
                    "selector": {"matchLabels": {"balancer": m.balancer_label}},
                },
                "target": {"type": "Value", "value": _quantity(m.p95_target)},
            },
        },
    ]
    if m.gpus:
        metrics.append(
            {
                "type": "Pods",
                "pods": {
                    "metric": {"name": m.gpu_metric},
                    "target": {"type": "AverageValue", "averageValue": _quantity(m.gpu_target)},
                },
            }
        )
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": _meta(m),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": m.name},
            "minReplicas": m.min_replicas,
            "maxReplicas": m.max_replicas,
            "metrics": metrics,
            "behavior": m.behavior.to_dict(),
        },
    }


def scaled_object(m: Manifests) -> dict[str, Any]:
    """The KEDA ScaledObject: lbclient's demand first (scale from zero), then the same
    signals as the HPA, the same behaviour."""
    sel = f'balancer="{m.balancer_label}"'
    pods = f'namespace="{m.namespace}",pod=~"{m.name}-.*"'
    queue_metric = m.queue_metric.replace("vllm_", "vllm:", 1)
    triggers: list[dict[str, Any]] = [
        {
            "type": "prometheus",
            "name": "demand",
            "metadata": {
                "serverAddress": m.prometheus,
                "query": f"sum(lbclient_demand_calls{{{sel}}})",
                "threshold": _num(m.demand_target),
                "activationThreshold": "0",
            },
        },
        {
            "type": "prometheus",
            "name": "queue",
            "metadata": {
                "serverAddress": m.prometheus,
                "query": f"sum({queue_metric}{{{pods}}})",
                "threshold": _num(m.queue_target),
            },
        },
        {
            "type": "prometheus",
            "name": "p95",
            "metricType": "Value",
            "metadata": {
                "serverAddress": m.prometheus,
                "query": (
                    "histogram_quantile(0.95, sum by (le) "
                    f"(rate(lbclient_call_duration_seconds_bucket{{{sel}}}[2m])))"
                ),
                "threshold": _num(m.p95_target),
            },
        },
    ]
    if m.gpus:
        triggers.append(
            {
                "type": "prometheus",
                "name": "gpu",
                "metricType": "Value",
                "metadata": {
                    "serverAddress": m.prometheus,
                    "query": f"avg({m.gpu_metric}{{{pods}}})",
                    "threshold": _num(m.gpu_target),
                },
            }
        )
    out: dict[str, Any] = {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": _meta(m),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": m.name},
            "minReplicaCount": m.min_replicas,
            "maxReplicaCount": m.max_replicas,
            "pollingInterval": 15,
            "cooldownPeriod": 300,
            "advanced": {"horizontalPodAutoscalerConfig": {"behavior": m.behavior.to_dict()}},
            "triggers": triggers,
        },
    }
    if m.scale_to_zero:
        # Idle (no trigger active: no demand at all): no replica.  Active: min..max.
        out["spec"]["idleReplicaCount"] = 0
    return out


def _num(x: float) -> str:
    """KEDA trigger metadata values are strings."""
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def pdb(m: Manifests) -> dict[str, Any]:
    """At most one replica taken away at a time by voluntary disruptions."""
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _meta(m),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": dict(m.selector)}},
    }


def manifests(m: Manifests) -> list[dict[str, Any]]:
    """The documents, in apply order: Deployment, the autoscaler (HPA or ScaledObject),
    PodDisruptionBudget."""
    scaler = hpa(m) if m.autoscaler == "hpa" else scaled_object(m)
    return [deployment(m), scaler, pdb(m)]


def to_yaml(docs: Sequence[dict[str, Any]]) -> str:
    """Multi-document YAML (PyYAML, the ``[ops]`` extra); without PyYAML, the same
    documents as JSON -- which is YAML too, and ``kubectl apply -f`` takes it."""
    try:
        import yaml
    except ImportError:
        return "".join("---\n" + json.dumps(d, indent=2) + "\n" for d in docs)
    return str(yaml.safe_dump_all(list(docs), sort_keys=False, explicit_start=True))


def to_json(docs: Sequence[dict[str, Any]]) -> str:
    """A ``v1`` ``List`` of the documents, as JSON (``kubectl apply -f`` takes it)."""
    return json.dumps({"apiVersion": "v1", "kind": "List", "items": list(docs)}, indent=2) + "\n"
