"""Read a product catalogue into photo rows: a folder of images, a CSV/JSONL manifest or tar shards.

Every reader returns a :class:`Catalogue`: one :class:`CatalogueRow` per photo
(several rows may share a product id), the products with their metadata, and the
rows that could not be used, each with a reason. A bad row never stops reading.

Text that cannot be stored faithfully is refused row by row, never for the whole
run: a row whose id or image source holds a control character, or any of whose
fields holds a NUL or a lone surrogate (undecodable bytes in a CSV/JSONL file, a
``"\\ud800"`` JSON escape, a file name that is not UTF-8), is reported as
``bad_text`` (``bad_name`` for folder entries). Such values are refused rather than
cleaned: cleaning could merge two ids into one, and SQLite stores UTF-8 text only.
Tabs and line breaks in titles and metadata are kept (quoted CSV fields hold them).

Photo sources are strings the pipeline knows how to read:

* an absolute file path;
* ``http://`` or ``https://`` URL;
* ``/path/to/shard.tar::member/name.jpg`` for a member of a tar shard.
"""
from __future__ import annotations

import csv
import json
import os
import re
import stat
import tarfile
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Iterable

from .errors import LookalikeError

#: Product ids may not end with these: ``GET /v1/products/{id}/image`` and ``.../similar`` would
#: read another route, and the product could never be read back over HTTP.
RESERVED_ID_SUFFIXES = ("/image", "/similar")

TAR_SEPARATOR = "::"
_JSON_SUFFIXES = (".jsonl", ".ndjson", ".json")
# Pillow registers these extensions for formats it can only write.
_WRITE_ONLY_FORMATS = frozenset({"PDF", "PALM"})
# NUL and lone surrogates (Python's stand-ins for undecodable bytes): no field may hold them.
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
# C0 and C1 control characters and DEL: not in ids, image sources or file names.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


class CatalogueError(LookalikeError):
    code = "bad_catalogue"


@dataclass
class ColumnMap:
    """Which manifest columns hold the product id, image, title and category."""

    id: str = "id"
    image: str = "image"
    title: str = "title"
    category: str = "category"


@dataclass
class CatalogueRow:
    """One photo of one product. ``where`` locates the row for reports (``file:line``)."""

    product_id: str
    source: str
    where: str
    metadata: dict = field(default_factory=dict)  # this row's extra columns


@dataclass
class RowProblem:
    where: str
    reason: str
    message: str
    product_id: str | None = None

    def __post_init__(self) -> None:
        # these end up in report.json and on the terminal: keep them printable and encodable
        self.where, self.message = printable(self.where), printable(self.message)
        if self.product_id is not None:
            self.product_id = printable(self.product_id)

    def to_dict(self) -> dict:
        return {"where": self.where, "id": self.product_id, "reason": self.reason, "message": self.message}


@dataclass
class Catalogue:
    rows: list[CatalogueRow] = field(default_factory=list)
    # id -> {"title", "category", "metadata"}; metadata holds the columns all the product's rows share
    products: dict[str, dict] = field(default_factory=dict)
    problems: list[RowProblem] = field(default_factory=list)

    def add(self, product_id: str, source: str, where: str, title=None, category=None, metadata=None,
            reason: str = "bad_text") -> bool:
        """Add a photo row. The first row of a product sets its title, category and metadata; a
        later row with another title or category is reported (the first is kept). Other columns
        may differ between a product's photos (colour, view): each photo keeps its own.

        A row with text that cannot be stored (see the module docstring) is not added but
        reported with ``reason``; returns whether the row was added."""
        problem = _row_text_problem(product_id, source, title, category, metadata)
        if not problem and product_id.strip().endswith(RESERVED_ID_SUFFIXES):
            problem, reason = (f"product id {printable(product_id)!r} ends with "
                               f"{' or '.join(RESERVED_ID_SUFFIXES)}, which are API routes"), "bad_id"
        if problem:
            self.problems.append(RowProblem(where, reason, problem, product_id))
            return False
        info = {"title": _clean(title), "category": _clean(category), "metadata": dict(metadata or {})}
        known = self.products.get(product_id)
        if known is None:
            self.products[product_id] = info
        else:
            # product metadata = the columns all its rows agree on; the rest is per photo
            known["metadata"] = {k: v for k, v in known["metadata"].items() if info["metadata"].get(k) == v}
            diff = [k for k in ("title", "category") if info[k] is not None and info[k] != known[k]]
            if diff:
                self.problems.append(
                    RowProblem(where, "conflicting_metadata",
                               f"product {product_id!r} already has another {' and '.join(diff)} "
                               f"({', '.join(repr(known[k]) for k in diff)}); the first row's is kept", product_id)
                )
        self.rows.append(CatalogueRow(product_id, source, where, metadata or {}))
        return True


