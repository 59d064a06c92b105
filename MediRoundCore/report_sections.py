"""Named blocks of the Markdown reports (`<!-- name -->` … `<!-- /name -->`), each written by the program that
measures it: RESULTS.md (benchmarks) and QUALITY.md (the evaluator's sets). A write replaces its own block and
leaves the rest of the file as it is."""

from __future__ import annotations

import os
import re
from pathlib import Path


def section_pattern(name: str) -> re.Pattern:
    return re.compile(rf"<!-- {name} -->.*?<!-- /{name} -->\n?", re.S)


def write_section(path: str | Path, name: str, body: str, new_file: str = "", order: tuple = ()) -> Path:
    """Replace (or add) block `name` of the file at `path`, atomically. A file that does not exist starts as
    `new_file`. A new block goes before the first block named after it in `order`, else at the end."""
    path = Path(path)
    text = path.read_text(encoding="utf-8") if path.is_file() else new_file
    block = f"<!-- {name} -->\n{body.strip()}\n<!-- /{name} -->\n"
    pattern = section_pattern(name)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text, count=1)
    else:
        later = [m.start() for s in (order[order.index(name) + 1:] if name in order else ())
                 if (m := re.search(rf"<!-- {s} -->", text))]
        if later:
            at = min(later)
            text = text[:at] + block + "\n" + text[at:]
        else:
            text = text.rstrip("\n") + "\n\n" + block
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path
