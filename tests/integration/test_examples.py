"""The examples run as shipped (offline: each starts its own fake replicas)."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _run(name: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's lbclient
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.timeout(90)
def test_the_openai_sdk_example() -> None:
    pytest.importorskip("openai")
    out = _run("openai_sdk.py")
    assert "calls 43, failed 0" in out
    assert out.count("stream: 'tok0 tok1 tok2 tok3 tok4 tok5 tok6 tok7 '") == 3


@pytest.mark.timeout(90)
def test_the_vendor_fallback_example() -> None:
    pytest.importorskip("openai")
    out = _run("vendor_fallback.py")
    assert "normal day:           ['self-hosted']" in out
    assert "a 40k-token prompt:   vendor" in out
    assert "self-hosted down:     10/10 served by the vendor pool" in out
    assert "every pool failed: no pool could serve the call (2 pools)" in out
