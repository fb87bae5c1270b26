"""First use: a run without the model hub fails fast, in one line that names the offline model; a re-index
follows the index's model; a run in which the photos fail exits non-zero with a hint; every option's help
says what it does."""
from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from indexer import modelspec as ms

pytestmark = pytest.mark.system

ROOT = Path(__file__).resolve().parents[1]
UNREACHABLE_HUB = "http://127.0.0.1:9"  # the discard port: nothing listens, the connection is refused at once

# Runs the CLI in a fresh interpreter and reports on stderr which heavy packages it imported.
RUN_AND_REPORT = """
import sys
from indexer.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as e:
    code = e.code
print("imported: " + ",".join(m for m in ("torch", "open_clip") if m in sys.modules), file=sys.stderr)
sys.exit(code)
"""


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """A folder of four generated photos."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("first-use") / "photos"
    folder.mkdir()
    for i, colour in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]):
        Image.new("RGB", (64, 48), colour).save(folder / f"p{i}.png")
    return folder


def _hub_env(tmp_path: Path, offline: bool) -> dict:
    """An environment without the model hub: an empty hub cache, an endpoint that refuses connections,
    and (``offline``) HF_HUB_OFFLINE=1."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_") and k.lower() not in ("https_proxy",
                                                                                                 "http_proxy")}
    env.update(HF_HUB_CACHE=str(tmp_path / "hf-cache"), HF_ENDPOINT=UNREACHABLE_HUB)
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return env


def _run(args: list[str], env: dict, timeout: float = 300) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-c", RUN_AND_REPORT, *args], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=timeout, check=False)
    return r, time.monotonic() - t0


def _imported(r: subprocess.CompletedProcess) -> str:
    return r.stderr.rsplit("imported:", 1)[1].strip()


def _error_lines(r: subprocess.CompletedProcess) -> list[str]:
    return [line for line in r.stderr.splitlines() if line.strip() and not line.startswith("imported:")]


@pytest.mark.parametrize("offline", [True, False], ids=["HF_HUB_OFFLINE", "hub-unreachable"])
def test_default_model_without_hub_fails_at_once_in_one_line(photos, tmp_path, offline):
    r, seconds = _run(["index", str(photos), "--out", str(tmp_path / "idx")], _hub_env(tmp_path, offline))
    lines = _error_lines(r)
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1, r.stderr  # no retry warnings
    assert lines[0].startswith("lookalike: error: model ViT-B-32 needs its pretrained weights"), lines[0]
    assert "--model lookalike-base" in lines[0] and "--pretrained PATH" in lines[0]
    # decided before torch is imported: about a second, whatever the machine's load
    assert _imported(r) == "", r.stderr
    assert seconds < 30
    assert not (tmp_path / "idx").exists()


def test_other_hub_weights_fail_without_retries(photos, tmp_path):
    """Weights that only open_clip's table knows are checked after it loads, also without retries."""
    r, seconds = _run(["index", str(photos), "--out", str(tmp_path / "idx"), "--model", "ViT-B-16", "--pretrained",
                       "laion2b_s34b_b88k"], _hub_env(tmp_path, offline=False))
    lines = _error_lines(r)
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1, r.stderr
    assert "ViT-B-16 needs its pretrained weights 'laion2b_s34b_b88k'" in lines[0]
    assert f"{UNREACHABLE_HUB} cannot be reached" in lines[0] and "--model lookalike-base" in lines[0]
    assert seconds < 60  # torch and open_clip load; the hub client's five retries would add about 25 s


def _fake_cached_weights(cache: Path, hub: str, content: bytes) -> Path:
    """Put a weights file into a Hugging Face cache layout, as a download of ``hub`` would leave it."""
    repo = hub.rstrip("/")
    commit = "0123456789abcdef0123456789abcdef01234567"
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "open_clip_model.safetensors").write_bytes(content)
    return snapshot / "open_clip_model.safetensors"


def test_cached_weights_are_used_without_the_hub(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "ENDPOINT", UNREACHABLE_HUB)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(ms.ModelLoadError, match="cannot be reached"):
        ms.check_hub_weights(ms.DEFAULT_MODEL, ms.DEFAULT_PRETRAINED, ms.DEFAULT_PRETRAINED_HUB)
    _fake_cached_weights(tmp_path, ms.DEFAULT_PRETRAINED_HUB, b"weights")
    assert ms.check_hub_weights(ms.DEFAULT_MODEL, ms.DEFAULT_PRETRAINED, ms.DEFAULT_PRETRAINED_HUB) is True


def test_cached_weights_load_without_asking_the_hub(photos, tmp_path):
    """With the weights in the cache and the hub unreachable, open_clip reads the cached file at once (here a
    broken one, so the load fails on the file), instead of retrying the hub for half a minute first."""
    env = _hub_env(tmp_path, offline=False)
    _fake_cached_weights(Path(env["HF_HUB_CACHE"]), ms.DEFAULT_PRETRAINED_HUB, b"not a safetensors file")
    r, seconds = _run(["index", str(photos), "--out", str(tmp_path / "idx")], env)
    lines = _error_lines(r)
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and "cannot load model 'ViT-B-32'" in lines[0], r.stderr
    assert "Retrying" not in r.stderr
    assert seconds < 60


def test_the_default_weights_hub_entry_is_open_clips():
    import open_clip

    assert open_clip.get_pretrained_cfg(ms.DEFAULT_MODEL, ms.DEFAULT_PRETRAINED)["hf_hub"] == ms.DEFAULT_PRETRAINED_HUB
    assert ms.OFFLINE_MODEL in ms.bundled_models()


