"""Hostile input against the catalogue audit, composed queries and region search, sent to a real
``lookalike serve`` process and the real CLI: an index whose product ids, titles and categories are
HTML, script and spreadsheet-formula injections; box values and query texts a careless or hostile
client sends (non-ASCII digits, NUL bytes, undecodable bytes); an audit threshold far too low for
the model. Every one must end in a 4xx JSON error or a one-line CLI message, and the reports must
show the hostile strings as text."""
from __future__ import annotations

import csv
import html
import io
import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from conftest import ROOT, served
from PIL import Image
from test_audit import _index

from indexer.audit import AuditOptions, AuditTooManyPairs, near_duplicate_pairs
from indexer.audit_report import FORMULA_PREFIXES, HTML_MAX_PHOTOS, csv_cell
from indexer.compose import QueryError, parse_box, query_text

LOOKALIKE = str(Path(sys.executable).parent / "lookalike")
#: Strings a hostile catalogue puts in ids, titles and categories.
HOSTILE = ['=HYPERLINK("http://evil.example","x")', "<script>alert(1)</script>", '"><img src=x onerror=alert(1)>',
           "+SUM(1,2)", "-2+3", "@cmd", "\tTAB"]
#: The test server's audit_max_pairs: the fixture's 77 photos (test-tiny puts most of them above cosine 0.95) have
#: 2,926 pairs that pass cosine 0.01, 335 that pass 0.99.
MAX_PAIRS = 1000


@pytest.fixture(scope="module")
def hostile_index(fixture_data, tiny_model, tmp_path_factory) -> Path:
    """The fixture catalogue with every 7th product renamed and re-filed under a hostile string, plus
    product ``=cmd|' /C calc'!A0`` reusing another product's photo (an exact duplicate)."""
    rows = fixture_data.rows()
    for i, r in enumerate(rows):
        if i % 7 == 0:
            bad = HOSTILE[(i // 7) % len(HOSTILE)]
            r.update(id=f"{bad}-{r['id']}", category=bad, title=f"<b onmouseover=alert(2)>{r['title']}")
    rows.append({**rows[1], "id": "=cmd|' /C calc'!A0", "title": "reused"})
    return _index(rows, tmp_path_factory.mktemp("hostile") / "index", tiny_model)


@pytest.fixture(scope="module")
def server(hostile_index):
    with served(hostile_index, {"LOOKALIKE_ACCESS_LOG": "false", "LOOKALIKE_AUDIT_MAX_PAIRS": str(MAX_PAIRS)}) as base:
        yield base


def _jpeg(size=(200, 160)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 40)).save(buf, "JPEG")
    return buf.getvalue()


def _multipart(field: bytes, value: bytes) -> tuple[bytes, dict]:
    """A search body whose ``field`` holds the raw bytes ``value`` (httpx would refuse to encode them)."""
    b = b"AtTaCkBoUnDaRy"
    body = (b"--" + b + b'\r\nContent-Disposition: form-data; name="image"; filename="q.jpg"\r\n'
            b"Content-Type: image/jpeg\r\n\r\n" + _jpeg() + b"\r\n--" + b
            + b'\r\nContent-Disposition: form-data; name="' + field + b'"\r\n\r\n' + value + b"\r\n--" + b + b"--\r\n")
    return body, {"content-type": "multipart/form-data; boundary=" + b.decode()}


# ------------------------------------------------------------------ unit: the rules themselves
@pytest.mark.unit
@pytest.mark.parametrize("value", ["٠,٠,١٠٠,١٠٠", "０,０,１００,１００", "0,0,1_00,100", "0,0,inf,10", "nan,0,10,10",
                                   "0x0,0,10,10", "0,0,10,10\x00", "0,0,1e400,10", " , ,1,1", "0,0,10,10,"])
def test_box_values_must_be_plain_ascii_decimals(value):
    with pytest.raises(QueryError):
        parse_box(value)


@pytest.mark.unit
def test_plain_box_spellings_still_parse():
    box = parse_box(" 10 , 20 , 1e2 , 1.5E2 ")
    assert (box.x0, box.y0, box.x1, box.y1, box.fractions) == (10, 20, 100, 150, False)
    assert parse_box("+.25,0,1.,1").fractions and parse_box("-0,0,0.5,0.5").fractions


@pytest.mark.unit
@pytest.mark.parametrize("text", ["red\x00bag", "red \udcff", "red \ufffd", "\x1b[31mred", "red\x85"])
def test_query_text_refuses_control_characters_and_undecodable_bytes(text):
    with pytest.raises(QueryError, match="UTF-8"):
        query_text(text)


@pytest.mark.unit
def test_query_text_keeps_tabs_emoji_and_right_to_left_words():
    assert query_text(" red\tbag\n") == "red\tbag"
    assert query_text("حقيبة 👜 café") == "حقيبة 👜 café"


@pytest.mark.unit
@pytest.mark.parametrize("value", [*(h for h in HOSTILE if h[0] in "=+-@\t"), "=1+1", "\rX"])
def test_csv_cells_that_a_spreadsheet_would_run_are_quoted(value):
    assert csv_cell(value) == "'" + value
    assert csv_cell(-0.5) == -0.5 and csv_cell("Gear/Bags") == "Gear/Bags"


@pytest.mark.integration
def test_near_duplicate_search_stops_past_the_pair_limit(hostile_index):
    from indexer.store import Store

    with Store.open(hostile_index) as store:
        ids = store.db.all_vectors(4096)
        with pytest.raises(AuditTooManyPairs, match="too low"):
            near_duplicate_pairs(store.vectors, ids, lambda x: x, 0.01, max_pairs=50, lookup=store._vectors)
    with pytest.raises(Exception, match="max_pairs"):
        AuditOptions(max_pairs=0)


# ------------------------------------------------------------------ the real server
@pytest.mark.system
@pytest.mark.parametrize("data", [
    {"box": "٠,٠,١٠٠,١٠٠"}, {"box": "０,０,１００,１００"}, {"box": "0,0,1_00,1_00"}, {"box": "0,0,100,100\x00"},
    {"box": "nan,0,10,10"}, {"box": "0,0,1e400,10"}, {"box": "0,0,10"}, {"box": "0,0,10,10,10"},
    {"text": "red\x00bag"}, {"negative_text": "\x00"}, {"text": "\x1b[2J"}, {"text": "   "},
    {"text": "red", "text_weight": "nan"}, {"text": "red", "text_weight": "1e309"},
    {"text": "red", "text_weight": "-1"},
    {"text": "x" * 100_000},
], ids=repr)
def test_hostile_search_fields_get_a_4xx_json_error(server, data):
    r = httpx.post(server + "/v1/search/image", files={"image": ("q.jpg", _jpeg(), "image/jpeg")}, data=data,
                   timeout=60)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] in ("bad_query", "validation_error")


