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


SIZES = (32, 37, 64, 128, 224, 256, 299, 384, 448, 512, 518)


def test_host_and_graph_give_identical_pixels(tmp_path):
    """Every file mode, every size of the issue (down- and upsampling, odd sizes), every contrast."""
    tf, G = _tf()
    files = {name: (read_image(path), tf.constant(path.read_bytes())) for name, path in _files(tmp_path).items()}
    for size in SIZES:
        for method in P.CONTRAST_METHODS:
            fn = tf.function(lambda b: G.prepare_bytes(b, size, method), input_signature=[tf.TensorSpec([], tf.string)])
            for name, (gray, data) in files.items():
                host, graph = P.prepare(gray, size, method), fn(data).numpy()[..., 0]
                assert host.shape == graph.shape == (size, size) and host.dtype == graph.dtype == np.uint8
                assert np.array_equal(host, graph), (name, size, method, int((host != graph).sum()))


def test_decoded_values_are_identical_before_resizing(tmp_path):
    tf, G = _tf()
    for name, path in _files(tmp_path).items():
        host = read_image(path)
        graph = G.decode_bytes(tf.io.read_file(str(path))).numpy()[..., 0]
        assert host.dtype == graph.dtype == np.float32 and np.array_equal(host, graph), name


def test_rgb_gray_is_pillows_integer_luma(tmp_path):
    rgb = np.random.default_rng(3).integers(0, 256, (40, 50, 3)).astype(np.uint8)
    gray = read_image(write_png(tmp_path / "rgb.png", rgb))
    want = np.asarray(Image.fromarray(rgb).convert("L")).astype(np.float32) / 255
    np.testing.assert_array_equal(gray, want)


def test_resize_keeps_flat_images_flat_and_identity_exact():
    """Fixed-point weights sum to exactly one: a flat image stays flat at every size, and a
    same-size 'resize' returns the input pixels."""
    for value in (0, 1, 77, 128, 254, 255):
        flat = np.full((123, 97), value / 255, np.float32)
        for size in (17, 64, 97, 123, 300):
            assert (P.prepare(flat, size) == value).all(), (value, size)
    g = random_cxr(2, 64)
    assert np.array_equal(P.prepare(g.astype(np.float32) / 255, 64), g)


def test_resize_is_close_to_pillows_antialiased_bilinear():
    """The same filter as PIL's BILINEAR resize (which tf.image.resize(antialias=True) follows);
    only the rounding is ours."""
    g = random_cxr(5, 300).astype(np.float32) / 255
    for size in (64, 224, 299, 512):
        ref = np.asarray(Image.fromarray(g, mode="F").resize((size, size), Image.BILINEAR), np.float32)
        ours = P.resize(g, size)
        assert np.abs(ours - ref).max() < 2e-3, size


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
        np.testing.assert_array_equal(G.decode_bytes(tf.constant(data)).numpy()[..., 0], P.resize(gray, 64))
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
    np.testing.assert_allclose(P.contrast(np.full((8, 8), 0.25, np.float32), "gamma"), 0.5, atol=0.5 / 255 + 1e-6)
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
