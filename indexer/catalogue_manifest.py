"""Read a CSV or JSONL manifest into a catalogue: one photo per row, sources resolved against
an image root, every other column kept as metadata.
"""
from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from pathlib import Path

from .catalogue_rows import Catalogue, CatalogueError, ColumnMap, RowProblem, clean_text, printable, text_problem
from .photo_sources import is_url

#: File name extensions read as JSON lines; any other manifest is read as CSV.
JSON_SUFFIXES = (".jsonl", ".ndjson", ".json")

def read_manifest(path: Path, columns: ColumnMap, image_root=None, allow_outside_root: bool = False) -> Catalogue:
    """A CSV (any of , ; tab delimiters, sniffed) or JSONL manifest, one photo per row.

    ``image`` values may be absolute paths, http(s) URLs, or paths relative to
    ``image_root`` (default: the manifest's folder). A relative path that leads
    outside that root (``../../etc/passwd``) is refused unless ``allow_outside_root``.
    With an explicit ``image_root``, paths with a leading ``/`` are taken relative
    to it as well (shop exports such as Magento's write ``/m/h/mh01.jpg``).
    Every other column is kept as product metadata.
    """
    root = Path(image_root).resolve() if image_root else path.resolve().parent
    cat = Catalogue()
    records = _read_records(path)
    header_checked = False
    bad_columns: set[str] = set()  # CSV header names that are not text: dropped, reported once
    for where, record in records:
        if isinstance(record, RowProblem):
            cat.problems.append(record)
            continue
        if not header_checked:
            header_checked = True
            missing = [c for c in (columns.id, columns.image) if c not in record]
            if missing:
                raise CatalogueError(
                    f"{printable(str(path))}: no column {' or '.join(repr(m) for m in missing)}; columns are "
                    f"{', '.join(repr(printable(c)) for c in record)}. Map yours with --id-column / --image-column"
                )
            if path.suffix.lower() not in JSON_SUFFIXES:
                for c in record:
                    problem = text_problem(c)
                    if problem:
                        bad_columns.add(c)
                        cat.problems.append(RowProblem(f"{path.name}:1", "bad_text",
                                                       f"column name {problem}; the column is not read"))
        pid = clean_text(record.get(columns.id))
        image = clean_text(record.get(columns.image))
        if pid is None:
            cat.problems.append(RowProblem(where, "empty_id", f"column {columns.id!r} is empty"))
            continue
        if image is None:
            cat.problems.append(RowProblem(where, "empty_image", f"column {columns.image!r} is empty", pid))
            continue
        problem = text_problem(pid, identifier=True) or text_problem(image, identifier=True)
        if problem:  # before the path is resolved: the OS refuses a path holding a NUL
            field_name = "id" if text_problem(pid, identifier=True) else "image"
            cat.problems.append(RowProblem(where, "bad_text", f"{field_name} {problem}", pid))
            continue
        source, problem = _resolve_source(image, root, explicit_root=image_root is not None,
                                          allow_outside_root=allow_outside_root)
        if problem:
            cat.problems.append(RowProblem(where, problem[0], problem[1], pid))
            continue
        meta = {
            k: v for k, v in record.items()
            if k not in (columns.id, columns.image, columns.title, columns.category) and v not in (None, "")
            and k not in bad_columns
        }
        cat.add(pid, source, where, record.get(columns.title), record.get(columns.category), meta)
    return cat


def _read_records(path: Path) -> Iterable[tuple[str, dict | RowProblem]]:
    """(where, record) per row, or (where, RowProblem) for a row that cannot be parsed.

    Bytes that are not UTF-8 are kept as lone surrogates (``surrogateescape``) so that only
    the rows that hold them are refused (by :meth:`Catalogue.add`), not the whole file.
    """
    name = path.name
    try:
        if path.suffix.lower() in JSON_SUFFIXES:
            with open(path, encoding="utf-8-sig", errors="surrogateescape") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    where = f"{name}:{n}"
                    try:
                        obj = json.loads(line)
                        if not isinstance(obj, dict):
                            yield where, RowProblem(where, "bad_json", "line is not a JSON object")
                            continue
                        record = {str(k): json_scalar(v) for k, v in obj.items()}
                    except ValueError as e:
                        yield where, RowProblem(where, "bad_json", f"not valid JSON: {e}")
                        continue
                    except RecursionError:
                        yield where, RowProblem(where, "bad_json", "JSON nested too deeply")
                        continue
                    yield where, record
            return
        with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
            sample = f.read(65536)
            f.seek(0)
            # Only the delimiter is sniffed: the Sniffer's guesses of quoting rules from a
            # sample misread later rows (it can decide doublequote=False).
            try:
                delimiter = csv.Sniffer().sniff(sample, delimiters=",;\t|").delimiter
            except csv.Error:
                delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
            reader = csv.DictReader(f, dialect=csv.excel, delimiter=delimiter)
            header = reader.fieldnames or []
            twice = sorted({h for h in header if h and h.strip() and header.count(h) > 1})  # not blank ones
            if twice:  # DictReader would keep the last column of each name, silently
                raise CatalogueError(f"{printable(str(path))}: the header names {', '.join(map(repr, twice))} more "
                                     "than once; rename the columns so each name is used once")
            while True:
                try:
                    record = next(reader)
                except StopIteration:
                    break
                except csv.Error as e:  # a field over csv.field_size_limit(): the reader goes on after it
                    where = f"{name}:{reader.line_num + 1}"
                    yield where, RowProblem(where, "bad_row", f"cannot parse row: {e}")
                    continue
                where = f"{name}:{reader.line_num}"
                if None in record:
                    yield where, RowProblem(where, "bad_row", "row has more fields than the header")
                    continue
                yield where, {k: v for k, v in record.items() if k is not None}
    except OSError as e:
        raise CatalogueError(f"cannot read {printable(str(path))}: {e.strerror or e}") from e


def json_scalar(v):
    """A JSON value as stored metadata: objects and arrays as their JSON text, the rest as is."""
    if isinstance(v, (dict, list)):
        return json.dumps(v, ensure_ascii=False)
    return v


def _resolve_source(image: str, root: Path, explicit_root: bool, allow_outside_root: bool):
    """Returns (source, None) or (None, (reason, message))."""
    if "://" in image:
        if is_url(image):
            return image, None
        return None, ("bad_url", f"{image!r}: only http and https URLs are read")
    if explicit_root and image.startswith("/"):
        image = image.lstrip("/")
    p = Path(image).expanduser()
    if not p.is_absolute():
        p = (root / p).resolve()
        if not allow_outside_root and not p.is_relative_to(root):
            return None, ("outside_root", f"{image!r} leads outside the catalogue folder {root} "
                                          "(allow with --allow-outside-root)")
    return str(p), None
