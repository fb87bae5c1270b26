"""Writing an audit report (:func:`indexer.audit.run_audit`) as ``report.json``, ``report.csv`` and a
self-contained ``report.html``.

The HTML page opens offline: styles are inline and every thumbnail is a small JPEG embedded as a
``data:`` URI (longest side :data:`THUMBNAIL_PX`), so the file can be mailed or archived alone. A
photo that cannot be read any more shows its source instead of a thumbnail.
"""
from __future__ import annotations

import base64
import csv
import html
import io
import json
from collections.abc import Callable
from pathlib import Path

from .audit import PARTS

#: Longest side of an embedded thumbnail, pixels, and its JPEG quality.
THUMBNAIL_PX = 128
THUMBNAIL_QUALITY = 70
#: Findings shown per part in the HTML page (the JSON and CSV files hold them all).
HTML_MAX_FINDINGS = 200
#: Photos shown per finding in the HTML page (a near-duplicate group can hold thousands; the JSON and CSV
#: files list them all): each is a thumbnail read and decoded, about 4 KB of the page.
HTML_MAX_PHOTOS = 24
#: Largest photo file read for a thumbnail, bytes.
MAX_PHOTO_BYTES = 64 * 1024 * 1024
CSV_COLUMNS = ["part", "finding", "product_id", "photo_id", "source", "category", "score", "evidence"]
TITLES = {
    "exact_duplicates": "Same photo file in several products",
    "near_duplicates": "Near-duplicate photos of different products",
    "category_disagreements": "Products whose photos look like another category",
    "outliers": "Products far from the rest of their category",
}


def write_report(report: dict, out_dir: str | Path, resolve_source: Callable[[str], str] = str) -> dict[str, Path]:
    """Write ``report.json``, ``report.csv`` and ``report.html`` into ``out_dir`` (created).

    resolve_source: a photo source -> where its bytes are (:meth:`indexer.store.Store.resolve_source`).
    Returns {"json", "csv", "html"} -> path. Raises OSError when the folder cannot be written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "csv": out / "report.csv", "html": out / "report.html"}
    paths["json"].write_text(json.dumps(report, ensure_ascii=False, indent=1), encoding="utf-8")
    with open(paths["csv"], "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS)
        w.writerows(csv_rows(report))
    paths["html"].write_text(render_html(report, Thumbnails(resolve_source)), encoding="utf-8")
    return paths


#: A spreadsheet reads a cell that starts with one of these as a formula (CSV injection, OWASP
#: "CSV Injection"): ``=HYPERLINK(...)`` in a product id or category would run when report.csv is opened.
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value):
    """``value`` safe for a spreadsheet: a string starting with a formula character (:data:`FORMULA_PREFIXES`)
    gets a leading ``'``, which spreadsheets show as text; numbers and other strings are unchanged."""
    return "'" + value if isinstance(value, str) and value.startswith(FORMULA_PREFIXES) else value


def csv_rows(report: dict) -> list[list]:
    """One row per photo of each finding (duplicates) or per product (categories, outliers); a
    near-duplicate photo's evidence is its own pairs (all of a group's pairs on every photo's row
    would grow as photos x pairs). Strings that a spreadsheet would run as formulas are quoted
    (:func:`csv_cell`)."""
    rows = []
    for part in PARTS:
        for n, f in enumerate(report.get(part, []), 1):
            if part in ("exact_duplicates", "near_duplicates"):
                score = f.get("cosine", f.get("max_cosine"))
                pairs_of: dict[int, list] = {}
                for pair in f.get("pairs", []):
                    pairs_of.setdefault(pair["a"], []).append(pair)
                    pairs_of.setdefault(pair["b"], []).append(pair)
                for p in f["photos"]:
                    evidence = ({"sha256": f["sha256"]} if part == "exact_duplicates"
                                else {"pairs": pairs_of.get(p["photo_id"], [])})
                    rows.append([part, n, p["product_id"], p["photo_id"], p["source"], "", score, json.dumps(evidence)])
            else:
                score = f["margin"] if part == "category_disagreements" else f["robust_z"]
                evidence = {k: v for k, v in f.items() if k not in ("product_id", "category", "photos", "title")}
                first = f["photos"][0] if f["photos"] else {"photo_id": "", "source": ""}
                rows.append([part, n, f["product_id"], first["photo_id"], first["source"], f["category"] or "", score,
                             json.dumps(evidence, ensure_ascii=False)])
    return [[csv_cell(v) for v in row] for row in rows]


class Thumbnails:
    """Photo source -> ``data:image/jpeg;base64,...`` thumbnail (None if unreadable), each made once."""

    def __init__(self, resolve_source: Callable[[str], str] = str):
        self.resolve_source = resolve_source
        self._done: dict[str, str | None] = {}

    def __call__(self, source: str) -> str | None:
        if source not in self._done:
            self._done[source] = self._make(source)
        return self._done[source]

    def _make(self, source: str) -> str | None:
        from PIL import Image

        from .images import ImageError, image_from_bytes
        from .photo_sources import read_source_bytes

        try:
            raw = read_source_bytes(self.resolve_source(source), MAX_PHOTO_BYTES)
            im = image_from_bytes(raw, draft_size=THUMBNAIL_PX)
        except ImageError:
            return None
        im.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        im.convert("RGB").save(buf, "JPEG", quality=THUMBNAIL_QUALITY)
        return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;color:#1d2430;background:#f6f7f9;margin:0;padding:16px 24px}
