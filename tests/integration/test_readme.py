"""The README's quickstart runs as pasted (Foundation v2, defect 12)."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _quickstart() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quickstart", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match is not None, "no python block under ## Quickstart"
    return match.group(1)


def test_the_readme_quickstart_runs_as_pasted(tmp_path: pathlib.Path) -> None:
    script = tmp_path / "quickstart.py"
    script.write_text(_quickstart())
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("100 replies;"), out.stdout
    assert "calls=100 failed=0" in out.stdout, out.stdout
