"""Where the files the code loads at run time live: the label sets and bundled models of ``data/``.

In a checkout they are the repository's top-level ``data/`` folder; an installed wheel carries the same
files as ``indexer/data/`` (pyproject.toml maps the one onto the other), so both layouts are looked for
here, once, and every module takes its paths from :data:`DATA_DIR`.
"""
from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent
#: ``data/`` of the installed package when there is one, else the checkout's
DATA_DIR = _PACKAGE / "data" if (_PACKAGE / "data").is_dir() else _PACKAGE.parent / "data"
