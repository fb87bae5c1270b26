"""Read a product catalogue into photo rows: a folder of images, a CSV/JSONL manifest or tar shards.

Every reader returns a :class:`Catalogue`: one :class:`CatalogueRow` per photo
(several rows may share a product id), the products with their metadata, and the
rows that could not be used, each with a reason. A bad row never stops reading.

Photo sources are strings the pipeline knows how to read:

* an absolute file path;
* ``http://`` or ``https://`` URL;
* ``/path/to/shard.tar::member/name.jpg`` for a member of a tar shard.
"""
from __future__ import annotations

import csv
import json
import os
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Iterable

from .errors import LookalikeError

IMAGE_EXTENSIONS = frozenset(
    ".jpg .jpeg .jpe .png .webp .gif .bmp .tif .tiff .jp2 .j2k .psd .ico .pbm .pgm .ppm .pnm .tga .avif .apng".split()
)
TAR_SEPARATOR = "::"


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

    def to_dict(self) -> dict:
        return {"where": self.where, "id": self.product_id, "reason": self.reason, "message": self.message}


@dataclass
class Catalogue:
    rows: list[CatalogueRow] = field(default_factory=list)
    # id -> {"title", "category", "metadata"}; metadata holds the columns all the product's rows share
    products: dict[str, dict] = field(default_factory=dict)
    problems: list[RowProblem] = field(default_factory=list)

    def add(self, product_id: str, source: str, where: str, title=None, category=None, metadata=None) -> None:
        """Add a photo row. The first row of a product sets its title, category and metadata; a
        later row with another title or category is reported (the first is kept). Other columns
        may differ between a product's photos (colour, view): each photo keeps its own."""
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
    Raises CatalogueError when ``path`` does not exist or is of no known kind.
    """
    path = Path(path)
    if not path.exists():
        raise CatalogueError(f"catalogue {path} does not exist")
    if path.is_dir():
        shards = sorted(p for p in path.iterdir() if p.suffix == ".tar")
        if shards and not any(_is_image(p) for p in path.rglob("*")):
            return read_shards(shards)
        return read_folder(path)
    suffix = path.suffix.lower()
    if suffix == ".tar":
        return read_shards([path])
    if suffix in (".csv", ".tsv", ".jsonl", ".ndjson", ".json"):
        return read_manifest(path, columns or ColumnMap(), image_root, allow_outside_root)
    raise CatalogueError(f"{path}: not a folder, .csv, .jsonl or .tar catalogue")


def _is_image(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()


def read_folder(root: Path) -> Catalogue:
    """Every image below ``root``; product id = relative path without extension, category = its folder."""
    cat = Catalogue()
    root = root.resolve()
    for p in sorted(root.rglob("*")):
        rel = PurePosixPath(p.relative_to(root).as_posix())
        if any(part.startswith(".") for part in rel.parts) or not _is_image(p):
            continue
        parent = str(rel.parent) if str(rel.parent) != "." else None
        cat.add(str(rel.with_suffix("")), str(p), str(rel), title=rel.stem, category=parent)
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
    for where, record in records:
        if isinstance(record, RowProblem):
            cat.problems.append(record)
            continue
        if not header_checked:
            header_checked = True
            missing = [c for c in (columns.id, columns.image) if c not in record]
            if missing:
                raise CatalogueError(
                    f"{path}: no column {' or '.join(repr(m) for m in missing)}; columns are "
                    f"{', '.join(map(repr, record))}. Map yours with --id-column / --image-column"
                )
        pid = _clean(record.get(columns.id))
        image = _clean(record.get(columns.image))
        if pid is None:
            cat.problems.append(RowProblem(where, "empty_id", f"column {columns.id!r} is empty"))
            continue
        if image is None:
            cat.problems.append(RowProblem(where, "empty_image", f"column {columns.image!r} is empty", pid))
            continue
        source, problem = _resolve_source(image, root, explicit_root=image_root is not None,
                                          allow_outside_root=allow_outside_root)
        if problem:
            cat.problems.append(RowProblem(where, problem[0], problem[1], pid))
            continue
        meta = {
            k: v for k, v in record.items()
            if k not in (columns.id, columns.image, columns.title, columns.category) and v not in (None, "")
        }
        cat.add(pid, source, where, record.get(columns.title), record.get(columns.category), meta)
    return cat


def _read_records(path: Path) -> Iterable[tuple[str, dict | RowProblem]]:
    name = path.name
    try:
        if path.suffix.lower() in (".jsonl", ".ndjson", ".json"):
            with open(path, encoding="utf-8-sig") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except ValueError as e:
                        yield f"{name}:{n}", RowProblem(f"{name}:{n}", "bad_json", f"not valid JSON: {e}")
                        continue
                    if not isinstance(obj, dict):
                        yield f"{name}:{n}", RowProblem(f"{name}:{n}", "bad_json", "line is not a JSON object")
                        continue
                    yield f"{name}:{n}", {str(k): _scalar(v) for k, v in obj.items()}
            return
        with open(path, encoding="utf-8-sig", newline="") as f:
            sample = f.read(65536)
            f.seek(0)
            # Only the delimiter is sniffed: the Sniffer's guesses of quoting rules from a
            # sample misread later rows (it can decide doublequote=False).
            try:
                delimiter = csv.Sniffer().sniff(sample, delimiters=",;\t|").delimiter
            except csv.Error:
                delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
            reader = csv.DictReader(f, dialect=csv.excel, delimiter=delimiter)
            for record in reader:
                where = f"{name}:{reader.line_num}"
                if None in record:
                    yield where, RowProblem(where, "bad_row", "row has more fields than the header")
                    continue
                yield where, {k: v for k, v in record.items() if k is not None}
    except UnicodeDecodeError as e:
        raise CatalogueError(f"{path} is not UTF-8 text: {e}") from e
    except OSError as e:
        raise CatalogueError(f"cannot read {path}: {e}") from e


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
                    images = [ext for ext in members if ext in IMAGE_EXTENSIONS]
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
    """Split ``shard.tar::member`` into (shard path, member name); None for other sources."""
    if TAR_SEPARATOR in source and not source.lower().startswith(("http://", "https://")):
        shard, member = source.split(TAR_SEPARATOR, 1)
        return shard, member
    return None


def read_source_bytes(source: str, max_bytes: int, tar_cache: dict | None = None) -> bytes:
    """The bytes of a photo source (file, tar member or URL). Raises ImageError-compatible LookalikeError."""
    from .images import ImageError
    from .fetch import fetch_url

    if source.lower().startswith(("http://", "https://")):
        return fetch_url(source, max_bytes=max_bytes)
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

