"""Plain-text work on email bodies: text from HTML, and folding away quotes and signatures.

Agents read the new words of a mail; the quoted history and the signature are kept on
the event (data["quoted"], data["signature"]) but not shown as its text. The rules
follow what common clients write: Gmail/Apple "On ... wrote:", Outlook's "-----Original
Message-----" and "From: / Sent:" header blocks, ">" prefixes, and the "-- " signature
delimiter of RFC 3676 plus the "Sent from my iPhone" family.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from html.parser import HTMLParser

# --- HTML to text --------------------------------------------------------------------

_BLOCK = {
    "address", "article", "aside", "div", "dl", "dt", "dd", "fieldset", "figure", "footer",
    "form", "h1", "h2", "h3", "h4", "h5", "h6", "header", "hr", "main", "nav", "ol", "p",
    "pre", "section", "table", "tr", "ul", "li",
}  # fmt: skip
_SKIP = {"head", "script", "style", "title", "template", "noscript"}


class _TextExtractor(HTMLParser):
    """Renders HTML as readable text: blocks become lines, blockquotes get "> " prefixes
    (so the quote folding below works on HTML-only replies too), links keep their URL."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self._lines: list[tuple[int, str]] = []  # (quote depth, text)
        self._current: list[str] = []
        self._depth = 0
        self._skip = 0
        self._pre = 0
        self._href: list[str | None] = []

    def _flush(self) -> None:
        text = "".join(self._current)
        self._current = []
        if self._pre:
            for line in text.split("\n"):
                self._lines.append((self._depth, line.rstrip()))
            return
        text = re.sub(r"[ \t\r\n\f\u00a0]+", " ", text).strip()
        if text:
            self._lines.append((self._depth, text))

    def _blank(self) -> None:
        self._flush()
        if self._lines and self._lines[-1][1] != "":
            self._lines.append((self._depth, ""))

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _SKIP:
            self._skip += 1
        elif tag == "br":
            self._flush()
        elif tag == "blockquote":
            self._blank()
            self._depth += 1
        elif tag in ("p", "table", "ul", "ol", "h1", "h2", "h3", "h4", "h5", "h6", "hr"):
            self._blank()
        elif tag in _BLOCK:
            self._flush()
            if tag == "li":
                self._current.append("- ")
        elif tag == "td" or tag == "th":
            self._current.append(" ")
        if tag == "pre":
            self._pre += 1
        if tag == "a":
            self._href.append(dict(attrs).get("href"))

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIP:
            self._skip = max(0, self._skip - 1)
        elif tag == "blockquote":
            self._blank()
            self._depth = max(0, self._depth - 1)
        elif tag in ("p", "table", "ul", "ol", "h1", "h2", "h3", "h4", "h5", "h6"):
            self._blank()
        elif tag in _BLOCK:
            self._flush()
        if tag == "pre":
            self._flush()
            self._pre = max(0, self._pre - 1)
        if tag == "a" and self._href:
            href = self._href.pop()
            # Show where a link goes when its words don't already say it.
            if href and href.startswith(("http:", "https:")):
                shown = "".join(self._current)
                if href not in shown:
                    self._current.append(f" <{href}>")

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self._current.append(data)

    def text(self) -> str:
        self._flush()
        while self._lines and not self._lines[-1][1]:
            self._lines.pop()  # separators after the last words
        out: list[str] = []
        for depth, line in self._lines:
            prefix = "> " * depth
            out.append((prefix + line).rstrip() if line else prefix.rstrip())
        return tidy("\n".join(out))


def html_to_text(html: str) -> str:
    parser = _TextExtractor()
    try:
        parser.feed(html)
        parser.close()
    except Exception:  # the stdlib parser is lenient; this guards the odd assertion
        return tidy(re.sub(r"<[^>]*>", " ", html))
    return parser.text()


