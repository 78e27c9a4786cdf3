"""Issue 20, the slide reader's share: each class of bad input found by the fuzz run is built here, several
members each, and must give a BleepError naming the problem (or the correct result); never an abort, a
hang, a wrong shape or a silently wrong pixel size. Threads and fork are in test_concurrency.py."""

import os
import pickle
import re
import subprocess
import sys
import textwrap
import threading
import warnings

import numpy as np
import pytest
from tiff_builder import Alias, Blob, Ref, build, rgb_strip

from bleep_rs import BleepError, Slide, _core, to_tensor

PIXELS = bytes(range(48)) * 3  # 4 x 4 px... of RGB, and some to spare
IMAGE = np.frombuffer(PIXELS[: 4 * 3 * 3], np.uint8).reshape(3, 4, 3)


def write(path, ifds, blobs=(PIXELS,)):
    path.write_bytes(build(ifds, blobs))
    return path


def run_limited(code: str, timeout: float = 120) -> str:
    """``code`` in a child whose address space is capped at 2 GB: an allocation of gigabytes made before
    an error fails there (a MemoryError, an abort), where on this machine it might pass unnoticed."""
    prelude = "import resource\nresource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))\n"
    out = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, out.stderr
    return out.stdout


# ----------------------------------------------------- 1. sizes checked before anything is allocated


@pytest.mark.parametrize(
    "side, why",
    [(224 * 0.5 / 10000, "--um-per-px 10000"), (0.05 / 0.5, "--bin-um 0.05"), (224 * 0.5 / 2500, "MPP = 2500")],
)
def test_a_grid_of_tiles_smaller_than_a_pixel_is_an_error(side, why):
    mask = np.ones((100, 100), np.uint8)
    with pytest.raises(BleepError, match=r"grid tile of .* level-0 px is smaller than one pixel.*um_per_px"):
        _core.tissue_grid(mask, 10.0, 1000, 1000, side, 0.5)


def test_bins_smaller_than_a_pixel_are_an_error(tmp_path):
    """``predict --bin-um 0.05`` on a 0.5 um/px slide: bins of a tenth of a pixel."""
    from bleep_rs.predict import slide_grid

    slide = Slide(write(tmp_path / "s.tif", [rgb_strip(4, 3)]), um_per_px=0.5)
    mask = slide.tissue_mask(4, median=1, close=1)
    with pytest.raises(BleepError, match=r"grid tile of 1.000e-1 level-0 px is smaller than one pixel"):
        slide_grid(slide, 224, 0.5, min_tissue=0.5, mask=mask, bin_um=0.05)


def test_tile_grid_at_a_target_far_finer_than_the_slide_is_an_error(tmp_path):
    # Both pixel sizes plausible (0.01 and 100 um/px), the tile a fiftieth of a pixel.
    slide = Slide(write(tmp_path / "s.tif", [rgb_strip(4, 3)]), um_per_px=100)
    mask = slide.tissue_mask(4, median=1, close=1)
    with pytest.raises(BleepError, match="smaller than one pixel"), pytest.warns(UserWarning, match="finer than"):
        slide.tile_grid(224, 0.01, mask=mask, min_tissue=0.0)


@pytest.mark.parametrize("repeat", ["same", "self", "chain"])
def test_subifds_listing_a_directory_again_are_refused_at_once(tmp_path, repeat):
    """One directory listed 100,000 times (0.4 MB of offsets), itself, or one already in the chain."""
    if repeat == "same":
        ifds = [rgb_strip(4, 3, extra={330: (4, [Ref(1)] * 100_000)}), {**rgb_strip(2, 1), "next": None}]
    elif repeat == "self":
        ifds = [rgb_strip(4, 3, extra={330: (4, [Ref(0)])})]
    else:
        ifds = [rgb_strip(4, 3, extra={330: (4, [Ref(1)])}), rgb_strip(2, 1)]
    path = write(tmp_path / f"{repeat}.tif", ifds)
    out = run_limited(f"""
        import bleep_rs
        try:
            bleep_rs.Slide({str(path)!r})
        except bleep_rs.BleepError as e:
            print(e)
    """)
    assert "is reached twice" in out and "loops or repeats" in out, out


def test_a_next_directory_chain_that_loops_is_refused(tmp_path):
    for ifds in ([{**rgb_strip(4, 3), "next": 0}], [rgb_strip(4, 3), {**rgb_strip(2, 1), "next": 0}]):
        with pytest.raises(BleepError, match="reached twice.*chain of next directories"):
            Slide(write(tmp_path / "loop.tif", ifds))


