"""The page's composed and region queries in a real browser (Chromium, against the real server): the
refine box re-searches the photo with its words, a box drawn with the mouse or a finger re-searches
that part of it, and clearing the box searches the whole photo again."""
import json
from urllib.parse import quote

import pytest
from test_browser import CHROMIUM_ARGS, browser, live_server  # noqa: F401 (fixtures)

pytestmark = pytest.mark.system


# Chromium gives Playwright no body for a request that uploads a file, so the page's fetch is wrapped
# to record the text fields of each form it sends (the photo left out).
RECORD_FORMS = """
window.__forms = [];
const send = window.fetch;
window.fetch = (url, options = {}) => {
  if (options.body instanceof FormData) {
    window.__forms.push(Object.fromEntries([...options.body.entries()].filter(([, v]) => typeof v === "string")));
  }
  return send(url, options);
};
"""


def _box(fields) -> list[float]:
    values = [float(v) for v in fields["box"].split(",")]
    assert len(values) == 4 and all(0 <= v <= 1 for v in values), values
    assert values[0] < values[2] and values[1] < values[3], values
    return values


def test_refine_words_and_a_drawn_box_search_again_with_those_fields(live_server, browser, fixture_catalogue):  # noqa: F811
    row = next(json.loads(x) for x in fixture_catalogue.read_text().splitlines() if json.loads(x)["view"] == "main")
    page = browser.new_page(viewport={"width": 1280, "height": 900}, has_touch=True)
    page.add_init_script(RECORD_FORMS)
    errors, searches = [], []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("request", lambda r: searches.append(r) if "/v1/search/image" in r.url else None)

    def search_done(n: int) -> dict[str, str]:
        page.wait_for_function("document.querySelector('#status').textContent.includes('ms)')")
        assert len(searches) == n, [s.url for s in searches]
        forms = page.evaluate("window.__forms")
        assert len(forms) == n
        return forms[-1]

    page.goto(live_server + "/")
    page.wait_for_selector("#category option:nth-child(2)", state="attached")
    assert page.locator("#refine-form").is_hidden()
    page.set_input_files("#file-input", row["image"])
    page.wait_for_selector("#results .result")
    assert search_done(1) == {}  # the photo alone
    assert page.locator("#refine-form").is_visible() and page.locator("#clear-box").is_hidden()

    page.fill("#refine-text", "in red")
    page.press("#refine-text", "Enter")
    page.wait_for_function("document.querySelector('#status').textContent.includes('in red')")
    assert search_done(2) == {"text": "in red"}

    img = page.locator("#query-image").bounding_box()
    natural = page.evaluate("[document.querySelector('#query-image').naturalWidth, "
                            "document.querySelector('#query-image').naturalHeight]")
    scale = min(img["width"] / natural[0], img["height"] / natural[1])
    left = img["x"] + (img["width"] - natural[0] * scale) / 2
    top = img["y"] + (img["height"] - natural[1] * scale) / 2
    width, height = natural[0] * scale, natural[1] * scale

    # the mouse: from 20 % to 70 % of the photo on both axes
    page.mouse.move(left + 0.2 * width, top + 0.2 * height)
    page.mouse.down()
    page.mouse.move(left + 0.5 * width, top + 0.45 * height, steps=5)
    page.mouse.move(left + 0.7 * width, top + 0.7 * height, steps=5)
    page.mouse.up()
    page.wait_for_function("document.querySelector('#status').textContent.includes('the box')")
    fields = search_done(3)
    assert fields["text"] == "in red"
    assert _box(fields) == pytest.approx([0.2, 0.2, 0.7, 0.7], abs=0.02)
    assert page.locator("#box-overlay").is_visible() and page.locator("#clear-box").is_visible()

    # a finger (touch events become pointer events): from 60 % to 10 % (dragged up and left)
    cdp = page.context.new_cdp_session(page)
    start, end = (left + 0.6 * width, top + 0.6 * height), (left + 0.1 * width, top + 0.1 * height)
    cdp.send("Input.dispatchTouchEvent", {"type": "touchStart", "touchPoints": [{"x": start[0], "y": start[1]}]})
    for t in (0.25, 0.5, 0.75, 1.0):
        point = {"x": start[0] + t * (end[0] - start[0]), "y": start[1] + t * (end[1] - start[1])}
        cdp.send("Input.dispatchTouchEvent", {"type": "touchMove", "touchPoints": [point]})
    cdp.send("Input.dispatchTouchEvent", {"type": "touchEnd", "touchPoints": []})
    page.wait_for_function("document.querySelector('#status').textContent.includes('the box')")
    fields = search_done(4)
    assert _box(fields) == pytest.approx([0.1, 0.1, 0.6, 0.6], abs=0.02)

    # a click is not a box: nothing searched, the box stays
    page.mouse.click(left + 0.9 * width, top + 0.9 * height)
    page.wait_for_timeout(300)
    assert len(searches) == 4 and page.locator("#box-overlay").is_visible()

    page.click("#clear-box")
    page.wait_for_function("!document.querySelector('#status').textContent.includes('the box') && "
                           "document.querySelector('#status').textContent.includes('ms)')")
    assert search_done(5) == {"text": "in red"}
    assert page.locator("#box-overlay").is_hidden() and page.locator("#clear-box").is_hidden()
    assert errors == []


def test_refine_on_a_similar_search_sends_the_words(live_server, browser, fixture_catalogue):  # noqa: F811
    product = json.loads(fixture_catalogue.read_text().splitlines()[0])["id"]
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    similar = []
    page.on("request", lambda r: similar.append(r.url) if "/similar" in r.url else None)
    page.goto(f"{live_server}/?similar={quote(product, safe='')}")
    page.wait_for_function(f"document.querySelector('#status').textContent.includes('like {product}')")
    assert page.locator("#box-hint").is_hidden()  # boxes refine uploaded photos only
    page.fill("#refine-text", "in blue")
    page.press("#refine-text", "Enter")
    page.wait_for_function("document.querySelector('#status').textContent.includes('in blue')")
    assert "text=in+blue" in similar[-1] and "refine=in+blue" in page.url
    page.reload()  # the words live in the URL
    page.wait_for_function("document.querySelector('#status').textContent.includes('in blue')")
    assert page.input_value("#refine-text") == "in blue"
