"""Traffic recording: one compact record per call, appended to a file off the hot path.

::

    from lbclient.ops import TrafficRecorder, load_trace

    with TrafficRecorder(lb, "traffic.jsonl"):      # or "traffic.csv"
        ...                                          # serve as usual
    records = load_trace("traffic.jsonl")            # the rotated files too, oldest first

Each call, however it ended, becomes one :class:`TrafficRecord`: when it started (Unix
time), the endpoint that answered and its region, the tenant, the estimated tokens and
the real ones (when :func:`lbclient.report_usage` told them), its latency (a stream:
to its end) and time to first chunk, and its outcome (``"ok"``, an HTTP status such as
``"503"``, or the error's class name: ``"Overloaded"``, ``"AttemptsExhausted"``...).
That is what :class:`lbclient.ops.CapacityPlanner` reads.

**Off the hot path.**  A call appends a tuple to a bounded in-memory buffer (a
``collections.deque``: append and pop are atomic) and returns; a background thread
formats and writes the buffer every ``flush_interval`` seconds.  When the buffer is
full (the disk stalls, a burst outruns the writer) new records are *dropped and
counted* (``dropped``) -- a call never waits for the recording.

**Bounded on disk.**  When the file passes ``max_bytes`` it is rotated like
``logging.handlers.RotatingFileHandler`` does: ``traffic.jsonl`` -> ``traffic.jsonl.1``
-> ... -> ``traffic.jsonl.<backups>``, the oldest deleted: at most
``max_bytes x (backups + 1)`` bytes.

**Formats.**  JSON lines (``.jsonl``, ``.json``; fields left out when empty) or CSV
(``.csv``; a header line at the top of every file).  A record is ~100 bytes: the
default 64 MiB x 4 files holds ~2.5 million calls.
"""

from __future__ import annotations

import collections
import csv
import io
import json
import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from .._errors import ConfigError
from .._numbers import is_int, is_number

if TYPE_CHECKING:
    from .._balancer import Balancer
    from .._context import CallContext
    from ..observe.histogram import Recorder

__all__ = ["FIELDS", "TrafficRecord", "TrafficRecorder", "load_trace", "trace_files"]

FIELDS = (
    "t",
    "endpoint",
    "region",
    "tenant",
    "tokens",
    "input_tokens",
    "output_tokens",
    "latency",
    "ttft",
    "outcome",
    "stream",
)
"""The columns of a recording, in order (the CSV header)."""


@attrs.frozen(kw_only=True)
class TrafficRecord:
    """One call.  Times in seconds; ``t`` is the Unix time the call started."""

    t: float
    latency: float
    outcome: str = "ok"
    endpoint: str | None = None
    region: str | None = None
    tenant: str | None = None
    tokens: float | None = None  # the estimate (the route's tokens=)
    input_tokens: float | None = None  # real usage, when reported
    output_tokens: float | None = None
    ttft: float | None = None  # streams: time to first chunk
    stream: bool = False

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"

    @property
    def shed(self) -> bool:
        """Shed at admission (``Overloaded``/``QuotaExceeded``): demand that was not served."""
        return self.outcome in ("Overloaded", "QuotaExceeded")

    def to_dict(self) -> dict[str, Any]:
        """The non-empty fields, for a JSON line."""
        out: dict[str, Any] = {}
        for name in FIELDS:
            v = getattr(self, name)
            if v is None or v is False:
                continue
            out[name] = v
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrafficRecord:
        def num(key: str) -> float | None:
            v = d.get(key)
            if v is None or v == "":
                return None
            return float(v)

        def text(key: str) -> str | None:
            v = d.get(key)
            return None if v is None or v == "" else str(v)

        stream = d.get("stream")
        t, latency = num("t"), num("latency")
        if t is None or latency is None:
            raise ValueError(f"a traffic record needs t and latency, got {d!r}")
        return cls(
            t=t,
            latency=latency,
            outcome=text("outcome") or "ok",
            endpoint=text("endpoint"),
            region=text("region"),
            tenant=text("tenant"),
            tokens=num("tokens"),
            input_tokens=num("input_tokens"),
            output_tokens=num("output_tokens"),
            ttft=num("ttft"),
            stream=stream in (True, "1", "true", "True"),
        )


# What the hook appends: cheap to build on the event loop, formatted by the writer.
_Row = tuple[
    float,  # start, Unix time
    "str | None",  # endpoint
    object,  # tenant (str() by the writer)
    "float | None",  # estimated tokens
    "tuple[float, float] | None",  # usage
    float,  # latency
    "float | None",  # ttft
    str,  # outcome
    bool,  # stream
]


def _fmt(x: float | None, digits: int) -> float | None:
    if x is None or not math.isfinite(x):
        return None
    return round(x, digits)


