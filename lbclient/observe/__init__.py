"""What the balancer tells the outside: events, counters and stats (internal).

:mod:`~lbclient.observe.events` (the event records and the ``Listener`` protocol),
:mod:`~lbclient.observe.observer` (the one fan-out, and the counters),
:mod:`~lbclient.observe.stats` (``lb.stats()`` snapshots).

Import the public names from :mod:`lbclient`.
"""
