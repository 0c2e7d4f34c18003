"""Grad-CAM for the registry's classifiers on any Keras backend (tensorflow, jax, torch).

Transfer-learning models nest the backbone as one layer, so the textbook
``keras.Model(model.inputs, model.get_layer(conv).output)`` fails with "graph
disconnected". Here the model's own graph is replayed instead (Keras'
``_run_through_graph``), descending into the nested sub-models that hold the
target layer, with every layer in inference mode. The target layer's output gets
a zero perturbation ``delta`` added: the gradient of the class score with
respect to ``delta`` at 0 *is* the gradient with respect to the activations, and
``delta`` is an ordinary function argument, so ``tf.GradientTape``, ``jax.grad``
and torch autograd all compute it the same way. The final softmax Dense is
applied as logits (kernel and bias, float32). ViT-style token outputs
``[B, N, D]`` (class token first) are laid on their patch grid.

A normalised map always looks like *something*; ``explain`` also says when the
raw map is flat (see ``FLAT_PEAK`` and ``FLAT_RANGE``), so a report can say
"no localisation" instead of showing a meaningless colour field.

One forward/backward pass per batch. From the second call on it is compiled (``tf.function`` on
TensorFlow, ``jax.jit`` on JAX, eager on PyTorch; ``compile=True`` from the first call, ``False``
never): the first compiled batch of a given shape traces and compiles (seconds), later ones are 10-30x
faster than the eager replay, so keep one ``GradCAM`` and feed it batches of one size.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
import keras
import numpy as np
from keras import ops
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize

from covidcxr.errors import CovidCXRError
from covidcxr.models.registry import get_spec
from covidcxr.plots import titled_figure, wrap_text

FLAT_PEAK = 1e-8   # raw map peak at or below this: no positive evidence at all
FLAT_RANGE = 0.05  # (max - min) / max below this: evidence spread evenly over the grid
FLAT_NOTE = "flat map: the model's evidence is spread evenly; this map shows no localisation"
EMPTY_NOTE = "flat map: nothing at this layer raises the score of this class; this map shows no localisation"
_TOKEN_EXTRAS = (0, 1, 2, 4, 5, 8)  # class / register / distillation tokens that lead a ViT sequence


class GradCAMError(CovidCXRError):
    pass


def _rank(layer) -> int:
    try:
        return len(layer.output.shape)
    except (AttributeError, ValueError, TypeError):
        return 0


def _graph(model):
    """The Functional graph of a Functional model or of a built Sequential; None otherwise."""
    if hasattr(model, "_run_through_graph"):
        return model
    return getattr(model, "_functional", None)


def _find_backbone(model):
    names = [layer.name for layer in model.layers]
    if "backbone" in names:
        return model.get_layer("backbone")
    subs = [layer for layer in model.layers if isinstance(layer, keras.Model) and _rank(layer) in (3, 4)]
    return subs[-1] if subs else None


def _contains(model, op) -> bool:
    """Whether ``op`` is a layer of ``model`` or of a sub-model nested in it, at any depth."""
    return any(layer is op or (isinstance(layer, keras.Model) and _contains(layer, op))
               for layer in getattr(model, "layers", []))


def candidate_layers(model, n: int = 8) -> list[str]:
    """Names of the last layers with spatial (or token) outputs, for error messages and --gradcam-layer."""
    bb = _find_backbone(model) or model
    names = [layer.name for layer in bb.layers
             if _rank(layer) in (3, 4) and not isinstance(layer, keras.layers.InputLayer)]
    return names[-n:]


def _token_layout(n: int) -> tuple[int, int]:
    """(leading extra tokens, side of the square patch grid) for a sequence of ``n`` tokens."""
    for extra in _TOKEN_EXTRAS:
        side = math.isqrt(max(n - extra, 0))
        if side > 0 and side * side == n - extra:
            return extra, side
    raise GradCAMError(f"cannot lay {n} tokens on a square patch grid")


def _tokens_to_grid(t: np.ndarray) -> np.ndarray:
    extra, side = _token_layout(t.shape[1])
    return t[:, extra:].reshape(t.shape[0], side, side, t.shape[2])


@dataclass(frozen=True)
class CAMResult:
    """What ``GradCAM.explain`` found for a batch: one entry per image.

    ``heatmaps`` [B, h, w] float32 in [0, 1] (the ReLU'd map divided by its peak; all
    zeros when the peak is 0); ``probabilities`` [B, K]; ``class_index`` [B] the class
    explained; ``raw_peak`` [B] the unnormalised map's maximum; ``flat`` [B] bool: the
    raw map has peak <= FLAT_PEAK or (max - min) / max < FLAT_RANGE, i.e. it shows no
    localisation however the normalised map is coloured (a 1 x 1 grid is always flat)."""

    heatmaps: np.ndarray
    probabilities: np.ndarray
    class_index: np.ndarray
    raw_peak: np.ndarray
    flat: np.ndarray

    def note(self, i: int) -> str | None:
        """The caption warning for image ``i`` (for ``render_cam(note=...)``), None when not flat."""
        if not self.flat[i]:
            return None
        return EMPTY_NOTE if self.raw_peak[i] <= FLAT_PEAK else FLAT_NOTE


def _value_and_grad(f, delta):
    """(d f(delta)[0] / d delta, f(delta)[1]) with the current backend's autodiff."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf  # optional under JAX/PyTorch: only where TensorFlow runs

        with tf.GradientTape() as tape:
            tape.watch(delta)
            score, aux = f(delta)
        return tape.gradient(score, delta), aux
    if backend == "jax":
        import jax  # only on the JAX backend

        (_, aux), grad = jax.value_and_grad(f, has_aux=True)(delta)
        return grad, aux
    if backend == "torch":
        import torch  # only on the PyTorch backend

        delta.requires_grad_(True)
        score, aux = f(delta)
        (grad,) = torch.autograd.grad(score, delta, allow_unused=True)
        return grad, aux
    raise GradCAMError(f"Grad-CAM supports the tensorflow, jax and torch backends, not '{backend}'.")


