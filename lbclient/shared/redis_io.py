"""The Redis side of the fleet-shared state: one background task per balancer.

Imported only when a balancer has ``shared=`` (it imports redis-py).  The task:

1. **connects** -- PING, loads the lease script (and checks the server really runs it:
   a proxy or an ACL may refuse ``EVALSHA`` while accepting ``SCRIPT LOAD``),
   subscribes to the namespace's channel, reads the server clock (``TIME``), counts the
   live peers and reads the trips and cooldowns other processes left as expiring keys;
   then queues this process's own.  Failed attempts are retried by tenacity with a
   jittered exponential wait (50 ms doubling, at most ``reconnect_max``), for as long
   as it takes;
2. **serves** -- every ``sync_interval`` one pipelined round trip: heartbeat, peer
   count, leases for every busy quota bucket (:func:`lbclient.shared.lease.plan`),
   fleet counters; and whenever events are queued, at once, a round that publishes
   them.  A listener task hands every message of the channel to the link;
3. **degrades** -- Redis is behind a circuit breaker: three failed rounds in a row (each
   bounded by ``timeout``), or a lost connection, and the link goes to degraded mode
   (quotas local, quota / peers) until a reconnect succeeds.

Nothing here is awaited by a call.  Every round trip runs under ``asyncio.timeout`` and
the client's own socket timeouts (redis-py's retries are off: the breaker decides).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis
import tenacity
from redis.asyncio.retry import Retry as _RedisRetry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError, ResponseError

from .lease import LeasedBucket, busy, plan

if TYPE_CHECKING:
    from .budget import FleetBudget
    from .link import FleetLink

__all__ = ["LEASE_SCRIPT", "LEASE_SHA", "Syncer"]

log = logging.getLogger("lbclient")

_IO_ERRORS: tuple[type[BaseException], ...] = (RedisError, OSError, TimeoutError)
_TRIP = 3  # failed rounds in a row that open the breaker around Redis
_LISTEN = 1.0  # s: the listener's long poll
_SCAN_BUDGET = 0.5  # s: reading the other processes' trips at connect, at most

LEASE_SCRIPT = """
-- A tenant's fleet bucket (KEYS[1]: level, stamp) and the peers' shares (KEYS[2]:
-- peer -> "demand|allowance|stamp").  Refill by the server's clock, take back what
-- the peer gives, charge what it spent without a lease (down to empty, never into
-- debt), then grant at most: what it asks, what the bucket holds, and its own
-- allowance -- a bucket of its share (its demand / the fleet's) of the rate and of
-- the burst, which a newcomer starts full.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rate, cap = tonumber(ARGV[1]), tonumber(ARGV[2])
local peer, demand = ARGV[3], tonumber(ARGV[4])
local ask, give, debt = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local ttl, stale = tonumber(ARGV[8]), tonumber(ARGV[9])
local b = redis.call('HMGET', KEYS[1], 'level', 'stamp')
local level, stamp = tonumber(b[1]), tonumber(b[2])
if level == nil or stamp == nil then
  level, stamp = cap, now
end
if now > stamp then
  level = math.min(cap, level + (now - stamp) * rate / 1000)
  stamp = now
end
level = math.min(cap, level + give)
if debt > 0 then level = math.max(0, level - debt) end
local total, mine, mine_at = demand, nil, now
local fields = redis.call('HGETALL', KEYS[2])
for i = 1, #fields, 2 do
  local p = fields[i]
  local d, e, s = string.match(fields[i + 1], '^([^|]*)|([^|]*)|([^|]*)$')
  d, e, s = tonumber(d), tonumber(e), tonumber(s)
  if p == peer then
    if e ~= nil and s ~= nil then mine, mine_at = e, s end
  elseif d == nil or s == nil or now - s > stale then
    redis.call('HDEL', KEYS[2], p)
  else
    total = total + d
  end
end
local share = 0
if total > 0 then share = demand / total end
if mine == nil then
  -- A newcomer: its share of the burst -- of the live processes' at most, so the first
  -- to ask while the others are still registering does not take all of it.
  mine = cap * math.min(share, 1 / math.max(1, tonumber(ARGV[10])))
end
mine = math.min(cap * share, mine + math.max(0, now - mine_at) * rate * share / 1000)
local grant = math.max(0, math.min(ask, mine, level))
mine = mine - grant
level = level - grant
redis.call('HSET', KEYS[1], 'level', tostring(level), 'stamp', tostring(stamp))
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('HSET', KEYS[2], peer, tostring(demand) .. '|' .. tostring(mine) .. '|' .. tostring(now))
redis.call('PEXPIRE', KEYS[2], ttl)
return {tostring(grant), tostring(level), tostring(total)}
"""


LEASE_SHA = hashlib.sha1(LEASE_SCRIPT.encode()).hexdigest()

# A cost ceiling's claim (lbclient.shared.budget): what is owed (or given back) is added
# whatever the ceiling says; then up to ``ask`` of what is left under it is granted.
# At most a fair share of what is left (left / peers, at least one call's worth), so the
# fastest claimer cannot take it all, and debts that land after an outage find room.
# KEYS[1]: the window's key; ARGV: delta, ask, ceiling, ttl (s), peers, one call's worth.
# Returns {grant, total, the total before}
# as strings (a Lua number would reach the client truncated to an integer).
BUDGET_SCRIPT = """
local prev = tonumber(redis.call('GET', KEYS[1]) or '0')
local cur = prev + tonumber(ARGV[1])
local left = math.max(0, tonumber(ARGV[3]) - cur)
local share = math.max(tonumber(ARGV[6]), left / tonumber(ARGV[5]))
local grant = math.min(tonumber(ARGV[2]), left, share)
cur = cur + grant
redis.call('SET', KEYS[1], tostring(cur), 'EX', tonumber(ARGV[4]))
return {tostring(grant), tostring(cur), tostring(prev)}
"""


def _lost(exc: BaseException) -> bool:
    """Is ``exc`` a lost connection (degrade at once) rather than one slow reply?"""
    if isinstance(exc, RedisConnectionError):
        return True
    return isinstance(exc, OSError) and not isinstance(exc, TimeoutError)


def _float(value: Any) -> float:
    if isinstance(value, bytes):
        value = value.decode()
    return float(value)


class _Round:
    """One pipeline and what to do with each reply."""

    __slots__ = ("handlers", "pipe")

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe
        self.handlers: list[
            tuple[Callable[[Any], None] | None, Callable[[BaseException], None] | None]
        ] = []

    def add(
        self,
        on_reply: Callable[[Any], None] | None = None,
        on_error: Callable[[BaseException], None] | None = None,
    ) -> Any:
        self.handlers.append((on_reply, on_error))
        return self.pipe


class Syncer:
    """The background task of one :class:`~lbclient.shared.link.FleetLink` in one event
    loop (see the module docstring)."""

    def __init__(self, link: FleetLink) -> None:
        self.link = link
        cfg = link.config
        self.cfg = cfg
        prefix = cfg.prefix
        self.channel = f"{prefix}:events"
        self.peers_key = f"{prefix}:peers"
        self.client: Any = None
        self.pubsub: Any = None
        self.listener: asyncio.Task[None] | None = None
        self.loaded = False  # the server has the lease script cached
        self.scripts = False
        self.offset = time.time() - time.monotonic()  # server clock - monotonic (s)
        self.failures = 0
        self.next_full = 0.0
        self.stale_ms = int(max(3 * cfg.sync_interval, 0.5) * 1000)  # a share this old is gone
        self.budgets_at: float | None = None  # when budgets were last planned (monotonic)

    # -- the task ---------------------------------------------------------------------------

    async def run(self) -> None:
        link = self.link
        link.wake = asyncio.Event()
        try:
            while not link.closed:
                await self._connect_retrying()
                if link.closed:
                    return
                reason = await self._serve()
                await self._teardown()
                if not link.closed:
                    link.degraded(reason)
        finally:
            await self._teardown()

    async def _connect_retrying(self) -> None:
        cfg = self.cfg

        def failed(state: tenacity.RetryCallState) -> None:
            outcome = state.outcome
            exc = outcome.exception() if outcome is not None else None
            self.link.errors += 1
            self.link.degraded(f"Redis unreachable ({_describe(exc)})")

        retrying = tenacity.AsyncRetrying(
            wait=tenacity.wait_exponential(multiplier=0.05, max=cfg.reconnect_max)
            + tenacity.wait_random(0, cfg.reconnect_max / 4),
            retry=tenacity.retry_if_exception_type(_IO_ERRORS),
            before_sleep=failed,
            reraise=True,
        )
        await retrying(self._connect)

    def _make_client(self) -> Any:
        cfg = self.cfg
        if cfg.connect is not None:
            return cfg.connect()
        assert cfg.url is not None
        return aioredis.Redis.from_url(
            cfg.url,
            socket_timeout=cfg.timeout,
            socket_connect_timeout=cfg.timeout,
            retry=_RedisRetry(NoBackoff(), 0),
            client_name=f"lbclient:{self.link.peer}"[:128].replace(" ", "_"),
        )

    async def _connect(self) -> None:
        link = self.link
        if link.closed:
            return
        await self._teardown()
        t = self.cfg.timeout
        client = self.client = self._make_client()
        async with asyncio.timeout(t):
            await client.ping()
        self.scripts = False
        self.loaded = False
        if self.cfg.scripts:
            try:
                async with asyncio.timeout(t):
                    await client.script_load(LEASE_SCRIPT)
                    probe = await client.script_load("return 1")
                    await client.evalsha(probe, 0)
                self.loaded = True
                self.scripts = True
            except ResponseError as exc:  # unknown command, NOPERM: a proxy or an ACL
                log.warning("lbclient fleet: Redis refuses Lua scripts (%s)", exc)
        pubsub = self.pubsub = client.pubsub(ignore_subscribe_messages=True)
        async with asyncio.timeout(t):
            await pubsub.subscribe(self.channel)
        peers = [0]
        round_ = _Round(client.pipeline(transaction=False))
        self._clock(round_)
        self._heartbeat(round_, peers.append)
        await self._execute(round_)
        await self._late_join(client)
        self.failures = 0
        link.synced_at = link.now()
        link.connected(self.scripts, peers[-1])
        self.listener = asyncio.get_running_loop().create_task(self._listen(pubsub))
        self.listener.add_done_callback(self._listener_ended)

    async def _late_join(self, client: Any) -> None:
        """Read the trips and cooldowns the others left as expiring keys."""
        prefix = self.cfg.prefix
        keys: list[bytes] = []
        with contextlib.suppress(*_IO_ERRORS):
            async with asyncio.timeout(_SCAN_BUDGET):
                for pattern in (f"{prefix}:open:*", f"{prefix}:cool:*"):
                    async for key in client.scan_iter(match=pattern, count=1000):
                        keys.append(key)
                        if len(keys) >= 10_000:
                            break
        if not keys:
            return
        pipe = client.pipeline(transaction=False)
        for key in keys:
            pipe.get(key)
            pipe.pttl(key)
        async with asyncio.timeout(max(self.cfg.timeout, _SCAN_BUDGET)):
            replies = await pipe.execute(raise_on_error=False)
        now = self.link.now()
        for i, key in enumerate(keys):
            value, ttl = replies[2 * i], replies[2 * i + 1]
            if isinstance(value, Exception) or value is None or not isinstance(ttl, int):
                continue
            if ttl <= 0:
                continue
            try:
                self._late_event(key.decode(), value, ttl / 1000.0, now)
            except (ValueError, TypeError, IndexError, KeyError):
                continue

    def _late_event(self, key: str, value: bytes, seconds: float, now: float) -> None:
        prefix = self.cfg.prefix
        link = self.link
        if key.startswith(f"{prefix}:open:"):
            peer, _, url = key[len(prefix) + 6 :].partition("|")
            run, derived = json.loads(value)
            if peer != link.peer:
                link.apply(peer, ["open", url, seconds, int(run), bool(derived), False], now)
        elif key.startswith(f"{prefix}:cool:"):
            url = key[len(prefix) + 6 :]
            status = json.loads(value)
            link.apply("", ["cool", url, seconds, status], now)

    async def _listen(self, pubsub: Any) -> None:
        link = self.link
        while not link.closed:
            msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=_LISTEN)
            if msg is not None and msg.get("type") == "message":
                link.receive(msg["data"])

    def _listener_ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled():
            task.exception()  # retrieved: _serve reports it
        wake = self.link.wake
        if wake is not None:
            wake.set()

    async def _serve(self) -> str:
        """Sync until the breaker around Redis opens; returns why."""
        link = self.link
        cfg = self.cfg
        wake = link.wake
        assert wake is not None
        loop = asyncio.get_running_loop()
        self.next_full = loop.time()
        while not link.closed:
            listener = self.listener
            if listener is not None and listener.done():
                exc = None if listener.cancelled() else listener.exception()
                return f"subscription lost ({_describe(exc)})"
            poll = link.poll_runs()
            now = loop.time()
            full = now >= self.next_full
            try:
                await self._round(full)
            except _IO_ERRORS as exc:
                self.failures += 1
                link.errors += 1
                link.leases_lost()  # no call waits for the breaker to decide
                if self.failures >= _TRIP or _lost(exc):
                    return f"Redis failed {self.failures} sync(s) in a row ({_describe(exc)})"
            else:
                if self.failures:
                    link.leases_back()
                self.failures = 0
            if full:
                self.next_full = now + cfg.sync_interval
            wait = max(0.0, self.next_full - loop.time())
            if poll is not None:
                wait = min(wait, poll)
            if wait > 0 and not wake.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await wake.wait()
            wake.clear()
        return "closed"

    # -- one round ----------------------------------------------------------------------------

    async def _round(self, full: bool) -> None:
        link = self.link
        client = self.client
        events = link.take_outbox()
        returns = not full and any(b.returning for b in link.budgets.values())
        if not events and not full and not returns:
            return
        round_ = _Round(client.pipeline(transaction=False))
        if events:
            self._publish(round_, events)
        if returns:
            self._budget_returns(round_)
        if full:
            self._clock(round_)
            self._heartbeat(round_, link.counted)
            self._leases(round_)
            self._counters(round_)
            self._budgets(round_)
        await self._execute(round_)
        if full:
            link.rounds += 1
            link.synced_at = link.now()

    async def _execute(self, round_: _Round) -> None:
        try:
            async with asyncio.timeout(self.cfg.timeout):
                replies = await round_.pipe.execute(raise_on_error=False)
        except BaseException as exc:
            for _, on_error in round_.handlers:
                if on_error is not None:
                    on_error(exc)
            raise
        for reply, (on_reply, on_error) in zip(replies, round_.handlers, strict=True):
            if isinstance(reply, Exception):
                if on_error is not None:
                    on_error(reply)
                if isinstance(reply, NoScriptError):
                    self.loaded = False  # the server lost its scripts (restart, flush)
                elif isinstance(reply, ResponseError):
                    log.debug("lbclient fleet: %s", reply)
                continue
            if on_reply is not None:
                on_reply(reply)

    def _publish(self, round_: _Round, events: list[list[Any]]) -> None:
        prefix = self.cfg.prefix
        peer = self.link.peer
        payload = json.dumps({"p": peer, "e": events}, separators=(",", ":"))
        round_.add().publish(self.channel, payload)
        for ev in events:
            kind, url = ev[0], ev[1]
            if kind == "open":
                ms = int(float(ev[2]) * 1000)
                key = f"{prefix}:open:{peer}|{url}"
                if ms > 0:
                    round_.add().set(key, json.dumps([ev[3], ev[4]]), px=ms)
            elif kind == "close":
                round_.add().delete(f"{prefix}:open:{peer}|{url}")
            elif kind == "cool":
                ms = int(float(ev[2]) * 1000)
                if ms > 0:
                    round_.add().set(f"{prefix}:cool:{url}", json.dumps(ev[3]), px=ms)

    def _clock(self, round_: _Round) -> None:
        sent = time.monotonic()

        def set_offset(reply: Any) -> None:
            sec, usec = reply
            mid = (sent + time.monotonic()) / 2
            self.offset = float(sec) + float(usec) / 1e6 - mid

        round_.add(set_offset).time()

    def server_ms(self) -> int:
        """The Redis server's clock now, in ms (estimated from the last ``TIME``)."""
        return int((time.monotonic() + self.offset) * 1000)

    def _heartbeat(self, round_: _Round, counted: Callable[[int], None]) -> None:
        now_ms = self.server_ms()
        ttl_ms = int(self.cfg.peer_ttl * 1000)
        key = self.peers_key
        round_.add().zadd(key, {self.link.peer: now_ms})
        round_.add().zremrangebyscore(key, "-inf", now_ms - ttl_ms)
        round_.add(lambda n: counted(int(n))).zcard(key)
        round_.add().pexpire(key, ttl_ms * 4)

    def _leases(self, round_: _Round) -> None:
        link = self.link
        now = link.now()
        interval = self.cfg.sync_interval
        for q in link.quotas:
            for b in q.buckets():
                if not b.leasing or not busy(b):
                    continue
                ask, give, debt, demand = plan(b, now, interval)
                if ask <= 0 and give <= 0 and debt <= 0 and demand <= 0:
                    continue
                if self.scripts:
                    self._lease_by_script(round_, q.tenant, b, ask, give, debt, demand)
                else:
                    self._lease_by_window(round_, q.tenant, b, ask, debt, demand)

    def _keys(self, tenant: str, b: LeasedBucket) -> tuple[str, str, int]:
        prefix = self.cfg.prefix
        ttl_ms = int(max(60.0, 2.0 * b.fleet_capacity / b.fleet_rate) * 1000)
        return f"{prefix}:q:{b.name}:{tenant}", f"{prefix}:qs:{b.name}:{tenant}", ttl_ms

    def _lease_by_script(
        self,
        round_: _Round,
        tenant: str,
        b: LeasedBucket,
        ask: float,
        give: float,
        debt: float,
        demand: float,
    ) -> None:
        bucket_key, shares_key, ttl_ms = self._keys(tenant, b)
        stale_ms = self.stale_ms
        b.level -= give  # sent back now; lost if the round fails (under-admits, never twice)

        def granted(reply: Any) -> None:
            b.granted(_float(reply[0]), ask)

        numbers = [repr(float(x)) for x in (b.fleet_rate, b.fleet_capacity)]
        asks = [repr(float(x)) for x in (demand, ask, give, debt)]
        args = (
            bucket_key,
            shares_key,
            *numbers,
            self.link.peer,
            *asks,
            ttl_ms,
            stale_ms,
            self.link.peers,
        )
        pipe = round_.add(granted, self._script_failed)
        if self.loaded:
            pipe.evalsha(LEASE_SHA, 2, *args)
        else:  # EVAL also caches it: EVALSHA from the next round on
            pipe.eval(LEASE_SCRIPT, 2, *args)
            self.loaded = True

    def _script_failed(self, exc: BaseException) -> None:
        """A lease call failed: a server that stopped running scripts (an ACL changed)
        moves this process to the fallback, and says so."""
        if isinstance(exc, ResponseError) and not isinstance(exc, NoScriptError) and self.scripts:
            log.warning("lbclient fleet: the lease script failed (%s); using the fallback", exc)
            self.scripts = False
            self.link.scripts = False
            self.link.scripts_refused()

    def _lease_by_window(
        self,
        round_: _Round,
        tenant: str,
        b: LeasedBucket,
        ask: float,
        debt: float,
        demand: float,
    ) -> None:
        """No scripts: one-second windows counted with ``INCRBYFLOAT``.  A process
        claims at most its share (its demand / the fleet's, from the shares hash) of a
        window's ``rate``; the counter caps the fleet (what overshoots is not granted)."""
        prefix = self.cfg.prefix
        now_ms = self.server_ms()
        window = now_ms // 1000
        limit = b.fleet_rate
        if b.fb_window != window:
            b.fb_window = window
            b.fb_claimed = 0.0
        claim = min(ask, max(0.0, limit * b.fb_share - b.fb_claimed))
        _, shares_key, ttl_ms = self._keys(tenant, b)
        key = f"{prefix}:qw:{b.name}:{window}:{tenant}"
        stale_ms = self.stale_ms

        def counted(reply: Any) -> None:
            total = _float(reply)
            grant = max(0.0, min(claim, limit - (total - claim)))
            b.granted(grant, ask)
            b.fb_claimed += grant

        def shared(reply: Any) -> None:
            total = 0.0
            for value in reply.values():
                d, _, stamp = value.decode().partition("|0|")
                if now_ms - float(stamp) <= stale_ms:
                    total += float(d)
            b.fb_share = demand / total if total > 0 else 1.0

        if claim + debt > 0:
            round_.add(counted).incrbyfloat(key, claim + debt)
            round_.add().pexpire(key, 3000)
        elif ask > 0:
            b.starved = True  # its share of this window is spent: no credit
        round_.add().hset(shares_key, self.link.peer, f"{demand!r}|0|{now_ms}")
        round_.add(shared).hgetall(shares_key)
        round_.add().pexpire(shares_key, ttl_ms)

    def _counters(self, round_: _Round) -> None:
        prefix = self.cfg.prefix
        server_s = self.server_ms() / 1000
        for c in self.link.counters.values():
            amount = c.take()
            window = int(server_s // c.window)
            key = f"{prefix}:c:{c.name}:{window}"
            ttl = max(1, int(2 * c.window))

            def synced(reply: Any, c: Any = c, wid: int = window, amount: float = amount) -> None:
                c.synced(wid, _float(reply), amount)

            def lost(exc: BaseException, c: Any = c, amount: float = amount) -> None:
                c.lost(amount)

            round_.add(synced, lost).incrbyfloat(key, amount)
            round_.add().expire(key, ttl)

    def _budgets(self, round_: _Round) -> None:
        """Cost ceilings (:mod:`lbclient.shared.budget`): what is owed or given back,
        and a claim on what is left under the ceiling."""
        budgets = self.link.budgets
        if not budgets:
            return
        now = time.monotonic()
        elapsed = now - self.budgets_at if self.budgets_at is not None else 0.0
        self.budgets_at = now
        server_s = self.server_ms() / 1000
        for b in budgets.values():
            b.roll(int(server_s // b.period))
            owed, give, ask = b.plan(elapsed, self.cfg.sync_interval)
            key = self._budget_key(b)
            ttl = max(1, int(2 * b.period))
            if not (owed or give or ask > 0):
                continue

            def lost(exc: BaseException, b: Any = b, owed: float = owed) -> None:
                b.lost(owed)

            if self.scripts:  # atomic: a refused ask never inflates the key

                def claimed(
                    reply: Any, b: Any = b, ask: float = ask, wid: int = b.window_id
                ) -> None:
                    if b.window_id == wid:
                        b.answered(ask, _float(reply[1]), _float(reply[2]), _float(reply[0]))

                args = (
                    repr(float(owed - give)),
                    repr(float(ask)),
                    repr(float(b.ceiling)),
                    ttl,
                    b.peers,
                    repr(float(b.largest)),
                )
                round_.add(claimed, lost).eval(BUDGET_SCRIPT, 1, key, *args)
                continue
            # Without scripts: INCRBYFLOAT's reply tells what was claimed before this
            # ask; the part refused goes back next round (the key errs high meanwhile).
            if owed or give:
                round_.add(None, lost).incrbyfloat(key, owed - give)
            if ask > 0:

                def answered(
                    reply: Any,
                    b: Any = b,
                    ask: float = ask,
                    delta: float = owed - give,
                    wid: int = b.window_id,
                ) -> None:
                    if b.window_id == wid:
                        total = _float(reply)
                        b.answered(ask, total, total - ask - delta)
                        if b.returning and self.link.wake is not None:
                            self.link.wake.set()  # give the refused part back now

                round_.add(answered).incrbyfloat(key, ask)
            round_.add().expire(key, ttl)

    def _budget_key(self, b: FleetBudget) -> str:
        """The key of a budget's current window."""
        return f"{self.cfg.prefix}:b:{b.name}:{b.window_id}"

    def _budget_returns(self, round_: _Round) -> None:
        """Without scripts: what a claim took beyond the ceiling goes back at once (it
        inflates the key, refusing the others, until it does)."""
        for b in self.link.budgets.values():
            give, b.returning = b.returning, 0.0
            if give and b.window_id >= 0:
                round_.add().incrbyfloat(self._budget_key(b), -give)

    # -- closing ------------------------------------------------------------------------------

    async def farewell(self) -> None:
        """Leave the peer count and give every lease back (one round trip, bounded)."""
        client = self.client
        link = self.link
        if client is None or link.mode != "connected":
            return
        round_ = _Round(client.pipeline(transaction=False))
        round_.add().zrem(self.peers_key, link.peer)
        if self.scripts and self.loaded:
            for q in link.quotas:
                for b in q.buckets():
                    if b.leasing and b.level > 0:
                        give, b.level = b.level, 0.0
                        bucket_key, shares_key, ttl_ms = self._keys(q.tenant, b)
                        round_.add().evalsha(
                            LEASE_SHA,
                            2,
                            bucket_key,
                            shares_key,
                            repr(b.fleet_rate),
                            repr(b.fleet_capacity),
                            link.peer,
                            "0.0",
                            "0.0",
                            repr(give),
                            "0.0",
                            ttl_ms,
                            self.stale_ms,
                            link.peers,
                        )
        for fb in link.budgets.values():  # what is held free goes back to the fleet
            free = fb.granted - fb.used
            if fb.leased and free > 0 and fb.window_id >= 0:
                fb.granted -= free
                round_.add().incrbyfloat(self._budget_key(fb), -free)
        with contextlib.suppress(*_IO_ERRORS):
            await self._execute(round_)

    async def _teardown(self) -> None:
        listener, self.listener = self.listener, None
        if listener is not None and not listener.done():
            listener.cancel()
            with contextlib.suppress(BaseException):
                await listener
        pubsub, self.pubsub = self.pubsub, None
        client, self.client = self.client, None
        for closing in (pubsub, client):
            if closing is None:
                continue
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self.cfg.timeout):
                    await closing.aclose()


def _describe(exc: BaseException | None) -> str:
    if exc is None:
        return "no error"
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:200]
