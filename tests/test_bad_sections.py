"""Issue 20, the section readers: each class of bad input found by the fuzz run, fixed at its root (one
mechanism per class), tested on several of its members: a BleepError naming the problem, or the right
answer; never a crash, a hang, a file read or written outside its folder, or a silently wrong section."""

import contextlib
import gzip
import os
import shutil
import threading
import time
import warnings

import h5py
import numpy as np
import pytest

import bleep_rs
from bleep_rs import BleepError, read_section, section_patches
from bleep_rs.expression import read_gene_list
from bleep_rs.readers._common import check_matrix, matrix_problem
from bleep_rs.readers.hest import write_hest_sample
from bleep_rs.sections import expand_sections

from conftest import DATA, writable_copy

C2 = DATA / "tiny" / "C2"


@pytest.fixture(scope="module")
def c2_h5ad(tmp_path_factory):
    """tiny C2 (25 spots x 64 genes, legacy ST) as an .h5ad with its platform and image path stored."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = read_section(C2)
    del a.uns["spatial"]
    path = tmp_path_factory.mktemp("h5ad") / "c2.h5ad"
    a.write_h5ad(path)
    return path


def h5ad_copy(c2_h5ad, tmp_path, change=None):
    """A copy of the C2 .h5ad, changed in place by ``change(h5py.File)``."""
    path = tmp_path / "c2.h5ad"
    shutil.copyfile(c2_h5ad, path)
    if change is not None:
        with h5py.File(path, "r+") as f:
            change(f)
    return path


def replace(name, value):
    """A change that replaces dataset ``name`` by ``value(old)``, keeping its attributes."""

    def change(f):
        old = f[name][()]
        attrs = dict(f[name].attrs)
        del f[name]
        f[name] = value(old)
        f[name].attrs.update(attrs)

    return change


def read(path, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return read_section(path, **kwargs)


# --- 1. Malformed sparse matrices: validated before scipy sees them (one check_matrix) -----------------

def _bumpy(indptr):
    """An indptr that rises past its data and falls back (still starting at 0, ending at nnz)."""
    out = indptr.copy()
    out[len(out) // 2] = indptr[-1] + 1000
    return out


SPARSE = [
    ("an index past the genes", "X/indices", lambda a: np.where(np.arange(len(a)) == 3, 10**6, a), r"column indices must lie in 0..63 \(found .*1000000\)"),
    ("a negative index", "X/indices", lambda a: np.where(np.arange(len(a)) == 3, -1, a).astype(np.int64), r"column indices must lie in 0..63 \(found -1"),
    ("indptr past its data and back", "X/indptr", _bumpy, r"indptr must rise from 0 to \d+ .*never fall"),
    ("indptr not starting at 0", "X/indptr", lambda a: a + 1, r"indptr must rise from 0"),
    ("indptr ending short of the data", "X/indptr", lambda a: np.append(a[:-1], a[-1] - 3), r"indptr must rise from 0 to \d+"),
]


@pytest.mark.parametrize("name, dataset, value, message", SPARSE, ids=[s[0] for s in SPARSE])
def test_a_malformed_sparse_x_in_an_h5ad_is_an_error_not_a_crash(c2_h5ad, tmp_path, name, dataset, value, message):
    path = h5ad_copy(c2_h5ad, tmp_path, replace(dataset, value))
    with pytest.raises(BleepError, match=r"c2.h5ad: X is not a well-formed matrix \(" + message):
        read(path)


def test_every_matrix_of_an_h5ad_is_checked_layers_and_raw_too(c2_h5ad, tmp_path):
    import anndata as ad

    a = ad.read_h5ad(c2_h5ad)
    a.layers["counts"] = a.X.copy()
    a.raw = a.copy()
    a.write_h5ad(tmp_path / "full.h5ad")
    for group, what in (("layers/counts", "layer 'counts'"), ("raw/X", r"\.raw\.X")):
        path = tmp_path / f"{group.replace('/', '_')}.h5ad"
        shutil.copyfile(tmp_path / "full.h5ad", path)
        with h5py.File(path, "r+") as f:
            replace(f"{group}/indices", lambda v: np.where(np.arange(len(v)) == 0, 10**6, v))(f)
        with pytest.raises(BleepError, match=what + r" is not a well-formed matrix \(column indices must lie in 0..63"):
            read(path)


def test_the_one_matrix_check_on_every_form():
    import scipy.sparse as sp

    good = sp.random(5, 4, density=0.5, format="csr", random_state=0)
    assert matrix_problem(good, (5, 4)) is None and matrix_problem(good.tocsc()) is None and matrix_problem(good.toarray()) is None
    bad_csr = sp.csr_matrix((good.data, good.indices.copy(), good.indptr), shape=(5, 4))
    bad_csr.indices[0] = 9
    assert "column indices must lie in 0..3" in matrix_problem(bad_csr)
    bad_csc = good.tocsc()
    bad_csc.indices[0] = 7
    assert "row indices must lie in 0..4" in matrix_problem(bad_csc)
    falling = good.copy()
    falling.indptr[2], falling.indptr[3] = falling.indptr[3], falling.indptr[2] - 1
    assert "never fall" in matrix_problem(falling)
    coo = good.tocoo(copy=True)
    coo.col[0] = 11
    assert "outside (5, 4)" in matrix_problem(coo)
    assert "holds 'x', not a number (row 0, column 1)" in matrix_problem(np.array([[1, "x"], [2, 3]], dtype=object))
    assert "not (5, 4)" in matrix_problem(good.T.tocsr(), (5, 4))
    with pytest.raises(BleepError, match=r"here: X is not a well-formed matrix \(a dok sparse matrix"):
        check_matrix(good.todok(), "here", "X")


# --- 2. Files that are not files: checked before they are opened (one checked_input) ---------------

@pytest.fixture
def fifo(tmp_path):
    """make(path) makes a named pipe there; a watchdog opens the pipe's other end after 20 s so that a
    reader that would block forever (the bug) ends with a failed test instead of a hung run."""
    made = []

    def make(path):
        os.mkfifo(path)
        made.append(path)
        return path

    stop = threading.Event()

    def watchdog():
        if stop.wait(20):
            return
        while not stop.is_set():
            for p in made:
                with contextlib.suppress(OSError):  # no reader yet: ENXIO
                    os.close(os.open(p, os.O_WRONLY | os.O_NONBLOCK))
            time.sleep(0.1)

    t = threading.Thread(target=watchdog, daemon=True)
    t.start()
    yield make
    stop.set()


def test_a_named_pipe_as_a_section_file_is_refused(tmp_path, fifo, c2_h5ad):
    section = fifo(tmp_path / "s.h5ad")
    with pytest.raises(BleepError, match=r"s.h5ad: a named pipe, not a regular file or a folder \(a section\)"):
        read(section)
    for name in ("meta.json", "spots.tsv", "counts.tsv.gz"):
        sec = writable_copy(C2, tmp_path / f"C2-{name}")
        (sec / name).unlink()
        fifo(sec / name)
        with pytest.raises(BleepError, match=rf"{name}: a named pipe, not a regular file"):
            read(sec)
    vis = writable_copy(DATA / "visium_v1", tmp_path / "vis")
    for name in ("filtered_feature_bc_matrix.h5", "spatial/scalefactors_json.json", "spatial/tissue_positions_list.csv", "spatial/tissue_lowres_image.png"):
        keep = tmp_path / "keep"
        shutil.move(vis / name, keep)
        fifo(vis / name)
        with pytest.raises(BleepError, match=rf"{os.path.basename(name)}: a named pipe, not a regular file"):
            read(vis)
        os.unlink(vis / name)
        shutil.move(keep, vis / name)


def test_a_named_pipe_as_an_image_or_a_stored_image_path_is_refused(tmp_path, fifo, c2_h5ad):
    import anndata as ad

    pipe = fifo(tmp_path / "he.jpg")
    with pytest.raises(BleepError, match=r"he.jpg: a named pipe, not a regular file or a folder \(the section's image\)"):
        read(C2, image=pipe)
    a = ad.read_h5ad(c2_h5ad)
    a.uns["bleep"]["image_path"] = str(pipe)
    a.write_h5ad(tmp_path / "stored.h5ad")
    with pytest.raises(BleepError, match=r"he.jpg: a named pipe"):
        read(tmp_path / "stored.h5ad")
    genes = fifo(tmp_path / "genes.txt")
    with pytest.raises(BleepError, match=r"genes.txt: a named pipe, not a regular file \(a gene list"):
        read_gene_list(genes)


# --- 3. Path escape: a HEST sample id is a name (one sample_file) ----------------------------------

@pytest.fixture
def hest_root(tmp_path, c2_h5ad):
    """ROOT with st/C2.h5ad and metadata/, and OUTSIDE/X.h5ad beside it (what an escaping id would read)."""
    root = tmp_path / "hest"
    for sub in ("st", "metadata", "wsis"):
        (root / sub).mkdir(parents=True)
    shutil.copyfile(c2_h5ad, root / "st" / "C2.h5ad")
    (tmp_path / "outside").mkdir()
    shutil.copyfile(c2_h5ad, tmp_path / "outside" / "X.h5ad")
    return root


BAD_IDS = ["../../outside/X", "../outside/X", "..", ".", "", " ", "a/b", "a\\b", "/etc/passwd", "C2\0"]


@pytest.mark.parametrize("sample", BAD_IDS)
def test_a_sample_id_that_is_not_a_name_is_refused_by_read_and_expand(hest_root, sample):
    with pytest.raises(BleepError, match=r"is not a HEST sample id: an id is a file name without its extension"):
        read(hest_root, sample=sample, image=C2 / "image.jpg")
    with pytest.raises(BleepError, match=r"is not a HEST sample id"):
        expand_sections([hest_root], ["C2", sample])


def test_the_absolute_path_of_a_real_file_is_no_sample_id(hest_root, tmp_path):
    with pytest.raises(BleepError, match=r"is not a HEST sample id"):
        read(hest_root, sample=str(tmp_path / "outside" / "X"), image=C2 / "image.jpg")
    assert read(hest_root, sample="C2", image=C2 / "image.jpg").n_obs == 25  # a name still reads


@pytest.mark.parametrize("sample", ["../../x", "../x", "/tmp/x", "", "a/b"])
def test_write_hest_sample_never_writes_outside_its_root(tmp_path, sample):
    section = read(C2)
    root = tmp_path / "deep" / "root"
    with pytest.raises(BleepError, match=r"is not a HEST sample id"):
        write_hest_sample(section, root, sample, patches=False)
    assert list(tmp_path.rglob("*")) == []  # neither the root nor anything beside it was made


# --- 4. Silently wrong ------------------------------------------------------------------------------

def test_a_relative_image_path_in_an_h5ad_is_relative_to_the_file(tmp_path, c2_h5ad, monkeypatch):
    import anndata as ad

    here = tmp_path / "section"
    here.mkdir()
    shutil.copyfile(C2 / "image.jpg", here / "he.jpg")
    a = ad.read_h5ad(c2_h5ad)
    a.uns["bleep"]["image_path"] = "he.jpg"
    a.write_h5ad(here / "c2.h5ad")
    elsewhere = tmp_path / "work"
    elsewhere.mkdir()
    shutil.copyfile(DATA / "tiny" / "C3" / "image.jpg", elsewhere / "he.jpg")  # another section's image
    monkeypatch.chdir(elsewhere)
    b = read(here / "c2.h5ad")
    assert b.uns["bleep"]["image_path"] == str((here / "he.jpg").resolve())
    monkeypatch.chdir(tmp_path)
    c = read(os.path.join("section", "c2.h5ad"))  # a relative .h5ad path too
    assert c.uns["bleep"]["image_path"] == str((here / "he.jpg").resolve())


def _with_in_tissue(c2_h5ad, tmp_path, values, name="t.h5ad"):
    import anndata as ad

    a = ad.read_h5ad(c2_h5ad)
    a.obs["in_tissue"] = values
    a.write_h5ad(tmp_path / name)
    return tmp_path / name


def test_in_tissue_follows_one_rule_in_every_reader(tmp_path, c2_h5ad):
    """A spot not under tissue is dropped (as Space Ranger's are); none under tissue is an error."""
    with pytest.raises(BleepError, match=r"no spot is under tissue \(in_tissue is 0 for all 25 spots\)"):
        read(_with_in_tissue(c2_h5ad, tmp_path, np.zeros(25, int)))
    some = np.ones(25, int)
    some[[0, 5, 7]] = 0
    b = read(_with_in_tissue(c2_h5ad, tmp_path, some, "some.h5ad"))
    full = read(c2_h5ad)
    assert b.n_obs == 22 and list(b.obs_names) == [s for s, k in zip(full.obs_names, some) if k]
    assert np.array_equal(b.X.toarray(), full.X.toarray()[some == 1]) and (b.obs["in_tissue"] == 1).all()
    vis = writable_copy(DATA / "visium_v1", tmp_path / "vis")
    pos = vis / "spatial" / "tissue_positions_list.csv"
    rows = [line.split(",") for line in pos.read_text().splitlines()]
    pos.write_text("\n".join(",".join([r[0], "0", *r[2:]]) for r in rows) + "\n")
    with pytest.raises(BleepError, match=r"no spot is under tissue \(in_tissue of tissue_positions_list.csv is 0 for all 100 spots\)"):
        read(vis)


@pytest.fixture(scope="module")
def hest_with_patches(tmp_path_factory):
    """A HEST sample of tiny C2 with 32 px patches at the image's own resolution."""
    pytest.importorskip("tifffile")
    root = tmp_path_factory.mktemp("hestp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        section = read_section(C2)
        write_hest_sample(section, root, "C2", patch_size=32, patch_um_per_px=section.uns["bleep"]["um_per_px"])
    return root


def test_a_patch_file_that_no_longer_fits_the_spots_is_set_aside(hest_with_patches, tmp_path):
    root = tmp_path / "hest"
    shutil.copytree(hest_with_patches, root)
    a = read(root, sample="C2")
    um = a.uns["bleep"]["um_per_px"]
    cut = a.copy()
    del cut.uns["bleep"]["patches_h5"]
    from_image = section_patches(cut, 32, um)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the matching file is used without a word
        assert np.array_equal(section_patches(a, 32, um), from_image)
    with h5py.File(root / "patches" / "C2.h5", "r+") as f:
        coords = f["coords"][()]
        coords[3] += 60  # one patch of another place
        f["coords"][...] = coords
        f["img"][3] = 0
    with pytest.warns(UserWarning, match=r"C2.h5: the patches of 1 of 25 spots are not centred on them .*cutting the patches from the image"):
        got = section_patches(a, 32, um)
    assert np.array_equal(got, from_image)
    with h5py.File(root / "patches" / "C2.h5", "r+") as f:
        del f["coords"]
    with pytest.warns(UserWarning, match=r"C2.h5: it has no coords"):
        assert np.array_equal(section_patches(a, 32, um), from_image)


def test_a_truncated_patch_file_is_an_error_naming_it(hest_with_patches, tmp_path):
    root = tmp_path / "hest"
    shutil.copytree(hest_with_patches, root)
    a = read(root, sample="C2")
    h5 = root / "patches" / "C2.h5"
    for frac in (0.5, 0.0):
        h5.write_bytes(h5.read_bytes()[: int(h5.stat().st_size * frac)])
        with pytest.raises(BleepError, match=r"C2.h5: not a readable HEST patch file .*delete it or download it again"):
            section_patches(a, 32, a.uns["bleep"]["um_per_px"])


def _write_10x(vis, names=None, barcodes=None):
    with h5py.File(vis / "filtered_feature_bc_matrix.h5", "r+") as f:
        if names is not None:
            replace("matrix/features/name", names)(f)
        if barcodes is not None:
            replace("matrix/barcodes", barcodes)(f)


@pytest.mark.parametrize("where, change, message", [
    ("10x", lambda a: np.array([b"\xff\xfeIGKC"] + list(a[1:])), r"/matrix/features/name\[0\] \(b'\\xff\\xfeIGKC'\) is not UTF-8 text"),
    ("10x", lambda a: np.array([b"A", b""] + list(a[2:])), r"1 gene names are empty \(columns \[1\]\)"),
    ("10x", lambda a: np.array([b"A", b"  "] + list(a[2:])), r"1 gene names are empty"),
    ("h5ad", None, r"holds text that is not UTF-8 .*gene names and spot ids must be UTF-8"),
    ("h5ad-empty", None, r"c2.h5ad: 2 gene names are empty \(columns \[3, 9\]\)"),
    ("legacy", None, r"counts.tsv.gz: 1 gene names are empty \(columns \[3\]\)"),
])
def test_gene_names_empty_or_not_utf8_are_refused(tmp_path, c2_h5ad, where, change, message):
    if where == "10x":
        vis = writable_copy(DATA / "visium_v1", tmp_path / "vis")
        _write_10x(vis, names=change)
        path = vis
    elif where.startswith("h5ad"):
        def names(a):
            a = a.copy()
            if where == "h5ad":
                a[3] = b"\xff\xfeX"
            else:
                a[3] = a[9] = ""
            return a
        path = h5ad_copy(c2_h5ad, tmp_path, lambda f: _utf8(f, "var/gene", names))
    else:
        path = writable_copy(C2, tmp_path / "C2")
        text = gzip.decompress((path / "counts.tsv.gz").read_bytes()).decode().split("\n")
        header = text[0].split("\t")
        header[2] = ""
        (path / "counts.tsv.gz").write_bytes(gzip.compress("\n".join(["\t".join(header)] + text[1:]).encode()))
    with pytest.raises(BleepError, match=message):
        read(path)


def _utf8(f, name, change):
    values = change(np.array(f[name][()], dtype=object))
    attrs = dict(f[name].attrs)
    del f[name]
    f.create_dataset(name, data=np.array([v if isinstance(v, bytes) else v.encode() for v in values], dtype=object), dtype=h5py.string_dtype("utf-8"))
    f[name].attrs.update(attrs)


def test_duplicate_gene_names_keep_their_documented_rule(tmp_path):
    """Documented in readers._common.build: an error, except for 10x matrices, suffixed -1 as scanpy does."""
    vis = writable_copy(DATA / "visium_v1", tmp_path / "vis")
    _write_10x(vis, names=lambda a: np.array([a[0], a[0]] + list(a[2:])))
    names = list(read(vis).var_names)
    assert names[0] + "-1" == names[1]


def test_spot_ids_with_leading_zeros_stay_text(tmp_path):
    sec = writable_copy(C2, tmp_path / "C2")
    spots = (sec / "spots.tsv").read_text().splitlines()
    ids = [line.split("\t")[0] for line in spots[1:]]
    new = {old: f"{i:03d}" for i, old in enumerate(ids)}  # "000", "001" ... "024"
    (sec / "spots.tsv").write_text("\n".join([spots[0]] + [new[line.split("\t")[0]] + line[line.index("\t"):] for line in spots[1:]]) + "\n")
    counts = gzip.decompress((sec / "counts.tsv.gz").read_bytes()).decode().splitlines()
    counts = [counts[0]] + [new[line.split("\t")[0]] + line[line.index("\t"):] for line in counts[1:]]
    (sec / "counts.tsv.gz").write_bytes(gzip.compress(("\n".join(counts) + "\n").encode()))
    a = read(sec)
    assert list(a.obs_names) == sorted(new.values(), key=lambda s: list(new.values()).index(s)) and a.obs_names[1] == "001"
    assert np.array_equal(a.X.toarray(), read(C2).X.toarray())
    vis = writable_copy(DATA / "visium_v1", tmp_path / "vis")  # Space Ranger: barcodes "000" ... in the matrix and the positions
    pos = vis / "spatial" / "tissue_positions_list.csv"
    rows = [line.split(",") for line in pos.read_text().splitlines()]
    bar = {r[0]: f"{i:05d}" for i, r in enumerate(rows)}
    header = "barcode,in_tissue,array_row,array_col,pxl_row_in_fullres,pxl_col_in_fullres\n"
    pos.write_text(header + "\n".join(",".join([bar[r[0]], *r[1:]]) for r in rows) + "\n")
    _write_10x(vis, barcodes=lambda a: np.array([bar[b.decode()].encode() for b in a]))
    v = read(vis)
    assert v.n_obs == 100 and all(len(s) == 5 and s.startswith("0") for s in v.obs_names)
    assert np.array_equal(v.X.toarray(), read(DATA / "visium_v1").X.toarray())


# --- 5. No raw tracebacks: one line saying what to fix ---------------------------------------------

DEEP = "[" * 200_000 + "]" * 200_000


def test_json_nested_too_deep_is_an_error_in_every_metadata_file(tmp_path, hest_root):
    sec = writable_copy(C2, tmp_path / "C2")
    (sec / "meta.json").write_text(DEEP)
    with pytest.raises(BleepError, match=r"meta.json: JSON nested too deeply to be metadata"):
        read(sec)
    vis = writable_copy(DATA / "visium_v1", tmp_path / "vis")
    (vis / "spatial" / "scalefactors_json.json").write_text('{"a": ' + DEEP + "}")
    with pytest.raises(BleepError, match=r"scalefactors_json.json: JSON nested too deeply"):
        read(vis)
    (hest_root / "metadata" / "C2.json").write_text(DEEP)
    with pytest.raises(BleepError, match=r"C2.json: JSON nested too deeply"):
        read(hest_root, sample="C2", image=C2 / "image.jpg")


@pytest.mark.parametrize("column, values, message", [
    ("array_row", lambda n: ["a"] * n, r"\(obs\): array_row of '.*' is 'a', not a whole number \(25 such rows\)"),
    ("array_col", lambda n: [1.5] * n, r"array_col of .* is '1.5', not a whole number"),
    ("in_tissue", lambda n: ["yes"] * n, r"in_tissue is 'yes' at spot 0; it must be 0 or 1"),
    ("in_tissue", lambda n: [2] * n, r"in_tissue is 2 at spot 0; it must be 0 or 1"),
])
def test_h5ad_obs_columns_that_are_not_numbers(tmp_path, c2_h5ad, column, values, message):
    import anndata as ad

    a = ad.read_h5ad(c2_h5ad)
    a.obs[column] = values(a.n_obs)
    a.write_h5ad(tmp_path / "o.h5ad")
    with pytest.raises(BleepError, match=message):
        read(tmp_path / "o.h5ad")


def test_h5ad_matrices_that_are_not_there_or_not_numbers(tmp_path, c2_h5ad):
    import anndata as ad

    a = ad.read_h5ad(c2_h5ad)
    a.X = None
    a.write_h5ad(tmp_path / "nox.h5ad")
    with pytest.raises(BleepError, match=r"nox.h5ad: X holds no matrix: store the counts in X or a layer and pass layer="):
        read(tmp_path / "nox.h5ad")
    a = ad.read_h5ad(c2_h5ad)
    a.X = a.X.toarray().astype(str)
    a.write_h5ad(tmp_path / "text.h5ad")
    with pytest.raises(BleepError, match=r"text.h5ad: X is not a well-formed matrix \(its values are text"):
        read(tmp_path / "text.h5ad")


def test_h5ad_positions_that_are_not_numbers(tmp_path, c2_h5ad):
    import anndata as ad

    a = ad.read_h5ad(c2_h5ad)
    a.obsm["spatial"] = np.array([["x", "y"]] * a.n_obs)
    a.write_h5ad(tmp_path / "p.h5ad")
    with pytest.raises(BleepError, match=r'obsm\["spatial"\] must hold numbers'):
        read(tmp_path / "p.h5ad")
    a.obsm["spatial"] = np.zeros((a.n_obs, 1))
    a.write_h5ad(tmp_path / "p1.h5ad")
    with pytest.raises(BleepError, match=r'obsm\["spatial"\] must be \(n_spots, 2\)'):
        read(tmp_path / "p1.h5ad")


@pytest.mark.parametrize("uns, message", [
    ({"spatial": "C2"}, r"uns\['spatial'\] must be a dict .*not a str"),
    ({"spatial": {"C2": "x"}}, r"uns\['spatial'\]\['C2'\] must be a dict"),
    ({"spatial": {"C2": {"scalefactors": "x"}}}, r"uns\['spatial'\]\['C2'\]\['scalefactors'\] must be a dict"),
    ({"spatial": {"C2": {"images": [1, 2]}}}, r"uns\['spatial'\]\['C2'\]\['images'\] must be a dict .*not a ndarray"),
    ({"spatial": {"C2": {"images": {"hires": np.zeros(4)}, "scalefactors": {"tissue_hires_scalef": 0.5}}}}, r"\['images'\]\['hires'\] must be an image"),
    ({"bleep": [1, 2]}, r"uns\['bleep'\] must be a dict"),
    ({"bleep": {"image_path": 3}}, r"uns\['bleep'\]\['image_path'\] must be a string, not a int"),
    ({"bleep": {"platform": 7}}, r"uns\['bleep'\]\['platform'\] must be a string"),
    ({"bleep": {"um_per_px": "1.38"}}, r"um_per_px is '1.38'; it must be a positive number"),
])
def test_uns_entries_of_the_wrong_type(tmp_path, c2_h5ad, uns, message):
    import anndata as ad

    a = ad.read_h5ad(c2_h5ad)
    a.uns = {**{"bleep": {"platform": "legacy-st", "library_id": "C2"}}, **uns}
    a.write_h5ad(tmp_path / "u.h5ad")
    with pytest.raises(BleepError, match=message):
        read(tmp_path / "u.h5ad", **({} if "image_path" in a.uns["bleep"] else {"image": C2 / "image.jpg"}))


@pytest.mark.parametrize("kwargs, message", [
    ({"path": None}, r"read_section's path must be a path \(str or pathlib.Path\), not a NoneType"),
    ({"path": b"/work/x"}, r"not a bytes \(decode it: .decode\(\)\)"),
    ({"path": ""}, r"not empty"),
    ({"path": 3}, r"not a int"),
    ({"path": C2, "um_per_px": "1.38"}, r"um_per_px must be a positive number, not a str \('1.38'\): pass um_per_px=1.38"),
    ({"path": C2, "um_per_px": True}, r"um_per_px must be a positive number, not a bool"),
    ({"path": C2, "um_per_px": -1.0}, r"um_per_px must be a positive number, not -1.0"),
    ({"path": C2, "bin_um": "16"}, r"bin_um must be a positive number, not a str"),
    ({"path": C2, "image": b"image.jpg"}, r"the section's image must be a path .* not a bytes"),
    ({"path": C2, "sample": 3}, r"sample must be a HEST sample id \(a str\)"),
])
def test_arguments_of_the_wrong_type(kwargs, message):
    kwargs = dict(kwargs)
    with pytest.raises(BleepError, match=message):
        read(kwargs.pop("path"), **kwargs)


@pytest.mark.parametrize("content, message", [
    (b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR", r"a binary file, not a gene list"),
    (b"IGKC\nERBB2\n\xff\xfe\n", r"line 3 is not UTF-8 text"),
    (b"\n  \n", r"no gene in it"),
])
def test_a_gene_list_file_that_is_not_one(tmp_path, content, message):
    (tmp_path / "genes.txt").write_bytes(content)
    with pytest.raises(BleepError, match=r"genes.txt: " + message):
        read_gene_list(tmp_path / "genes.txt")
    from bleep_rs.cli import _read_gene_file  # what `bleep-rs reference --genes FILE` calls

    with pytest.raises(BleepError, match=message):
        _read_gene_file(tmp_path / "genes.txt")
    (tmp_path / "ok.txt").write_bytes(b"\xef\xbb\xbfIGKC\r\n ERBB2 \n\n")
    assert read_gene_list(tmp_path / "ok.txt") == ["IGKC", "ERBB2"]
    with pytest.raises(BleepError, match=r"missing"):
        read_gene_list(tmp_path / "none.txt")


def test_bleep_error_is_what_the_package_exports():
    assert BleepError is bleep_rs.BleepError


@pytest.mark.parametrize("stated", [5000.0, 1e-300, 0.001])
def test_a_section_file_stating_an_implausible_pixel_size_is_not_believed(tmp_path, stated):
    """The readers hold every pixel size to the slide reader's one rule: a stated value outside it is
    dropped with a warning (the spot pitch then gives the size), a given one is an error."""
    import json

    src = DATA / "tiny" / "C2"
    sec = tmp_path / "C2"
    writable_copy(src, sec)
    meta = json.loads((sec / "meta.json").read_text())
    meta["um_per_px"] = stated
    (sec / "meta.json").write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match="plausible"):
        adata = bleep_rs.read_section(sec)
    assert abs(adata.uns["bleep"]["um_per_px"] / 1.3873 - 1) < 0.1  # from the spot pitch
    with pytest.raises(BleepError, match="plausible"):
        bleep_rs.read_section(src, um_per_px=stated)
