"""JSON Lines input (request files, training data): one object per non-empty line, with
errors that name the file and line."""

from __future__ import annotations

import json
from pathlib import Path


def read_objects(path: str | Path, what: str = "file") -> list[tuple[str, dict]]:
    """(where, object) for each non-empty line; `where` is "path:line" for error messages."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read {what} {path}: {e.strerror}") from None
    try:
        lines = data.decode("utf-8").splitlines()
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x}); "
                         f"the {what} must be UTF-8 JSON Lines") from None
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{where}: each line must be a JSON object, got {obj!r}")
        out.append((where, obj))
    return out