def test_directories_sharing_one_huge_offset_array_are_refused(tmp_path):
    """4,000 directories that all point at the same 100,000 strip offsets: 1.7 MB of file, 6 GB parsed."""
    n = 100_000
    first = rgb_strip(1, n, extra={273: (4, [Blob(0)] * n), 279: (4, [3] * n), 278: (4, [1])})
    again = {**first, 273: (4, Alias(n, 0, 273)), 279: (4, Alias(n, 0, 279))}
    path = write(tmp_path / "shared.tif", [first] + [again] * 4000, [PIXELS * 2100])
    assert path.stat().st_size < 2 << 20
    out = run_limited(f"""
        import bleep_rs
        try:
            bleep_rs.Slide({str(path)!r})
        except bleep_rs.BleepError as e:
            print(e)
    """)
    assert "directories claim more than" in out and "listed again and again" in out, out


@pytest.mark.parametrize("width, height, compression", [(600_000_000, 2, 1), (600_000_000, 2, 5), (2, 600_000_000, 8)])
def test_an_image_larger_than_its_data_can_hold_is_refused_at_open(tmp_path, width, height, compression):
    """A strip TIFF declaring 600,000,000 x 2 px over 144 bytes (uncompressed, LZW, deflate)."""
    tags = rgb_strip(width, height, nbytes=len(PIXELS), extra={259: (3, [compression])})
    path = write(tmp_path / "wide.tif", [tags])
    out = run_limited(f"""
        import bleep_rs
        try:
            s = bleep_rs.Slide({str(path)!r})
            s.thumbnail(64)
        except bleep_rs.BleepError as e:
            print(e)
    """)
    assert f"a TIFF image of {width} x {height} px" in out and "stored in 144 bytes" in out, out


# --------------------------------------------------------------- 2. one rule for every pixel size

CM = {296: (3, [3])}  # ResolutionUnit: centimetre
APERIO = "Aperio Image Library v12.0.15\r\n4 x 3 [0,0 4x3] (240x240) JPEG/RGB Q=70|AppMag = 20|MPP = {}|Left = 1"
OME = '<?xml version="1.0"?><OME><Image><Pixels PhysicalSizeX="{}" PhysicalSizeXUnit="µm"/></Image></OME>'


def described(text: str, extra=None) -> dict:
    raw = list(text.encode()) + [0]
    return rgb_strip(4, 3, extra={270: (2, raw), **(extra or {})})


BAD_SIZES = {
    "tags zero denominator": (rgb_strip(4, 3, extra={282: (5, [20000, 0]), **CM}), "TIFF resolution tags", "0e0"),
    "tags 0/0": (rgb_strip(4, 3, extra={282: (5, [0, 0]), **CM}), "TIFF resolution tags", "NaN"),
    "tags negative SRATIONAL": (rgb_strip(4, 3, extra={282: (10, [-20000, 1]), **CM}), "TIFF resolution tags", "-5e-1"),
    "tags huge": (rgb_strip(4, 3, extra={282: (5, [1, 1000]), **CM}), "TIFF resolution tags", "1e7"),
    "tags tiny": (rgb_strip(4, 3, extra={282: (5, [4_000_000_000, 1]), **CM}), "TIFF resolution tags", "2.5e-6"),
    "Aperio 1e-300": (described(APERIO.format("1e-300")), "Aperio ImageDescription", "1e-300"),
    "Aperio 5000": (described(APERIO.format("5000")), "Aperio ImageDescription", "5e3"),
    "Aperio 2500": (described(APERIO.format("2500")), "Aperio ImageDescription", "2.5e3"),
    "Aperio 1e+300": (described(APERIO.format("1e+300")), "Aperio ImageDescription", "1e300"),
    "Aperio negative": (described(APERIO.format("-0.25")), "Aperio ImageDescription", "-2.5e-1"),
    "OME zero": (described(OME.format("0")), "OME-XML PhysicalSizeX", "0e0"),
    "OME 1e9": (described(OME.format("1e9")), "OME-XML PhysicalSizeX", "1e9"),
}


