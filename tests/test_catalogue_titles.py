"""Folder catalogues: a photo's title tells products apart (camera and dataset file names are numbers)."""
import pytest
from PIL import Image

from indexer.catalogue import read_folder

pytestmark = pytest.mark.unit


def test_numeric_file_names_get_their_folder_in_the_title(tmp_path):
    for rel in ("cat/0039.png", "horse/0039.png", "Men/Tops/hoodie-gray.png", "IMG_0001.png", "0007.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (200, 10, 10)).save(tmp_path / rel)
    titles = {pid: p["title"] for pid, p in read_folder(tmp_path).products.items()}
    assert titles == {"cat/0039": "cat/0039", "horse/0039": "horse/0039", "Men/Tops/hoodie-gray": "hoodie-gray",
                      "IMG_0001": "IMG_0001", "0007": "0007"}
