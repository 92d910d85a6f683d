"""The loop every per-model benchmark shares: run each model, print its lines as they come, save JSON."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any


def run_models(names: str, bench: Callable[[str], dict[str, Any]], fmt: Callable[[dict[str, Any]], str],
               json_path: Path | None) -> list[dict[str, Any]]:
    """``bench(name)`` for each comma-separated name, ``fmt(row)`` printed after each; rows to ``json_path``."""
    rows = []
    for name in names.split(","):
        rows.append(bench(name))
        print(fmt(rows[-1]), flush=True)
    if json_path:
        json_path.write_text(json.dumps(rows, indent=2, default=float))
    return rows