def _compile(fn):
    """``fn`` traced and compiled by the current backend (TensorFlow, JAX); PyTorch runs it eagerly."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf  # optional under JAX/PyTorch: only where TensorFlow runs

        return tf.function(fn)  # one trace per batch shape
    if backend == "jax":
        import jax  # only on the JAX backend

        return jax.jit(fn)
    return fn


class GradCAM:
    """``GradCAM(model, layer=None).explain(x) / .heatmaps(x)``: class activation maps for a batch.

    ``model`` ends in a Dense classification layer; ``layer``: a layer name inside the
    backbone (or the model, when not nested); default: the backbone's output (its last
    feature block). Inputs ``x`` are what the model takes (uint8-range gray [B, S, S, 1])."""

    def __init__(self, model, layer: str | None = None, compile: bool | None = None):
        self.model, self.compile, self._compiled, self._calls = model, compile, None, 0
        self.dense = model.layers[-1]
        if not isinstance(self.dense, keras.layers.Dense) or _graph(model) is None:
            raise GradCAMError(f"Grad-CAM needs a built model ending in a Dense classification layer; "
                               f"{model.name} ends in {type(self.dense).__name__} '{self.dense.name}'.")
        self.backbone = _find_backbone(model)
        self._default = self._default_target()
        self.target = self._default if layer is None else self._named_target(layer)
        if _rank(self.target) not in (3, 4):
            raise GradCAMError(f"Grad-CAM layer '{self.target.name}' has output shape {self.target.output.shape}; "
                               f"it needs a feature map [B, H, W, C] or tokens [B, N, D]. Candidates: "
                               f"{', '.join(candidate_layers(model))}")
        self.act_shape = tuple(self.target.output.shape[1:])
        if None in self.act_shape:
            raise GradCAMError(f"Grad-CAM layer '{self.target.name}' has no fixed output shape "
                               f"{self.target.output.shape}; build the model for a fixed image size.")
        self.layer_name = self.target.name
        self._nested = [m for m in self._submodels(model) if _contains(m, self.target) or _contains(m, self.dense)]

    def _default_target(self):
        if self.backbone is not None and _graph(self.backbone) is not None:
            return _graph(self.backbone).outputs[0]._keras_history.operation
        for layer in reversed(self.model.layers):
            if _rank(layer) == 4 and not isinstance(layer, keras.layers.InputLayer):
                return layer
        raise GradCAMError(f"no layer with a spatial output in {self.model.name}; pass a layer name.")

    def _named_target(self, name: str):
        for scope in (self.backbone, self.model):
            if scope is not None and name in {layer.name for layer in scope.layers}:
                return scope.get_layer(name)
        where = self.backbone.name if self.backbone is not None else self.model.name
        raise GradCAMError(f"Grad-CAM layer '{name}' not found in {where}; last candidates: "
                           f"{', '.join(candidate_layers(self.model))}")

    @staticmethod
    def _submodels(model):
        for layer in model.layers:
            if isinstance(layer, keras.Model) and _graph(layer) is not None:
                yield layer
                yield from GradCAM._submodels(layer)

    def _forward(self, x, delta):
        """(target activations + delta in float32, logits [B, K] float32), all in inference mode.
        Replays the model's graph, descending into the nested sub-models on the way to the target
        and the head; a layer called more than once is perturbed at its first call."""
        seen = {}

        def wrap(op):
            def call(*args, **kwargs):
                if "training" in getattr(op, "_call_context_args", ()):
                    kwargs["training"] = False
                if op is self.target and "acts" not in seen:
                    seen["acts"] = ops.cast(op(*args, **kwargs), "float32") + delta
                    return seen["acts"]
                if op is self.dense:
                    return self._logits(args[0])
                if any(op is m for m in self._nested):
                    return _graph(op)._run_through_graph(args[0], operation_fn=wrap)
                return op(*args, **kwargs)
            return call

        logits = _graph(self.model)._run_through_graph(x, operation_fn=wrap)
        if "acts" not in seen:
            raise GradCAMError(f"Grad-CAM layer '{self.layer_name}' is not on the path to {self.model.name}'s output.")
        return seen["acts"], logits

    def _logits(self, h):
        logits = ops.matmul(ops.cast(h, "float32"), ops.cast(self.dense.kernel, "float32"))
        return logits + ops.cast(self.dense.bias, "float32") if self.dense.use_bias else logits

    def _class_indices(self, class_index, batch: int) -> np.ndarray | None:
        if class_index is None:
            return None
        k = self.dense.units
        idx = np.broadcast_to(np.asarray(class_index, np.int64), (batch,))
        if idx.min() < 0 or idx.max() >= k:
            raise GradCAMError(f"class_index {class_index} out of range for {k} classes.")
        return idx

    def _pass(self, x, wanted):
        """(d score / d activations, activations, logits) of one forward/backward pass; ``wanted`` [B] int32:
        the class explained per image, -1 for the predicted one."""
        def score(delta):
            acts, logits = self._forward(x, delta)
            predicted = ops.cast(ops.argmax(logits, axis=-1), "int32")
            onehot = ops.stop_gradient(ops.one_hot(ops.where(wanted >= 0, wanted, predicted), self.dense.units))
            return ops.sum(logits * onehot), (acts, logits)

        delta = ops.zeros((int(x.shape[0]),) + self.act_shape, "float32")
        grads, (acts, logits) = _value_and_grad(score, delta)
        return grads, acts, logits

    def _compiled_pass(self):
        """``_pass`` compiled once per batch shape (tf.function / jax.jit; eager on PyTorch): an eager
        replay of a 200-layer backbone spends most of its time dispatching ops. ``compile``: True from
        the first call, False never, None (default) from the second call on, so a single map costs no
        compilation."""
        self._calls += 1
        if self.compile is False or (self.compile is None and self._calls == 1):
            return self._pass
        if self._compiled is None:
            self._compiled = _compile(self._pass)
        return self._compiled

    def explain(self, x, class_index=None) -> CAMResult:
        """Grad-CAM of ``class_index`` (int, one per image, or None: the predicted class) for a batch,
        in one forward/backward pass, with the flatness verdict per image."""
        x = ops.convert_to_tensor(x, "float32")
        batch = int(x.shape[0])
        fixed = self._class_indices(class_index, batch)
        wanted = np.full(batch, -1, np.int32) if fixed is None else fixed.astype(np.int32)
        grads, acts, logits = self._compiled_pass()(x, ops.convert_to_tensor(wanted))
        a = ops.convert_to_numpy(acts)
        g = np.zeros_like(a) if grads is None else ops.convert_to_numpy(grads)
        if a.ndim == 3:
            a, g = _tokens_to_grid(a), _tokens_to_grid(g)
        cam = np.maximum((g.mean(axis=(1, 2), keepdims=True) * a).sum(axis=-1), 0.0)
        peak, low = cam.max(axis=(1, 2)), cam.min(axis=(1, 2))
        flat = (peak <= FLAT_PEAK) | ((peak - low) < FLAT_RANGE * peak)
        scale = np.where(peak > FLAT_PEAK, peak, np.inf)[:, None, None]
        logits = ops.convert_to_numpy(logits)
        probs = ops.convert_to_numpy(ops.softmax(logits, axis=-1))
        idx = logits.argmax(axis=-1) if fixed is None else fixed
        return CAMResult((cam / scale).astype(np.float32), probs, idx, peak.astype(np.float32), flat)

    def heatmaps(self, x, class_index=None) -> tuple[np.ndarray, np.ndarray]:
        """(heatmaps [B, h, w] in [0, 1], probabilities [B, K]): ``explain`` without the verdicts."""
        result = self.explain(x, class_index)
        return result.heatmaps, result.probabilities

    @property
    def grid(self) -> tuple[int, int]:
        """(rows, columns) of the map: the target's spatial grid, or its patch grid for tokens."""
        if len(self.act_shape) == 2:
            side = _token_layout(self.act_shape[0])[1]
            return side, side
        return self.act_shape[0], self.act_shape[1]

    def describe(self, image_size: int | None = None) -> str:
        """Plain words for the map's layer and resolution, e.g. "the last feature block of the
        EfficientNetB0 backbone (layer 'top_activation'): a 7 x 7 grid over the 224 px input,
        each cell about 32 x 32 px". ``image_size``: default the model's input size."""
        size = int(image_size or self.model.inputs[0].shape[1])
        rows, cols = self.grid
        which = "the last feature block" if self.target is self._default else "an inner layer"
        kind = "patch grid" if len(self.act_shape) == 2 else "grid"
        return (f"{which} of the {self._backbone_title()} (layer '{self.layer_name}'): a {rows} x {cols} {kind} "
                f"over the {size} px input, each cell about {size / rows:.0f} x {size / cols:.0f} px")

    def _backbone_title(self) -> str:
        """'EfficientNetB0 backbone' / 'ViT (vit_b16) backbone': build_classifier names the model
        '<arch>_classifier' and its sub-model 'backbone', so the registry knows the architecture;
        otherwise the backbone's class or model name."""
        if self.backbone is None:
            return f"{self.model.name} model"
        try:
            spec = get_spec(self.model.name.removesuffix("_classifier"))
        except CovidCXRError:
            spec = None
        if spec is not None and spec.source == "keras.applications":
            return f"{spec.constructor} backbone"
        cls = type(self.backbone).__name__
        name = cls.removesuffix("Backbone") if cls not in ("Functional", "Sequential") else self.backbone.name
        name = f"{name} ({spec.name})" if spec is not None else name
        return "backbone" if name == "backbone" else f"{name} backbone"


