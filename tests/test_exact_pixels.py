"""Serving equals training, to the pixel: the host decoder (NumPy/Pillow) and the SavedModel's graph
(TensorFlow) give identical uint8 pixels on every real file of ../shared/data, images and masks,
and on generated images of random sizes, bit depths and modes."""
import io

import numpy as np
import pytest
from PIL import Image

from covidcxr.data import preprocess as P
from covidcxr.data.imageio import read_image, read_mask
from tests.conftest import SHARED

tf = pytest.importorskip("tensorflow")
from covidcxr.data import tfgraph as G  # noqa: E402

ALWAYS = [(64, m) for m in P.CONTRAST_METHODS] + [(224, m) for m in P.CONTRAST_METHODS]
ROTATING = [(s, m) for s in (32, 128, 256, 299, 384, 448, 512, 518) for m in P.CONTRAST_METHODS]
MASK_SIZES = (64, 224, 256)
BATCH = 32


def _configs(i: int) -> list[tuple[int, str]]:
    """Every file: both sizes above at every contrast, plus one more (size, contrast) in turn."""
    return ALWAYS + [ROTATING[i % len(ROTATING)]]


@tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
def _graph_always(data):
    return {f"{s}-{m}": tf.map_fn(lambda b, s=s, m=m: G.prepare_bytes(b, s, m), data,
                                  fn_output_signature=tf.TensorSpec([s, s, 1], tf.uint8)) for s, m in ALWAYS}


_ROTATING_FNS = {c: tf.function(lambda b, c=c: G.prepare_bytes(b, *c), input_signature=[tf.TensorSpec([], tf.string)])
                 for c in ROTATING}


@tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
def _graph_masks(data):
    return {s: tf.map_fn(lambda b, s=s: tf.cast(G.resize_mask(G.decode_mask(b), s), tf.uint8), data,
                         fn_output_signature=tf.TensorSpec([s, s, 1], tf.uint8)) for s in MASK_SIZES}


def _real_files(kind: str) -> list:
    if not SHARED.exists():
        pytest.skip("../shared/data not present (runs in CI)")
    files = sorted(p for p in SHARED.rglob("*.png"))
    is_mask = lambda p: "mask" in p.parent.name.lower()  # noqa: E731  masks/, lung masks/, infection masks/
    picked = [p for p in files if is_mask(p) == (kind == "masks")]
    assert picked, f"no {kind} under {SHARED}"
    return picked


def _mismatch(where, host, graph) -> str:
    return f"{where}: {int((host != graph).sum())} pixels differ (max {int(np.abs(host.astype(int) - graph).max())})"


def test_every_real_image_gives_identical_pixels_on_both_paths():
    files = _real_files("images")
    bad = []
    for start in range(0, len(files), BATCH):
        chunk = files[start:start + BATCH]
        data = [p.read_bytes() for p in chunk]
        graph = {k: v.numpy()[..., 0] for k, v in _graph_always(tf.constant(data)).items()}
        for i, (path, raw) in enumerate(zip(chunk, data)):
            gray = read_image(path)
            assert np.array_equal(gray, G.decode_bytes(tf.constant(raw)).numpy()[..., 0]), path
            for size, method in _configs(start + i):
                host = P.prepare(gray, size, method)
                key = f"{size}-{method}"
                g = graph[key][i] if key in graph else _ROTATING_FNS[size, method](tf.constant(raw)).numpy()[..., 0]
                if not np.array_equal(host, g):
                    bad.append(_mismatch(f"{path} at {size} px, {method}", host, g))
    assert not bad, f"{len(bad)} mismatches, e.g. " + "; ".join(bad[:5])
    assert len(files) >= 1000  # all three folders


def test_every_real_mask_gives_identical_pixels_on_both_paths():
    files = _real_files("masks")
    bad = []
    for start in range(0, len(files), BATCH):
        chunk = files[start:start + BATCH]
        graph = {k: v.numpy()[..., 0] for k, v in _graph_masks(tf.constant([p.read_bytes() for p in chunk])).items()}
        for i, path in enumerate(chunk):
            native = read_mask(path)
            assert set(np.unique(native)) <= {0, 1}
            for size in MASK_SIZES:
                host = P.resize_mask(native, size)
                if not np.array_equal(host, graph[size][i]):
                    bad.append(_mismatch(f"{path} at {size} px", host, graph[size][i]))
    assert not bad, f"{len(bad)} mismatches, e.g. " + "; ".join(bad[:5])


# ----------------------------------------------------------------------------- generated images

def _random_image(rng) -> tuple[bytes, str]:
    """PNG/JPEG bytes of a random size (17..1500 px, odd and even), bit depth and mode."""
    h, w = (int(v) for v in rng.integers(17, 1501, 2))
    kind = rng.choice(["L", "LA", "RGB", "RGBA", "P", "1", "I;16", "JPEG-L", "JPEG-RGB"])
    base = rng.integers(0, 256, (h // 8 + 2, w // 8 + 2)).astype(np.uint8)
    smooth = np.asarray(Image.fromarray(base).resize((w, h), Image.BICUBIC))     # film-like structure
    noise = rng.integers(-6, 7, (h, w))
    g8 = np.clip(smooth.astype(int) + noise, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    if kind == "I;16":
        bits = int(rng.integers(9, 17))
        v = (g8.astype(np.int64) << (bits - 8)) + rng.integers(0, 1 << (bits - 8), (h, w))
        Image.fromarray(v.astype(np.uint16)).save(buf, format="PNG")
        kind = f"16-bit ({bits} used)"
    elif kind.startswith("JPEG"):
        arr = g8 if kind == "JPEG-L" else np.dstack([g8, np.roll(g8, 2, 0), np.roll(g8, 3, 1)])
        Image.fromarray(arr).save(buf, format="JPEG", quality=int(rng.integers(60, 98)))
    else:
        rgb = np.dstack([g8, np.roll(g8, 5, 1), np.roll(g8, 7, 0)])
        img = {"L": lambda: Image.fromarray(g8), "LA": lambda: Image.fromarray(np.dstack([g8, g8[::-1]]), "LA"),
               "RGB": lambda: Image.fromarray(rgb), "RGBA": lambda: Image.fromarray(np.dstack([rgb, np.roll(g8, 11, 1)])),
               "P": lambda: Image.fromarray(rgb).convert("P"), "1": lambda: Image.fromarray(g8 > 128)}[kind]()
        img.save(buf, format="PNG")
    return buf.getvalue(), f"{kind} {h}x{w}"


def test_random_images_of_every_mode_give_identical_pixels(tmp_path):
    rng = np.random.default_rng(20261203)
    sizes = (32, 64, 128, 224, 256, 299, 384, 448, 512, 518)
    for case in range(30):
        raw, what = _random_image(rng)
        path = tmp_path / f"case{case}.img"
        path.write_bytes(raw)
        gray = read_image(path)
        assert np.array_equal(gray, G.decode_bytes(tf.constant(raw)).numpy()[..., 0]), what
        size, method = int(rng.choice(sizes)), str(rng.choice(P.CONTRAST_METHODS))
        host = P.prepare(gray, size, method)
        graph = G.prepare_bytes(tf.constant(raw), size, method).numpy()[..., 0]
        assert np.array_equal(host, graph), _mismatch(f"case {case}: {what} at {size} px, {method}", host, graph)
