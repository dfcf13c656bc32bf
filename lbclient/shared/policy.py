"""`RedisState`: where and how a balancer shares what it learns with the other processes
of its fleet (frozen configuration; the runtime is :mod:`lbclient.shared.link`)."""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Callable
from typing import Any

import attrs

from .._errors import ConfigError
from .._numbers import is_int, is_number

__all__ = ["RedisState"]

_SCHEMES = ("redis://", "rediss://", "unix://")
_NAMESPACE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")


def _url(_i: object, _a: object, value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, str) or not value.startswith(_SCHEMES):
        raise ConfigError(
            f"RedisState url must be a redis://, rediss:// or unix:// URL, got {value!r}"
        )


def _connect(_i: object, _a: object, value: Any) -> None:
    if value is not None and (isinstance(value, type) or not callable(value)):
        raise ConfigError(
            "RedisState connect must be a callable returning a redis.asyncio.Redis "
            f"client (e.g. a Sentinel master), got {value!r}"
        )


def _namespace(_i: object, _a: object, value: object) -> None:
    if not isinstance(value, str) or not _NAMESPACE.match(value):
        raise ConfigError(
            "RedisState namespace must be 1-64 characters of letters, digits and _ . : -, "
            f"got {value!r}"
        )


def _seconds(low: float, high: float) -> Any:
    def check(_i: object, a: attrs.Attribute[Any], value: object) -> None:
        if not is_number(value) or not low < value <= high:
            raise ConfigError(
                f"RedisState {a.name} must be a number of seconds in ({low:g}, {high:g}], "
                f"got {value!r}"
            )

    return check


def _to_float(value: object) -> object:
    return float(value) if is_int(value) else value


def _peers(_i: object, _a: object, value: object) -> None:
    if not is_int(value) or value < 1:
        raise ConfigError(f"RedisState expected_peers must be an int >= 1, got {value!r}")


def _flag(_i: object, a: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"RedisState {a.name} must be a bool, got {value!r}")


