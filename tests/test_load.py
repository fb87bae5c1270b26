"""The load-test script's short mode: concurrent searches and writes against the real server."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_load_test_has_no_errors_or_lost_writes(magento_index):
    spec = importlib.util.spec_from_file_location("load_test", ROOT / "scripts" / "load_test.py")
    load_test = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(load_test)
    photos = load_test._index_photos(magento_index)
    assert len(photos) == 8
    result = load_test.run(magento_index, seconds=15, clients=4, query_photos=photos)
    assert result["errors"] == 0, result["error_examples"]
    assert result["lost_writes"] == 0 and result["resurrected_deletes"] == 0
    assert result["image_count"] > 0 and result["text_count"] > 0 and result["add_count"] > 0
    assert result["writes_acknowledged"] > 0
    assert result["image_p50_ms"] > 0 and result["image_p99_ms"] >= result["image_p50_ms"]
    assert result["rss_growth"] is not None
