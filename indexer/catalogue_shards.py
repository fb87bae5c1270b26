"""Read webdataset tar shards into a catalogue: members grouped by key, one photo row per image
member, titles, categories and metadata from the key's ``.json``, ``.txt`` and ``.cls`` members.
"""
from __future__ import annotations

import json
import tarfile
import zlib
from pathlib import Path

from .catalogue_manifest import json_scalar
from .catalogue_rows import Catalogue, RowProblem, clean_text, image_suffixes
from .photo_sources import TAR_SEPARATOR

#: A shard with more members than this is refused (``bad_shard``): every member's header is held while
#: the shard is grouped by key (about 1 KiB each). Webdataset shards hold thousands of samples.
MAX_SHARD_MEMBERS = 200_000
#: A key's ``.json`` metadata member larger than this is refused (``bad_json``) without reading it
MAX_JSON_MEMBER_BYTES = 1 << 20


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
                for n, m in enumerate(tar, 1):
                    if n > MAX_SHARD_MEMBERS:
                        raise tarfile.TarError(f"more than {MAX_SHARD_MEMBERS:,} members: split it into smaller shards")
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
                            raw = tar.extractfile(members[".json"]).read(MAX_JSON_MEMBER_BYTES + 1)
                            if len(raw) > MAX_JSON_MEMBER_BYTES:
                                raise ValueError(f"over {MAX_JSON_MEMBER_BYTES:,} bytes of metadata")
                            loaded = json.loads(raw)
                            if isinstance(loaded, dict):
                                meta = {str(k): json_scalar(v) for k, v in loaded.items()}
                        except RecursionError:
                            cat.problems.append(RowProblem(where, "bad_json", f"{key}.json: nested too deeply"))
                        except ValueError as e:
                            cat.problems.append(RowProblem(where, "bad_json", f"{key}.json: {e}"))
                    title = meta.pop("title", None)
                    category = meta.pop("category", None)
                    if ".txt" in members:
                        title = title or _read_text(tar, members[".txt"])
                    if ".cls" in members:
                        category = category or _read_text(tar, members[".cls"])
                    pid = clean_text(meta.pop("id", None)) or key
                    for ext in sorted(images):
                        source = f"{shard.resolve()}{TAR_SEPARATOR}{members[ext].name}"
                        cat.add(pid, source, where, title, category, meta)
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
            cat.problems.append(RowProblem(shard.name, "bad_shard", f"cannot read tar shard: {e}"))
    return cat


def _read_text(tar: tarfile.TarFile, member: tarfile.TarInfo) -> str | None:
    data = tar.extractfile(member).read(65536)
    return data.decode("utf-8", "replace").strip() or None
