"""Read the bytes of one photo source, whatever kind the catalogue gave: a file path, an
``http(s)://`` URL, or ``shard.tar::member`` for a member of a tar shard.

Each read is bounded by ``max_bytes`` and fails with :class:`indexer.images.ImageError`, so the
pipeline and the server report a bad source the same way as a bad image.
"""
from __future__ import annotations

import os
import stat
import tarfile
import zlib

#: Separates a tar shard's path from a member's name in a photo source.
TAR_SEPARATOR = "::"


def is_url(source: str) -> bool:
    """Whether a photo source is an ``http(s)://`` URL (any case), which is fetched, not opened."""
    return source.lower().startswith(("http://", "https://"))


def tar_member(source: str) -> tuple[str, str] | None:
    """Split ``shard.tar::member`` into (shard path, member name); None for other sources (a file
    whose own name holds ``::`` is a file: the part before ``::`` must name a ``.tar``)."""
    if TAR_SEPARATOR in source and not is_url(source):
        shard, member = source.split(TAR_SEPARATOR, 1)
        if shard.lower().endswith(".tar"):
            return shard, member
    return None


def read_source_bytes(source: str, max_bytes: int, tar_cache: dict | None = None,
                      allow_private_urls: bool = False) -> bytes:
    """The bytes of a photo source (file, tar member or URL). Raises ImageError.

    A URL is fetched only from a public address unless ``allow_private_urls`` (see
    :func:`indexer.fetch.fetch_url`)."""
    from .fetch import fetch_url
    from .images import ImageError, PhotoUnavailable, check_not_special_file

    if is_url(source):
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
            raise PhotoUnavailable("not_found", f"no such tar shard: {shard}") from None
        except KeyError:
            raise PhotoUnavailable("not_found", f"{name} is not in {shard}") from None
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
            raise PhotoUnavailable("unreadable", f"cannot read {name} from {shard}: {e}") from None
        if data is None:
            raise ImageError("not_an_image", f"{name} in {shard} is not a regular file")
        if len(data) > max_bytes:
            raise ImageError("too_large", f"{name} is over the {max_bytes}-byte limit")
        return data
    try:
        st = os.stat(source)
        check_not_special_file(st.st_mode, source)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(source)
        if st.st_size > max_bytes:
            raise ImageError("too_large", f"file is {st.st_size} bytes, over the {max_bytes}-byte limit")
        with open(source, "rb") as f:
            data = f.read(max_bytes + 1)  # the file may have grown since stat
        if len(data) > max_bytes:
            raise ImageError("too_large", f"file is over the {max_bytes}-byte limit")
        return data
    except FileNotFoundError:
        raise PhotoUnavailable("not_found", f"no such file: {source}") from None
    except IsADirectoryError:
        raise ImageError("not_an_image", f"{source} is a folder") from None
    except PermissionError:
        raise PhotoUnavailable("unreadable", f"permission denied: {source}") from None
    except OSError as e:
        raise PhotoUnavailable("unreadable", f"cannot read {source}: {e}") from None
