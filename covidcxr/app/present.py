"""Plain text and HTML the page shows (no Gradio here): the banner, the film results with their
probability bars, and the model card's summary. Every number of a film is in the page twice: rounded for
reading (4 decimals) and at full precision in ``data-prob`` (what the browser tests compare with predict)."""
from __future__ import annotations

import html
import re
from pathlib import Path

from covidcxr.modelcard import INTENDED, MODEL_CARD

BANNER = f"**{INTENDED.capitalize()}.** Do not use these outputs for diagnosis, triage or any clinical decision."
CARD_SECTIONS = ("Training data", "Results")
CARD_CHARS = 6000


def share_note(share: bool, host: str, port: int) -> str:
    if share:
        return ("**Sharing is ON (--share):** this page is reachable through a public gradio.live link by anyone "
                "who has it. Do not upload identifiable patient films.")
    return f"Local only: served on http://{host}:{port} (sharing off; --share would make a public link)."


def _bar(cls: str, p: float, top: bool) -> str:
    width = max(0.0, min(100.0, 100 * p))
    colour = "#c0392b" if top else "#7f8c8d"
    return (f'<div class="prob-row" data-class="{html.escape(cls)}" data-prob="{p!r}">'
            f'<span class="prob-name" style="display:inline-block;width:12em">{html.escape(cls)}</span>'
            f'<span style="display:inline-block;width:50%;background:#eee;vertical-align:middle">'
            f'<span style="display:block;height:0.9em;width:{width:.2f}%;background:{colour}"></span></span> '
            f'<span class="prob-value">{p:.4f}</span></div>')


def film_html(res) -> str:
    """One film's card: its name, the call, the probability bars (or the error)."""
    name = html.escape(res.name)
    if res.error:
        return (f'<div class="film film-error" data-file="{name}" style="border:2px solid #c0392b;padding:8px;'
                f'margin:6px 0"><b>Could not score {name}</b><p class="error-message">{html.escape(res.error)}</p></div>')
    parts = [f'<div class="film" data-file="{name}" style="border:1px solid #ccc;padding:8px;margin:6px 0">'
             f'<b>{name}</b>']
    if res.probs:
        cal = "calibrated (temperature from calibration.json)" if res.calibrated else "uncalibrated"
        parts.append(f'<p>Predicted: <b class="pred-label" data-label="{html.escape(res.label)}">'
                     f'{html.escape(res.label)}</b> <small>({cal})</small></p>')
        parts += [_bar(c, p, c == res.label) for c, p in res.probs.items()]
    if res.flag:
        parts.append(f'<p class="op-flag"><b>Operating point:</b> {html.escape(res.flag)}</p>')
    if res.cam_layer:
        parts.append(f'<p class="cam-layer"><small>Grad-CAM layer: {html.escape(res.cam_layer)}</small></p>')
    if res.mask_note:
        parts.append(f'<p class="mask-note"><small>{html.escape(res.mask_note)}</small></p>')
    return "".join(parts) + "</div>"


def films_html(results) -> str:
    if not results:
        return "<p>Drop one or several PNG, JPEG or DICOM films above.</p>"
    return "".join(film_html(r) for r in results)


def gallery(results) -> list[tuple]:
    """(image, caption) pairs for the Grad-CAM figures and mask overlays of the films that scored."""
    out = []
    for r in results:
        if r.cam is not None:
            out.append((r.cam, f"{r.name}: Grad-CAM"))
        if r.mask is not None:
            out.append((r.mask, f"{r.name}: mask overlay"))
        if r.cam is None and r.mask is None and r.film is not None:
            out.append((r.film, r.name))
    return out


def _sections(text: str) -> dict[str, str]:
    text = re.sub(r"\A---\n.*?\n---\n", "", text, flags=re.S)
    found, parts = {}, re.split(r"(?m)^## ", text)
    for part in parts[1:]:
        title, _, body = part.partition("\n")
        found[title.strip()] = body.strip()
    return found


def card_summary(*folders: Path | None) -> str:
    """Markdown: the Training data and Results sections of the first MODEL_CARD.md found in ``folders``."""
    for folder in folders:
        path = Path(folder) / MODEL_CARD if folder is not None else None
        if path is not None and path.exists():
            sec = _sections(path.read_text())
            body = "\n\n".join(f"### {t}\n\n{sec[t]}" for t in CARD_SECTIONS if t in sec)
            if len(body) > CARD_CHARS:
                body = body[:CARD_CHARS].rsplit("\n", 1)[0] + f"\n\n... (the rest is in {path})"
            return f"From `{path}`:\n\n{body}" if body else f"`{path}` has no Training data or Results section."
    return "No MODEL_CARD.md beside this model (covidcxr.train and covidcxr.evaluate write one)."
