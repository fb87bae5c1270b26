"""One router per resource; :func:`server.app.create_app` includes them in this order:
``health``, ``search``, ``labels``, ``products``."""
from __future__ import annotations

import time


def elapsed_ms(t0: float) -> float:
    """Milliseconds since ``t0`` (a ``time.perf_counter()`` reading), rounded to 0.01 ms."""
    return round((time.perf_counter() - t0) * 1000, 2)
