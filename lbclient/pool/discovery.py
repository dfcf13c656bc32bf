"""Service discovery: providers that tell the balancer which endpoints exist.

A provider is anything with an ``interval`` (seconds between refreshes) and an async
``resolve()`` returning the current endpoints (:class:`Discovery`).  Three ship here:
:class:`StaticDiscovery` (a fixed list), :class:`CallableDiscovery` (your function:
a Kubernetes API call, a Consul query, a config file) and :class:`DnsDiscovery`
(``A``/``AAAA``/``SRV`` records, with dnspython).

The balancer drives them: ``start()`` (or ``async with``) waits for one
:func:`refresh_once`, then :func:`discovery_loop` refreshes every ``interval``.  Each
refresh hands the answer to ``Balancer.sync``: new endpoints are added, missing ones
drained and removed once idle, survivors keep their statistics.

**Failure keeps the last good set.**  A refresh that raises, times out or returns no
endpoints changes nothing (a warning is logged).  An empty answer is treated as a
failure on purpose: a DNS server that briefly answers ``NXDOMAIN`` during a deploy, or
a registry that returns ``[]`` while it restarts, would otherwise empty the pool and
fail every call, although the replicas themselves are fine.  To really shrink the
pool to nothing, ``remove()`` endpoints yourself.
"""

from __future__ import annotations

import asyncio
import importlib.util
import inspect
import ipaddress
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import attrs

from .._endpoint import Endpoint, to_endpoint
from .._errors import ConfigError
from .._numbers import is_int, is_number

if TYPE_CHECKING:
    from dns.asyncresolver import Resolver
    from dns.name import Name

    from .pool import Pool

__all__ = [
    "CallableDiscovery",
    "Discovery",
    "DnsDiscovery",
    "StaticDiscovery",
    "discovery_loop",
    "refresh_once",
    "refresh_retrying",
]

log = logging.getLogger("lbclient")

_DNS_HINT = "DnsDiscovery needs dnspython, which is not installed: pip install 'lbclient[dns]'"
_RECORDS = ("A", "AAAA", "SRV")
_SRV_ZERO_SHARE = 0.01
"""An SRV weight of 0 next to positive weights becomes 1% of the smallest positive one."""


@runtime_checkable
class Discovery(Protocol):
    """What ``Balancer(discovery=...)`` accepts: a source of the current endpoint set.

    * ``interval`` -- seconds between two refreshes; ``math.inf`` refreshes only once,
      when the balancer starts.
    * ``resolve()`` -- the endpoints that exist now (URLs or :class:`Endpoint` objects).
      It may raise: the balancer logs a warning and keeps the last good set.  It should
      bound its own run time (a hung ``resolve`` delays ``start()`` and every later
      refresh).
    """

    interval: float

    async def resolve(self) -> Sequence[Endpoint | str]:
        """The current endpoints."""
        ...


# -- validators: messages name the bad value ----------------------------------------------


_MIN_INTERVAL = 0.01  # seconds: faster refreshes would only spin the event loop


