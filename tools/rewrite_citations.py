"""Point every citation of a document outside the repository at its in-repository replacement.

The code and docs once cited two notes kept outside the repository; their content now lives, with the same
section numbers, in ``docs/MODEL.md`` and ``docs/STACK.md``. This tool rewrites, in every text file git tracks
(or would track), the document name and keeps the section list::

    <old model note> §4–§7, §11   ->  docs/MODEL.md §4–§7, §11
    <old stack note> §9           ->  docs/STACK.md §9
    `<old model note>`            ->  `docs/MODEL.md`          (a bare mention, with or without a path)

The old names are spelled out in ``MAPPING`` below (this file is the one place that may name them).
Every section cited (each ``§N.M``, both ends of a range ``§12.3-12.4``) must be a heading of the target
document (``## N.`` / ``### N.M``); a section that is not, or a citation of another outside note
(``UNMAPPED``), is listed and the tool exits with status 1 (nothing is written when anything is unmappable,
unless ``--force``). ``--dry-run`` lists the rewrites and writes nothing.

Usage: ``python tools/rewrite_citations.py [--dry-run] [--force] [--root DIR]``
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

# old document name (as cited, without ".md" where the citation omits it) -> in-repository replacement
MAPPING = {"deepseek-v4.md": "docs/MODEL.md", "stack-notes.md": "docs/STACK.md", "stack-notes": "docs/STACK.md"}
# other notes that lived outside the repository: citing them is an error this tool cannot fix
UNMAPPED = ("local-clusters.md", "data-at-scale.md", "code-anchors.md", "anchors.md", "v4-frameworks.md")
SKIP = {"tools/rewrite_citations.py", "tests/test_rewrite_citations.py"}  # they name the old documents

_NUM = r"\d+(?:\.\d+)*"
_ITEM = rf"§{_NUM}(?:\s*[–-]\s*§?{_NUM})?"
_NAMES = "|".join(re.escape(n) for n in sorted(MAPPING, key=len, reverse=True))
# optional path before the name; the name; optionally the section list that follows it
CITATION = re.compile(
    rf"(?<![\w-])(?:[\w.~-]*/)*(?P<doc>{_NAMES})(?![\w-])(?P<refs>[ \t]+{_ITEM}"
    rf"(?:[ \t]*[,/][ \t]*{_ITEM})*)?"
)
OTHER = re.compile(rf"(?<![\w-])(?:[\w.~-]*/)*(?P<doc>{'|'.join(re.escape(n) for n in UNMAPPED)})(?![\w-])")
HEADING = re.compile(rf"^#{{2,4}}\s+(?P<num>{_NUM})\.?\s")


@dataclass
class Finding:
    path: str
    line: int
    old: str
    new: str | None  # None: cannot be mapped
    why: str = ""


def sections(doc: Path) -> set[str]:
    """Section numbers of a markdown document: '3', '3.2', ... from its ``##``/``###`` headings."""
    if not doc.is_file():
        return set()
    return {m["num"] for line in doc.read_text(encoding="utf-8").splitlines() if (m := HEADING.match(line))}


def text_files(root: Path) -> list[Path]:
    """Files git tracks or would track (not ignored), text only."""
    out = (
        subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            cwd=root,
            check=True,
            capture_output=True,
        )
        .stdout.decode()
        .split("\0")
    )
    files = []
    for rel in filter(None, out):
        p = root / rel
        if rel in SKIP or not p.is_file():
            continue
        data = p.read_bytes()
        if b"\0" in data[:8192]:
            continue
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        files.append(p)
    return files


def rewrite_text(text: str, rel: str, known: dict[str, set[str]]) -> tuple[str, list[Finding]]:
    """(new text, findings) for one file; ``known`` maps a target document to its section numbers."""
    findings: list[Finding] = []

    def line_of(pos: int) -> int:
        return text.count("\n", 0, pos) + 1

    def sub(m: re.Match) -> str:
        target = MAPPING[m["doc"]]
        refs = m["refs"] or ""
        missing = [n for n in re.findall(_NUM, refs) if n not in known[target]]
        new = target + refs
        if missing:
            why = (
                f"{target} has no section {', '.join('§' + n for n in missing)}"
                if known[target]
                else f"{target} does not exist"
            )
            findings.append(Finding(rel, line_of(m.start()), m[0], None, why))
            return m[0]
        findings.append(Finding(rel, line_of(m.start()), m[0], new))
        return new

    new_text = CITATION.sub(sub, text)
    for m in OTHER.finditer(new_text):
        findings.append(
            Finding(
                rel,
                line_of(m.start()),
                m[0],
                None,
                "a note outside the repository with no "
                "replacement: write what the reader needs into docs/ and cite that",
            )
        )
    return new_text, findings


def run(root: Path, dry_run: bool, force: bool) -> int:
    known = {t: sections(root / t) for t in set(MAPPING.values())}
    changes: dict[Path, str] = {}
    findings: list[Finding] = []
    for p in text_files(root):
        text = p.read_text(encoding="utf-8")
        new, found = rewrite_text(text, str(p.relative_to(root)), known)
        findings += found
        if new != text:
            changes[p] = new
    bad = [f for f in findings if f.new is None]
    for f in findings:
        if f.new is not None:
            print(f"{f.path}:{f.line}: {f.old!r} -> {f.new!r}")
    for f in bad:
        print(f"{f.path}:{f.line}: CANNOT MAP {f.old!r}: {f.why}", file=sys.stderr)
    ok = len(findings) - len(bad)
    if dry_run or (bad and not force):
        verb = "would rewrite" if dry_run else "nothing written; would rewrite"
        print(f"{verb} {ok} citation(s) in {len(changes)} file(s); {len(bad)} cannot be mapped")
    else:
        for p, new in changes.items():
            p.write_text(new, encoding="utf-8")
        print(f"rewrote {ok} citation(s) in {len(changes)} file(s); {len(bad)} cannot be mapped")
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="list the rewrites, write nothing")
    ap.add_argument("--force", action="store_true", help="write the mappable rewrites even if some cannot be mapped")
    ap.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1], help="repository root")
    args = ap.parse_args(argv)
    return run(args.root.resolve(), args.dry_run, args.force)


if __name__ == "__main__":
    sys.exit(main())
