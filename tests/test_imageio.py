import numpy as np
import pytest

from covidcxr.data.imageio import ImageReadError, inspect_file, read_image, read_mask
from tests.conftest import write_png


def test_read_8bit_gray_and_rgb_agree(tmp_path):
    g = (np.arange(64 * 64) % 256).astype(np.uint8).reshape(64, 64)
    a = read_image(write_png(tmp_path / "g.png", g))
    b = read_image(write_png(tmp_path / "rgb.png", np.stack([g] * 3, -1)))
    c = read_image(write_png(tmp_path / "rgba.png", np.dstack([g, g, g, np.full_like(g, 255)])))
    assert a.shape == (64, 64) and a.dtype == np.float32
    np.testing.assert_allclose(a, g / 255.0, atol=1e-6)
    np.testing.assert_allclose(b, a, atol=1 / 255)
    np.testing.assert_allclose(c, a, atol=1 / 255)


def test_read_16bit_is_scaled_by_its_bit_depth(tmp_path):
    arr = np.linspace(100, 4095, 32 * 32).reshape(32, 32).astype(np.uint16)  # 12-bit data in a 16-bit PNG
    img = read_image(write_png(tmp_path / "i16.png", arr))
    np.testing.assert_allclose(img, arr / 4095.0, atol=0.5 / 65535 + 1e-7)  # not stretched (16-bit grid): the film's own range is kept
    low = read_image(write_png(tmp_path / "low.png", (arr // 8).astype(np.uint16)))  # 9-bit data
    np.testing.assert_allclose(low, (arr // 8) / 511.0, atol=0.5 / 65535 + 1e-7)


def test_dicom_monochrome1_is_inverted(tmp_path):
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    def write(path, photometric):
        meta = FileMetaDataset()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
        meta.MediaStorageSOPInstanceUID = generate_uid()
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        arr = np.tile(np.arange(32, dtype=np.uint16) * 100, (32, 1))
        ds.Rows, ds.Columns = arr.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = arr.tobytes()
        ds.save_as(str(path), enforce_file_format=True)
        return path

    m2 = read_image(write(tmp_path / "a.dcm", "MONOCHROME2"))
    m1 = read_image(write(tmp_path / "b.dcm", "MONOCHROME1"))
    assert m2[0, 0] == 0.0 and m2[0, -1] == pytest.approx(1.0)
    np.testing.assert_allclose(m1, 1.0 - m2, atol=1e-6)


def test_bad_files_fail_with_reason(tmp_path):
    good = write_png(tmp_path / "ok.png", np.zeros((64, 64), np.uint8) + 90)
    trunc = tmp_path / "trunc.png"
    trunc.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ImageReadError, match="trunc.png"):
        read_image(trunc)
    assert inspect_file(good).ok
    assert "empty" in inspect_file(tmp_path / "empty.png").reason
    assert not inspect_file(trunc).ok
    assert "not an image" in inspect_file(tmp_path / "text.png").reason


def test_mask_threshold_resize_and_rgb(tmp_path):
    m = np.zeros((32, 32, 3), np.uint8)
    m[8:24, 8:24] = 200  # not strictly 255, RGB
    m[0, 0] = 40         # noise below threshold
    out = read_mask(write_png(tmp_path / "m.png", m), size=(64, 64))
    assert out.shape == (64, 64) and set(np.unique(out)) == {0, 1}
    assert out[16:48, 16:48].all() and out[:16].sum() == 0


def test_inspect_hash_mirror(tmp_path):
    from tests.conftest import random_cxr

    a = random_cxr(1)
    ia = inspect_file(write_png(tmp_path / "a.png", a))
    ib = inspect_file(write_png(tmp_path / "b.png", a[:, ::-1].copy()))
    assert ia.phash_mirror == ib.phash and ia.phash == ib.phash_mirror
    assert ia.thumb.shape == (32, 32)
