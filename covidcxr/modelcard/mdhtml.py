"""The little markdown a covidcxr card uses (headings, tables, lists, bold, code, links) as escaped
HTML for report.html; no dependency. Front matter is shown as a preformatted block."""
from __future__ import annotations

import html
import re

from covidcxr.modelcard.results import slug


def _inline(text: str) -> str:
    t = html.escape(text, quote=False)
    t = re.sub(r"`([^`]+)`", r"<code>\1</code>", t)
    t = re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", t)
    t = re.sub(r"(?<![\w*])\*([^*]+)\*(?![\w*])", r"<i>\1</i>", t)
    t = re.sub(r"!\[([^\]]*)\]\(([^)\s]+)\)", r"[figure \2]", t)   # report.html embeds the figures itself
    return re.sub(r"\[([^\]]+)\]\((#[\w\-]+)\)", r'<a href="\2">\1</a>', t)


def _table(lines: list[str]) -> str:
    cells = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in lines if not re.match(r"^\|[-|: ]+\|$", ln)]
    head, body = cells[0], cells[1:]
    th = "".join(f"<th>{_inline(c)}</th>" for c in head)
    return f"<table><tr>{th}</tr>" + "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>"
                                            for r in body) + "</table>"


def _front(text: str) -> tuple[str, str]:
    if text.startswith("---\n"):
        end = text.find("\n---\n", 4)
        if end > 0:
            return f"<pre>{html.escape(text[:end + 5])}</pre>", text[end + 5:]
    return "", text


def _block(lines: list[str]) -> str:
    first = lines[0]
    if first.startswith("|"):
        return _table(lines)
    if first.startswith("- "):
        return "<ul>" + "".join(f"<li>{_inline(ln[2:])}</li>" for ln in lines) + "</ul>"
    m = re.match(r"^(#{1,6}) (.*)$", first)
    if m:
        n = min(len(m.group(1)) + 1, 6)   # the report's own h1 stays the page title
        rest = f"<p>{_inline(' '.join(lines[1:]))}</p>" if lines[1:] else ""
        return f'<h{n} id="{slug(m.group(2))}">{_inline(m.group(2))}</h{n}>' + rest
    return f"<p>{_inline(' '.join(lines))}</p>"


def to_html(text: str) -> str:
    front, body = _front(text)
    blocks, cur = [], []
    for line in body.splitlines():
        if not line.strip():
            if cur:
                blocks.append(cur)
            cur = []
        elif cur and (line.startswith("#") or line.startswith("|") != cur[-1].startswith("|")):
            blocks.append(cur)
            cur = [line]
        else:
            cur.append(line)
    if cur:
        blocks.append(cur)
    return front + "".join(_block(b) for b in blocks)