@pytest.mark.parametrize("case", sorted(BAD_SIZES))
def test_an_implausible_pixel_size_in_a_file_is_dropped_with_a_warning(tmp_path, case):
    tags, source, shown = BAD_SIZES[case]
    path = write(tmp_path / "s.tif", [tags])
    with pytest.warns(UserWarning, match=rf"s.tif: {source}.* {shown} um/px, outside the plausible 0.01 to 100"):
        slide = Slide(path)
    assert slide.um_per_px is None and slide.um_per_px_source is None
    with pytest.raises(BleepError, match="has no pixel size"):
        slide.spot_patches(np.array([[1.0, 1.0]]), 8, 0.5)
    # Given by the caller, the value is used without a word about the file's.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Slide(path, um_per_px=0.5).um_per_px == 0.5


def test_a_plausible_size_in_a_later_source_is_used_after_a_bad_one(tmp_path):
    ok = {282: (5, [20000, 1]), **CM}  # 0.5 um/px
    with pytest.warns(UserWarning, match="MPP"):
        slide = Slide(write(tmp_path / "s.tif", [described(APERIO.format("5000"), ok)]))
    assert slide.um_per_px == pytest.approx(0.5) and slide.um_per_px_source == "TIFF resolution tags"
    for tags, want, source in [
        (described(APERIO.format("0.2527")), 0.2527, "Aperio ImageDescription (MPP)"),
        (described(OME.format("0.325")), 0.325, "OME-XML PhysicalSizeX"),
        (rgb_strip(4, 3, extra={282: (5, [20000, 1]), **CM}), 0.5, "TIFF resolution tags"),
        (rgb_strip(4, 3, extra={282: (10, [100000, 2]), **CM}), 0.2, "TIFF resolution tags"),
        (rgb_strip(4, 3, extra={282: (5, [72, 1])}), None, None),  # a 72 dpi default: no claim at all
    ]:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            slide = Slide(write(tmp_path / "ok.tif", [tags]))
        assert slide.um_per_px == (None if want is None else pytest.approx(want)), tags
        assert slide.um_per_px_source == source


@pytest.mark.parametrize("value", [10000, 2500, 0, -0.5, float("nan"), float("inf"), 1e-5, 1e300])
def test_an_implausible_given_pixel_size_is_an_error(tmp_path, value):
    with pytest.raises(BleepError, match=rf"um_per_px={re.escape(repr(value))} \(given\) gives .* outside the plausible 0.01 to 100"):
        Slide(write(tmp_path / "s.tif", [rgb_strip(4, 3)]), um_per_px=value)


def test_other_backends_pixel_sizes_pass_the_same_rule():
    from bleep_rs.slide import file_um_per_px

    with pytest.warns(UserWarning, match=r"x.svs: OpenSlide .* 5e3 um/px, outside the plausible"):
        assert file_um_per_px((5000.0, "OpenSlide properties (openslide.mpp-x)"), "x.svs") is None
    assert file_um_per_px((0.25, "the transformation to 'microns'"), "x.zarr") == (0.25, "the transformation to 'microns'")
    assert _core.check_um_per_px(0.01, "x") == 0.01 and _core.check_um_per_px(100.0, "x") == 100.0


# ------------------------------------------------- 4. arrays of the wrong shape are refused, not reshaped


@pytest.fixture(scope="module")
def small_slide(tmp_path_factory):
    path = tmp_path_factory.mktemp("s") / "s.tif"
    return Slide(write(path, [rgb_strip(4, 3)]), um_per_px=0.5)


@pytest.mark.parametrize("shape", [(4, 3), (6,), (2, 2, 2), (3, 1), (2,)])
def test_centres_and_origins_must_be_n_by_2(small_slide, shape):
    points = np.ones(shape)
    with pytest.raises(BleepError, match=rf"centres must be an \(n, 2\) array .* not shape {re.escape(str(shape))}"):
        small_slide.spot_patches(points, 2)
    with pytest.raises(BleepError, match=rf"origins must be an \(n, 2\) array .* not shape {re.escape(str(shape))}"):
        small_slide.read_patches(points, 2)
    # (n, 2), including none at all, is read.
    assert small_slide.read_patches(np.ones((3, 2)), 2).shape == (3, 2, 2, 3)
    assert small_slide.read_patches(np.zeros((0, 2)), 2).shape == (0, 2, 2, 3)