@attrs.frozen(repr=False)
class RedisState:
    """Share what this process learns with every process of the fleet, through Redis.

    ::

        lb = lbclient.Balancer(
            urls,
            breaker=lbclient.Breaker(),
            admission=lbclient.Admission(quotas={"*": lbclient.Quota(requests_per_second=100)}),
            shared=lbclient.RedisState("redis://10.0.0.5:6379/0", namespace="chat"),
        )

    What is shared, per ``namespace`` (give each pool -- each model group -- its own):

    * **ejections** -- a process's failures on an endpoint and its breaker's trips are
      published at once; the others *weigh* them (:mod:`lbclient.shared.evidence`):
      failures in a row seen by two or more processes eject the endpoint everywhere,
      about as soon as one process alone would have (the fleet counts together); a
      single process's report only makes the next call there a probe, so one process
      with a bad network cannot eject a healthy replica for everyone.  Needs a
      ``Breaker``.
    * **Retry-After cooldowns** -- the server's own word: applied everywhere for the
      rest of its time (capped as local ones are).  ``share_cooldowns=False`` if your
      processes use different API keys that a server rate-limits separately.
    * **tenant quotas** -- fleet-wide: each process leases slices of the tenant's token
      bucket kept in Redis (an atomic Lua script, shares in proportion to each
      process's demand) and returns what it does not use; servers that refuse scripts
      get a windowed-counter fallback (announced by a :class:`~lbclient.FleetEvent`).
    * **membership** -- heartbeats: every process knows how many peers are alive.

    Nothing on a call's path touches Redis: picks and admission read process memory,
    a background task syncs every ``sync_interval`` (events go out at once), every Redis
    call has a ``timeout``, and Redis sits behind a circuit breaker with a jittered
    reconnect loop.  When Redis is down or slow no call waits or fails because of it:
    ejections stay local, each quota falls back to the last lease and then to quota /
    peers (the live count last seen, at least ``expected_peers``) -- never the whole
    quota per process -- and state converges again within about a second of Redis
    coming back.  ``lb.stats().shared`` and :class:`~lbclient.FleetEvent` say which mode
    it is in.

    * ``url`` -- ``redis://[user:password@]host:port/db`` (``rediss://`` for TLS,
      ``unix://``); or ``connect=`` -- a callable returning a ``redis.asyncio.Redis``
      (a Sentinel master, custom TLS), called once per event loop.
    * ``namespace`` -- what is shared with whom (default ``"default"``).
    * ``sync_interval`` -- seconds between background syncs (leases, heartbeats,
      counters); default 0.2, at most 0.5.  Events do not wait for it.
    * ``timeout`` -- seconds any one Redis round trip may take (default 0.05).
    * ``peer_ttl`` -- a process silent this long is no longer counted (default 3 s).
    * ``expected_peers`` -- how many processes to assume before the first heartbeat
      count is read (a process starting while Redis is down); default 1 -- set it to
      your replica count so such a process takes quota / replicas, not the whole quota.
    * ``scripts`` -- lease by Lua script when the server runs them (default ``True``;
      checked at every connection); ``False`` always uses the fallback.
    * ``share_ejections`` / ``share_cooldowns`` -- turn either part off (default on).
    * ``reconnect_max`` -- the longest wait between reconnect attempts (default 0.5 s,
      plus up to a quarter of it in jitter: the processes of a fleet come back within
      about half a second of each other -- while some are back and others not, the
      first ones lease the whole rate as the others still spend their local share).

    Needs the ``redis`` extra (``pip install 'lbclient[redis]'``, redis-py's asyncio
    client).  Standalone Redis >= 6.2 and Valkey are supported; Sentinel through
    ``connect=``; Redis Cluster is not (the keys of a namespace share one hash tag, but
    it is untested).
    """

    url: str | None = attrs.field(default=None, validator=_url)
    namespace: str = attrs.field(default="default", kw_only=True, validator=_namespace)
    sync_interval: float = attrs.field(
        default=0.2, kw_only=True, converter=_to_float, validator=_seconds(0.0, 0.5)
    )
    timeout: float = attrs.field(
        default=0.05, kw_only=True, converter=_to_float, validator=_seconds(0.0, 1.0)
    )
    peer_ttl: float = attrs.field(
        default=3.0, kw_only=True, converter=_to_float, validator=_seconds(0.0, 600.0)
    )
    expected_peers: int = attrs.field(default=1, kw_only=True, validator=_peers)
    scripts: bool = attrs.field(default=True, kw_only=True, validator=_flag)
    share_ejections: bool = attrs.field(default=True, kw_only=True, validator=_flag)
    share_cooldowns: bool = attrs.field(default=True, kw_only=True, validator=_flag)
    reconnect_max: float = attrs.field(
        default=0.5, kw_only=True, converter=_to_float, validator=_seconds(0.0, 60.0)
    )
    connect: Callable[[], Any] | None = attrs.field(default=None, kw_only=True, validator=_connect)

    def __attrs_post_init__(self) -> None:
        if (self.url is None) == (self.connect is None):
            raise ConfigError(
                "RedisState needs a url (e.g. 'redis://127.0.0.1:6379/0') or connect= "
                f"(a callable returning a redis.asyncio.Redis), not both: got url={self.url!r}"
            )
        if self.peer_ttl < 2 * self.sync_interval:
            raise ConfigError(
                f"RedisState peer_ttl ({self.peer_ttl!r}) must be at least twice sync_interval "
                f"({self.sync_interval!r}): a live process would be counted out between beats"
            )
        if importlib.util.find_spec("redis") is None:
            raise ConfigError("RedisState needs redis-py: pip install 'lbclient[redis]' (redis>=5)")

    @property
    def prefix(self) -> str:
        """The namespace's key prefix; the braces are a hash tag, so every key of a
        namespace lives in one slot."""
        return f"lbclient:{{{self.namespace}}}"

    def __repr__(self) -> str:
        where = _redact(self.url) if self.url is not None else "connect=..."
        parts = [repr(where)]
        for field in attrs.fields(RedisState):
            if field.name in ("url", "connect"):
                continue
            value = getattr(self, field.name)
            if value != field.default:
                parts.append(f"{field.name}={value!r}")
        return f"lbclient.RedisState({', '.join(parts)})"


def _redact(url: str) -> str:
    """The URL without its password (reprs end up in logs)."""
    return re.sub(r"(://[^:/@]*:)[^@/]*@", r"\1***@", url)
