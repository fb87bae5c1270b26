"""The hostile-input script (scripts/attack.py --quick) against the real server on loopback:
no 5xx, no dead or unresponsive server, bounded memory, no lost write, a consistent index, and
every attack answered with the status the hardened server gives."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.system

EXPECTED_ATTACKS = {"thin images", "decode-huge files", "4 heavy decodes at once", "108 Mpx photo", "request bodies", "slow clients",
                    "costly open routes", "integrity", "smaller kinds"}


def test_quick_attack_meets_targets(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "attack.py"), "--quick", "--json",
                           "--log", str(tmp_path / "server.log")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    lines = proc.stdout.strip().splitlines()
    assert lines, f"no output; stderr: {proc.stderr[-3000:]}"
    result = json.loads(lines[-1])
    table = "\n".join(lines[:-1])

    assert set(result["attacks"]) == EXPECTED_ATTACKS, table
    assert result["server_died"] is None, table
    assert result["five_xx"] == 0, table
    assert result["healthz_ok"], table
    assert result["max_rss_mb"] < 2048, table
    assert result["acknowledged_writes"] > 0, table
    assert result["lost_writes"] == 0, table
    assert result["check_ok"], result["check_output"]
    for name, attack in result["attacks"].items():
        assert attack["requests"], name
        for req in attack["requests"]:
            assert req["ok"], f"{name}: {req['request']}: got {req['statuses']}, expected {req['expect']} " \
                              f"{req.get('problem', '')}\n{table}"
            assert all(s in ("408", "closed") or 200 <= int(s) < 500 for s in req["statuses"]), (name, req)
    assert result["unexpected"] == [], table
    assert result["ok"] and proc.returncode == 0, table
