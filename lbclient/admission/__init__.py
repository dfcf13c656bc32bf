"""Admission control: what may start, in what order, and what is shed (internal).

:mod:`~lbclient.admission.policy` (the frozen ``Admission`` and ``Quota``),
:mod:`~lbclient.admission.gate` (the runtime: permits, waiting, shedding),
:mod:`~lbclient.admission.limiter` (the adaptive concurrency limit),
:mod:`~lbclient.admission.fair` (the waiting room: priority, then VTC fairness),
:mod:`~lbclient.admission.quota` (per-tenant token buckets),
:mod:`~lbclient.admission.throttle` (client-side throttling when the fleet rejects).

Import the public names from :mod:`lbclient`.
"""
