"""The pool: endpoints, their runtime state, and what may be picked now (internal).

* :mod:`~lbclient.pool.pool` -- :class:`Pool`: membership, health, cooldowns, picking;
  the only writer of endpoint state.
* :mod:`~lbclient.pool.lease` -- :class:`Lease`: one attempt's slot, given back by one
  outcome (ok, fail, cut, cancel, lose).
* :mod:`~lbclient.pool.snapshot` -- the pickable view, rebuilt only when it changes.
* :mod:`~lbclient.pool.state` -- :class:`EndpointState`; :mod:`~lbclient.pool.load` --
  the load metrics pickers compare.
* :mod:`~lbclient.pool.locality`, :mod:`~lbclient.pool.health`,
  :mod:`~lbclient.pool.discovery`, :mod:`~lbclient.pool.background`,
  :mod:`~lbclient.pool.drain` -- what feeds and changes the membership.

Nothing here is public API: use what :mod:`lbclient` exports.
"""
