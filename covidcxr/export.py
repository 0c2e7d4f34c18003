"""Export a trained model for serving: ``python -m covidcxr.export RUN_OR_MODEL --out DIR``.

Writes ``DIR/serving/1/`` (TF SavedModel, servable by TF Serving with
``model_base_path=DIR/serving``), ``DIR/model.keras`` and ``DIR/model_card.json``. The
``serving_default`` signature takes ``image_bytes`` (tf.string [batch], PNG/JPEG/BMP/GIF of
any size, 8/16-bit, grayscale or RGB), runs the same preprocessing as training in the graph,
and returns ``probabilities`` and ``label`` (segmenters: ``mask``, ``mask_png``, ``height``,
``width``). The export is reloaded and checked against the Keras model before it is kept.
Runs trained on JAX or PyTorch are exported through a TensorFlow subprocess.

``--format onnx`` (or ``savedmodel,onnx``; extra ``[onnx]``) writes ``DIR/model.onnx`` instead of (or beside)
the SavedModel: the Keras model's contract (uint8-range ``[B, S, S, 1]`` in), checked against Keras in ONNX
Runtime on real files; ``python -m covidcxr.predict --model DIR --engine onnx`` runs it. ``DIR/README.md`` is
the Hugging Face model card; ``--push-to-hub OWNER/NAME`` (extra ``[hub]``) uploads the finished folder to
that model repo (created when missing; token from the usual ``hf auth login``), loadable as
``--model hf://OWNER/NAME``.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from covidcxr import cli
with cli.startup_quiet():  # Keras and its backend load here, their start-up noise hidden
    from covidcxr.errors import DataError
    from covidcxr.exporting import export_run, parse_formats
    from covidcxr.hub import parse as parse_handle, push_folder


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m covidcxr.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="run directory, export directory or .keras file")
    p.add_argument("--out", required=True, help="export directory")
    p.add_argument("--check", action="append", default=[], help="image file to compare Keras and SavedModel on "
                                                                  "(repeatable; default: a few of the run's images)")
    p.add_argument("--format", default="savedmodel", help="savedmodel (default), onnx, or savedmodel,onnx")
    p.add_argument("--push-to-hub", default=None, metavar="OWNER/NAME",
                   help="upload the export folder to this Hugging Face model repo (created when missing)")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    p.add_argument("--overwrite", action="store_true")
    return p


def run(args) -> int:
    for c in args.check:
        if not Path(c).is_file():
            raise DataError(f"--check {c}: no such image file.")
    formats = parse_formats(args.format)
    if args.push_to_hub:
        parse_handle(args.push_to_hub)   # a bad repo name is refused before the export's work
    out = export_run(args.model, args.out, args.overwrite, args.check, formats=formats)
    if out is None:
        return 1
    if args.push_to_hub:
        push_folder(out, args.push_to_hub, private=True if args.private else None)
    return 0


main = cli.entry(build_parser, run)

if __name__ == "__main__":
    raise SystemExit(main())