class TrafficRecorder:
    """Record every call of ``lb`` to ``path`` (see the module docstring).

    * ``format`` -- ``"jsonl"`` or ``"csv"``; default: from the file's suffix.
    * ``max_bytes`` / ``backups`` -- rotate past this size, keeping this many old files.
    * ``buffer`` -- records held in memory between two writes; more are dropped.
    * ``flush_interval`` -- seconds between writes.
    * ``clock`` -- the wall clock stamping the records (default ``time.time``).

    :meth:`start` (or ``with``) attaches it; :meth:`close` detaches, writes what is
    buffered and stops the writer thread.  ``written`` and ``dropped`` count records.
    """

    def __init__(
        self,
        lb: Balancer,
        path: str | os.PathLike[str],
        *,
        format: str | None = None,
        max_bytes: int = 64 * 1024 * 1024,
        backups: int = 3,
        buffer: int = 100_000,
        flush_interval: float = 1.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        from .._balancer import Balancer

        if not isinstance(lb, Balancer):
            raise ConfigError(f"TrafficRecorder needs an lbclient.Balancer, got {lb!r}")
        self.path = Path(path)
        fmt = format or _format_of(self.path)
        if fmt not in ("jsonl", "csv"):
            raise ConfigError(f"TrafficRecorder format must be 'jsonl' or 'csv', got {fmt!r}")
        self.format = fmt
        for name, value, low in (("max_bytes", max_bytes, 1024), ("buffer", buffer, 1)):
            if not is_int(value) or value < low:
                raise ConfigError(f"TrafficRecorder {name} must be an int >= {low}, got {value!r}")
        if not is_int(backups) or backups < 0:
            raise ConfigError(f"TrafficRecorder backups must be an int >= 0, got {backups!r}")
        if not is_number(flush_interval) or flush_interval <= 0:
            raise ConfigError(
                f"TrafficRecorder flush_interval must be a number of seconds > 0, "
                f"got {flush_interval!r}"
            )
        self.max_bytes = max_bytes
        self.backups = backups
        self.capacity = buffer
        self.flush_interval = float(flush_interval)
        self._lb = lb
        self._clock = clock
        self._queue: collections.deque[_Row] = collections.deque()
        self._regions: dict[str, str | None] = {}
        self._wake = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._recorder: Recorder | None = None
        self._write_lock = threading.Lock()
        self.written = 0
        self.dropped = 0
        self.errors = 0  # writes that failed (disk full...): their records are lost

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> TrafficRecorder:
        """Attach to the balancer and start the writer thread.  Returns ``self``."""
        if self._thread is not None:
            return self
        from ..metrics import recorder_of

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._recorder = recorder_of(self._lb)
        self._recorder.traffic.append(self)
        self._thread = threading.Thread(
            target=self._run, name=f"lbclient-traffic:{self.path.name}", daemon=True
        )
        self._thread.start()
        return self

    def close(self, timeout: float = 5.0) -> None:
        """Detach, write what is buffered, stop the thread.  Idempotent."""
        rec = self._recorder
        if rec is not None:
            if self in rec.traffic:
                rec.traffic.remove(self)
            self._recorder = None
        thread = self._thread
        if thread is None:
            return
        self._stop = True
        self._wake.set()
        thread.join(timeout)
        self._thread = None
        self.flush()

    def __enter__(self) -> TrafficRecorder:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"<lbclient.ops.TrafficRecorder {str(self.path)!r} written={self.written} "
            f"dropped={self.dropped}>"
        )

    # -- the hooks (event loop; keep them tiny) ------------------------------------------

    def call(
        self,
        seconds: float,
        ok: bool,
        endpoint: str | None,
        error: str | None,
        stream: bool,
        call: CallContext | None,
    ) -> None:
        if call is not None:
            if stream and ok and call.stream:
                call.ttft = seconds  # its first chunk: the record is written when it ends
                return
            stream = call.stream
        self._put(seconds, endpoint, "ok" if ok else (error or "error"), stream, call)

    def _put(
        self,
        seconds: float,
        endpoint: str | None,
        outcome: str,
        stream: bool,
        call: CallContext | None,
    ) -> None:
        q = self._queue
        if len(q) >= self.capacity:
            self.dropped += 1
            return
        if call is None:
            q.append(
                (
                    self._clock() - seconds,
                    endpoint,
                    None,
                    None,
                    None,
                    seconds,
                    None,
                    outcome,
                    stream,
                )
            )
        else:
            q.append(
                (
                    self._clock() - seconds,
                    endpoint,
                    call.tenant,
                    call.tokens,
                    call.usage,
                    seconds,
                    call.ttft,
                    outcome,
                    stream,
                )
            )
        if len(q) >= self.capacity // 2:
            self._wake.set()  # half full: write now rather than at the next tick

    # -- the writer thread ------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop:
            self._wake.wait(self.flush_interval)
            self._wake.clear()
            self.flush()

    def flush(self) -> None:
        """Write what is buffered now (the writer thread does it every
        ``flush_interval``; safe to call from any thread)."""
        with self._write_lock:
            q = self._queue
            rows: list[_Row] = []
            while q:
                try:
                    rows.append(q.popleft())
                except IndexError:  # pragma: no cover - emptied meanwhile
                    break
            if not rows:
                return
            records = [self._record(r) for r in rows]
            try:
                self._write(records)
            except OSError:
                self.errors += 1
                return
            self.written += len(records)

    def _region(self, url: str | None) -> str | None:
        if url is None:
            return None
        try:
            return self._regions[url]
        except KeyError:
            pass
        state = self._lb._pool.members.get(url)
        region = state.endpoint.region if state is not None else None
        if state is not None:
            self._regions[url] = region
        return region

    def _record(self, row: _Row) -> TrafficRecord:
        t, endpoint, tenant, tokens, usage, latency, ttft, outcome, stream = row
        return TrafficRecord(
            t=round(t, 4),
            latency=_fmt(latency, 6) or 0.0,
            outcome=outcome,
            endpoint=endpoint,
            region=self._region(endpoint),
            tenant=None if tenant is None else str(tenant),
            tokens=tokens,
            input_tokens=None if usage is None else usage[0],
            output_tokens=None if usage is None else usage[1],
            ttft=_fmt(ttft, 6),
            stream=stream,
        )

    def _write(self, records: Sequence[TrafficRecord]) -> None:
        if self.format == "jsonl":
            text = "".join(
                json.dumps(r.to_dict(), separators=(",", ":")) + "\n" for r in records
            ).encode()
        else:
            buf = io.StringIO()
            w = csv.writer(buf, lineterminator="\n")
            for r in records:
                w.writerow(["" if (v := getattr(r, f)) is None else _csv_value(v) for f in FIELDS])
            text = buf.getvalue().encode()
        size = self.path.stat().st_size if self.path.exists() else 0
        if size and size + len(text) > self.max_bytes:
            self._rotate()
            size = 0
        with open(self.path, "ab") as f:
            if size == 0 and self.format == "csv":
                f.write((",".join(FIELDS) + "\n").encode())
            f.write(text)

    def _rotate(self) -> None:
        if self.backups == 0:
            self.path.unlink(missing_ok=True)
            return
        for i in range(self.backups, 0, -1):
            src = self.path if i == 1 else _numbered(self.path, i - 1)
            if src.exists():
                os.replace(src, _numbered(self.path, i))


