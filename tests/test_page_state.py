"""The web page keeps its state in the URL: any k the API accepts and any category level (a parent
category filters everything below it), in a real browser against the real server. No request of
the page's own gets a 404 (the favicon used to)."""
import pytest
from test_browser import CHROMIUM_ARGS, browser, live_server  # noqa: F401 (fixtures)

pytestmark = pytest.mark.system


def test_url_k_and_parent_category_are_applied(live_server, browser):  # noqa: F811
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors, missing = [], []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("response", lambda r: missing.append(r.url) if r.status == 404 else None)
    # the fixture catalogue: Gear/Bags and Gear/Watches (8 products), Men/Tops/Hoodies, ...
    page.goto(live_server + "/?q=bag&k=5&category=gear")
    page.wait_for_function("document.querySelector('#status').textContent.includes('bag')")
    assert page.input_value("#k") == "5"  # not one of the page's choices (6, 12, 24, 48)
    assert page.input_value("#category") == "gear"
    results = page.locator("#results .result")
    assert results.count() == 5
    categories = [results.nth(i).locator(".category").inner_text() for i in range(5)]
    assert all(c.startswith("Gear/") for c in categories), categories
    options = page.eval_on_selector_all("#category option", "os => os.map(o => o.value)")
    assert {"Gear", "Men", "Men/Tops", "Men/Tops/Hoodies"} <= set(options)  # parent levels, not only leaves
    page.select_option("#category", "Men")
    page.wait_for_function("document.querySelectorAll('#results .result').length > 0 && "
                           "[...document.querySelectorAll('#results .result .category')]"
                           ".every(c => c.textContent.startsWith('Men/'))")
    assert "category=Men" in page.url and "k=5" in page.url
    page.goto(live_server + "/?q=bag&k=nonsense")
    page.wait_for_function("document.querySelector('#status').textContent.includes('bag')")
    assert page.input_value("#k") == "12" and page.locator("#error").is_hidden()
    assert errors == [] and missing == [], (errors, missing)
