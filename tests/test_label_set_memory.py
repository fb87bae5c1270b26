"""The server labels query photos with the user's label set: ``serve --labels FILE``, else the set
the index was last labelled with (``lookalike label INDEX --labels FILE`` records it in the index)."""
import io
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from indexer.store import Store
from server.app import create_app

pytestmark = pytest.mark.system
EXE = str(Path(sys.executable).parent / "lookalike")


@pytest.fixture(scope="module")
def small_index(tmp_path_factory):
    root = tmp_path_factory.mktemp("labelled")
    photos = root / "photos"
    for i, colour in enumerate([(200, 20, 20), (20, 200, 20), (20, 20, 200), (200, 200, 20)]):
        (photos / f"cat{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (64, 64), colour).save(photos / f"cat{i % 2}" / f"p{i}.png")
    index = root / "index"
    r = subprocess.run([EXE, "index", str(photos), "--out", str(index), "--model", "test-tiny"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return root, index


def _labels(client) -> set[str]:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (120, 60, 30)).save(buf, "PNG")
    r = client.post("/v1/search/image?k=1", files={"image": ("q.png", buf.getvalue(), "image/png")})
    assert r.status_code == 200, r.text
    return {lab["label"] for lab in r.json()["labels"]}


def test_index_remembers_its_label_set_and_serve_labels_overrides_it(small_index, tiny_model):
    root, index = small_index
    mine = root / "mine.yaml"
    mine.write_text("labels:\n  - horse\n  - zebra\n  - {name: donkey, prompts: [a donkey, a mule]}\n")
    r = subprocess.run([EXE, "label", str(index), "--labels", str(mine)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    with Store.open(index) as store:
        assert [lab["name"] for lab in store.label_set()["labels"]] == ["horse", "zebra", "donkey"]
    with TestClient(create_app(index, model=tiny_model)) as c:
        assert _labels(c) <= {"horse", "zebra", "donkey"} and _labels(c)
    other = root / "other.yaml"
    other.write_text("labels: [boot, sandal]\n")
    with TestClient(create_app(index, model=tiny_model, labels_file=other)) as c:
        assert _labels(c) == {"boot", "sandal"}
    r = subprocess.run([EXE, "serve", "--help"], capture_output=True, text=True, timeout=60)
    assert "--labels" in r.stdout
