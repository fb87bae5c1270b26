"""Read a folder of images into a catalogue: walk it (hidden entries, links, loops, odd files),
decide by content which files are photos, and name each product after its path.
"""
from __future__ import annotations

import os
import stat
import warnings
from pathlib import Path, PurePosixPath

from .catalogue_rows import RESERVED_ID_SUFFIXES, Catalogue, RowProblem, image_suffixes, text_problem


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


def folder_product_id(rel: PurePosixPath) -> str:
    """A folder photo's product id: its path relative to the folder without the extension
    (``tops/hoodie-gray``), or with it where the path without it would end like an API route
    (``SKU1/image.jpg``, not ``SKU1/image``: :data:`indexer.catalogue_rows.RESERVED_ID_SUFFIXES`), the
    common folder-per-product layout of ``SKU/image.jpg``."""
    pid = str(rel.with_suffix(""))
    return str(rel) if pid.strip().endswith(RESERVED_ID_SUFFIXES) else pid


def read_folder(root: Path, allow_outside_root: bool = False) -> Catalogue:
    """Every image below ``root``; product id = relative path without extension
    (:func:`folder_product_id`), category = its folder.

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
        cat.add(folder_product_id(rel), str(path), str(rel), title=_folder_title(rel), category=parent,
                reason="bad_name")
    cat.problems.sort(key=lambda p: p.where)
    return cat