def test_a_read_only_or_foreign_out_is_an_error(small_slide):
    patches = np.zeros((2, 4, 4, 3), np.uint8)
    out = np.empty((2, 3, 4, 4), np.float32)
    out.flags.writeable = False
    with pytest.raises(BleepError, match="out must be a writable array"):
        to_tensor(patches, out=out)
    with pytest.raises(BleepError, match="out must be a float32 NumPy array"):
        to_tensor(patches, out=[[0.0]])
    with pytest.raises(BleepError, match="out must be a NumPy array of"):
        _core.to_tensor_into(patches, [0.0] * 3, [1.0] * 3, np.empty((2, 3, 4, 4), np.float64))
    dst = np.empty((1, 1, 2, 2, 3), np.uint8)
    dst.flags.writeable = False
    with pytest.raises(BleepError, match="out must be a writable array"):
        small_slide._core.fields_into(np.zeros((1, 2)), 2, [1.0], dst)
    dst = np.empty((1, 2, 2, 3), np.uint8)
    dst.flags.writeable = False
    with pytest.raises(BleepError, match="out must be a writable array"):
        small_slide._core.patches_into(np.zeros((1, 2)), 2, 1.0, dst)


# ------------------------------------------------------------------- 5. only regular files are opened


def _opens_within(fn, seconds=20.0):
    """fn() run in a thread: its exception, or a failure when it has not returned within `seconds`."""
    box = []

    def run():
        try:
            fn()
            box.append(None)
        except Exception as e:
            box.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert box, "opening blocked"
    return box[0]


@pytest.mark.skipif(sys.platform != "linux", reason="FIFOs and /dev/null")
def test_a_fifo_or_a_device_is_refused_by_name_without_blocking(tmp_path):
    fifo = tmp_path / "slide.svs"
    os.mkfifo(fifo)
    for opener in (lambda: Slide(fifo), lambda: Slide(fifo, backend="rust"), lambda: _core.SlideCore.open(fifo)):
        e = _opens_within(opener)
        assert isinstance(e, BleepError) and f"{fifo}: not a regular file (a FIFO)" in str(e), e
    for opener in (lambda: Slide("/dev/null"), lambda: _core.SlideCore.open("/dev/null")):
        e = _opens_within(opener)
        assert isinstance(e, BleepError) and "/dev/null: not a regular file (a device" in str(e), e
    e = _opens_within(lambda: _core.SlideCore.open(tmp_path))
    assert isinstance(e, BleepError) and "not a regular file (a directory)" in str(e), e


# ----------------------------------------------------------------------- 6. a Slide pickles by path


def _read_in_child(slide):
    return slide.read_region((0, 0), 0, (4, 3)), slide.um_per_px, slide.um_per_px_source


def test_a_slide_pickles_by_path_and_reopens(small_slide, tmp_path):
    again = pickle.loads(pickle.dumps(small_slide))
    assert again is not small_slide and again.path == small_slide.path
    assert (again.um_per_px, again.um_per_px_source) == (0.5, "given")
    np.testing.assert_array_equal(again.read_region((0, 0), 0, (4, 3)), IMAGE)
    core = pickle.loads(pickle.dumps(small_slide._core))
    np.testing.assert_array_equal(core.read_region(0, 0, 0, 4, 3), IMAGE)
    # As multiprocessing with "spawn" sends it to a worker.
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(1) as pool:
        region, um, source = pool.apply_async(_read_in_child, (small_slide,)).get(60)
    np.testing.assert_array_equal(region, IMAGE)
    assert (um, source) == (0.5, "given")
    # A file gone since: unpickling says so.
    moved = write(tmp_path / "gone.tif", [rgb_strip(4, 3)])
    data = pickle.dumps(Slide(moved, um_per_px=0.5))
    moved.unlink()
    with pytest.raises(BleepError, match="gone.tif: no such image file"):
        pickle.loads(data)


def test_with_no_tissue_required_every_tile_centred_on_the_slide_is_kept_and_read():
    """predict --slide --min-tissue 0: every tile whose centre lies on the slide, none past its edge (their
    patches were refused as 'spot centres outside the image', a thing the user never gave)."""
    from conftest import DATA

    slide = Slide(DATA / "tiny" / "C2" / "image.jpg", um_per_px=1.3873)
    w, h = slide.dimensions
    size = 100  # 100 px at 1.3873 um/px: a footprint that does not divide the image
    coords = slide.tile_grid(size, 1.3873, min_tissue=0.0)
    centres = coords + size / 2
    assert len(coords) == (w // size + (w % size > size / 2)) * (h // size + (h % size > size / 2))
    assert (centres[:, 0] < w).all() and (centres[:, 1] < h).all()
    assert slide.spot_patches(centres, 32).shape == (len(coords), 32, 32, 3)
