"""Judge prompt templates: built-in files under judges/templates/, or any file by path.

The template's hash goes into every cache key and record, so changing a template
never reuses verdicts made with another one.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

BUILTIN_DIR = Path(__file__).parent / "templates"
BUILTIN = {"pairwise", "pairwise_reference", "pointwise"}


@dataclass(frozen=True)
class Template:
    name: str
    text: str

    @property
    def sha(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()[:16]

    def render(self, **fields: str) -> str:
        return self.text.format(**fields)


def load_template(name_or_path: str, required_fields: tuple[str, ...] = ()) -> Template:
    path = BUILTIN_DIR / f"{name_or_path}.txt" if name_or_path in BUILTIN else Path(name_or_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"judge template {name_or_path!r} is neither a built-in ({', '.join(sorted(BUILTIN))}) nor a file"
        )
    text = path.read_text()
    missing = [f for f in required_fields if "{" + f + "}" not in text]
    if missing:
        raise ValueError(f"judge template {path} lacks the placeholders {missing}; it needs {list(required_fields)}")
    return Template(str(name_or_path), text)