def test_reindex_without_model_uses_the_index_model_offline(photos, tmp_path):
    """Re-indexing an index made with test-tiny needs no --model, and so no hub, even with the hub off."""
    out = tmp_path / "idx"
    env = _hub_env(tmp_path, offline=True)
    common = ["--device", "cpu", "--backend", "torch", "--workers", "0", "-q", "--json"]
    r, _ = _run(["index", str(photos), "--out", str(out), "--model", "test-tiny", *common], env)
    assert r.returncode == 0, r.stderr
    r, _ = _run(["index", str(photos), "--out", str(out), *common], env)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["model"]["name"] == "test-tiny" and report["unchanged"] == 4 and report["failed"] == 0


# ------------------------------------------------------------------ failed runs
def _index_in_process(args: list[str], capsys) -> tuple[int, str, str]:
    from indexer.cli import main

    code = main(["index", *args, "--model", "test-tiny", "--device", "cpu", "--backend", "torch", "--workers", "0",
                 "-q"])
    out, err = capsys.readouterr()
    return code, out, err


def _manifest(path: Path, images: list[str]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "image"])
        for i, image in enumerate(images):
            w.writerow([f"p{i}", image])
    return path


def test_relative_paths_that_miss_fail_the_run_with_an_image_root_hint(photos, tmp_path, capsys):
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    catalogue = _manifest(manifests / "c.csv", [f"photos/p{i}.png" for i in range(4)])  # relative to photos.parent
    out = tmp_path / "idx"
    code, stdout, err = _index_in_process([str(catalogue), "--out", str(out)], capsys)
    assert code == 1
    assert "nothing was indexed: all 4 photos failed (4 not_found)" in err
    assert "--image-root" in err and str(manifests) in err
    assert len(err.strip().splitlines()) == 1
    report = json.loads((out / "report.json").read_text())  # the report is written all the same
    assert report["failed"] == 4 and report["indexed"] == 0
    code, _, err = _index_in_process([str(catalogue), "--out", str(out), "--image-root", str(photos.parent)], capsys)
    assert code == 0, err


def test_more_failures_than_the_threshold_fail_the_run(photos, tmp_path, capsys):
    (tmp_path / "m").mkdir()
    images = [str(photos / "p0.png"), str(tmp_path / "gone1.png"), str(tmp_path / "gone2.png")]
    catalogue = _manifest(tmp_path / "m" / "c.csv", images)  # not found, but not under the manifest's folder
    code, _, err = _index_in_process([str(catalogue), "--out", str(tmp_path / "a")], capsys)
    assert code == 1
    assert "2 of 3 photos failed, more than --max-failed-fraction 0.5" in err
    assert "--image-root" not in err  # absolute paths: the root is not the problem
    code, _, err = _index_in_process([str(catalogue), "--out", str(tmp_path / "b"), "--max-failed-fraction", "0.7"],
                                     capsys)
    assert code == 0, err
    # a few failures in a run that indexed most photos are reported, not fatal
    few = _manifest(tmp_path / "few.csv", [str(photos / f"p{i}.png") for i in range(4)] + [str(tmp_path / "x.png")])
    code, stdout, err = _index_in_process([str(few), "--out", str(tmp_path / "c")], capsys)
    assert code == 0 and "1 failed" in stdout, err


def test_max_failed_fraction_is_checked():
    from indexer.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["index", "x", "--out", "y", "--max-failed-fraction", "1.5"])


# ------------------------------------------------------------------ --help
def _subcommands() -> dict:
    from indexer.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a.choices, dict))
    return sub.choices


def _help_entries(text: str) -> dict[str, str]:
    """{option or positional: its help text} parsed from argparse's --help output."""
    entries: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        m = re.match(r"^  (\S.*?)(?:\s{2,}(\S.*))?$", line)
        if m and not line.startswith("    "):
            names = re.findall(r"(?:^|, )(-{1,2}[\w-]+)", m.group(1))  # "-v, --verbose", "--precision {a,b}"
            current = names[-1] if names else m.group(1).split()[0]
            entries[current] = m.group(2) or ""
        elif current and line.startswith(" " * 8) and line.strip():
            entries[current] = (entries[current] + " " + line.strip()).strip()
        elif not line.strip() or not line.startswith(" "):
            current = None
    return entries


@pytest.mark.parametrize("name", sorted(_subcommands()))
def test_every_option_has_help_and_shows_its_default(name):
    parser = _subcommands()[name]
    text = parser.format_help()
    entries = _help_entries(text)
    assert "--help" in entries and "--verbose" in entries
    for option, help_text in entries.items():
        assert help_text, f"lookalike {name}: {option} has no help text"
    for action in parser._actions:
        if action.option_strings and action.default not in (None, False, "==SUPPRESS=="):
            option = action.option_strings[-1]
            assert "default" in entries[option].lower(), f"lookalike {name}: {option} does not show its default"


def test_eval_help_does_not_speak_of_an_index():
    assert "index" not in _subcommands()["eval"].format_help().lower()


def test_verbose_is_accepted_before_and_after_the_command():
    from indexer.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["-v", "info", "x"]).verbose is True
    assert parser.parse_args(["info", "x", "-v"]).verbose is True
    assert parser.parse_args(["info", "--verbose", "x"]).verbose is True
    assert parser.parse_args(["info", "x"]).verbose is False
