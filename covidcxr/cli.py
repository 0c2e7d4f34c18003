"""The one command-line runner every entry point goes through.

- a user error (``CovidCXRError``) prints one line, ``error: ...``, and exits 2 (or the error's own
  ``exit_code``: 3 when a training run finished and only its export failed);
- Ctrl-C exits 130 with one line (and the command's own hint, e.g. the real resume command);
- TensorFlow / absl / CUDA / JAX start-up noise is silenced unless ``--verbose``.

Command modules define ``build_parser()`` and ``run(args)`` and end with
``main = cli.entry(build_parser, run)``; they never import each other.
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import sys
import warnings

from covidcxr.errors import EXIT_USAGE, CovidCXRError


class Interrupted(KeyboardInterrupt):
    """Ctrl-C with a message saying how to continue (e.g. ``--resume --run-dir DIR``)."""

    def __init__(self, hint: str):
        super().__init__(hint)
        self.hint = hint


def quiet(verbose: bool, keras_needed: bool = True) -> None:
    """Hide start-up noise of the numeric libraries; must run before they are imported.

    TensorFlow's C++ libraries print a few lines while they load, before any log level is read
    ("All log messages before absl::InitializeLog() ..."), so Keras (and through it the
    backend) is imported here with the process's stderr pointed at /dev/null; everything
    after that is filtered by the usual levels."""
    if verbose:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    for name in ("absl", "jax._src.xla_bridge", "tensorflow", "h5py"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"keras(\.|$)")
    warnings.filterwarnings("ignore", message=r".*(oneDNN|cuda|CUDA|TensorRT|computation placer).*")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    if keras_needed and "keras" not in sys.modules:
        sys.stderr.flush()
        saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 2)
        try:
            import keras  # noqa: F401

            # Keras imports TensorFlow, when installed, on any backend (model saving checks for TF types).
            if importlib.util.find_spec("tensorflow") is not None:
                import tensorflow as tf  # optional: silenced only where it is installed

                if keras.backend.backend() == "tensorflow":
                    tf.config.list_physical_devices()  # driver probing ("failed call to cuInit") happens here
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            os.close(null)


@contextlib.contextmanager
def startup_quiet():
    """Wrap a command module's imports of the numeric libraries (Keras, its backend, keras-hub):
    inside the block the process's stderr points at /dev/null, unless ``--verbose`` is on the command
    line, so TensorFlow's C++ start-up lines never show (``quiet`` for the rest)."""
    if "--verbose" in sys.argv:
        yield
        return
    quiet(False)
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def entry(build_parser, run, keras_needed: bool = True):
    """A ``main(argv=None) -> exit code`` for a command."""
    def main(argv: list[str] | None = None) -> int:
        argv = sys.argv[1:] if argv is None else list(argv)
        parser = build_parser()
        if not any(a.dest == "verbose" for a in parser._actions):
            parser.add_argument("--verbose", action="store_true", help="show library start-up messages and warnings")
        args = parser.parse_args(argv)
        args.argv = argv
        quiet(args.verbose, keras_needed)
        try:
            code = run(args)
        except CovidCXRError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return getattr(exc, "exit_code", EXIT_USAGE)
        except Interrupted as exc:
            print(f"\ninterrupted: {exc.hint}", file=sys.stderr)
            return 130
        except KeyboardInterrupt:
            print("\ninterrupted", file=sys.stderr)
            return 130
        return int(code or 0)

    return main


def explicit(argv: list[str], parser) -> set[str]:
    """The destinations of the options given on the command line (to tell them from defaults)."""
    given = {a.split("=", 1)[0] for a in argv if a.startswith("-")}
    return {act.dest for act in parser._actions if any(o in given for o in act.option_strings)}
