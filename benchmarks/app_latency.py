"""App response for one 299 px film with a classifier at 224 px: upload to rendered result with Grad-CAM.

    PYTHONPATH=. python benchmarks/app_latency.py [--arch efficientnetb0] [--repeats 5] [--browser]

The model (random weights: the latency does not depend on them) is built, saved and loaded once, then
timed after one warm-up call: (1) the app's handler (``ui.film_outputs``: decode, predict, calibration,
Grad-CAM figure, HTML), and with ``--browser`` (2) the real page in Debian's Chromium through Playwright,
from ``set_input_files`` on the upload to the Grad-CAM image shown in the gallery (upload, queue, handler,
transfer, render). The film is a real 299 px COVID-19 Radiography Database file from ../shared/data/cxr-sample
when present, else a synthetic one.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# offline: no GPU, no QUIC, no first-run, update, sync or background fetches (as in tests/test_app.py)
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
sys.path.insert(0, str(REPO))


def _model(folder: Path, arch: str) -> Path:
    from covidcxr.artifacts import ModelCard
    from covidcxr.models.classifier import build_classifier
    from covidcxr.models.registry import get_spec

    spec = get_spec(arch)
    build_classifier(spec, 4, 224, None).save(folder / "model.keras")
    ModelCard(["COVID", "Lung_Opacity", "Normal", "Viral Pneumonia"], arch, image_size=224,
              normalization=spec.normalization).save(folder)
    (folder / "calibration.json").write_text(json.dumps({"temperature": 1.3}))
    return folder


def _film(tmp: Path) -> Path:
    found = sorted((REPO.parent / "shared" / "data" / "cxr-sample" / "COVID" / "images").glob("*.png"))
    if found:
        return found[0]
    import numpy as np
    from PIL import Image

    path = tmp / "film.png"
    Image.fromarray((np.random.default_rng(0).random((299, 299)) * 255).astype("uint8")).save(path)
    return path


def _browser(page_app, film: Path, repeats: int) -> list[float]:
    from playwright.sync_api import sync_playwright

    page_app.launch(server_name="127.0.0.1", server_port=7931, prevent_thread_lock=True, quiet=True)
    times = []
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=shutil.which("chromium"), args=CHROMIUM_ARGS)
        for i in range(repeats + 1):
            p = b.new_page()
            p.goto("http://127.0.0.1:7931")
            p.locator("#film-upload input[type=file]").wait_for(state="attached", timeout=30000)
            t0 = time.perf_counter()
            p.locator("#film-upload input[type=file]").set_input_files(str(film))
            p.locator("#film-gallery img").first.wait_for(timeout=60000)
            p.locator("#film-results .pred-label").wait_for(timeout=60000)
            if i:  # the first is the warm-up
                times.append(time.perf_counter() - t0)
            p.close()
        b.close()
    page_app.close()
    return times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="efficientnetb0")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--browser", action="store_true")
    a = ap.parse_args()
    from covidcxr.app import ui
    from covidcxr.app.film import FilmViewer

    tmp = Path(tempfile.mkdtemp(prefix="app-bench-"))
    t0 = time.perf_counter()
    viewer = FilmViewer(_model(tmp, a.arch))
    load = time.perf_counter() - t0
    film = _film(tmp)
    html, gallery = ui.film_outputs(viewer, [str(film)])   # warm-up (first compiled call, Grad-CAM trace)
    assert "pred-label" in html and gallery, html
    times = []
    for _ in range(a.repeats):
        t = time.perf_counter()
        ui.film_outputs(viewer, [str(film)])
        times.append(time.perf_counter() - t)
    out = {"arch": a.arch, "film": str(film), "model_build_and_load_s": round(load, 2),
           "handler_s": {"median": round(statistics.median(times), 3), "max": round(max(times), 3),
                         "all": [round(x, 3) for x in times]}}
    if a.browser:
        bt = _browser(ui.build(viewer), film, a.repeats)
        out["browser_s"] = {"median": round(statistics.median(bt), 3), "max": round(max(bt), 3),
                            "all": [round(x, 3) for x in bt]}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