def tidy(text: str) -> str:
    """Normalize newlines, drop trailing spaces (but the "-- " signature delimiter keeps
    its space), collapse runs of blank lines, trim blank lines at both ends."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    lines = [line if line == "-- " else line.rstrip() for line in text.split("\n")]
    text = "\n".join(lines)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip("\n")


# --- folding quotes and signatures ---------------------------------------------------

# "On Tue, 5 Mar 2024 at 10:12, Jane <jane@x> wrote:" and friends in a few languages.
_ATTRIBUTION = re.compile(
    r"^\s*(on\b.{0,400}\bwrote|le\b.{0,400}\ba écrit|am\b.{0,400}\bschrieb|el\b.{0,400}"
    r"\bescribió|op\b.{0,400}\bschreef|il\b.{0,400}\bha scritto)\s*:?\s*$",
    re.IGNORECASE,
)
_ORIGINAL = re.compile(
    r"^\s*-{2,}\s*(original message|ursprüngliche nachricht|message d'origine|"
    r"mensaje original)\s*-{2,}\s*$",
    re.IGNORECASE,
)
_HEADER_FROM = re.compile(r"^\s*\*?(from|de|von|van)\s*:\*?\s+\S", re.IGNORECASE)
_HEADER_SENT = re.compile(
    r"^\s*\*?(sent|date|envoyé|gesendet|datum|enviado|verzonden)\s*:\*?\s+\S", re.IGNORECASE
)
_RULE = re.compile(r"^\s*_{8,}\s*$")
_MOBILE_SIGNATURE = re.compile(
    r"^\s*(sent from my \w[\w -]{0,40}|sent from (mail|outlook) for \w+|get outlook for \w+"
    r"|envoyé de mon \w+|von meinem \w+ gesendet)\.?\s*$",
    re.IGNORECASE,
)


@dataclass(frozen=True, slots=True)
class Folded:
    text: str  # what the sender wrote now
    quoted: str  # the earlier messages they quoted
    signature: str


def _quote_header_at(lines: list[str], i: int) -> int | None:
    """If a quote header starts at line i, the index where the quoted part begins."""
    line = lines[i]
    if _ORIGINAL.match(line) or _ATTRIBUTION.match(line):
        return i
    # Gmail wraps long attributions: "On Mon, ... Jane Doe <" / "jane@x.com> wrote:".
    if (
        re.match(r"^\s*(on|le|am|el|op|il)\s", line, re.IGNORECASE)
        and i + 1 < len(lines)
        and _ATTRIBUTION.match(line + " " + lines[i + 1])
    ):
        return i
    # Outlook: "From: ..." then "Sent: ..." (or Date:) within the next lines; a rule of
    # underscores often sits right above it and belongs to the quote.
    if _HEADER_FROM.match(line):
        for j in range(i + 1, min(i + 4, len(lines))):
            if _HEADER_SENT.match(lines[j]):
                start = i
                if start > 0 and _RULE.match(lines[start - 1]):
                    start -= 1
                return start
    return None


def _split_signature(text: str) -> tuple[str, str]:
    lines = text.split("\n")
    # The last delimiter wins: a "-- " inside the body is rarer than one before the end.
    for i in range(len(lines) - 1, -1, -1):
        if lines[i] in ("-- ", "--"):
            return "\n".join(lines[:i]), "\n".join(lines[i + 1 :])
    # "Sent from my iPhone" as the last non-empty line.
    idx = len(lines) - 1
    while idx >= 0 and not lines[idx].strip():
        idx -= 1
    if idx > 0 and _MOBILE_SIGNATURE.match(lines[idx]):
        return "\n".join(lines[:idx]), lines[idx].strip()
    return text, ""


def fold(text: str, *, keep_quotes: bool = False) -> Folded:
    """Split a plain-text body into new text, quoted history and signature.

    `keep_quotes` (forwarded mail) leaves the quoted part in the text: there it is the
    content the sender wants us to read. If folding would leave nothing, nothing is
    folded: an agent never sees an empty message for a mail that had words in it.
    """
    text = tidy(text)
    lines = text.split("\n")
    quoted = ""
    if not keep_quotes:
        cut = None
        for i in range(len(lines)):
            cut = _quote_header_at(lines, i)
            if cut is not None:
                break
        if cut is None:
            # A trailing block of ">" lines (bottom quote without an attribution line).
            # Inline answers between quoted lines are left alone: folding those would
            # hide the answers' context.
            first = next((i for i, line in enumerate(lines) if line.startswith(">")), None)
            if first is not None and all(
                line.startswith(">") or not line.strip() for line in lines[first:]
            ):
                cut = first
        if cut is not None:
            quoted = tidy("\n".join(lines[cut:]))
            lines = lines[:cut]
    main, signature = _split_signature(tidy("\n".join(lines)))
    main, signature = tidy(main), tidy(signature)
    if not main.strip():
        return Folded(text=text, quoted="", signature="")
    return Folded(text=main, quoted=quoted, signature=signature)
