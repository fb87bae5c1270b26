"""The web page in a real browser: Debian's Chromium driven by Playwright, against the real server.

Needs /usr/bin/chromium (``apt-get install chromium``; .ci/run installs it). Set
LOOKALIKE_CHROMIUM to use another binary, LOOKALIKE_TEST_ARTIFACTS to keep the screenshots.
"""
import json
import os
from pathlib import Path

import pytest

from conftest import served

pytestmark = pytest.mark.system

CHROMIUM = os.environ.get("LOOKALIKE_CHROMIUM", "/usr/bin/chromium")
# As this machine's probe ran it: no sandbox as root, no GPU, no background traffic.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


@pytest.fixture(scope="module")
def live_server(fixture_index):
    with served(fixture_index, {"LOOKALIKE_ACCESS_LOG": "false"}) as base:
        yield base


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} not found: apt-get install chromium (or set LOOKALIKE_CHROMIUM)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture
def artifacts(tmp_path):
    folder = Path(os.environ.get("LOOKALIKE_TEST_ARTIFACTS", tmp_path))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _unique_photo(fixture_catalogue):
    rows = [json.loads(x) for x in fixture_catalogue.read_text().splitlines()]
    owners = {}
    for r in rows:
        owners.setdefault(r["image"], set()).add(r["id"])
    return next(r for r in rows if r["view"] == "main" and len(owners[r["image"]]) == 1)


def test_photo_search_labels_text_search_and_details(live_server, browser, fixture_catalogue, artifacts):
    row = _unique_photo(fixture_catalogue)
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(live_server + "/")
    page.wait_for_selector("#category option:nth-child(2)", state="attached")

    page.set_input_files("#file-input", row["image"])
    page.wait_for_selector("#results .result")
    first = page.locator("#results .result").first
    assert first.get_attribute("data-id") == row["id"]
    assert first.locator(".title").inner_text() == row["title"]
    assert page.locator("#label-list li").count() == 5
    assert page.locator("#query-preview").is_visible()
    page.wait_for_function("[...document.querySelectorAll('#results img')].slice(0, 4).every(i => i.complete && i.naturalWidth > 0)")
    page.screenshot(path=str(artifacts / "photo-search.png"), full_page=True)

    page.fill("#text-query", "striped hoodie")
    page.press("#text-query", "Enter")
    page.wait_for_function("document.querySelector('#status').textContent.includes('striped hoodie')")
    assert page.locator("#results .result").count() == 12
    assert "q=striped+hoodie" in page.url

    page.select_option("#k", "6")
    page.wait_for_function("document.querySelectorAll('#results .result').length === 6")
    assert "k=6" in page.url
    page.reload()  # the query lives in the URL
    page.wait_for_function("document.querySelectorAll('#results .result').length === 6")
    assert page.input_value("#text-query") == "striped hoodie"

    first_id = page.locator("#results .result").first.get_attribute("data-id")
    page.locator("#results .result .more").first.click()
    page.wait_for_function(f"document.querySelector('#status').textContent.includes('like {first_id}')")
    assert f"similar={first_id}" in page.url.replace("%2F", "/")
    page.locator("#results .result .open").first.click()
    page.wait_for_selector("#details[open] .photos img")
    page.screenshot(path=str(artifacts / "details.png"))
    assert errors == []


def test_errors_in_plain_words_and_phone_width(live_server, browser, tmp_path, artifacts):
    page = browser.new_page(viewport={"width": 390, "height": 844}, is_mobile=True)
    page.goto(live_server + "/")
    not_photo = tmp_path / "notes.jpg"
    not_photo.write_text("this is not a photo")
    page.set_input_files("#file-input", str(not_photo))
    page.wait_for_selector("#error:not([hidden])")
    assert "cannot use the uploaded image" in page.inner_text("#error")
    assert page.locator(".camera").is_visible()  # take-a-photo button on phones
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390, f"page is {width}px wide at phone width"
    page.screenshot(path=str(artifacts / "phone-error.png"))


def test_audit_page_runs_again_with_the_values_typed(live_server, browser, artifacts):
    """The audit page runs on load, then "Run audit" re-runs it with the thresholds typed: the form's
    defaults must pass the browser's own validation (step/min), or the button silently does nothing."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    audits = []
    page.on("request", lambda r: "/v1/audit" in r.url and audits.append(r.url))
    page.goto(live_server + "/static/audit.html")
    page.wait_for_function("document.querySelector('#status').textContent.includes('audited')")
    assert page.evaluate("document.getElementById('audit-form').checkValidity()"), page.evaluate(
        "[...document.querySelectorAll('#audit-form input')].map(i => i.id + ': ' + i.validationMessage)")
    with page.expect_response(lambda r: "/v1/audit" in r.url, timeout=30_000):
        page.click("#audit-form button[type=submit]")  # the defaults, as loaded
    page.fill("#min-z", "3")
    page.fill("#margin", "0.6")
    with page.expect_response(lambda r: "/v1/audit" in r.url, timeout=30_000):
        page.click("#audit-form button[type=submit]")
    page.wait_for_function("document.querySelector('#status').textContent.includes('audited')")
    assert len(audits) == 3, audits
    assert "outlier_min_z=3&" in audits[2] + "&" and "category_min_margin=0.6" in audits[2]
    assert "outlier_min_z=3.5" in audits[1]
    assert page.locator("#error").is_hidden() and not errors
    page.screenshot(path=str(artifacts / "audit.png"), full_page=True)
