"""The commands the README and docs/ print for a running `make serve`, as a test runs them.

A fenced ```bash block right after the line `<!-- tested: runs against make serve -->` is one such
command. The tests run each block as printed, from a directory laid out like the repository's root,
with only the server's port changed (tests never take port 8000).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

MARK = "<!-- tested: runs against make serve -->"
_BLOCK = re.compile(re.escape(MARK) + r"\n```bash\n(.*?)\n```", re.DOTALL)
DEFAULT_ADDRESS = "127.0.0.1:8000"


@dataclass(frozen=True)
class DocCommand:
    page: str
    script: str

    def for_port(self, port: int) -> str:
        return self.script.replace(DEFAULT_ADDRESS, f"127.0.0.1:{port}")


def doc_commands(root: Path) -> list[DocCommand]:
    """Every marked block of README.md and docs/*.md, in page order, then in order within a page."""
    pages = [root / "README.md", *sorted((root / "docs").glob("*.md"))]
    return [DocCommand(str(page.relative_to(root)), match.group(1))
            for page in pages for match in _BLOCK.finditer(page.read_text())]