h1{font-size:22px}h2{font-size:18px;margin-top:28px}.muted{color:#5d6675}
.finding{background:#fff;border:1px solid #dfe3ea;border-radius:10px;padding:10px 12px;margin:10px 0}
.photos{display:flex;flex-wrap:wrap;gap:10px;margin-top:6px}
figure{margin:0;width:140px;font-size:12px}figure img{width:128px;height:128px;object-fit:contain;
background:#fff;border:1px solid #dfe3ea;border-radius:6px}figcaption{word-break:break-all}
.missing{width:128px;height:128px;display:flex;align-items:center;justify-content:center;
border:1px dashed #aab4c3;border-radius:6px;color:#5d6675}
table{border-collapse:collapse}td,th{padding:2px 10px 2px 0;text-align:left}
"""


def _e(value) -> str:
    return html.escape("" if value is None else str(value))


def _figure(photo: dict, thumbs: Thumbnails, caption: str = "") -> str:
    uri = thumbs(photo["source"])
    img = (f'<img alt="{_e(photo["product_id"])}" src="{uri}">' if uri
           else '<div class="missing">unreadable</div>')
    return (f'<figure>{img}<figcaption><b>{_e(photo["product_id"])}</b> #{photo["photo_id"]}{caption}'
            f'<br><span class="muted">{_e(Path(photo["source"]).name)}</span></figcaption></figure>')


def _finding_html(part: str, f: dict, thumbs: Thumbnails) -> str:
    if part == "exact_duplicates":
        head = f'{len(f["products"])} products share one file (sha256 {_e(f["sha256"][:16])}…)'
    elif part == "near_duplicates":
        head = (f'{len(f["products"])} products, {len(f["photos"])} photos, cosine {f["min_cosine"]:.3f} to '
                f'{f["max_cosine"]:.3f}')
    elif part == "category_disagreements":
        head = (f'<b>{_e(f["product_id"])}</b> {_e(f["title"])}: filed under <b>{_e(f["category"])}</b>, looks like '
                f'<b>{_e(f["predicted_label"])}</b> (p {f["p_predicted"]:.2f} vs {f["p_catalogue"]:.2f}, margin '
                f'{f["margin"]:.2f})')
    else:
        head = (f'<b>{_e(f["product_id"])}</b> {_e(f["title"])} in <b>{_e(f["category"])}</b>: robust z '
                f'{f["robust_z"]:.1f}, distance to centroid {f["distance"]:.3f} '
                f'(median {f["category_median_distance"]:.3f} of {f["category_products"]}); '
                f'nearest {_e(f["nearest_product"])} at cosine {f["nearest_cosine"]:.3f}')
    body = "".join(_figure(p, thumbs) for p in f["photos"][:HTML_MAX_PHOTOS])
    if len(f["photos"]) > HTML_MAX_PHOTOS:
        body += f'<p class="muted">{len(f["photos"]) - HTML_MAX_PHOTOS} more photos in report.json and report.csv</p>'
    return f'<div class="finding" data-part="{part}"><div>{head}</div><div class="photos">{body}</div></div>'


def render_html(report: dict, thumbs: Thumbnails) -> str:
    """The report as one self-contained HTML page (no external URL: styles inline, thumbnails as data URIs)."""
    t = report["thresholds"]
    parts = [p for p in PARTS if p in report]
    summary = "".join(f"<tr><td>{_e(TITLES[p])}</td><td>{len(report[p])}</td></tr>" for p in parts)
    sections = []
    for p in parts:
        items = report[p][:HTML_MAX_FINDINGS]
        more = len(report[p]) - len(items)
        body = "".join(_finding_html(p, f, thumbs) for f in items) or '<p class="muted">none found</p>'
        if more > 0:
            body += f'<p class="muted">{more} more in report.json and report.csv</p>'
        sections.append(f'<section id="{p}"><h2>{_e(TITLES[p])} ({len(report[p])})</h2>{body}</section>')
    notes = "".join(f"<li>{_e(n)}</li>" for n in report.get("notes", []))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Catalogue audit: {_e(report["index"])}</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{_STYLE}</style></head><body>
<h1>Catalogue audit</h1>
<p class="muted">{_e(report["index"])}: {report["products"]} products, {report["photos"]} photos;
model {_e(report["model"])};
{_e(report["generated_at"])}. Near-duplicate cosine &ge; {t["near_duplicate_min_cosine"]}
({_e(t["near_duplicate_threshold_source"])}), category margin &ge; {t["category_min_margin"]},
outlier robust z &ge; {t["outlier_min_z"]}.</p>
<table>{summary}</table>{f"<ul>{notes}</ul>" if notes else ""}
{"".join(sections)}
</body></html>
"""
