"""The shape of the code itself: no function in src/ longer than 80 lines (issue #10).

Long functions hide several jobs behind one name; config.py's field declarations are not
functions, so they do not count. The test names every offender with its length.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "keeneye"
MAX_LINES = 80


def long_functions(root: Path = SRC, limit: int = MAX_LINES) -> list[str]:
    """'path:line name (N lines)' of every function or method longer than `limit` lines (decorators excluded)."""
    found = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > limit:
                    found.append(f"{path.relative_to(root.parent)}:{node.lineno} {node.name} ({length} lines)")
    return found


def test_no_function_over_80_lines() -> None:
    offenders = long_functions()
    assert not offenders, "functions over 80 lines:\n" + "\n".join(offenders)


def test_the_check_finds_a_long_function(tmp_path: Path) -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES))
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "long.py").write_text(f"def long():\n{body}\n\n\ndef short():\n    return 1\n")
    (tmp_path / "pkg" / "ok.py").write_text("class A:\n    def method(self):\n        return 2\n")
    assert long_functions(tmp_path / "pkg") == ["pkg/long.py:1 long (81 lines)"]
