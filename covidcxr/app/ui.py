"""The Gradio page: a thin layout over ``film``, ``evaltab`` and ``present`` (all logic is there, tested
without a browser). Gradio is the optional extra ``[app]``: without it ``build`` refuses with the install
line (the command turns that into one ``error:`` line)."""
from covidcxr.app import present
from covidcxr.app.evaltab import ALL, ERRORS_FIRST, Filter
from covidcxr.errors import ConfigError

try:  # optional extra [app]: the command refuses cleanly when it is missing (need_gradio)
    import gradio as gr
except ImportError:  # pragma: no cover - exercised where the extra is not installed
    gr = None

FILE_TYPES = [".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".bmp", ".tif", ".tiff"]


def need_gradio():
    if gr is None:
        raise ConfigError("the app needs Gradio: pip install 'covidcxr[app]'")
    return gr


def film_outputs(viewer, paths):
    """(films HTML, gallery) for uploaded files (Gradio gives their paths)."""
    paths = [getattr(p, "name", p) for p in (paths or [])]
    results = viewer.show_many(paths)
    return present.films_html(results), present.gallery(results)


def _film_tab(viewer) -> None:
    files = gr.File(label="X-ray films (PNG, JPEG, DICOM)", file_count="multiple", file_types=FILE_TYPES,
                    elem_id="film-upload")
    with gr.Row():
        result = gr.HTML(present.films_html([]), elem_id="film-results")
        pictures = gr.Gallery(label="Grad-CAM and mask overlays", columns=2, height="auto", elem_id="film-gallery")
    files.change(lambda p: film_outputs(viewer, p), files, [result, pictures])


def _filter_of(ev, values) -> Filter:
    true, pred, outcome, lo, hi, col, val, sort, asc = values
    return Filter(true or ALL, pred or ALL, outcome or ALL, float(lo), float(hi), col if col != ALL else "",
                  val or "", sort or ERRORS_FIRST, bool(asc))


def table_outputs(ev, *values):
    rows = ev.filter(_filter_of(ev, values))
    return ev.shown(rows), list(rows["path"]), f"{len(rows)} of {len(ev.table)} rows"


def row_outputs(viewer, paths, evt):
    """Film, gallery and text of a clicked row of the table."""
    row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
    if row is None or not 0 <= row < len(paths):
        return None, [], ""
    res = viewer.show(paths[row])
    return res.film, present.gallery([res]), present.film_html(res)


def _eval_tab(viewer, ev) -> None:
    gr.Markdown(ev.summary(), elem_id="eval-summary")
    with gr.Row():
        grid = gr.Dataframe(ev.confusion_grid(), label="Confusion matrix (rows: true, columns: predicted); click a "
                            "cell to filter the table", interactive=False, elem_id="confusion-grid")
        if ev.confusion_png is not None:
            gr.Image(str(ev.confusion_png), label="confusion_matrix.png", height=260)
    with gr.Row():
        true = gr.Dropdown([ALL] + ev.classes, value=ALL, label="true class", elem_id="f-true")
        pred = gr.Dropdown([ALL] + ev.classes, value=ALL, label="predicted class", elem_id="f-pred")
        outcome = gr.Radio([ALL, "correct", "wrong"], value=ALL, label="outcome", elem_id="f-outcome")
        lo = gr.Slider(0, 1, 0, step=0.01, label="confidence at least")
        hi = gr.Slider(0, 1, 1, step=0.01, label="confidence at most")
    with gr.Row():
        col = gr.Dropdown([ALL] + ev.metadata, value=ALL, label="metadata column")
        val = gr.Textbox(label="equals", placeholder="value as in predictions.csv")
        sort = gr.Dropdown([ERRORS_FIRST] + list(ev.shown(ev.table).columns[1:]), value=ERRORS_FIRST, label="sort by")
        asc = gr.Checkbox(False, label="ascending")
    count = gr.Markdown(f"{len(ev.table)} of {len(ev.table)} rows", elem_id="eval-count")
    first, paths0, _ = table_outputs(ev, ALL, ALL, ALL, 0, 1, ALL, "", ERRORS_FIRST, False)
    table = gr.Dataframe(first, interactive=False, wrap=True, elem_id="eval-table")
    paths = gr.State(paths0)
    with gr.Row():
        film = gr.Image(label="film", elem_id="eval-film")
        pictures = gr.Gallery(label="Grad-CAM and mask overlay", columns=2, height="auto")
    text = gr.HTML()
    controls = [true, pred, outcome, lo, hi, col, val, sort, asc]
    for c in controls:
        c.change(lambda *v: table_outputs(ev, *v), controls, [table, paths, count])

    def on_cell(evt: gr.SelectData):
        f = ev.cell_filter(*evt.index)
        return f.true, f.pred, ALL
    grid.select(on_cell, None, [true, pred, outcome])

    def on_row(p, evt: gr.SelectData):
        return row_outputs(viewer, p, evt)
    table.select(on_row, paths, [film, pictures, text])


def build(viewer, ev=None, share: bool = False, host: str = "127.0.0.1", port: int = 7860):
    """The whole page (a ``gr.Blocks``), not yet launched."""
    need_gradio()
    with gr.Blocks(title="covidcxr viewer") as page:
        gr.Markdown(present.BANNER, elem_id="banner")
        gr.Markdown(present.share_note(share, host, port), elem_id="share-note")
        with gr.Tab("Film"):
            _film_tab(viewer)
        if ev is not None:
            with gr.Tab("Evaluation"):
                _eval_tab(viewer, ev)
        with gr.Accordion("Model card summary", open=False):
            gr.Markdown(present.card_summary(*_card_folders(viewer, ev)))
    return page


def _card_folders(viewer, ev):
    return [viewer.pred.located.root] + ([ev.folder] if ev is not None else [])
