"""tools/rewrite_citations.py on a throw-away git tree: citations are rewritten with their sections kept,
unknown sections and notes without a replacement fail the run (exit 1) and nothing is written then."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tools.rewrite_citations import main

MODEL = "# Model\n## 1. One\n### 1.2 Sub\n## 12. Twelve\n### 12.3 A\n### 12.4 B\n"
STACK = "# Stack\n## 9. Streaming\n"


def _tree(tmp: Path, files: dict[str, str]) -> Path:
    for rel, text in {"docs/MODEL.md": MODEL, "docs/STACK.md": STACK, **files}.items():
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp / rel).write_text(text)
    subprocess.run(["git", "init", "-q"], cwd=tmp, check=True)
    return tmp


def test_rewrites_names_and_keeps_sections(tmp_path, capsys):
    src = (
        '"""Spec (deepseek-v4.md §1.2, §12.3-12.4; paper §2.2)."""\n'
        "# see stack-notes §9 and `deepseek-v4.md` and /x/y/stack-notes.md\n"
    )
    root = _tree(tmp_path, {"a.py": src})
    assert main(["--root", str(root), "--dry-run"]) == 0
    assert (root / "a.py").read_text() == src  # dry run: nothing written
    assert main(["--root", str(root)]) == 0
    assert (root / "a.py").read_text() == (
        '"""Spec (docs/MODEL.md §1.2, §12.3-12.4; paper §2.2)."""\n'
        "# see docs/STACK.md §9 and `docs/MODEL.md` and docs/STACK.md\n"
    )
    assert main(["--root", str(root)]) == 0  # idempotent: nothing left to rewrite
    assert "rewrote 0 citation(s)" in capsys.readouterr().out


def test_unknown_section_and_unmapped_note_fail_and_write_nothing(tmp_path, capsys):
    src = "x = 1  # deepseek-v4.md §12.9, §1\n# recipe: local-clusters.md\n# stack-notes §9\n"
    root = _tree(tmp_path, {"b.py": src})
    assert main(["--root", str(root)]) == 1
    err = capsys.readouterr().err
    assert "b.py:1: CANNOT MAP" in err and "§12.9" in err and "b.py:2: CANNOT MAP 'local-clusters.md'" in err
    assert (root / "b.py").read_text() == src
