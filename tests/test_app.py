"""covidcxr.app: (a) the page's logic as plain functions (a film's result is predict's CSV row, a confusion
cell's filter gives exactly its rows, a bad file gets a message); (b) the real page in a real browser
(Playwright driving Debian's Chromium, no browser download) on a tiny model trained on real films.
The browser tests skip, saying why, without Gradio, Playwright, Chromium or ../shared."""
import importlib.util
import json
import shutil
import socket
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.conftest import random_cxr, shared_path, write_png

CLASSES = ["COVID-19", "Non-COVID", "Normal"]


def predict_row(model, path, out: Path, calibrated=True) -> dict:
    from covidcxr import predict as P

    argv = ["--model", str(model), str(path), "--out", str(out), "--batch-size", "1", "--quiet"]
    assert P.main(argv + (["--calibrated"] if calibrated else [])) == 0
    return pd.read_csv(out, float_precision="round_trip").iloc[0].to_dict()


# ------------------------------------------------------------ (a) plain functions, no browser


@pytest.fixture(scope="module")
def random_model(tmp_path_factory):
    """A random-weight resnet18 classifier at 32 px (model.keras + model_card.json) with a calibration.json
    and an operating_point.json beside it."""
    from covidcxr.artifacts import ModelCard
    from covidcxr.models.classifier import build_classifier
    from covidcxr.models.registry import get_spec

    root = tmp_path_factory.mktemp("appmodel")
    spec = get_spec("resnet18")
    build_classifier(spec, len(CLASSES), 32, None).save(root / "model.keras")
    ModelCard(CLASSES, "resnet18", image_size=32, normalization=spec.normalization).save(root)
    (root / "calibration.json").write_text(json.dumps({"temperature": 1.7}))
    (root / "operating_point.json").write_text(json.dumps({"class": "COVID-19", "threshold": 0.3}))
    return root


def test_film_result_is_predicts_calibrated_row(random_model, tmp_path):
    from covidcxr.app.film import FilmViewer
    from covidcxr.app.present import film_html

    viewer = FilmViewer(random_model)
    assert viewer.temperature == 1.7 and viewer.operating_point["class"] == "COVID-19"
    for i in range(3):
        img = write_png(tmp_path / f"f{i}.png", random_cxr(i, 40 + 7 * i))
        row = predict_row(random_model, img, tmp_path / f"p{i}.csv")
        res = viewer.show(img)
        assert res.ok and res.calibrated and res.label == row["label"]
        assert res.probs == {c: row[f"prob_{c}"] for c in CLASSES}   # exactly, not approximately
        assert res.cam is not None and res.cam.ndim == 3 and "grid over the 32 px input" in res.cam_layer
        assert ("FLAGGED" if res.probs["COVID-19"] >= 0.3 else "not flagged") in res.flag
        page = film_html(res)
        assert f'data-prob="{row["prob_Normal"]!r}"' in page and f'{row["prob_Normal"]:.4f}' in page


def test_bad_files_get_a_message_not_an_exception(random_model, tmp_path):
    from covidcxr.app.film import FilmViewer
    from covidcxr.app.present import films_html

    viewer = FilmViewer(random_model)
    fake = tmp_path / "notes.png"
    fake.write_text("this is not an image\n")
    good = write_png(tmp_path / "good.png", random_cxr(5, 48))
    results = viewer.show_many([fake, tmp_path / "missing.png", good])
    assert [r.ok for r in results] == [False, False, True]
    assert "notes.png: cannot be read as an X-ray" in results[0].error and "not found" in results[1].error
    page = films_html(results)
    assert page.count("film-error") == 2 and "Traceback" not in page


