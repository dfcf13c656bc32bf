"""Client-side throttling when the fleet itself rejects (Google SRE book, "Handling
Overload"): reject locally with probability ``max(0, (requests - K x accepts) /
(requests + 1))`` over a sliding window of 2 minutes.

A request is counted when its answer is known -- accepted (anything but a 429/503 or a
refused connection) or rejected -- not when it is sent.  Counted at send time, every
call in flight is a request without its accept yet: a burst of 2,000 calls to a healthy
fleet looks like 2,000 rejections and is throttled (go-zero #5011 is that bug with a
window shorter than a call; a burst shows it with any window).  Counted at the answer,
``requests - K x accepts`` is the fleet's own verdict.  ``K = 2``: a fleet must reject
more than half of what it answers before anything is rejected locally; then local
rejects keep what is sent at about twice what is accepted.  Calls rejected locally are
not counted (they tell nothing about the fleet), so the throttle lets probes through and
eases off as soon as the fleet accepts again.  Counting starts at the first rejection and
stops after a window without one: a healthy fleet costs a flag check per call.  Nothing
is rejected locally before the window holds :data:`MIN_REQUESTS` answers: at tiny volume
the formula would reject half the calls after a single 429.
"""

from __future__ import annotations

import random

__all__ = ["Throttle"]

_SLOTS = 24
WINDOW = 120.0  # seconds
MIN_REQUESTS = 10  # answers in the window before anything is rejected locally


class Throttle:
    __slots__ = (
        "_acc",
        "_k",
        "_last_reject",
        "_req",
        "_rng",
        "_slot",
        "_width",
        "_window",
        "accepts",
        "active",
        "requests",
    )

    def __init__(self, k: float, rng: random.Random, now: float, window: float = WINDOW) -> None:
        self._k = k
        self._rng = rng
        self._width = window / _SLOTS
        self._slot = int(now // self._width)
        self._req = [0] * _SLOTS
        self._acc = [0] * _SLOTS
        self.requests = 0  # in the window
        self.accepts = 0
        self._window = window
        # Dormant until the fleet rejects something, and again once a whole window has
        # passed without a rejection: a healthy fleet costs one flag check per call.
        self.active = False
        self._last_reject = -window

    def _rotate(self, now: float) -> int:
        slot = int(now // self._width)
        if slot != self._slot:
            for s in range(max(self._slot + 1, slot - _SLOTS + 1), slot + 1):
                i = s % _SLOTS
                self.requests -= self._req[i]
                self.accepts -= self._acc[i]
                self._req[i] = self._acc[i] = 0
            self._slot = slot
        return slot % _SLOTS

    def probability(self, now: float) -> float:
        self._rotate(now)
        if self.requests < MIN_REQUESTS:
            return 0.0
        reject = (self.requests - self._k * self.accepts) / (self.requests + 1)
        return reject if reject > 0 else 0.0

    def admit(self, now: float) -> bool:
        """May a call be sent (False: reject it locally)?"""
        if not self.active:
            return True
        self._rotate(now)
        if self.requests < MIN_REQUESTS:
            return True
        reject = (self.requests - self._k * self.accepts) / (self.requests + 1)
        return not (reject > 0 and self._rng.random() < reject)

    def answered(self, accepted: bool, now: float) -> None:
        """The fleet answered a call: accepted it, or rejected it (429/503, refused)."""
        if accepted:
            if not self.active:
                return
            if now - self._last_reject > self._window:
                self.active = False  # a whole window without a rejection: dormant again
                return
        else:
            self._last_reject = now
            if not self.active:
                self.active = True
                self._slot = int(now // self._width)
                self._req = [0] * _SLOTS
                self._acc = [0] * _SLOTS
                self.requests = self.accepts = 0
        i = self._rotate(now)
        self._req[i] += 1
        self.requests += 1
        if accepted:
            self._acc[i] += 1
            self.accepts += 1