def _csv_value(v: object) -> str:
    if v is True:
        return "1"
    return str(v)


def _numbered(path: Path, i: int) -> Path:
    return path.with_name(f"{path.name}.{i}")


def _format_of(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return "csv"
    if suffix in (".jsonl", ".json", ".ndjson", ""):
        return "jsonl"
    raise ConfigError(
        f"cannot tell the format of {str(path)!r} from its suffix: use .jsonl or .csv, "
        "or pass format="
    )


def trace_files(path: str | os.PathLike[str]) -> list[Path]:
    """``path`` and its rotated predecessors that exist, oldest first."""
    p = Path(path)
    numbered = []
    i = 1
    while _numbered(p, i).exists():
        numbered.append(_numbered(p, i))
        i += 1
    files = [*reversed(numbered)]
    if p.exists():
        files.append(p)
    return files


def _read_one(path: Path) -> Iterator[TrafficRecord]:
    base = path.name
    while base[-1:].isdigit() and "." in base:  # traffic.csv.2 -> traffic.csv
        base = base.rsplit(".", 1)[0]
    fmt = _format_of(Path(base))
    with open(path, newline="") as f:
        if fmt == "csv":
            for row in csv.DictReader(f):
                yield TrafficRecord.from_dict(row)
        else:
            for line in f:
                line = line.strip()
                if line:
                    yield TrafficRecord.from_dict(json.loads(line))


def load_trace(
    paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
) -> list[TrafficRecord]:
    """Every record of a recording (its rotated files included), sorted by start time.

    ``paths``: one file (``traffic.jsonl`` also reads ``traffic.jsonl.1``... if
    present) or several.  Raises ``FileNotFoundError`` if nothing is there."""
    if isinstance(paths, str | os.PathLike):
        files = trace_files(paths)
        if not files:
            raise FileNotFoundError(f"no traffic recording at {os.fspath(paths)!r}")
    else:
        files = [f for p in paths for f in trace_files(p)]
        if not files:
            raise FileNotFoundError("no traffic recording at the paths given")
    out = [r for f in files for r in _read_one(f)]
    out.sort(key=lambda r: r.t)
    return out
