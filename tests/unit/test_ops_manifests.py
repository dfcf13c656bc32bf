"""Kubernetes manifests validated against the Kubernetes OpenAPI schemas
(``kubernetes-validate``, strict: unknown fields fail), no kubectl; the HPA behaviour
simulated."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from lbclient import ConfigError
from lbclient.ops import Behavior, HpaSimulator, Manifests, manifests, to_json, to_yaml

kv = pytest.importorskip("kubernetes_validate")
jsonschema = pytest.importorskip("jsonschema")
yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[2]
K8S_VERSIONS = ["1.27", "1.30", "1.33", kv.latest_version()]

# KEDA's ScaledObject is a custom resource: not in the Kubernetes schemas.  Its spec,
# written from KEDA's reference (keda.sh/docs/latest/reference/scaledobject-spec), with
# additionalProperties false on every level we emit, so a misspelt field fails; the
# HPA behaviour inside it and its metadata are checked with the Kubernetes schemas below.
_KEDA_TRIGGER = {
    "type": "object",
    "required": ["type", "metadata"],
    "additionalProperties": False,
    "properties": {
        "type": {"type": "string", "enum": ["prometheus"]},
        "name": {"type": "string"},
        "metricType": {"type": "string", "enum": ["AverageValue", "Value", "Utilization"]},
        "metadata": {
            "type": "object",
            "required": ["serverAddress", "query", "threshold"],
            "additionalProperties": {"type": "string"},
            "properties": {
                "serverAddress": {"type": "string", "pattern": "^https?://"},
                "query": {"type": "string", "minLength": 1},
                "threshold": {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?$"},
                "activationThreshold": {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?$"},
            },
        },
    },
}
KEDA_SCALED_OBJECT = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "metadata": {"type": "object"},
        "spec": {
            "type": "object",
            "required": ["scaleTargetRef", "triggers"],
            "additionalProperties": False,
            "properties": {
                "scaleTargetRef": {
                    "type": "object",
                    "required": ["name"],
                    "additionalProperties": False,
                    "properties": {
                        "apiVersion": {"type": "string"},
                        "kind": {"type": "string"},
                        "name": {"type": "string"},
                        "envSourceContainerName": {"type": "string"},
                    },
                },
                "pollingInterval": {"type": "integer", "minimum": 1},
                "cooldownPeriod": {"type": "integer", "minimum": 0},
                "idleReplicaCount": {"type": "integer", "enum": [0]},
                "minReplicaCount": {"type": "integer", "minimum": 0},
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "advanced": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "restoreToOriginalReplicaCount": {"type": "boolean"},
                        "horizontalPodAutoscalerConfig": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {
                                "name": {"type": "string"},
                                "behavior": {"type": "object"},
                            },
                        },
                    },
                },
                "triggers": {"type": "array", "minItems": 1, "items": _KEDA_TRIGGER},
            },
        },
    },
}


def _validate(doc: dict[str, Any], version: str) -> None:
    if doc["kind"] == "ScaledObject":
        jsonschema.validate(doc, KEDA_SCALED_OBJECT)
        spec = doc["spec"]
        assert spec["minReplicaCount"] <= spec["maxReplicaCount"]
        # The behaviour is an autoscaling/v2 HorizontalPodAutoscalerBehavior: check it as one.
        behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
        as_hpa = {
            "apiVersion": "autoscaling/v2",
            "kind": "HorizontalPodAutoscaler",
            "metadata": doc["metadata"],
            "spec": {
                "scaleTargetRef": spec["scaleTargetRef"],
                "maxReplicas": spec["maxReplicaCount"],
                "behavior": behavior,
            },
        }
        kv.validate(as_hpa, version, strict=True)
        return
    kv.validate(doc, version, strict=True)


def _configs() -> list[Manifests]:
    base = {"name": "llm", "image": "vllm/vllm-openai:v0.6.3"}
    return [
        Manifests(**base),
        Manifests(**base, autoscaler="keda"),
        Manifests(**base, gpus=0, autoscaler="keda", scale_to_zero=False),
        Manifests(
            **base,
            gpus=4,
            namespace="inference",
            min_replicas=3,
            max_replicas=40,
            p95_target=2.5,
            queue_target=3,
            args=("--model", "meta-llama/Llama-3.1-8B-Instruct", "--max-num-seqs", "64"),
            behavior=Behavior().scaled(2),
        ),
    ]


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("cfg", _configs(), ids=lambda m: f"{m.autoscaler}-gpus{m.gpus}")
def test_every_manifest_validates(cfg: Manifests, version: str) -> None:
    docs = manifests(cfg)
    assert [d["kind"] for d in docs] == [
        "Deployment",
        "HorizontalPodAutoscaler" if cfg.autoscaler == "hpa" else "ScaledObject",
        "PodDisruptionBudget",
    ]
    for doc in docs:
        _validate(doc, version)


def test_an_invalid_manifest_is_caught() -> None:
    """The validator can fail: a misspelt field and a wrong type are rejected."""
    docs = manifests(Manifests(name="llm", image="x"))
    bad = json.loads(json.dumps(docs[0]))
    bad["spec"]["template"]["spec"]["terminationGracePeriod"] = 30  # not a field
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, "1.30", strict=True)
    bad_hpa = json.loads(json.dumps(docs[1]))
    bad_hpa["spec"]["behavior"]["scaleUp"]["policies"][0]["value"] = "100%"
    with pytest.raises(kv.ValidationError):
        kv.validate(bad_hpa, "1.30", strict=True)
    keda = json.loads(json.dumps(manifests(Manifests(name="llm", image="x", autoscaler="keda"))[1]))
    keda["spec"]["triggers"][0]["metadata"]["threshold"] = 8  # KEDA wants strings
    with pytest.raises(jsonschema.ValidationError):
        _validate(keda, "1.30")


def test_the_playbook_behaviour_and_signals() -> None:
    m = Manifests(name="llm", image="x", min_replicas=2, max_replicas=12, gpus=2)
    dep, hpa, pdb = manifests(m)
    spec = hpa["spec"]
    assert spec["minReplicas"] == 2 and spec["maxReplicas"] == 12
    assert spec["behavior"] == {
        "scaleUp": {
            "stabilizationWindowSeconds": 60,
            "selectPolicy": "Max",
            "policies": [
                {"type": "Percent", "value": 100, "periodSeconds": 60},
                {"type": "Pods", "value": 4, "periodSeconds": 60},
            ],
        },
        "scaleDown": {
            "stabilizationWindowSeconds": 300,
            "selectPolicy": "Min",
            "policies": [
                {"type": "Percent", "value": 50, "periodSeconds": 300},
                {"type": "Pods", "value": 2, "periodSeconds": 300},
            ],
        },
    }
    names = [
        (x["type"], x.get("pods", x.get("external", {})).get("metric", {}).get("name"))
        for x in spec["metrics"]
    ]
    assert names == [
        ("Pods", "vllm_num_requests_waiting"),
        ("External", "lbclient_call_duration_p95_seconds"),
        ("Pods", "DCGM_FI_DEV_GPU_UTIL"),
    ]
    assert all(x["type"] != "Resource" for x in spec["metrics"])  # never CPU
    pod = dep["spec"]["template"]
    assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    c = pod["spec"]["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert c["resources"]["requests"]["nvidia.com/gpu"] == "2"
    assert {"livenessProbe", "readinessProbe", "startupProbe"} <= set(c)
    sleep = int(c["lifecycle"]["preStop"]["exec"]["command"][-1].split()[-1])
    grace = pod["spec"]["terminationGracePeriodSeconds"]
    assert sleep == m.drain_seconds and grace >= sleep + m.max_call_seconds
    assert grace <= 120  # within a spot instance's 2-minute notice, by default
    assert "replicas" not in dep["spec"]  # the autoscaler owns the count
    assert pdb["spec"]["maxUnavailable"] == 1


def test_keda_scales_from_zero_on_lbclient_demand() -> None:
    so = manifests(Manifests(name="chat", image="x", autoscaler="keda", balancer="chat-lb"))[1]
    spec = so["spec"]
    assert spec["idleReplicaCount"] == 0 and spec["minReplicaCount"] == 2
    demand = spec["triggers"][0]
    assert demand["name"] == "demand"
    assert demand["metadata"]["query"] == 'sum(lbclient_demand_calls{balancer="chat-lb"})'
    assert demand["metadata"]["activationThreshold"] == "0"
    assert spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"] == Behavior().to_dict()


def test_yaml_and_json_round_trip() -> None:
    docs = manifests(Manifests(name="llm", image="x", autoscaler="keda"))
    text = to_yaml(docs)
    assert text.count("---") == 3 and "&id" not in text  # no YAML anchors
    assert list(yaml.safe_load_all(text)) == docs
    assert json.loads(to_json(docs))["items"] == docs


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"name": "LLM"}, "DNS label"),
        ({"min_replicas": 1}, "min_replicas must be >= 2"),
        ({"min_replicas": 5, "max_replicas": 3}, "max_replicas"),
        ({"gpus": -1}, "gpus"),
        ({"autoscaler": "vpa"}, "autoscaler"),
        ({"p95_target": 0}, "p95_target"),
    ],
)
def test_bad_values_are_config_errors(fields: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        Manifests(**{"name": "llm", "image": "x", **fields})


def test_cli_prints_valid_multi_document_yaml() -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "lbclient",
            "manifests",
            "--name",
            "llm",
            "--image",
            "vllm/vllm-openai:v0.6.3",
            "--min-replicas",
            "3",
            "--max-replicas",
            "12",
            "--gpus",
            "2",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    docs = list(yaml.safe_load_all(out.stdout))
    assert [d["kind"] for d in docs] == [
        "Deployment",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
    ]
    assert docs[1]["spec"]["minReplicas"] == 3 and docs[1]["spec"]["maxReplicas"] == 12
    for doc in docs:
        _validate(doc, "1.30")
    bad = subprocess.run(
        [sys.executable, "-m", "lbclient", "manifests", "--name", "llm", "--image", "x",
         "--min-replicas", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )  # fmt: skip
    assert bad.returncode == 2 and "min_replicas must be >= 2" in bad.stderr


# -- the behaviour, simulated -------------------------------------------------------------


def _drive(sim: HpaSimulator, demand: Any, seconds: float, per_replica: float = 5.0) -> None:
    t = 0.0
    while t < seconds:
        sim.step(t, demand(t) / (sim.replicas * per_replica))
        t += 15.0


def test_scale_up_is_fast_and_rate_limited() -> None:
    sim = HpaSimulator(Behavior(), min_replicas=2, max_replicas=50)
    _drive(sim, lambda t: 200.0, 300.0)  # wants 40 replicas
    ups = sim.history
    # the first sync past the 60 s window: max(+100% of 2, +4) = 6
    assert ups[0] == (75.0, 6)
    # never more than max(+100%, +4) within any 60 s window
    for i, (t, r) in enumerate(ups):
        before = [x for s, x in [(0.0, 2), *ups[:i]] if s <= t - 60] or [2]
        assert r <= max(2 * before[-1], before[-1] + 4)
    assert sim.replicas == 40
    assert ups[-1][0] <= 300.0  # 2 -> 40 within 5 minutes


def test_scale_down_waits_and_is_gentle() -> None:
    sim = HpaSimulator(Behavior(), min_replicas=2, max_replicas=50, replicas=20)
    _drive(sim, lambda t: 10.0, 1800.0)  # wants 2
    downs = sim.history
    assert downs[0][0] >= 300.0  # nothing before the 300 s stabilization window
    assert all(b[1] - a[1] >= -2 for a, b in zip([(0.0, 20), *downs], downs, strict=False))
    assert all(b[0] - a[0] >= 300.0 for a, b in itertools.pairwise(downs))


def test_oscillation_does_not_thrash_with_the_playbook_behaviour() -> None:
    """Load alternating every 5 minutes: the playbook's behaviour scales up once and holds;
    with no stabilization the HPA follows every swing."""

    def demand(t: float) -> float:
        return 60.0 if (t // 300) % 2 == 0 else 15.0

    calm = HpaSimulator(Behavior(), min_replicas=2, max_replicas=20)
    _drive(calm, demand, 3600.0)
    naive = HpaSimulator(Behavior.none(), min_replicas=2, max_replicas=20)
    _drive(naive, demand, 3600.0)
    assert calm.reversals == 0 and calm.replicas == 12
    assert naive.reversals >= 10