def printable(text: str) -> str:
    """``text`` with undecodable bytes shown as ``\\xNN``, other lone surrogates as ``\\uNNNN`` and
    control characters escaped as Python writes them, for reports and terminal output."""
    if not _CONTROL.search(text):
        return text
    out = []
    for ch in text:
        o = ord(ch)
        if 0xDC80 <= o <= 0xDCFF:  # os.fsdecode / surrogateescape stand-in for the byte o - 0xDC00
            out.append(f"\\x{o - 0xDC00:02x}")
        elif 0xD800 <= o <= 0xDFFF:
            out.append(f"\\u{o:04x}")
        elif _CONTROL.match(ch):
            out.append(repr(ch)[1:-1])
        else:
            out.append(ch)
    return "".join(out)


def text_problem(value: str, identifier: bool = False) -> str | None:
    """Why ``value`` cannot be stored as given, or None. ``identifier``: an id, image source or
    file name, which may hold no control character at all; free text may hold tabs and line breaks."""
    bad = (_CONTROL if identifier else _UNSTORABLE).search(value)
    if bad is None:
        return None
    ch = bad.group()
    if "\ud800" <= ch <= "\udfff":
        return f"is not valid UTF-8 text ('{printable(value)}')"
    if ch == "\x00":
        return f"holds a NUL character ('{printable(value)}')"
    return f"holds a control character ('{printable(value)}')"


def _row_text_problem(product_id, source, title, category, metadata) -> str | None:
    fields = [("id", product_id, True), ("image", source, True), ("title", title, False), ("category", category, False)]
    for key, value in (metadata or {}).items():
        fields += [("a column name", str(key), False), (f"column {str(key)!r}", value, False)]
    for name, value, identifier in fields:
        if isinstance(value, str):
            problem = text_problem(value, identifier)
            if problem:
                return f"{name} {problem}"
    return None


def _clean(value) -> str | None:
    if value is None:
        return None
    value = str(value).strip()
    return value or None


def read_catalogue(
    path: str | os.PathLike,
    columns: ColumnMap | None = None,
    image_root: str | os.PathLike | None = None,
    allow_outside_root: bool = False,
) -> Catalogue:
    """Read a catalogue from a folder of images, a ``.csv``/``.jsonl`` manifest, or ``.tar`` shards.

    A folder that holds ``.tar`` files and no images is read as webdataset shards.
    ``allow_outside_root``: follow a folder's symbolic links, and a manifest's relative
    paths, that lead outside the catalogue's root.
    Raises CatalogueError when ``path`` does not exist or is of no known kind.
    """
    path = Path(path)
    if not path.exists():
        raise CatalogueError(f"catalogue {path} does not exist")
    if path.is_dir():
        folder = read_folder(path, allow_outside_root)
        shards = sorted(p for p in path.iterdir() if p.suffix == ".tar")
        if shards and not folder.rows:
            return read_shards(shards)
        return folder
    suffix = path.suffix.lower()
    if suffix == ".tar":
        return read_shards([path])
    if suffix in (".csv", ".tsv", *_JSON_SUFFIXES):
        return read_manifest(path, columns or ColumnMap(), image_root, allow_outside_root)
    raise CatalogueError(f"{path}: not a folder, .csv, .jsonl or .tar catalogue")


def image_suffixes() -> frozenset[str]:
    """The file name extensions (lower case, with the dot) of every format Pillow can open."""
    from PIL import Image

    Image.init()
    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt not in _WRITE_ONLY_FORMATS)