def _eval_folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(40):
        t, p = CLASSES[i % 3], CLASSES[(i * 7 // 3) % 3]
        probs = rng.dirichlet(np.ones(3))
        probs = np.roll(np.sort(probs)[::-1], CLASSES.index(p))  # the predicted class holds the highest
        rows.append({"path": f"/data/{t}/img{i}.png", "true_label": t, "pred_label": p,
                     **{f"prob_{c}": v for c, v in zip(CLASSES, probs)}, "train_overlap": False,
                     "sex": "F" if i % 2 else "M", "site": f"s{i % 4}"})
    root.mkdir(parents=True)
    pd.DataFrame(rows).to_csv(root / "predictions.csv", index=False, float_format="%.17g")
    (root / "metrics.json").write_text(json.dumps({"classes": CLASSES, "n": 40, "split": "test", "accuracy": 0.5,
                                                   "ci95": {"covid_class": "COVID-19", "accuracy": [0.3, 0.6]}}))
    return root


def test_confusion_cell_filters_exactly_its_rows_and_errors_come_first(tmp_path):
    from covidcxr.app.evaltab import ALL, EvalView, Filter

    ev = EvalView(_eval_folder(tmp_path / "ev"))
    df = pd.read_csv(tmp_path / "ev" / "predictions.csv")
    grid = ev.confusion_grid()
    for r, t in enumerate(CLASSES):
        for c, p in enumerate(CLASSES, start=1):
            f = ev.cell_filter(r, c)
            got = ev.filter(f)
            want = df[(df.true_label == t) & (df.pred_label == p)]
            assert (f.true, f.pred) == (t, p) and sorted(got["path"]) == sorted(want["path"])
            assert grid.iloc[r, c] == len(want)
    assert ev.cell_filter(1, 0).pred == ALL and len(ev.filter(ev.cell_filter(1, 0))) == (df.true_label == CLASSES[1]).sum()
    first = ev.filter()
    wrong = ~first["correct"].to_numpy()
    fn = wrong & (first["true_label"] == "COVID-19").to_numpy()
    assert fn[: fn.sum()].all() and wrong[: wrong.sum()].all()     # COVID false negatives, then errors, then right
    f = ev.filter(Filter(outcome="wrong", column="sex", value="F", conf_min=0.5, sort="confidence", ascending=True))
    assert (~f["correct"]).all() and (f["sex"] == "F").all() and (f["confidence"] >= 0.5).all()
    assert list(f["confidence"]) == sorted(f["confidence"]) and ev.metadata == ["sex", "site"]
    assert "COVID-19 false negatives" in ev.summary() and "[0.300, 0.600]" in ev.summary()


def test_the_command_refuses_without_gradio_and_a_bad_eval_folder(random_model, tmp_path, monkeypatch, capsys):
    from covidcxr.app import __main__ as A, ui

    assert A.main(["--model", str(random_model), "--eval", str(tmp_path)]) == 2 if ui.gr else True
    monkeypatch.setattr(ui, "gr", None)
    assert A.main(["--model", str(random_model)]) == 2
    assert "pip install 'covidcxr[app]'" in capsys.readouterr().err


# ------------------------------------------------------------ (b) a real browser


def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        if shutil.which(name):
            return shutil.which(name)
    pytest.skip("no Debian chromium on PATH (apt-get install chromium)")


@pytest.fixture(scope="session")
def live_app(tmp_path_factory):
    """A tiny model trained on real films (COVID-QU-Ex sample), evaluated on its Val split, and the app on it."""
    for mod, why in (("gradio", "pip install 'covidcxr[app]'"), ("playwright", "pip install playwright")):
        if importlib.util.find_spec(mod) is None:
            pytest.skip(f"{mod} missing ({why})")
    chromium = _chromium()
    data = shared_path("covid-qu-ex-sample")
    from covidcxr import evaluate, train
    from covidcxr.app import __main__ as A

    root = tmp_path_factory.mktemp("liveapp")
    assert train.main(["--data", str(data), "--arch", "mobilenetv3small", "--weights", "none", "--epochs", "1",
                       "--fine-tune-epochs", "0", "--image-size", "32", "--batch-size", "16",
                       "--run-dir", str(root / "run"), "--export-dir", "none"]) == 0
    assert evaluate.main(["--model", str(root / "run"), "--data", str(data), "--split", "val", "--out",
                          str(root / "ev"), "--bootstrap", "0", "--gradcam", "0"]) == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = A.build_parser().parse_args(["--model", str(root / "run"), "--eval", str(root / "ev"), "--port", str(port)])
    page, _, ev = A.prepare(args)
    page.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield {"url": f"http://127.0.0.1:{port}", "run": root / "run", "ev": ev, "data": data, "chromium": chromium,
           "tmp": root}
    page.close()


@pytest.fixture(scope="session")
def browser(live_app):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        # the flags keep Chromium from calling out (this machine's network is closed)
        b = pw.chromium.launch(executable_path=live_app["chromium"],
                               args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                                     "--disable-background-networking", "--disable-component-update",
                                     "--disable-sync"])
        yield b
        b.close()


@pytest.fixture
def page(browser, live_app):
    p = browser.new_page()
    p.goto(live_app["url"])
    p.get_by_text("research use only", exact=False).first.wait_for(timeout=30000)
    yield p
    p.close()


def _upload(page, path: Path) -> None:
    page.locator("#film-upload input[type=file]").set_input_files(str(path))


def test_browser_film_equals_predicts_row(page, live_app):
    film = next((live_app["data"] / "Infection Segmentation Data" / "Test" / "COVID-19" / "images").glob("*.png"))
    row = predict_row(live_app["run"], film, live_app["tmp"] / "film.csv")
    _upload(page, film)
    card = page.locator("#film-results .film").first
    card.wait_for(timeout=60000)
    assert page.locator("#film-results .pred-label").inner_text() == row["label"]
    for c in CLASSES:
        bar = page.locator(f'#film-results .prob-row[data-class="{c}"]')
        assert float(bar.get_attribute("data-prob")) == row[f"prob_{c}"]
        assert bar.locator(".prob-value").inner_text() == f"{row[f'prob_{c}']:.4f}"
    assert "calibrated" in card.inner_text() and "Grad-CAM layer" in card.inner_text()
    page.locator("#film-gallery img").first.wait_for(timeout=30000)   # the Grad-CAM figure is on the page
    assert "not a medical device" in page.locator("#banner").inner_text()
    assert "sharing off" in page.locator("#share-note").inner_text()


def test_browser_text_file_named_png_shows_the_error(page, live_app):
    fake = live_app["tmp"] / "report.png"
    fake.write_text("Findings: none. This is a text file.\n")
    _upload(page, fake)
    err = page.locator("#film-results .film-error")
    err.wait_for(timeout=60000)
    assert "cannot be read as an X-ray" in err.inner_text() and "Traceback" not in page.content()


def _cell(live_app) -> tuple[str, str]:
    """COVID-19 true / Normal predicted, else the first non-empty off-diagonal cell of the tiny evaluation."""
    ev = live_app["ev"]
    m = ev.confusion()
    want = (ev.classes.index("COVID-19"), ev.classes.index("Normal"))
    if m[want]:
        return want
    off = [(i, j) for i in range(len(m)) for j in range(len(m)) if i != j and m[i, j]]
    return off[0] if off else (0, 0)


def test_browser_confusion_cell_filters_the_table(page, live_app):
    ev = live_app["ev"]
    r, c = _cell(live_app)
    want = ev.table[(ev.table.true_label == ev.classes[r]) & (ev.table.pred_label == ev.classes[c])]
    assert len(want) > 0
    page.get_by_role("tab", name="Evaluation").click()
    grid = page.locator("#confusion-grid")
    grid.wait_for(timeout=30000)
    grid.locator(f'[data-testid="cell-{r}-{c + 1}"]').click()   # column 0 holds the true class's name
    count = page.locator("#eval-count")
    count.get_by_text(f"{len(want)} of {len(ev.table)} rows").wait_for(timeout=30000)
    cells = page.locator('#eval-table [role="gridcell"][data-col="0"]')   # the file-name column
    names = sorted(cells.nth(i).inner_text().strip() for i in range(cells.count()))
    assert names == sorted(Path(p).name for p in want["path"])
