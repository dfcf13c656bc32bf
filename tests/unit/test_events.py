"""Event records: immutable, one-line messages, logging levels, the Listener protocol."""

from __future__ import annotations

import logging

import attrs
import pytest

from lbclient.observe.events import (
    BreakerEvent,
    Event,
    EventHook,
    Listener,
    LoggingListener,
    MembershipEvent,
    PanicEvent,
)

URL = "http://10.0.0.1:8000"


def test_breaker_event_messages_and_levels() -> None:
    opened = BreakerEvent(URL, "closed", "open", 12.5, "5 consecutive failures", 5, 5.2)
    assert opened.level == logging.WARNING
    assert str(opened) == opened.message()
    assert opened.message() == (
        f"breaker {URL}: closed -> open (5 consecutive failures); ejected for 5.2 s"
    )
    half = BreakerEvent(URL, "open", "half_open", 17.7, "cooldown 5.2 s elapsed", 5, None)
    assert half.level == logging.INFO
    assert str(half) == f"breaker {URL}: open -> half_open (cooldown 5.2 s elapsed)"
    closed = BreakerEvent(
        url=URL,
        old="half_open",
        new="closed",
        at=18.0,
        reason="probe succeeded",
        consecutive_failures=5,
    )
    assert closed.cooldown is None
    assert closed.level == logging.INFO
    assert "\n" not in str(closed)


def test_breaker_event_rejects_unknown_states() -> None:
    with pytest.raises(ValueError, match="'ajar'"):
        BreakerEvent(URL, "closed", "ajar", 0.0, "?", 0)


def test_panic_event() -> None:
    entered = PanicEvent(True, 3.0, 1, 4)
    assert entered.level == logging.WARNING
    assert str(entered) == (
        "panic mode entered: only 1 of 4 endpoints healthy; "
        "also serving the ejected ones that failed longest ago"
    )
    left = PanicEvent(entered=False, at=9.0, pickable=3, total=4)
    assert left.level == logging.INFO
    assert str(left) == "panic mode left: 3 of 4 endpoints healthy"


@pytest.mark.parametrize(
    ("action", "text"),
    [("add", "added"), ("remove", "removed"), ("drain", "draining"), ("undrain", "undrained")],
)
def test_membership_event(action: str, text: str) -> None:
    event = MembershipEvent(URL, action, 1.0)
    assert event.level == logging.INFO
    assert str(event) == f"endpoint {URL} {text}"


def test_membership_event_rejects_unknown_action() -> None:
    with pytest.raises(ValueError, match="'evict'"):
        MembershipEvent(URL, "evict", 1.0)


def test_events_are_frozen_and_comparable() -> None:
    a = MembershipEvent(URL, "add", 1.0)
    assert a == MembershipEvent(url=URL, action="add", at=1.0)
    assert hash(a) == hash(MembershipEvent(URL, "add", 1.0))
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        a.at = 2.0  # type: ignore[misc]


def test_listener_protocol_and_hook() -> None:
    class Collect:
        def __init__(self) -> None:
            self.events: list[Event] = []

        def on_event(self, event: Event) -> None:
            self.events.append(event)

    class Quiet(Listener):
        pass

    collect = Collect()
    assert isinstance(collect, Listener)
    assert isinstance(Quiet(), Listener)
    Quiet().on_event(PanicEvent(True, 0.0, 0, 2))  # the no-op default
    hook: EventHook = collect.on_event
    event = MembershipEvent(URL, "drain", 2.0)
    hook(event)
    assert collect.events == [event]
    assert not isinstance(object(), Listener)


def test_logging_listener(caplog: pytest.LogCaptureFixture) -> None:
    listener = LoggingListener()
    assert isinstance(listener, Listener)
    assert repr(listener) == "lbclient.LoggingListener('lbclient')"
    with caplog.at_level(logging.INFO, logger="lbclient"):
        listener.on_event(BreakerEvent(URL, "closed", "open", 1.0, "probe failed", 6, 10.0))
        listener.on_event(MembershipEvent(URL, "remove", 2.0))
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.WARNING, f"breaker {URL}: closed -> open (probe failed); ejected for 10.0 s"),
        (logging.INFO, f"endpoint {URL} removed"),
    ]
    custom = logging.getLogger("myapp.lb")
    assert LoggingListener(custom).logger is custom