@pytest.mark.system
@pytest.mark.parametrize("field,value", [(b"text", b"red \xc2\x85"), (b"negative_text", b"\xed\xb2\x80"),
                                         (b"box", b"0,0,\xff,1"), (b"text_weight", b"0.\xff")])
def test_undecodable_form_bytes_get_a_4xx_json_error(server, field, value):
    body, headers = _multipart(field, value)
    r = httpx.post(server + "/v1/search/image", content=body, headers=headers, timeout=60)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] in ("bad_query", "validation_error")


@pytest.mark.system
@pytest.mark.parametrize("query", ["text=%00", "text=%FF", "text=%ED%B2%80", "negative_text=a%00b",
                                   "text=red&text_weight=nan"])
def test_hostile_similar_parameters_get_a_4xx_json_error(server, query):
    r = httpx.get(server + "/v1/products/FX-BAG-02/similar?" + query, timeout=60)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] in ("bad_query", "validation_error")


@pytest.mark.system
@pytest.mark.parametrize("query", ["red\x00bag", "\x1b[2J", "   ", "red \udcff"])
def test_hostile_text_search_gets_a_4xx_json_error(server, query):
    body = json.dumps({"query": query}).encode()  # json.dumps escapes the lone surrogate as \\udcff
    r = httpx.post(server + "/v1/search/text", content=body, headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] in ("bad_query", "validation_error")
    assert httpx.post(server + "/v1/search/text", json={"query": "red bag"}, timeout=60).status_code == 200


