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
    # on a timeout: which kinds of request still answered, and the server's thread stacks at that moment
    assert result["errors"] == 0, (result["error_examples"], result["stall_probes"], result["stall_stacks"])
    assert result["lost_writes"] == 0 and result["resurrected_deletes"] == 0
    assert result["unsearchable_writes"] == 0, result["unsearchable_examples"]
    assert result["check_problems"] == []
    assert result["image_count"] > 0 and result["text_count"] > 0 and result["add_count"] > 0
    assert result["writes_acknowledged"] > 0
    assert result["image_p50_ms"] > 0 and result["image_p99_ms"] >= result["image_p50_ms"]
    assert result["rss_growth"] is not None
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_a_timed_out_request_brings_back_the_servers_stacks_and_what_still_answers(fixture_index):
    """Clients that give up after 1 ms time out at once: load_test then asks the server for its thread
    stacks (SIGUSR1) and probes each kind of request on a new connection, which all answer."""
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "load_test.py"), str(fixture_index),
                           "--seconds", "2", "--clients", "2", "--timeout", "0.001", "--json"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 1 and result["errors"] > 0
    assert all("transport error" in e and e.split(":")[0] in ("image", "text", "add", "delete")
               for e in result["error_examples"]), result["error_examples"]
    probes = result["stall_probes"]
    assert set(probes) == {"healthz", "read", "text", "image", "write"}, probes
    assert probes["healthz"].startswith("HTTP 200") and probes["text"].startswith("HTTP 200"), probes
    assert probes["read"].startswith("HTTP 404") and probes["write"].startswith("HTTP 404"), probes
    assert probes["image"].startswith("HTTP 200"), probes
    stacks = result["stall_stacks"]
    assert "Thread 0x" in stacks and "_next_batch" in stacks, stacks[-2000:]


def test_the_load_test_stops_its_server_whatever_fails(fixture_index, monkeypatch):
    """An error after the server started (here: a query photo that is not there) used to leave
    ``lookalike serve`` running; 48 of them, 500 MB each, once filled a machine."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import load_test
    import serverproc

    spawned = []
    real_spawn = serverproc.spawn

    def spawn(*args, **kwargs):
        spawned.append(real_spawn(*args, **kwargs))
        return spawned[-1]

    monkeypatch.setattr(serverproc, "spawn", spawn)
    with pytest.raises(FileNotFoundError):
        load_test.run(fixture_index, 1, 1, [ROOT / "no-such-photo.jpg"])
    assert len(spawned) == 1 and spawned[0].poll() is not None  # stopped, not left behind
