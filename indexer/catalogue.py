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

Each source has its reader: :mod:`indexer.catalogue_folder`, :mod:`indexer.catalogue_manifest`
and :mod:`indexer.catalogue_shards`; the rows they produce and the text rules are in
:mod:`indexer.catalogue_rows`, and reading a photo source's bytes in :mod:`indexer.photo_sources`.
This module picks the reader and re-exports all their public names.
"""
from __future__ import annotations

import os
from pathlib import Path

from .catalogue_folder import read_folder
from .catalogue_manifest import JSON_SUFFIXES, read_manifest
from .catalogue_rows import (
    RESERVED_ID_SUFFIXES,
    RESERVED_IDS,
    Catalogue,
    CatalogueError,
    CatalogueRow,
    ColumnMap,
    RowProblem,
    image_suffixes,
    printable,
    reserved_id_problem,
    text_problem,
)
from .catalogue_shards import read_shards
from .photo_sources import TAR_SEPARATOR, read_source_bytes, tar_member

__all__ = [
    "RESERVED_ID_SUFFIXES",
    "RESERVED_IDS",
    "reserved_id_problem",
    "TAR_SEPARATOR",
    "Catalogue",
    "CatalogueError",
    "CatalogueRow",
    "ColumnMap",
    "RowProblem",
    "image_suffixes",
    "printable",
    "read_catalogue",
    "read_folder",
    "read_manifest",
    "read_shards",
    "read_source_bytes",
    "tar_member",
    "text_problem",
]


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
    if suffix in (".csv", ".tsv", *JSON_SUFFIXES):
        return read_manifest(path, columns or ColumnMap(), image_root, allow_outside_root)
    raise CatalogueError(f"{path}: not a folder, .csv, .jsonl or .tar catalogue")
