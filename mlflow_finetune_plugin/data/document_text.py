"""The text of one document, as blocks (paragraphs) that know where they are: Markdown and plain text with
their first line, HTML through the standard library's `html.parser` (the text of block elements, h1-h6 as
headings, scripts and styles dropped), PDF through `pypdf` page by page. `data/documents.py` chunks the
blocks."""

from __future__ import annotations

import re
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

MARKDOWN = (".md", ".markdown")
HTML = (".html", ".htm")
PDF = (".pdf",)


class Unreadable(Exception):
    """A document that cannot be read; the message is the reason and what to do, shown in the report."""


@dataclass(frozen=True)
class Block:
    """A paragraph: its text, first line (md/txt/html) or page (pdf), both 1-based, and its heading path."""

    text: str
    line: int | None = None
    page: int | None = None
    heading: tuple[str, ...] = ()


def read_blocks(path: Path) -> list[Block]:
    """The paragraphs of the document at `path`, in order; raises `Unreadable` with the reason."""
    suffix = path.suffix.lower()
    if suffix in PDF:
        return _pdf_blocks(path)
    text = _decoded(path)
    if suffix in HTML:
        return _html_blocks(text)
    return _text_blocks(text, headings=suffix in MARKDOWN)


def _decoded(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise Unreadable(
            f"not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); save it as UTF-8"
        ) from None


_HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)(?:\s+#+)?\s*$")
_FENCE = re.compile(r"^ {0,3}(```|~~~)")


def _text_blocks(text: str, headings: bool) -> list[Block]:
    """Paragraphs split at blank lines; in Markdown also at `#` headings (which set the heading path, and are
    not text themselves). A fenced code block stays one paragraph, `#` lines in it included."""
    blocks: list[Block] = []
    path: list[tuple[int, str]] = []  # (level, heading) from the top
    lines: list[str] = []
    first = fence = None

    def flush():
        nonlocal lines, first
        if lines and "".join(lines).strip():
            blocks.append(Block("\n".join(lines).strip("\n"), line=first, heading=tuple(h for _, h in path)))
        lines, first = [], None

    for number, line in enumerate(text.splitlines(), 1):
        if fence:
            lines.append(line)
            fence = None if line.strip().startswith(fence) else fence
            continue
        if headings and (m := _FENCE.match(line)):
            fence = m.group(1)
        elif headings and (m := _HEADING.match(line)):
            flush()
            level = len(m.group(1))
            path = [(lv, h) for lv, h in path if lv < level] + [(level, m.group(2).strip())]
            continue
        elif not line.strip():
            flush()
            continue
        lines.append(line)
        first = first or number
    flush()
    return blocks


class _HtmlText(HTMLParser):
    """The text of an HTML page's block elements, each a paragraph with the line its text starts on."""

    HEADINGS = {f"h{n}": n for n in range(1, 7)}
    SKIP = {"script", "style", "noscript", "template", "title", "head"}
    BLOCK = {"p", "div", "li", "ul", "ol", "pre", "blockquote", "section", "article", "header", "footer",
             "main", "nav", "aside", "table", "tr", "td", "th", "dl", "dt", "dd", "figure", "figcaption",
             "form", "hr", "body", "html", "caption", "details", "summary", "address"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.blocks: list[Block] = []
        self.path: list[tuple[int, str]] = []
        self.parts: list[str] = []
        self.first: int | None = None
        self.skipping = 0
        self.heading: int | None = None  # the level of the heading being read

    def handle_starttag(self, tag, attrs):
        if tag == "br":  # a line break inside a paragraph: a space between its words
            self.parts.append(" ")
        elif tag in self.SKIP:
            self.skipping += 1
        elif tag in self.HEADINGS or tag in self.BLOCK:
            self._flush()
            self.heading = self.HEADINGS.get(tag, self.heading)

    def handle_endtag(self, tag):
        if tag in self.SKIP:
            self.skipping = max(self.skipping - 1, 0)
        elif tag in self.HEADINGS and self.heading is not None:
            text = " ".join("".join(self.parts).split())
            if text:
                self.path = [(lv, h) for lv, h in self.path if lv < self.heading] + [(self.heading, text)]
            self.parts, self.first, self.heading = [], None, None
        elif tag in self.BLOCK:
            self._flush()

    def handle_data(self, data):
        if self.skipping or not data.strip():
            return
        if self.first is None:  # the line of the first visible character, not of the whitespace before it
            self.first = self.getpos()[0] + data[: len(data) - len(data.lstrip())].count("\n")
        self.parts.append(data)

    def _flush(self):
        text = " ".join("".join(self.parts).split())
        if text and self.heading is None:
            self.blocks.append(Block(text, line=self.first, heading=tuple(h for _, h in self.path)))
        if self.heading is None:
            self.parts, self.first = [], None


def _html_blocks(text: str) -> list[Block]:
    parser = _HtmlText()
    parser.feed(text)
    parser.close()
    parser._flush()
    return parser.blocks


def _pdf_blocks(path: Path) -> list[Block]:
    """Each page's text (pypdf's extraction), split at blank lines; a PDF carries no reliable headings."""
    import logging

    from pypdf import PdfReader

    logging.getLogger("pypdf").setLevel(logging.ERROR)  # a damaged file is reported once, as unreadable
    try:
        reader = PdfReader(path)
        if reader.is_encrypted and not reader.decrypt(""):
            raise Unreadable("encrypted PDF (it needs a password); save a copy without the password")
        pages = [page.extract_text() or "" for page in reader.pages]
    except Unreadable:
        raise
    # pypdf raises many kinds for a damaged file; each is the same advice
    except Exception as e:  # noqa: BLE001
        raise Unreadable(f"broken PDF ({type(e).__name__}: {e}); open it and save or export it "
                         "again") from None
    blocks = []
    for number, text in enumerate(pages, 1):
        blocks += [Block(p.strip(), page=number) for p in re.split(r"\n\s*\n", text) if p.strip()]
    return blocks
