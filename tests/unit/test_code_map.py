"""README's code map matches the tree: every file and folder its "where" column names
exists (issue 18). A bare name (`placement.py`) lives in the folder of the path before it
in the same cell."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _code_map_places() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Code map\n", 1)[1].split("\n## ", 1)[0]
    places: list[str] = []
    for row in section.splitlines():
        cells = row.split("|")
        if len(cells) < 4 or set(cells[2].strip()) <= {"-"} or cells[2].strip() == "where":
            continue
        folder = ""
        for name in re.findall(r"`([^`]+)`", cells[2]):
            if "/" in name:
                folder = name if name.endswith("/") else name.rsplit("/", 1)[0] + "/"
                places.append(name)
            else:
                places.append(folder + name)
    return places


def test_every_place_in_the_code_map_exists() -> None:
    places = _code_map_places()
    assert len(places) > 20  # the table was found and read
    missing = [p for p in places if not (ROOT / p).exists()]
    assert missing == []
