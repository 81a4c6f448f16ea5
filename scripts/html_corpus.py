"""Turn a directory of HTML documentation into a plain-text corpus for `--data.source` (one .txt per page).

    python scripts/html_corpus.py SRC_DIR OUT_DIR [--min-words 150] [--max-words 0]

Keeps the prose of each page: the text of its main content (the element with role="main", else <body>), without
code blocks (<pre>), scripts, styles and navigation, one paragraph per line. Pages with fewer than --min-words
words (indexes, stubs) are skipped. --max-words N > 0 cuts longer pages at paragraph boundaries into parts of about
N words (``<page>_partKK.txt``; a last part under --min-words joins the one before), so that an evaluation split of
a few thousand tokens holds many documents (its intervals resample documents), not a few long pages. Used to check that results hold on a corpus other than the default, e.g. the
Python or PostgreSQL manuals from Debian's python3.11-doc / postgresql-doc-15 packages (`apt-get download`, then
`dpkg-deb -x`).
"""

from __future__ import annotations

import argparse
import re
from html.parser import HTMLParser
from pathlib import Path

SKIP = {"pre", "script", "style", "nav", "header", "footer", "head", "title"}
BLOCK = {"p", "li", "dd", "dt", "h1", "h2", "h3", "h4", "h5", "h6", "div", "section", "tr", "td", "th", "br",
         "blockquote", "table"}
VOID = {"br", "img", "hr", "meta", "link", "input", "col", "area", "base", "wbr", "source"}


class _Text(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[tuple[str, bool]] = []  # (tag, opened the main content)
        self.skip = 0
        self.main_depth = 0  # > 0 inside the main content
        self.has_main = False
        self.parts: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag in VOID:
            if tag == "br":
                self.parts.append("\n")
            return
        is_main = dict(attrs).get("role") == "main"
        self.stack.append((tag, is_main))
        if is_main:
            self.main_depth += 1
            self.has_main = True
        if tag in SKIP:
            self.skip += 1
        if tag in BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in VOID or all(t != tag for t, _ in self.stack):  # <hr/>, or a stray end tag
            return
        while self.stack:
            t, is_main = self.stack.pop()
            if is_main:
                self.main_depth -= 1
            if t in SKIP:
                self.skip -= 1
            if t == tag:
                break
        if tag in BLOCK:
            self.parts.append("\n")

    def handle_data(self, data):
        if not self.skip:
            self.parts.append(data if self.main_depth else "\0" + data)  # \0: outside the main content

    def text(self) -> str:
        keep = [p for p in self.parts if not p.startswith("\0")] if self.has_main else \
            [p.lstrip("\0") for p in self.parts]
        lines = (re.sub(r"[ \t\r\f\v]+", " ", line).strip() for line in "".join(keep).split("\n"))
        paras = [line for line in lines if line and line != "¶"]
        return "\n".join(p.replace("¶", "").strip() for p in paras)


def page_text(html: str) -> str:
    parser = _Text()
    parser.feed(html)
    parser.close()
    return parser.text()


def parts(text: str, max_words: int, min_words: int) -> list[str]:
    """``text`` cut at paragraph (line) boundaries into parts of at least ``max_words`` words each, except the last,
    which joins the one before when it has fewer than ``min_words``; [text] when ``max_words`` is 0."""
    if max_words <= 0:
        return [text]
    out: list[list[str]] = [[]]
    n = 0
    for para in text.split("\n"):
        out[-1].append(para)
        n += len(para.split())
        if n >= max_words:
            out.append([])
            n = 0
    if not out[-1]:
        out.pop()
    if len(out) > 1 and sum(len(p.split()) for p in out[-1]) < min_words:
        last = out.pop()
        out[-1] += last
    return ["\n".join(ps) for ps in out]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src")
    ap.add_argument("out")
    ap.add_argument("--min-words", type=int, default=150)
    ap.add_argument("--max-words", type=int, default=0, help="cut longer pages into parts of about this many words")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    kept = docs = words = 0
    for f in sorted(Path(a.src).rglob("*.html")):
        text = page_text(f.read_text(encoding="utf-8", errors="replace"))
        n = len(text.split())
        if n < a.min_words or f.name.startswith(("genindex", "py-modindex", "search", "contents")):
            continue
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(f.relative_to(a.src)))[:-5]
        cut = parts(text, a.max_words, a.min_words)
        for i, part in enumerate(cut):
            name = f"{stem}_part{i:02d}.txt" if len(cut) > 1 else f"{stem}.txt"
            (out / name).write_text(part + "\n", encoding="utf-8")
        kept += 1
        docs += len(cut)
        words += n
    print(f"{kept} pages ({docs} documents), {words:,} words -> {out}")


if __name__ == "__main__":
    main()
