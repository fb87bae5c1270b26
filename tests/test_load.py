"""The load-test script's short mode, run as a user runs it (its own process): concurrent searches and
writes against the real server, with no errors and no lost writes: every acknowledged product is
found by an image search with its own photo while the server runs, and check is clean after it stops."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.system


def test_quick_load_test_has_no_errors_or_lost_writes(fixture_index):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "load_test.py"), str(fixture_index),
                           "--seconds", "15", "--clients", "4", "--json"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    # on a timeout, the server's thread stacks at that moment (load_test asks for them with SIGUSR1)
    assert result["errors"] == 0, (result["error_examples"], result["stall_stacks"])
    assert result["lost_writes"] == 0 and result["resurrected_deletes"] == 0
    assert result["unsearchable_writes"] == 0, result["unsearchable_examples"]
    assert result["check_problems"] == []
    assert result["image_count"] > 0 and result["text_count"] > 0 and result["add_count"] > 0
    assert result["writes_acknowledged"] > 0
    assert result["image_p50_ms"] > 0 and result["image_p99_ms"] >= result["image_p50_ms"]
    assert result["rss_growth"] is not None
    assert proc.returncode == 0, proc.stderr[-2000:]
