"""Host (NumPy) preprocessing against the SavedModel's TensorFlow twin, contrast methods,
and the 8-bit / 16-bit agreement of the same film."""
import numpy as np
import pytest
from PIL import Image

from covidcxr.data import preprocess as P
from covidcxr.data.imageio import read_image
from tests.conftest import random_cxr, write_png


def _tf():
    tf = pytest.importorskip("tensorflow")
    from covidcxr.data import tfgraph as G

    return tf, G


def _files(tmp_path):
    """Files of every mode the decoders handle."""
    g = random_cxr(0, 96)
    rgb = np.stack([g, np.roll(g, 3, 0), np.roll(g, 5, 1)], -1)
    files = {
        "L.png": write_png(tmp_path / "L.png", g),
        "RGB.png": write_png(tmp_path / "RGB.png", rgb),
        "RGBA.png": write_png(tmp_path / "RGBA.png", np.dstack([rgb, np.full_like(g, 200)])),
        "LA.png": write_png(tmp_path / "LA.png", np.dstack([g, np.full_like(g, 255)]), mode="LA"),
        "16.png": write_png(tmp_path / "16.png", (g.astype(np.uint16) * 16 + 7)),  # 12-bit data
        "P.png": tmp_path / "P.png",
        "jpg": tmp_path / "a.jpg",
    }
    Image.fromarray(rgb).convert("P").save(files["P.png"])
    Image.fromarray(g).save(files["jpg"], quality=90)
    return files


@pytest.mark.parametrize("size,method", [(64, "none"), (160, "none"), (64, "stretch"), (64, "clahe"),
                                         (64, "gamma"), (37, "none")])
def test_host_and_graph_give_the_same_pixels(tmp_path, size, method):
    tf, G = _tf()
    for name, path in _files(tmp_path).items():
        host = P.prepare(read_image(path), size, method)
        graph = G.prepare(G.decode_bytes(tf.io.read_file(str(path))), size, method).numpy()[..., 0]
        assert host.shape == graph.shape == (size, size) and host.dtype == np.uint8, name
        diff = np.abs(host.astype(int) - graph.astype(int))
        assert diff.max() <= 1 and (diff > 0).mean() < 0.002, (name, diff.max(), (diff > 0).mean())


def test_decoded_values_agree_before_resizing(tmp_path):
    tf, G = _tf()
    for name, path in _files(tmp_path).items():
        host = read_image(path)
        graph = G.decode_bytes(tf.io.read_file(str(path))).numpy()[..., 0]
        np.testing.assert_allclose(host, graph, atol=1e-6, err_msg=name)


def test_eight_and_sixteen_bit_copies_of_a_film_agree(tmp_path):
    g = random_cxr(4, 128)
    a = read_image(write_png(tmp_path / "8.png", g))
    b = read_image(write_png(tmp_path / "16.png", g.astype(np.uint16) * 257))  # the same film, 16-bit
    v12 = np.round(g / 255 * 4095).astype(np.uint16)  # a 12-bit film in a 16-bit container
    c = read_image(write_png(tmp_path / "12.png", v12))
    np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_allclose(a, c, atol=0.5 / 4095 + 1e-6)
    assert P.bit_depth(4095) == 12 and P.bit_depth(4096) == 13 and P.bit_depth(255) == 8 and P.bit_depth(65535) == 16


def test_png_round_trip_for_host_decoded_images(tmp_path):
    tf, G = _tf()
    for gray in (random_cxr(1).astype(np.float32) / 255, np.linspace(0.2, 1.0, 64 * 64, dtype=np.float32).reshape(64, 64)):
        data = P.numpy_to_png_bytes(gray)
        np.testing.assert_allclose(G.decode_bytes(tf.constant(data)).numpy()[..., 0], gray, atol=1 / 65535)
    with pytest.raises(ValueError, match="half range"):
        P.numpy_to_png_bytes(np.full((8, 8), 0.1234, np.float32))


def test_contrast_methods():
    img = np.linspace(0.2, 0.6, 64 * 64, dtype=np.float32).reshape(64, 64)
    for method in P.CONTRAST_METHODS:
        out = P.contrast(img, method)
        assert out.shape == (64, 64) and out.min() >= 0 and out.max() <= 1.0 + 1e-6
    stretched = P.contrast(img, "stretch")
    assert stretched.min() == 0.0 and stretched.max() == 1.0
    narrow = np.random.default_rng(0).uniform(0.45, 0.55, (64, 64)).astype(np.float32)
    assert P.contrast(narrow, "clahe").std() > 2 * narrow.std()  # spreads a narrow histogram
    np.testing.assert_allclose(P.contrast(np.full((8, 8), 0.25, np.float32), "gamma"), 0.5, atol=1e-5)
    with pytest.raises(ValueError, match="unknown contrast"):
        P.contrast(img, "sharpen")


def test_masks_resize_and_probabilities():
    m = np.zeros((40, 40), np.uint8)
    m[10:30, 5:20] = 1
    r = P.resize_mask(m, 80)
    assert r.shape == (80, 80) and set(np.unique(r)) == {0, 1} and r[20:60, 10:40].all()
    probs = np.zeros((16, 16), np.float32)
    probs[4:12, 4:12] = 0.9
    full = P.mask_from_probs(probs, 64, 48)
    assert full.shape == (64, 48) and full.dtype == bool and full[32, 24] and not full[2, 2]
