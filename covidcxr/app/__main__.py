"""A local web viewer for a trained model: ``python -m covidcxr.app --model M [--eval EVAL_DIR] [--port 7860]``.

Film tab: drop PNG/JPEG/DICOM films; each gets the predicted class and the probabilities as bars (exactly
predict's numbers: the same Predictor, and the temperature of a calibration.json beside the model, as
``predict --calibrated`` finds it), the operating-point flag when an operating_point.json is there, the
Grad-CAM figure with its colour bar and the layer in words, and the mask overlay (segmenters, multi-task
models, classifiers that crop with a lung segmenter). Evaluation tab (``--eval``, the output folder of
``covidcxr.evaluate``): the summary figures and the confusion matrix (click a cell to filter), and
predictions.csv, errors first, to sort and filter; click a row to see its film, Grad-CAM and mask.

It listens on 127.0.0.1 only, unless ``--host`` says otherwise; ``--share`` (a public gradio.live link) is
off unless given, and the page says when it is on. Needs the optional extra: pip install 'covidcxr[app]'.
Research use only; not a medical device.
"""
from __future__ import annotations

import argparse

from covidcxr import cli

with cli.startup_quiet():  # Keras and its backend load here, their start-up noise hidden
    from covidcxr.app import ui
    from covidcxr.app.evaltab import EvalView
    from covidcxr.app.film import FilmViewer
    from covidcxr.errors import ConfigError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m covidcxr.app", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="run folder, export folder or .keras file (Grad-CAM needs Keras)")
    p.add_argument("--eval", default=None, metavar="EVAL_DIR", help="an output folder of python -m covidcxr.evaluate")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--share", action="store_true", help="also make a public gradio.live link (off by default)")
    return p


def prepare(args):
    """(page, viewer, evaluation) without launching: the checks, the model loaded once."""
    ui.need_gradio()
    if not 0 < args.port < 65536:
        raise ConfigError(f"--port {args.port}: expected 1..65535.")
    viewer = FilmViewer(args.model)
    ev = EvalView(args.eval) if args.eval else None
    if ev is not None and ev.classes != viewer.classes:
        print(f"note: the evaluation's classes {ev.classes} are not the model's {viewer.classes}; rows are shown "
              f"as evaluated, films are scored by --model.")
    return ui.build(viewer, ev, args.share, args.host, args.port), viewer, ev


def run(args) -> int:
    page, viewer, _ = prepare(args)
    print(f"model {args.model}: {viewer.task.name}, classes {', '.join(viewer.classes)}"
          + (f"; calibrated with {viewer.calibration}" if viewer.calibration else ""))
    print(f"warmed up in {viewer.warm_up():.1f} s (model and Grad-CAM compiled)")
    print("research use only; not a medical device" + ("; sharing ON (public link)" if args.share else ""))
    page.launch(server_name=args.host, server_port=args.port, share=args.share, show_error=False)
    return 0


main = cli.entry(build_parser, run)

if __name__ == "__main__":
    raise SystemExit(main())
