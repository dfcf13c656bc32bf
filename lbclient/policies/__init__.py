"""Policies: frozen, validated configuration and the pure decisions made from it.

``Retry`` (:mod:`~lbclient.policies.retry`), ``Breaker`` and its per-endpoint state
machine (:mod:`~lbclient.policies.breaker`), ``Hedge`` (:mod:`~lbclient.policies.hedge`),
``Budget`` (:mod:`~lbclient.policies.budget`), error classification
(:mod:`~lbclient.policies.classify`) and the region latency table
(:mod:`~lbclient.policies.geo`).  Nothing here awaits or does I/O.

Import the public names from :mod:`lbclient`.
"""
