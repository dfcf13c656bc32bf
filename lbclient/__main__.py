"""``python -m lbclient``: the operator's commands.

::

    python -m lbclient manifests --name llm --image vllm/vllm-openai:v0.6.3 --gpus 1 \\
        [--min-replicas 2] [--max-replicas 10] [--autoscaler hpa|keda] > llm.yaml
    python -m lbclient plan --trace traffic.jsonl --target-p95 2.0 [--concurrency 8] \\
        [--plot plan.png]
    python -m lbclient plan --synthetic 40 --service-time 1.2 --target-p95 4 --concurrency 8
    python -m lbclient cost --rps 100 [--max-spot-share 0.5] [--plot cost.png]
    python -m lbclient cost --trace traffic.jsonl        # the recorded daily profile

``--json`` prints machine-readable output instead of tables.  Exit status 2 on a bad
argument (the message names it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Sequence
from typing import Any

from ._errors import ConfigError


def _manifests(ns: argparse.Namespace) -> str:
    from .ops.manifests import Manifests, manifests, to_json, to_yaml

    m = Manifests(
        name=ns.name,
        image=ns.image,
        namespace=ns.namespace,
        port=ns.port,
        gpus=ns.gpus,
        min_replicas=ns.min_replicas,
        max_replicas=ns.max_replicas,
        args=tuple(ns.arg or ()),
        cpu=ns.cpu,
        memory=ns.memory,
        drain_seconds=ns.drain_seconds,
        max_call_seconds=ns.max_call_seconds,
        queue_target=ns.queue_target,
        p95_target=ns.p95_target,
        gpu_target=ns.gpu_target,
        autoscaler=ns.autoscaler,
        scale_to_zero=not ns.no_scale_to_zero,
        demand_target=ns.demand_target,
        balancer=ns.balancer,
        prometheus=ns.prometheus,
    )
    docs = manifests(m)
    return to_json(docs) if ns.format == "json" else to_yaml(docs)


def _records(ns: argparse.Namespace) -> list[Any]:
    from .ops.planner import synthetic_trace
    from .ops.recording import load_trace

    if ns.trace:
        return load_trace(ns.trace)
    if ns.synthetic:
        return synthetic_trace(
            ns.synthetic,
            ns.duration,
            service_time=ns.service_time or 1.0,
            diurnal=ns.diurnal,
            seed=ns.seed,
        )
    raise ConfigError("give a recording (--trace FILE) or --synthetic RATE")


def _plan(ns: argparse.Namespace) -> str:
    from .ops.planner import CapacityPlanner

    planner = CapacityPlanner(_records(ns), window=ns.window)
    rate: str | float = ns.rate
    with contextlib.suppress(ValueError):
        rate = float(ns.rate)
    plan = planner.plan(
        ns.target_p95,
        percentile=ns.percentile,
        concurrency=ns.concurrency,
        headroom=ns.headroom,
        rate=rate,
        service_time=ns.service_time,
        service=ns.service,
        min_replicas=ns.min_replicas,
        max_replicas=ns.max_replicas,
    )
    if ns.plot:
        plan.plot(ns.plot)
    if ns.json:
        summary = planner.traffic()
        out = {"traffic": _jsonable(summary), "plan": plan.to_dict()}
        return json.dumps(out, indent=2, default=str) + "\n"
    text = "traffic\n" + _indent(planner.traffic().table()) + "\n" + plan.table() + "\n"
    if ns.plot:
        text += f"plot: {ns.plot}\n"
    return text


def _cost(ns: argparse.Namespace) -> str:
    from .ops.cost import DEFAULT_INSTANCES, CostModel, InstanceType

    instances = DEFAULT_INSTANCES
    if ns.instances:
        with open(ns.instances) as f:
            raw = json.load(f)
        if not isinstance(raw, list):
            raise ConfigError(f"--instances must hold a JSON list of instance types, got {raw!r}")
        instances = tuple(InstanceType.from_dict(d) for d in raw)
    model = CostModel(
        instances=instances,
        max_spot_share=ns.max_spot_share,
        spot_interruption=ns.spot_interruption,
    )
    if ns.hourly:
        plan = model.plan(hourly=[float(x) for x in ns.hourly.split(",")])
    elif ns.trace:
        from .ops.planner import CapacityPlanner
        from .ops.recording import load_trace

        hourly = CapacityPlanner(load_trace(ns.trace)).traffic().hourly
        plan = model.plan(hourly=[v * (1.0 + ns.headroom) for v in hourly.values()])
    elif ns.rps is not None:
        plan = model.plan(rps=ns.rps * (1.0 + ns.headroom))
    else:
        raise ConfigError("give the load: --rps R, --hourly R0,R1,... or --trace FILE")
    if ns.plot:
        plan.plot(ns.plot)
    if ns.json:
        return json.dumps(plan.to_dict(), indent=2) + "\n"
    return plan.table() + "\n" + (f"plot: {ns.plot}\n" if ns.plot else "")


def _jsonable(obj: Any) -> Any:
    import attrs

    return attrs.asdict(obj) if attrs.has(type(obj)) else obj


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lbclient",
        description="lbclient's operator commands: Kubernetes manifests, capacity planning, cost.",
    )
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser(
        "manifests",
        help="print Kubernetes manifests (Deployment, HPA or KEDA ScaledObject, PDB) as YAML",
    )
    m.add_argument("--name", required=True, help="the Deployment's name (a DNS label)")
    m.add_argument("--image", required=True, help="the replicas' container image")
    m.add_argument("--min-replicas", type=int, default=2, help="at least 2 (default 2)")
    m.add_argument("--max-replicas", type=int, default=10, help="default 10")
    m.add_argument("--gpus", type=int, default=1, help="GPUs per replica (default 1; 0: none)")
    m.add_argument("--namespace", default="default")
    m.add_argument("--port", type=int, default=8000, help="the server's port (default 8000)")
    m.add_argument("--arg", action="append", help="a container argument (repeat)")
    m.add_argument("--cpu", default="4", help="CPU request (default 4)")
    m.add_argument("--memory", default="32Gi", help="memory request and limit (default 32Gi)")
    m.add_argument("--drain-seconds", type=int, default=15, help="preStop sleep (default 15)")
    m.add_argument(
        "--max-call-seconds", type=int, default=90, help="the longest call to let finish (90)"
    )
    m.add_argument("--queue-target", type=float, default=5.0, help="waiting requests per pod (5)")
    m.add_argument("--p95-target", type=float, default=2.0, help="p95 latency, seconds (2.0)")
    m.add_argument("--gpu-target", type=float, default=80.0, help="GPU utilization %% (80)")
    m.add_argument(
        "--autoscaler",
        choices=("hpa", "keda"),
        default="hpa",
        help="hpa: an autoscaling/v2 HPA; keda: a KEDA ScaledObject (scales from zero on "
        "lbclient's demand metric)",
    )
    m.add_argument("--no-scale-to-zero", action="store_true", help="keda: keep min replicas")
    m.add_argument("--demand-target", type=float, default=8.0, help="keda: demand per replica")
    m.add_argument("--balancer", help="the balancer label of lbclient's metrics (default: name)")
    m.add_argument(
        "--prometheus",
        default="http://prometheus-operated.monitoring.svc:9090",
        help="keda: Prometheus's address",
    )
    m.add_argument("--format", choices=("yaml", "json"), default="yaml")
    m.set_defaults(run=_manifests)

    pl = sub.add_parser("plan", help="replicas needed for a latency target, from a recording")
    pl.add_argument("--trace", help="a traffic recording (lbclient.ops.TrafficRecorder)")
    pl.add_argument("--synthetic", type=float, help="or: synthetic Poisson traffic at this rate")
    pl.add_argument("--duration", type=float, default=3600.0, help="synthetic: seconds (3600)")
    pl.add_argument("--diurnal", type=float, default=0.0, help="synthetic: daily swing share")
    pl.add_argument("--seed", type=int, default=0, help="synthetic: seed")
    pl.add_argument("--target-p95", type=float, required=True, help="latency target, seconds")
    pl.add_argument("--percentile", type=float, default=0.95, help="of the target (0.95)")
    pl.add_argument("--concurrency", type=int, default=1, help="slots per replica (1)")
    pl.add_argument("--headroom", type=float, default=0.2, help="extra rate share (0.2)")
    pl.add_argument("--rate", default="p95", help="mean, p50, p95, p99, peak or calls/s (p95)")
    pl.add_argument("--window", type=float, default=60.0, help="seconds per rate sample (60)")
    pl.add_argument("--service-time", type=float, help="mean seconds per call (default: measured)")
    pl.add_argument("--service", choices=("exponential", "empirical"), default="exponential")
    pl.add_argument("--min-replicas", type=int, default=2)
    pl.add_argument("--max-replicas", type=int)
    pl.add_argument("--plot", help="write the replicas vs latency curve to this PNG")
    pl.add_argument("--json", action="store_true")
    pl.set_defaults(run=_plan)

    c = sub.add_parser("cost", help="the cheapest on-demand / spot / reserved mix for a load")
    c.add_argument("--rps", type=float, help="a constant load, calls/s")
    c.add_argument("--hourly", help="or: a daily profile, 24 comma-separated calls/s")
    c.add_argument("--trace", help="or: the hourly profile of a recording")
    c.add_argument("--headroom", type=float, default=0.0, help="extra load share (0)")
    c.add_argument("--max-spot-share", type=float, default=0.5, help="of the load on spot (0.5)")
    c.add_argument("--spot-interruption", type=float, default=0.05, help="spot away share (0.05)")
    c.add_argument("--instances", help="a JSON list of instance types (name, on_demand, ...)")
    c.add_argument("--plot", help="write the monthly cost per option to this PNG")
    c.add_argument("--json", action="store_true")
    c.set_defaults(run=_cost)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    p = parser()
    ns = p.parse_args(argv)
    try:
        out = ns.run(ns)
    except (ConfigError, OSError, ValueError) as exc:
        p.exit(2, f"{p.prog} {ns.command}: error: {exc}\n")
    sys.stdout.write(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
