"""The call engine: one layered path for every call (internal).

``route`` (the variant, chosen at decoration) -> ``retrying`` (rounds, retry decisions,
Retry-After waits) -> ``hedging`` (a round as a race of attempts) -> ``attempt`` (one
attempt under a lease, its outcome recorded once); ``streaming`` is the same path in
stream mode (an attempt succeeds at its first chunk).  ``pick`` is ``lb.pick()``;
``engine`` holds what they share.

Nothing here is public API: use what :mod:`lbclient` exports.
"""