@pytest.mark.system
def test_plain_refined_and_boxed_search_still_answers(server):
    r = httpx.post(server + "/v1/search/image", files={"image": ("q.jpg", _jpeg(), "image/jpeg")},
                   data={"text": "red bag 👜", "box": " 0 , 0 , 0.5 , 0.5 "}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["results"]


@pytest.mark.system
def test_audit_with_a_threshold_far_too_low_stops_with_422_and_the_server_keeps_serving(server):
    r = httpx.get(server + "/v1/audit", params={"near_duplicate_min_cosine": 0.01}, timeout=120)
    assert r.status_code == 422, r.text[:300]
    assert r.json()["error"]["code"] == "audit_too_many_pairs"
    assert f"more than {MAX_PAIRS:,}" in r.json()["error"]["message"]
    ok = httpx.get(server + "/v1/audit", params={"near_duplicate_min_cosine": 0.999}, timeout=120)  # lock freed
    assert ok.status_code == 200 and ok.json()["counts"]["exact_duplicates"] >= 1
    empty = httpx.get(server + "/v1/audit", params={"parts": ", ,"}, timeout=60)
    assert empty.status_code == 400 and "no audit part given" in empty.json()["error"]["message"]


@pytest.mark.system
def test_audit_page_shows_hostile_names_as_text_in_chromium(server):
    from playwright.sync_api import sync_playwright
    from test_browser import CHROMIUM, CHROMIUM_ARGS

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page()
        dialogs, errors = [], []
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(server + "/static/audit.html")  # its first audit, at the default cosine, passes the pair limit
        page.wait_for_selector("#error:not([hidden])")
        assert "too low for this model" in page.inner_text("#error")
        page.fill("#near-dup", "0.99")  # the input steps by 0.01
        page.fill("#margin", "0")  # every product with a category is a finding: the hostile ones shown
        page.fill("#min-z", "0.1")
        page.click("#audit-form button")
        page.wait_for_function("document.querySelectorAll('#category_disagreements .finding').length > 5")
        text = page.inner_text("#audit-results")
        assert "<script>alert(1)</script>" in text and "onerror=alert(1)" in text
        assert page.locator("#audit-results script, #audit-results img[src='x']").count() == 0
        group = page.locator("#near_duplicates .finding").first  # test-tiny: 67 photos above cosine 0.99
        assert group.locator("img").count() == 24
        assert "more photos in the JSON report" in group.locator(".more-photos").inner_text()
        browser.close()
    assert dialogs == [] and errors == []


# ------------------------------------------------------------------ the real CLI
def _cli(*args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([LOOKALIKE, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


@pytest.mark.system
def test_cli_reports_keep_hostile_names_inert(hostile_index, tmp_path):
    out = tmp_path / "report"
    r = _cli("audit", str(hostile_index), "--out", str(out), "--category-min-margin", "0", "--outlier-min-z", "0.01",
             "--near-duplicate-min-cosine", "0.9")
    assert r.returncode == 0, r.stderr
    with open(out / "report.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert len(rows) > 20
    cells = [c for row in rows[1:] for c in row]
    assert not [c for c in cells if c.startswith(FORMULA_PREFIXES)]
    assert "'=cmd|' /C calc'!A0" in cells and "'+SUM(1,2)" in cells  # quoted, not dropped
    for row in rows[1:]:  # a near-duplicate photo's evidence is its own pairs, not the whole group's
        if row[0] == "near_duplicates":
            pairs = json.loads(row[7])["pairs"]
            assert pairs and all(int(row[3]) in (p["a"], p["b"]) for p in pairs)
    page = (out / "report.html").read_text(encoding="utf-8")
    for bad in (b for b in HOSTILE if "<" in b):
        assert bad not in page and html.escape(bad) in page
    assert "<script>" not in page and "<img src=x" not in page and "<b onmouseover" not in page
    group = page.split('data-part="near_duplicates"')[1].split('<div class="finding"')[0]
    assert group.count("<figure>") == HTML_MAX_PHOTOS and "more photos in report.json" in group  # 60-odd photos


@pytest.mark.system
def test_cli_audit_past_the_pair_limit_is_one_line(hostile_index, tmp_path):
    r = _cli("audit", str(hostile_index), "--out", str(tmp_path / "r"), "--near-duplicate-min-cosine", "0.01",
             "--max-pairs", "100", "--parts", "near_duplicates")
    assert r.returncode != 0
    assert "too low for this model" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "r" / "report.csv").exists()


@pytest.mark.system
@pytest.mark.parametrize("flag,value,message", [
    ("--box", "٠,٠,١٠٠,١٠٠", "plain ASCII decimal"),
    ("--box", "0,0,1_00,100", "plain ASCII decimal"),
    ("--text", "red\x1b[2Jbag", "control character"),
    ("--negative-text", "\x7f", "control character"),
])
def test_cli_hostile_query_values_are_one_line(hostile_index, fixture_data, flag, value, message):
    photo = fixture_data.rows()[3]["image"]
    r = _cli("search", str(hostile_index), "--image", photo, flag, value, timeout=120)
    assert r.returncode == 2, r.stdout
    assert message in r.stderr and "Traceback" not in r.stderr


@pytest.mark.system
def test_cli_undecodable_text_bytes_are_one_line(hostile_index, fixture_data):
    photo = fixture_data.rows()[3]["image"].encode()
    r = subprocess.run([LOOKALIKE.encode(), b"search", str(hostile_index).encode(), b"--image", photo,
                        b"--text", b"red \xff\xfe"], capture_output=True, timeout=120, cwd=ROOT)
    assert r.returncode == 2
    assert b"not UTF-8" in r.stderr and b"Traceback" not in r.stderr


@pytest.mark.system
def test_cli_audit_out_at_the_index_or_a_file_is_refused_before_it_runs(hostile_index, tmp_path):
    indexing_report = (hostile_index / "report.json").read_bytes()
    r = _cli("audit", str(hostile_index), "--out", str(hostile_index) + "/.", "--parts", "exact_duplicates")
    assert r.returncode == 2 and "is the index directory" in r.stderr and "Traceback" not in r.stderr
    assert (hostile_index / "report.json").read_bytes() == indexing_report  # the indexing report is kept
    assert not (hostile_index / "report.csv").exists()
    a_file = tmp_path / "report.html"
    a_file.write_text("mine")
    r = _cli("audit", str(hostile_index), "--out", str(a_file), "--parts", "near_duplicates")
    assert r.returncode == 2 and "is a file" in r.stderr and "Traceback" not in r.stderr
    assert a_file.read_text() == "mine" and "near-duplicates:" not in r.stderr  # refused before the audit ran
