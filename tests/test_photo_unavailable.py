"""A photo that cannot be read (where it lives failed) is told apart from one that is not a usable
image: PhotoUnavailable, still an ImageError."""
import pickle

import pytest

from indexer.catalogue import read_source_bytes
from indexer.images import ImageError, PhotoUnavailable, open_image

pytestmark = pytest.mark.unit


def test_missing_or_unreadable_sources_are_photo_unavailable(tmp_path):
    with pytest.raises(PhotoUnavailable) as e:
        open_image(tmp_path / "gone.jpg")
    assert e.value.reason == "not_found" and isinstance(e.value, ImageError)
    with pytest.raises(PhotoUnavailable):
        read_source_bytes(str(tmp_path / "gone.jpg"), 1024)
    with pytest.raises(PhotoUnavailable):
        read_source_bytes(f"{tmp_path / 'shard.tar'}::a.jpg", 1024)
    copy = pickle.loads(pickle.dumps(e.value))  # crosses worker processes
    assert type(copy) is PhotoUnavailable and copy.reason == "not_found"


def test_a_bad_image_is_an_image_error_but_not_unavailable(tmp_path):
    bad = tmp_path / "notes.jpg"
    bad.write_text("not a photo")
    with pytest.raises(ImageError) as e:
        open_image(bad)
    assert not isinstance(e.value, PhotoUnavailable) and e.value.reason == "not_an_image"
    with pytest.raises(ValueError):
        PhotoUnavailable("corrupt", "a decode problem is not an unavailable photo")