def _sniff(path: Path) -> tuple[str, str] | None:
    """None if ``path`` (a regular file) holds an image Pillow recognises, else (reason, message).

    Pillow identifies the format from the file's header, as the upload routes do, so a camera
    ``.mpo``, a ``.qoi`` or an AVIF named ``.heic`` counts and a ``.jpg`` that holds HTML does not.
    Only the header is parsed; pixels are decoded later, in the pipeline's workers. A file under
    an image extension that Pillow cannot identify (empty, truncated, broken header) is still a
    photo row, so that the pipeline reports exactly what is wrong with it.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the pipeline decides
            with Image.open(path):
                return None
    except UnidentifiedImageError:
        if path.suffix.lower() in image_suffixes():
            return None
        return "not_an_image", "not an image: Pillow does not recognise its content"
    except PermissionError:
        return "unreadable", "permission denied"
    except OSError as e:
        if isinstance(e, (FileNotFoundError, IsADirectoryError)) or e.errno is not None:
            return "unreadable", f"cannot read: {e.strerror or e}"
        return None  # a recognised format whose header Pillow rejects: the pipeline says why
    except Exception:  # any other header error from a recognised format, as above
        return None


def _folder_title(rel: PurePosixPath) -> str:
    """A folder photo's title: its file name without extension when that says something
    (``hoodie-gray``), else its path (``horse/0039``: ``0039`` alone would not tell a horse from a cat)."""
    if any(ch.isalpha() for ch in rel.stem) or len(rel.parts) == 1:
        return rel.stem
    return str(rel.with_suffix(""))


def read_folder(root: Path, allow_outside_root: bool = False) -> Catalogue:
    """Every image below ``root``; product id = relative path without extension, category = its folder.

    Whether a file is an image is decided by its content (:func:`_sniff`), not its extension.
    Every entry that is not read is reported with a reason: ``hidden`` (a name starting with a
    dot; hidden folders are not entered), ``not_an_image``, ``not_a_file`` (FIFO, socket,
    device), ``unreadable``, ``bad_name`` (not UTF-8, or a control character), ``broken_link``,
    ``link_loop``, and ``outside_root`` for a symbolic link that leads outside ``root`` (followed
    only with ``allow_outside_root``).
    """
    cat = Catalogue()
    root = Path(root).resolve()

    def skip(rel: PurePosixPath, reason: str, message: str) -> None:
        cat.problems.append(RowProblem(str(rel), reason, message))

    files: list[tuple[PurePosixPath, Path]] = []
    walked = {root}  # resolved folders entered: a link back to one of them would loop
    pending = [(root, PurePosixPath())]
    while pending:
        folder, rel_folder = pending.pop()
        try:
            with os.scandir(folder) as it:
                entries = list(it)
        except OSError as e:
            skip(rel_folder, "unreadable", f"cannot list folder: {e.strerror or e}")
            continue
        for entry in entries:
            rel = rel_folder / entry.name
            path = Path(entry.path)
            if entry.name.startswith("."):
                skip(rel, "hidden", "hidden (name starts with a dot)")
                continue
            problem = text_problem(entry.name, identifier=True)
            if problem:
                skip(rel, "bad_name", f"file name {problem}; rename it")
                continue
            is_link = entry.is_symlink()
            try:
                st = path.stat()
                target = path.resolve(strict=True) if is_link else path
            except (OSError, RuntimeError) as e:
                if is_link:
                    skip(rel, "broken_link", f"symbolic link to {os.readlink(path)!r}, which does not exist or loops")
                else:
                    skip(rel, "unreadable", f"cannot read: {getattr(e, 'strerror', None) or e}")
                continue
            if is_link and not allow_outside_root and not target.is_relative_to(root):
                skip(rel, "outside_root", f"symbolic link to {target}, outside the catalogue folder {root} "
                                          "(allow with --allow-outside-root)")
                continue
            if stat.S_ISDIR(st.st_mode):
                target = target.resolve()  # a folder reached through a linked folder
                if target in walked:
                    skip(rel, "link_loop", f"symbolic link to {target}, a folder already read")
                    continue
                walked.add(target)
                pending.append((path, rel))
            elif stat.S_ISREG(st.st_mode):
                files.append((rel, path))
            else:
                skip(rel, "not_a_file", "not a regular file (a FIFO, socket or device)")
    for rel, path in sorted(files, key=lambda f: str(f[0])):
        sniffed = _sniff(path)
        if sniffed:
            skip(rel, *sniffed)
            continue
        parent = str(rel.parent) if str(rel.parent) != "." else None
        cat.add(str(rel.with_suffix("")), str(path), str(rel), title=_folder_title(rel), category=parent, reason="bad_name")
    cat.problems.sort(key=lambda p: p.where)
    return cat


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
            if path.suffix.lower() not in _JSON_SUFFIXES:
                for c in record:
                    problem = text_problem(c)
                    if problem:
                        bad_columns.add(c)
                        cat.problems.append(RowProblem(f"{path.name}:1", "bad_text",
                                                       f"column name {problem}; the column is not read"))
        pid = _clean(record.get(columns.id))
        image = _clean(record.get(columns.image))
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
        if path.suffix.lower() in _JSON_SUFFIXES:
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
                        record = {str(k): _scalar(v) for k, v in obj.items()}
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


def _scalar(v):
    if isinstance(v, (dict, list)):
        return json.dumps(v, ensure_ascii=False)
    return v


def _resolve_source(image: str, root: Path, explicit_root: bool, allow_outside_root: bool):
    """Returns (source, None) or (None, (reason, message))."""
    lower = image.lower()
    if "://" in image:
        if lower.startswith(("http://", "https://")):
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


def read_shards(shards: list[Path]) -> Catalogue:
    """Webdataset tar shards: ``KEY.jpg`` (or another image extension) with optional
    ``KEY.json`` (metadata; its ``id``, ``title``, ``category`` keys are used),
    ``KEY.txt`` (title / caption) and ``KEY.cls`` (category). Product id: the json
    ``id``, else KEY.
    """
    cat = Catalogue()
    suffixes = image_suffixes()
    for shard in shards:
        try:
            with tarfile.open(shard) as tar:
                groups: dict[str, dict[str, tarfile.TarInfo]] = {}
                for m in tar.getmembers():
                    if not m.isfile():
                        continue
                    base = m.name.rsplit("/", 1)[-1]
                    if "." not in base:
                        continue
                    key, ext = m.name[: m.name.rfind("/") + 1] + base.split(".", 1)[0], "." + base.split(".", 1)[1]
                    groups.setdefault(key, {})[ext.lower()] = m
                for key, members in groups.items():
                    where = f"{shard.name}:{key}"
                    images = [ext for ext in members if ext in suffixes]
                    if not images:
                        continue
                    meta: dict = {}
                    if ".json" in members:
                        try:
                            loaded = json.loads(tar.extractfile(members[".json"]).read())
                            if isinstance(loaded, dict):
                                meta = {str(k): _scalar(v) for k, v in loaded.items()}
                        except ValueError as e:
                            cat.problems.append(RowProblem(where, "bad_json", f"{key}.json: {e}"))
                    title = meta.pop("title", None)
                    category = meta.pop("category", None)
                    if ".txt" in members:
                        title = title or _read_text(tar, members[".txt"])
                    if ".cls" in members:
                        category = category or _read_text(tar, members[".cls"])
                    pid = _clean(meta.pop("id", None)) or key
                    for ext in sorted(images):
                        cat.add(pid, f"{shard.resolve()}{TAR_SEPARATOR}{members[ext].name}", where, title, category, meta)
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
            cat.problems.append(RowProblem(shard.name, "bad_shard", f"cannot read tar shard: {e}"))
    return cat


def _read_text(tar: tarfile.TarFile, member: tarfile.TarInfo) -> str | None:
    data = tar.extractfile(member).read(65536)
    return data.decode("utf-8", "replace").strip() or None


def tar_member(source: str) -> tuple[str, str] | None:
    """Split ``shard.tar::member`` into (shard path, member name); None for other sources (a file
    whose own name holds ``::`` is a file: the part before ``::`` must name a ``.tar``)."""
    if TAR_SEPARATOR in source and not source.lower().startswith(("http://", "https://")):
        shard, member = source.split(TAR_SEPARATOR, 1)
        if shard.lower().endswith(".tar"):
            return shard, member
    return None


def read_source_bytes(source: str, max_bytes: int, tar_cache: dict | None = None,
                      allow_private_urls: bool = False) -> bytes:
    """The bytes of a photo source (file, tar member or URL). Raises ImageError.

    A URL is fetched only from a public address unless ``allow_private_urls`` (see
    :func:`indexer.fetch.fetch_url`)."""
    from .images import ImageError
    from .fetch import fetch_url

    if source.lower().startswith(("http://", "https://")):
        return fetch_url(source, max_bytes=max_bytes, allow_private=allow_private_urls)
    member = tar_member(source)
    if member:
        shard, name = member
        cache = tar_cache if tar_cache is not None else {}
        try:
            tar = cache.get(shard)
            if tar is None:
                tar = cache[shard] = tarfile.open(shard)
            f = tar.extractfile(name)
            data = f.read(max_bytes + 1) if f is not None else None
        except FileNotFoundError:
            raise ImageError("not_found", f"no such tar shard: {shard}") from None
        except KeyError:
            raise ImageError("not_found", f"{name} is not in {shard}") from None
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
            raise ImageError("unreadable", f"cannot read {name} from {shard}: {e}") from None
        if data is None:
            raise ImageError("not_an_image", f"{name} in {shard} is not a regular file")
        if len(data) > max_bytes:
            raise ImageError("too_large", f"{name} is over the {max_bytes}-byte limit")
        return data
    try:
        size = os.path.getsize(source)
        if size > max_bytes:
            raise ImageError("too_large", f"file is {size} bytes, over the {max_bytes}-byte limit")
        with open(source, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise ImageError("not_found", f"no such file: {source}") from None
    except IsADirectoryError:
        raise ImageError("not_an_image", f"{source} is a folder") from None
    except PermissionError:
        raise ImageError("unreadable", f"permission denied: {source}") from None
    except OSError as e:
        raise ImageError("unreadable", f"cannot read {source}: {e}") from None