def _check_interval(owner: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ConfigError(
            f"{owner} interval must be a number of seconds > 0 (math.inf: resolve only "
            f"once), got {value!r}"
        )
    if value < _MIN_INTERVAL:
        raise ConfigError(
            f"{owner} interval must be at least {_MIN_INTERVAL} s (a refresh that often "
            f"would spin the event loop), got {value!r}"
        )
    return float(value)


def _check_positive(owner: str, name: str, value: object) -> float:
    if not is_number(value) or value <= 0:
        raise ConfigError(f"{owner} {name} must be a finite number > 0, got {value!r}")
    return float(value)


def _port_number(owner: str, name: str, value: object) -> int:
    if not is_int(value) or not 1 <= value <= 65535:
        raise ConfigError(f"{owner} {name} must be an int in 1..65535, got {value!r}")
    return value


def _dns_name(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"DnsDiscovery name must be a non-empty DNS name, got {value!r}")
    name = value.strip()
    if any(c.isspace() for c in name) or "/" in name or ":" in name or "@" in name:
        raise ConfigError(
            f"DnsDiscovery name must be a DNS name such as 'llm.internal' or "
            f"'_http._tcp.llm.internal' (not a URL), got {value!r}"
        )
    bare = name[:-1] if name.endswith(".") else name
    labels = bare.split(".")
    if len(bare) > 253 or any(not 1 <= len(label) <= 63 for label in labels):
        raise ConfigError(
            f"DnsDiscovery name must have labels of 1..63 characters and at most 253 "
            f"characters in all, got {value!r}"
        )
    return name


def _record(value: object) -> str:
    if not isinstance(value, str) or value.strip().upper() not in _RECORDS:
        raise ConfigError(f"DnsDiscovery record must be 'A', 'AAAA' or 'SRV', got {value!r}")
    return value.strip().upper()


def _scheme(value: object) -> str:
    if not isinstance(value, str) or value.strip().lower() not in ("http", "https"):
        raise ConfigError(f"DnsDiscovery scheme must be 'http' or 'https', got {value!r}")
    return value.strip().lower()


def _nameservers(value: object) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise ConfigError(
            f"DnsDiscovery nameservers must be a list of IP addresses or None, got {value!r}"
        )
    servers = []
    for item in value:
        try:
            servers.append(
                str(ipaddress.ip_address(item.strip() if isinstance(item, str) else item))
            )
        except ValueError:
            raise ConfigError(
                f"DnsDiscovery nameservers must be IP addresses, got {item!r} in {value!r}"
            ) from None
    if not servers:
        raise ConfigError("DnsDiscovery nameservers must not be empty (None: the system's): got []")
    return tuple(servers)


def _check_label(name: str, value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"DnsDiscovery {name} must be a non-empty str or None, got {value!r}")
    return value.strip()


def _region(value: object) -> str | None:
    return _check_label("region", value)


def _zone(value: object) -> str | None:
    return _check_label("zone", value)


def _dns_interval(value: object) -> float:
    return _check_interval("DnsDiscovery", value)


def _dns_timeout(value: object) -> float:
    return _check_positive("DnsDiscovery", "timeout", value)


def _dns_weight(value: object) -> float:
    return _check_positive("DnsDiscovery", "weight", value)


def _callable_interval(value: object) -> float:
    return _check_interval("CallableDiscovery", value)


def _optional_port(value: object) -> int | None:
    return None if value is None else _port_number("DnsDiscovery", "port", value)


def _nameserver_port(value: object) -> int:
    return _port_number("DnsDiscovery", "nameserver_port", value)


def _short_repr(obj: Any, name: str, positional: str | None = None) -> str:
    """``lbclient.Name(positional, field=value...)`` showing only non-default fields."""
    parts: list[str] = []
    for field in attrs.fields(type(obj)):
        if not field.init:
            continue
        value = getattr(obj, field.name)
        if field.name == positional:
            parts.insert(0, repr(value))
        elif value != field.default:
            parts.append(f"{field.name}={value!r}")
    return f"lbclient.{name}({', '.join(parts)})"


# -- providers ------------------------------------------------------------------------------


def _static_endpoints(value: object) -> tuple[Endpoint, ...]:
    if isinstance(value, str | Endpoint) or not isinstance(value, Iterable):
        raise ConfigError(
            f"StaticDiscovery endpoints must be a list of URLs or Endpoints, got {value!r}"
        )
    eps = tuple(to_endpoint(e) for e in value)
    if not eps:
        raise ConfigError("StaticDiscovery endpoints must not be empty: got []")
    seen: set[str] = set()
    for ep in eps:
        if ep.url in seen:
            raise ConfigError(f"StaticDiscovery: duplicate endpoint url {ep.url!r}")
        seen.add(ep.url)
    return eps


@attrs.frozen(repr=False)
class StaticDiscovery:
    """A fixed endpoint list, resolved once (``interval`` is ``math.inf``).

    ::

        lb = lbclient.Balancer([], discovery=lbclient.StaticDiscovery(["http://a:8000"]))

    Mostly useful in tests and as the neutral value where a provider is required; a
    plain ``Balancer(urls)`` does the same.
    """

    endpoints: tuple[Endpoint, ...] = attrs.field(converter=_static_endpoints)
    interval: float = attrs.field(default=math.inf, init=False)

    async def resolve(self) -> Sequence[Endpoint]:
        return self.endpoints

    def __repr__(self) -> str:
        return f"lbclient.StaticDiscovery({[e.url for e in self.endpoints]!r})"


def _callable(value: object) -> Callable[[], Any]:
    if not callable(value):
        raise ConfigError(f"CallableDiscovery needs a callable, got {value!r}")
    return value


@attrs.frozen(repr=False)
class CallableDiscovery:
    """Endpoints from your own function, called every ``interval`` seconds.

    ::

        async def from_registry() -> list[str]:
            async with http.get("http://registry/llm") as r:
                return [f"http://{i['ip']}:{i['port']}" for i in await r.json()]

        lb = lbclient.Balancer([], discovery=lbclient.CallableDiscovery(from_registry))

    ``fn`` takes no arguments and returns URLs or :class:`Endpoint` objects (to carry
    weights, regions and zones).  It may be ``async def`` or a plain function; a plain
    one runs on the event loop, so it must be quick -- wrap blocking code in
    ``asyncio.to_thread`` inside an async function.  It should also bound its own time
    (a timeout on its HTTP call): a hung ``fn`` delays ``start()`` and later refreshes.
    If it raises or returns nothing, the balancer keeps the endpoints it has.

    ``interval`` (30 s) is the refresh period: short enough that a scaled-out replica
    takes traffic within half a minute, long enough that 100 client processes cost a
    registry about 3 queries per second.
    """

    fn: Callable[[], Any] = attrs.field(converter=_callable)
    interval: float = attrs.field(default=30.0, kw_only=True, converter=_callable_interval)

    async def resolve(self) -> Sequence[Endpoint | str]:
        result = self.fn()
        if inspect.isawaitable(result):
            result = await result
        if isinstance(result, str | Endpoint) or not isinstance(result, Iterable):
            raise TypeError(
                f"CallableDiscovery fn {self.fn!r} must return a list of URLs or Endpoints, "
                f"got {result!r}"
            )
        return list(result)

    def __repr__(self) -> str:
        name = getattr(self.fn, "__qualname__", None) or repr(self.fn)
        extra = "" if self.interval == 30.0 else f", interval={self.interval!r}"
        return f"lbclient.CallableDiscovery({name}{extra})"


@attrs.frozen(repr=False)
class DnsDiscovery:
    """Endpoints from DNS: ``A``/``AAAA`` records with a fixed port, or ``SRV`` records.

    ::

        # A Kubernetes headless service: one A record per ready pod
        lbclient.DnsDiscovery("llm.prod.svc.cluster.local", port=8000)
        # SRV: each record carries its own port and weight
        lbclient.DnsDiscovery("_http._tcp.llm.prod.svc.cluster.local", record="SRV")

    Needs dnspython (``pip install 'lbclient[dns]'``); it is imported only when a lookup
    runs, so ``import lbclient`` stays light.  Give a fully qualified name: search
    domains from ``resolv.conf`` are not applied.

    * ``record`` -- ``"A"`` (IPv4, default), ``"AAAA"`` (IPv6) or ``"SRV"``.
    * ``port`` -- required for ``A``/``AAAA`` (URLs are ``{scheme}://{ip}:{port}``,
      IPv6 in brackets); not allowed for ``SRV``, whose records carry the port.
    * ``scheme`` -- ``"http"`` or ``"https"``.
    * ``interval`` -- seconds between lookups (30 s).  DNS TTLs of headless services
      are typically 5-30 s, and a replica that disappears is found by the breaker and
      health checks long before DNS says so; 30 s bounds how late a *new* replica gets
      traffic.  Lower it for fast autoscaling.
    * ``nameservers`` / ``nameserver_port`` -- query these servers (IP addresses) on
      that port instead of the system's (``/etc/resolv.conf``, port 53).
    * ``timeout`` -- seconds one lookup may take (2 s; dnspython's ``lifetime``, all
      retries included).  A timeout is a failed refresh: the last good set stays.
    * ``region`` / ``zone`` -- labels given to every endpoint found (for geo scoring
      and locality; use one provider per region, or a :class:`CallableDiscovery`).
    * ``weight`` -- weight of every endpoint (A/AAAA); for SRV, a factor on the
      records' own weights.

    **SRV records** (RFC 2782).  Only the records of the lowest ``priority`` value are
    used: the others are declared backups, and the breaker and health checks already
    handle a failed primary without sending traffic to a backup tier.  A record's
    ``weight`` becomes the endpoint's weight.  Weight 0 means "pick almost never when
    others have weight": with only zeros every endpoint gets weight 1; next to positive
    weights a 0 becomes 1% of the smallest positive weight (an :class:`Endpoint` needs a
    weight > 0).  A target ``.`` ("no service") is skipped.  A target is turned into
    addresses from the answer's additional section if present, else by an ``A`` lookup
    (``AAAA`` if it has no ``A`` record); a target that is itself an IP address is used
    as is.  A target that does not exist (``NXDOMAIN``, no address) is skipped with a
    warning; any other lookup error fails the whole refresh.  Two records that lead to
    the same address and port make one endpoint with the sum of their weights.
    """

    name: str = attrs.field(converter=_dns_name)
    port: int | None = attrs.field(default=None, kw_only=True, converter=_optional_port)
    scheme: str = attrs.field(default="http", kw_only=True, converter=_scheme)
    record: str = attrs.field(default="A", kw_only=True, converter=_record)
    interval: float = attrs.field(default=30.0, kw_only=True, converter=_dns_interval)
    nameservers: tuple[str, ...] | None = attrs.field(
        default=None, kw_only=True, converter=_nameservers
    )
    nameserver_port: int = attrs.field(default=53, kw_only=True, converter=_nameserver_port)
    timeout: float = attrs.field(default=2.0, kw_only=True, converter=_dns_timeout)
    region: str | None = attrs.field(default=None, kw_only=True, converter=_region)
    zone: str | None = attrs.field(default=None, kw_only=True, converter=_zone)
    weight: float = attrs.field(default=1.0, kw_only=True, converter=_dns_weight)

    def __attrs_post_init__(self) -> None:
        if self.record == "SRV" and self.port is not None:
            raise ConfigError(
                f"DnsDiscovery port must be None for record='SRV' (SRV records carry the "
                f"port), got {self.port!r}"
            )
        if self.record != "SRV" and self.port is None:
            raise ConfigError(
                f"DnsDiscovery port is required for record={self.record!r} "
                f"(an int in 1..65535), got None"
            )
        if self.nameservers is None and self.nameserver_port != 53:
            raise ConfigError(
                f"DnsDiscovery nameserver_port applies to the nameservers= you give; pass "
                f"nameservers= with nameserver_port={self.nameserver_port!r}"
            )
        if importlib.util.find_spec("dns") is None:
            raise ImportError(_DNS_HINT)

    def __repr__(self) -> str:
        return _short_repr(self, "DnsDiscovery", positional="name")

    # -- lookups ------------------------------------------------------------------------

    def _resolver(self) -> Resolver:
        try:
            import dns.asyncresolver
        except ImportError as exc:
            raise ImportError(_DNS_HINT) from exc
        if self.nameservers is None:
            resolver = dns.asyncresolver.Resolver()
        else:
            resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.port = self.nameserver_port  # before nameservers: they copy it when set
        if self.nameservers is not None:
            resolver.nameservers = list(self.nameservers)
        resolver.lifetime = self.timeout
        resolver.timeout = self.timeout
        return resolver

    async def resolve(self) -> list[Endpoint]:
        """Look the name up once; raises dnspython's errors (``NXDOMAIN``, ``NoAnswer``,
        ``LifetimeTimeout``, ``NoNameservers``...) when the lookup fails."""
        resolver = self._resolver()
        if self.record == "SRV":
            return await self._resolve_srv(resolver)
        answer = await resolver.resolve(self.name, self.record, lifetime=self.timeout)
        assert self.port is not None  # checked at construction
        urls = dict.fromkeys(_url(self.scheme, rdata.address, self.port) for rdata in answer)
        return [self._endpoint(url, self.weight) for url in urls]

    async def _resolve_srv(self, resolver: Resolver) -> list[Endpoint]:
        import dns.name
        import dns.rdatatype

        answer = await resolver.resolve(self.name, "SRV", lifetime=self.timeout)
        records = []
        for rdata in answer:
            if rdata.target == dns.name.root:
                continue  # "." : the service is decidedly not available at this name
            if rdata.port == 0:
                log.warning("DnsDiscovery %s: SRV record %s has port 0; skipped", self.name, rdata)
                continue
            records.append(rdata)
        if not records:
            return []
        best = min(r.priority for r in records)
        group = [r for r in records if r.priority == best]
        weights = _srv_weights([r.weight for r in group])

        known: dict[Name, list[str]] = {}
        for rrset in answer.response.additional:
            if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
                known.setdefault(rrset.name, []).extend(r.address for r in rrset)
        missing = list(dict.fromkeys(r.target for r in group if r.target not in known))
        found = await asyncio.gather(*(self._addresses(resolver, t) for t in missing))
        known.update(zip(missing, found, strict=True))

        shares: dict[str, float] = {}
        for r, w in zip(group, weights, strict=True):
            for address in known[r.target]:
                url = _url(self.scheme, address, r.port)
                shares[url] = shares.get(url, 0.0) + w * self.weight
        return [self._endpoint(url, w) for url, w in shares.items()]

    async def _addresses(self, resolver: Resolver, target: Name) -> list[str]:
        """The addresses of one SRV target: itself if an IP, else its A (or AAAA) records."""
        import dns.resolver

        text = target.to_text(omit_final_dot=True)
        try:
            return [str(ipaddress.ip_address(text))]
        except ValueError:
            pass
        for rdtype in ("A", "AAAA"):
            try:
                answer = await resolver.resolve(target, rdtype, lifetime=self.timeout)
            except dns.resolver.NoAnswer:
                continue  # no record of this type: try the next
            except dns.resolver.NXDOMAIN:
                break
            return [rdata.address for rdata in answer]
        log.warning("DnsDiscovery %s: SRV target %s has no address; skipped", self.name, text)
        return []

    def _endpoint(self, url: str, weight: float) -> Endpoint:
        return Endpoint(url, weight=weight, region=self.region, zone=self.zone)


def _url(scheme: str, address: str, port: int) -> str:
    host = f"[{address}]" if ":" in address else address
    return f"{scheme}://{host}:{port}"


def _srv_weights(weights: Sequence[int]) -> list[float]:
    """RFC 2782 weights as Endpoint weights (> 0): all zero -> equal; else a 0 is tiny."""
    positive = [w for w in weights if w > 0]
    if not positive:
        return [1.0] * len(weights)
    floor = min(positive) * _SRV_ZERO_SHARE
    return [float(w) if w > 0 else floor for w in weights]


# -- the driver -----------------------------------------------------------------------------


async def refresh_once(pool: Pool, provider: Discovery) -> bool:
    """Resolve once and make the pool match; ``True`` if the pool was updated.

    Never raises (except ``CancelledError``): on an error or an empty answer a warning
    is logged on the ``lbclient`` logger and the pool keeps its last good set.
    """
    if pool.closed:
        return False
    try:
        result = await provider.resolve()
        if isinstance(result, str | Endpoint) or not isinstance(result, Iterable):
            raise TypeError(f"resolve() must return a list of URLs or Endpoints, got {result!r}")
        endpoints = [to_endpoint(e) for e in result]
        if not endpoints:
            raise LookupError("no endpoints in the answer")
        if pool.closed:
            return False
        before = set(pool.members)
        pool.sync(endpoints)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        if pool.closed:
            return False
        detail = str(exc) or "(no message)"
        log.warning(
            "discovery failed, keeping the last good set of %d endpoints: %r: %s: %s",
            len(pool.members),
            provider,
            type(exc).__name__,
            detail,
        )
        return False
    after = set(pool.members)
    if before != after:
        log.debug(
            "discovery %r: %d endpoint(s), +%d -%d",
            provider,
            len(endpoints),
            len(after - before),
            len(before - after),
        )
    return True


def _interval_of(provider: Discovery) -> float | None:
    interval = getattr(provider, "interval", None)
    if (
        isinstance(interval, bool)
        or not isinstance(interval, int | float)
        or math.isnan(interval)
        or interval <= 0
    ):
        log.error("discovery %r has no usable interval (%r); refreshes stop", provider, interval)
        return None
    return float(interval)


async def refresh_retrying(pool: Pool, provider: Discovery, interval: float) -> bool:
    """:func:`refresh_once`, and if it fails, again after a jittered exponential backoff
    (tenacity: from ``min(1 s, interval / 8)``, doubling, capped at half the interval)
    for at most one interval in all -- a DNS blip heals in about a second instead of
    leaving the pool stale for a whole ``interval``.  Sleeps on the pool's clock."""
    import tenacity

    first = min(1.0, interval / 8)
    cap = max(first, interval / 2)
    waits, total = 0, 0.0
    while total + min(cap, first * 2**waits) <= interval and waits < 16:
        total += min(cap, first * 2**waits)
        waits += 1
    retrying = tenacity.AsyncRetrying(
        wait=tenacity.wait_exponential(multiplier=first, max=cap)
        + tenacity.wait_random(0, first / 2),
        stop=tenacity.stop_after_attempt(waits + 1),
        retry=tenacity.retry_if_result(lambda ok: not ok and not pool.closed),
        retry_error_callback=lambda state: False,
        sleep=pool.clock.sleep,
    )
    ok: bool = await retrying(refresh_once, pool, provider)
    return ok


async def discovery_loop(pool: Pool, provider: Discovery) -> None:
    """Refresh every ``provider.interval`` seconds (on the pool's clock) until the pool
    closes.  The first refresh is ``start()``'s; this loop does the later ones -- except
    when the pool is empty as the loop starts (the balancer was started by its first call
    rather than by ``start()``, or the first resolution failed): then it refreshes at
    once.  A failed refresh is retried within the interval (:func:`refresh_retrying`).
    Nothing but cancellation ends it early; a provider with an infinite interval makes
    it return after the first success."""
    interval = _interval_of(provider)
    if interval is None:
        return
    if not pool.closed and not pool.members:
        await refresh_retrying(pool, provider, min(interval, 60.0))
    while not pool.closed:
        interval = _interval_of(provider)
        if interval is None or math.isinf(interval):
            return
        try:
            await pool.clock.sleep(interval)
            if pool.closed:
                return
            await refresh_retrying(pool, provider, interval)
        except asyncio.CancelledError:
            raise
        except Exception:  # refresh_once never raises; a broken clock might
            log.exception("discovery loop step failed; retrying in %s s", interval)
            await asyncio.sleep(min(interval, 1.0))