def overlay(gray01: np.ndarray, cam: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """Grayscale image [H, W] in [0, 1] + heatmap [h, w] in [0, 1] -> RGB uint8 [H, W, 3] (jet)."""
    h, w = gray01.shape[:2]
    cam_img = Image.fromarray((np.clip(cam, 0, 1) * 255).astype(np.uint8)).resize((w, h), Image.BILINEAR)
    heat = colormaps["jet"](np.asarray(cam_img, np.float32) / 255.0)[..., :3]
    base = np.repeat(np.clip(gray01, 0, 1)[..., None], 3, axis=-1)
    return (np.clip((1 - alpha) * base + alpha * heat, 0, 1) * 255 + 0.5).astype(np.uint8)


def render_cam(gray01: np.ndarray, cam: np.ndarray, out_path: str | Path, title_lines: list[str],
               note: str | None = None, alpha: float = 0.4) -> Path:
    """One Grad-CAM figure: the X-ray with the map overlaid (jet), a colour bar "relative
    importance (0-1)", the wrapped ``title_lines`` above (e.g. true / predicted class, file
    name) and ``note`` (e.g. ``CAMResult.note(i)``) boxed below, so a flat map is labelled as such."""
    width = 5.0
    note_text = wrap_text(note, width - 0.5, 9) if note else ""
    fig = titled_figure(width, 4.4 + (0.18 * (note_text.count("\n") + 2) if note else 0), "\n".join(title_lines), 9)
    ax = fig.add_subplot()
    ax.imshow(overlay(np.asarray(gray01, np.float32), cam, alpha))
    ax.set_axis_off()
    bar = fig.colorbar(ScalarMappable(Normalize(0, 1), cmap="jet"), ax=ax, fraction=0.046, pad=0.03)
    bar.set_label("relative importance (0-1)")
    if note_text:
        fig.supxlabel(note_text, fontsize=9, color="darkred",
                      bbox=dict(boxstyle="round", facecolor="lightyellow", edgecolor="darkred"))
    fig.savefig(out_path, dpi="figure")
    return Path(out_path)
