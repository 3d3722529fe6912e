"""What verify and the quantization report share: a folder, per-block rows, the chain result, a verdict, and
a JSON file written next to the graphs."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..format import write_text_atomic


@dataclass
class Report:
    folder: Path
    blocks: list
    chain: dict
    path: Optional[Path] = None
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def failed(self) -> list:  # names of what failed; subclasses say what counts
        return []

    @property
    def ok(self) -> bool:
        return not self.failed

    def to_json(self) -> dict:
        raise NotImplementedError

    def save(self, name: str) -> Path:
        self.path = Path(self.folder) / name
        write_text_atomic(self.path, json.dumps(self.to_json(), indent=2))
        return self.path
