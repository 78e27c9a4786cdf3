//! All PyO3 glue: the `bleep_rs._core` module. Arguments arrive as C-contiguous float32 arrays (the
//! Python layer coerces them); the interpreter is released for all numeric work.

use crate::aggregate::{Method, Table};
use crate::error::Error;
use crate::pool;
use crate::reference::{Labels, Reference};
use numpy::{PyArray1, PyArray2, PyArrayMethods, PyReadonlyArray2, PyUntypedArrayMethods};
use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use std::path::PathBuf;

create_exception!(
    _core,
    BleepError,
    PyException,
    "The error bleep-rs raises for bad input and unreadable files; the message says what to fix."
);

impl From<Error> for PyErr {
    fn from(e: Error) -> PyErr {
        BleepError::new_err(e.to_string())
    }
}

fn slice<'a>(a: &'a PyReadonlyArray2<'_, f32>, what: &str) -> PyResult<&'a [f32]> {
    a.as_slice()
        .map_err(|_| BleepError::new_err(format!("{what} must be C-contiguous")))
}

/// (indices, similarities) as NumPy arrays.
type NeighbourArrays<'py> = (Bound<'py, PyArray2<i64>>, Bound<'py, PyArray2<f32>>);

fn matrix<'py>(
    py: Python<'py>,
    values: Vec<f32>,
    rows: usize,
    cols: usize,
) -> PyResult<Bound<'py, PyArray2<f32>>> {
    PyArray1::from_vec(py, values).reshape([rows, cols])
}

/// The native reference: embeddings, expression and labels, with exact search and imputation.
#[pyclass(name = "ReferenceCore", module = "bleep_rs._core", frozen)]
struct PyReference {
    inner: Reference,
}

#[pymethods]
impl PyReference {
    #[staticmethod]
    #[pyo3(signature = (embeddings, expression, genes, spot_ids=None, sections=None, provenance=None, expression_dtype="float32", threads=None))]
    #[allow(clippy::too_many_arguments)]
    fn build(
        py: Python<'_>,
        embeddings: PyReadonlyArray2<'_, f32>,
        expression: PyReadonlyArray2<'_, f32>,
        genes: Vec<String>,
        spot_ids: Option<Vec<String>>,
        sections: Option<Vec<String>>,
        provenance: Option<String>,
        expression_dtype: &str,
        threads: Option<usize>,
    ) -> PyResult<Self> {
        let [n, dim] = [embeddings.shape()[0], embeddings.shape()[1]];
        let [n_expr, g] = [expression.shape()[0], expression.shape()[1]];
        if n_expr != n {
            return Err(BleepError::new_err(format!(
                "embeddings have {n} rows but expression has {n_expr}: give one row per reference spot in both"
            )));
        }
        if g != genes.len() {
            return Err(BleepError::new_err(format!(
                "expression has {g} columns but {} gene names were given: one name per column",
                genes.len()
            )));
        }
        let (emb, expr) = (
            slice(&embeddings, "embeddings")?,
            slice(&expression, "expression")?,
        );
        let labels = Labels {
            genes,
            spot_ids,
            sections,
            provenance,
        };
        let inner = py.detach(|| {
            pool::install(threads, || {
                let table = crate::reference::table_from_f32(expr, expression_dtype)?;
                Reference::build(emb.to_vec(), dim.max(usize::from(n == 0)), table, labels)
            })?
        })?;
        Ok(PyReference { inner })
    }

    #[staticmethod]
    #[pyo3(signature = (path, threads=None))]
    fn load(py: Python<'_>, path: PathBuf, threads: Option<usize>) -> PyResult<Self> {
        let inner = py.detach(|| pool::install(threads, || Reference::load(&path))?)?;
        Ok(PyReference { inner })
    }

    fn save(&self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        py.detach(|| self.inner.save(&path))?;
        Ok(())
    }

    /// (indices int64 Q x k', cosine similarities float32 Q x k'), k' = min(k, n_spots), best first.
    #[pyo3(signature = (queries, k, threads=None))]
    fn search<'py>(
        &self,
        py: Python<'py>,
        queries: PyReadonlyArray2<'py, f32>,
        k: usize,
        threads: Option<usize>,
    ) -> PyResult<NeighbourArrays<'py>> {
        let q = self.check_queries(&queries)?;
        let nq = queries.shape()[0];
        let nb = py.detach(|| pool::install(threads, || self.inner.search(q, k))?)?;
        let idx: Vec<i64> = nb.indices.iter().map(|&i| i as i64).collect();
        Ok((
            PyArray1::from_vec(py, idx).reshape([nq, nb.k])?,
            matrix(py, nb.scores, nq, nb.k)?,
        ))
    }

    /// (prediction float32 Q x G, indices int64 Q x k', similarities float32 Q x k').
    #[pyo3(signature = (queries, k, method="mean", temperature=0.1, threads=None))]
    #[allow(clippy::type_complexity)]
    fn impute<'py>(
        &self,
        py: Python<'py>,
        queries: PyReadonlyArray2<'py, f32>,
        k: usize,
        method: &str,
        temperature: f32,
        threads: Option<usize>,
    ) -> PyResult<(
        Bound<'py, PyArray2<f32>>,
        Bound<'py, PyArray2<i64>>,
        Bound<'py, PyArray2<f32>>,
    )> {
        let method = Method::parse(method, temperature)?;
        let q = self.check_queries(&queries)?;
        let nq = queries.shape()[0];
        let out = py.detach(|| pool::install(threads, || self.inner.impute(q, k, method))?)?;
        let nb = out.neighbours;
        let idx: Vec<i64> = nb.indices.iter().map(|&i| i as i64).collect();
        Ok((
            matrix(py, out.expression, nq, self.inner.genes().len())?,
            PyArray1::from_vec(py, idx).reshape([nq, nb.k])?,
            matrix(py, nb.scores, nq, nb.k)?,
        ))
    }

    /// Weighted sums of expression rows: (Q x k int64 indices, Q x k float32 weights) -> Q x G.
    #[pyo3(signature = (indices, weights, threads=None))]
    fn aggregate<'py>(
        &self,
        py: Python<'py>,
        indices: PyReadonlyArray2<'py, i64>,
        weights: PyReadonlyArray2<'py, f32>,
        threads: Option<usize>,
    ) -> PyResult<Bound<'py, PyArray2<f32>>> {
        if indices.shape() != weights.shape() {
            return Err(BleepError::new_err(format!(
                "indices {:?} and weights {:?} must have the same shape (queries x k)",
                indices.shape(),
                weights.shape()
            )));
        }
        let [nq, k] = [indices.shape()[0], indices.shape()[1]];
        let idx = indices
            .as_slice()
            .map_err(|_| BleepError::new_err("indices must be C-contiguous"))?;
        let n = self.inner.n_spots() as i64;
        if let Some(&bad) = idx.iter().find(|&&i| i < 0 || i >= n) {
            return Err(BleepError::new_err(format!(
                "index {bad} is out of range for a reference of {n} spots"
            )));
        }
        let idx: Vec<u32> = idx.iter().map(|&i| i as u32).collect();
        let w = slice(&weights, "weights")?;
        let out =
            py.detach(|| pool::install(threads, || self.inner.aggregate(&idx, w, k.max(1)))?)?;
        matrix(py, out, nq, self.inner.genes().len())
    }

    #[getter]
    fn n_spots(&self) -> usize {
        self.inner.n_spots()
    }
    #[getter]
    fn dim(&self) -> usize {
        self.inner.dim()
    }
    #[getter]
    fn genes(&self) -> Vec<String> {
        self.inner.genes().to_vec()
    }
    #[getter]
    fn spot_ids(&self) -> Vec<String> {
        self.inner.spot_ids().to_vec()
    }
    #[getter]
    fn sections(&self) -> Option<Vec<String>> {
        self.inner.sections().map(<[String]>::to_vec)
    }
    #[getter]
    fn provenance(&self) -> String {
        self.inner.provenance().to_string()
    }
    #[getter]
    fn expression_dtype(&self) -> &'static str {
        self.inner.expression_dtype().name()
    }

    /// The reference embeddings as given (not normalised), a float32 copy.
    fn embeddings<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let r = &self.inner;
        matrix(py, r.embeddings().to_vec(), r.n_spots(), r.dim())
    }

    /// The expression table as float32 (16-bit tables are widened), a copy.
    fn expression<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let r = &self.inner;
        let values = py.detach(|| match r.expression() {
            Table::F32(v) => v,
            other => other.to_f32(),
        });
        matrix(py, values, r.n_spots(), r.genes().len())
    }
}

impl PyReference {
    fn check_queries<'a>(&self, queries: &'a PyReadonlyArray2<'_, f32>) -> PyResult<&'a [f32]> {
        let d = queries.shape()[1];
        if d != self.inner.dim() {
            return Err(BleepError::new_err(format!(
                "queries have {d} columns but the reference embeddings have {}: embed the queries with the model that built this reference",
                self.inner.dim()
            )));
        }
        slice(queries, "queries")
    }
}

/// A whole-slide image or plain image, read tile by tile.
#[pyclass(name = "SlideCore", module = "bleep_rs._core", frozen)]
struct PySlide {
    inner: crate::slide::Slide,
}

type U8Array<'py> = Bound<'py, numpy::PyArrayDyn<u8>>;

fn u8_array<'py>(py: Python<'py>, values: Vec<u8>, shape: &[usize]) -> PyResult<U8Array<'py>> {
    PyArray1::from_vec(py, values).reshape(shape.to_vec())
}

/// The bytes of a C-contiguous uint8 array whose last axis is 3 (RGB).
fn rgb_slice<'a>(a: &'a numpy::PyReadonlyArrayDyn<'_, u8>, what: &str) -> PyResult<&'a [u8]> {
    if a.shape().last() != Some(&3) {
        return Err(BleepError::new_err(format!(
            "{what} must have RGB channels last (shape (..., 3)), got shape {:?}",
            a.shape()
        )));
    }
    a.as_slice()
        .map_err(|_| BleepError::new_err(format!("{what} must be C-contiguous")))
}

#[pymethods]
impl PySlide {
    #[staticmethod]
    fn open(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        let inner = py.detach(|| crate::slide::Slide::open(&path))?;
        Ok(PySlide { inner })
    }

    /// (width, height) of each level.
    #[getter]
    fn level_dimensions(&self) -> Vec<(usize, usize)> {
        self.inner
            .levels
            .iter()
            .map(|l| (l.width, l.height))
            .collect()
    }

    #[getter]
    fn level_downsamples(&self) -> Vec<f64> {
        self.inner.levels.iter().map(|l| l.downsample).collect()
    }

    /// (micrometres per level-0 pixel, where it came from), or None when the file does not say.
    #[getter]
    fn um_per_px(&self) -> Option<(f64, String)> {
        self.inner.um_per_px.clone()
    }

    #[getter]
    fn format(&self) -> &'static str {
        self.inner.format
    }

    /// OpenSlide's `read_region`: top-left `(x, y)` in level-0 px, `(w, h)` in the level's px; RGB (h, w, 3).
    fn read_region<'py>(
        &self,
        py: Python<'py>,
        x: i64,
        y: i64,
        level: usize,
        w: usize,
        h: usize,
    ) -> PyResult<U8Array<'py>> {
        let ds = self.inner.levels.get(level).map_or(1.0, |l| l.downsample);
        // OpenSlide paints a lower level at a sub-pixel offset; here the position is rounded to the level's grid.
        let rect = crate::slide::Rect {
            x: (x as f64 / ds).round() as i64,
            y: (y as f64 / ds).round() as i64,
            w,
            h,
        };
        let mut regions = py.detach(|| self.inner.read_regions(level, &[rect]))?;
        u8_array(py, regions.pop().unwrap_or_default(), &[h, w, 3])
    }

    /// Writes patches into `out` (n, size, size, 3) uint8: top-left corners `origins` (n x 2, level-0
    /// px), `scale` level-0 px per px.
    #[pyo3(signature = (origins, size, scale, out, threads=None))]
    fn patches_into(
        &self,
        py: Python<'_>,
        origins: numpy::PyReadonlyArray2<'_, f64>,
        size: usize,
        scale: f64,
        mut out: numpy::PyReadwriteArrayDyn<'_, u8>,
        threads: Option<usize>,
    ) -> PyResult<()> {
        if origins.shape()[1] != 2 {
            return Err(BleepError::new_err(
                "origins must be an (n, 2) array of (x, y)",
            ));
        }
        let xy: Vec<(f64, f64)> = origins
            .as_array()
            .rows()
            .into_iter()
            .map(|r| (r[0], r[1]))
            .collect();
        let dst = out
            .as_slice_mut()
            .map_err(|_| BleepError::new_err("out must be C-contiguous"))?;
        py.detach(|| pool::install(threads, || self.inner.patches_into(&xy, size, scale, dst))?)?;
        Ok(())
    }

    /// The whole slide with its longer side at most `max_side` px: RGB (h, w, 3).
    fn thumbnail<'py>(&self, py: Python<'py>, max_side: usize) -> PyResult<U8Array<'py>> {
        let (rgb, w, h) = py.detach(|| pool::install(None, || self.inner.thumbnail(max_side))?)?;
        u8_array(py, rgb, &[h, w, 3])
    }
}

/// (mask (h, w) uint8 of 0/1, Otsu threshold) of an RGB thumbnail.
#[pyfunction]
fn tissue_mask<'py>(
    py: Python<'py>,
    rgb: numpy::PyReadonlyArrayDyn<'py, u8>,
    median: usize,
    close: usize,
) -> PyResult<(U8Array<'py>, u8)> {
    let (h, w) = (rgb.shape()[0], rgb.shape().get(1).copied().unwrap_or(0));
    let data = rgb_slice(&rgb, "the thumbnail")?;
    if rgb.ndim() != 3 || h * w == 0 {
        return Err(BleepError::new_err(
            "the thumbnail must be a non-empty (h, w, 3) array",
        ));
    }
    let mask = py.detach(|| crate::tissue::tissue_mask(data, w, h, median, close));
    Ok((u8_array(py, mask.pixels, &[h, w])?, mask.threshold))
}

/// Top-left corners (n, 2) of the grid tiles with enough tissue.
#[pyfunction]
fn tissue_grid<'py>(
    py: Python<'py>,
    mask: numpy::PyReadonlyArray2<'py, u8>,
    mask_scale: f64,
    width: usize,
    height: usize,
    tile: f64,
    min_tissue: f64,
) -> PyResult<Bound<'py, PyArray2<f64>>> {
    let (mh, mw) = (mask.shape()[0], mask.shape()[1]);
    let pixels = mask
        .as_slice()
        .map_err(|_| BleepError::new_err("mask must be C-contiguous"))?
        .to_vec();
    let m = crate::tissue::Mask {
        pixels,
        width: mw,
        height: mh,
        threshold: 0,
    };
    let xy = py.detach(|| crate::tissue::grid(&m, mask_scale, width, height, tile, min_tissue));
    let n = xy.len();
    PyArray1::from_vec(py, xy.into_iter().flat_map(|(x, y)| [x, y]).collect()).reshape([n, 2])
}

fn stains_from(
    he: &numpy::PyReadonlyArray2<'_, f32>,
    max_c: &[f32],
) -> PyResult<crate::stain::Stains> {
    let a = he.as_array();
    if a.shape() != [3, 2] || max_c.len() != 2 {
        return Err(BleepError::new_err(
            "a stain basis is a (3, 2) matrix and 2 maximum concentrations",
        ));
    }
    Ok(crate::stain::Stains {
        he: std::array::from_fn(|r| [a[[r, 0]], a[[r, 1]]]),
        max_c: [max_c[0], max_c[1]],
    })
}

/// Macenko's stain basis of the target pixels: (HE (3, 2), max concentrations (2,)).
#[pyfunction]
fn macenko_fit<'py>(
    py: Python<'py>,
    pixels: numpy::PyReadonlyArrayDyn<'py, u8>,
    io: f32,
    alpha: f32,
    beta: f32,
) -> PyResult<(Bound<'py, PyArray2<f32>>, Vec<f32>)> {
    let data = rgb_slice(&pixels, "the target")?;
    let params = crate::stain::MacenkoParams { io, alpha, beta };
    let s = py.detach(|| crate::stain::macenko_fit(data, &params))?;
    Ok((
        matrix(py, s.he.iter().flatten().copied().collect(), 3, 2)?,
        s.max_c.to_vec(),
    ))
}

/// Macenko-normalised copies of patches (n, h, w, 3), and whether each had enough stain to normalise.
#[pyfunction]
#[pyo3(signature = (patches, he, max_c, io, alpha, beta, threads=None))]
#[allow(clippy::too_many_arguments)]
fn macenko_transform<'py>(
    py: Python<'py>,
    patches: numpy::PyReadonlyArrayDyn<'py, u8>,
    he: numpy::PyReadonlyArray2<'py, f32>,
    max_c: Vec<f32>,
    io: f32,
    alpha: f32,
    beta: f32,
    threads: Option<usize>,
) -> PyResult<(U8Array<'py>, Vec<bool>)> {
    let shape = patches.shape().to_vec();
    let mut data = rgb_slice(&patches, "patches")?.to_vec();
    if shape.len() != 4 {
        return Err(BleepError::new_err(format!(
            "patches must be (n, h, w, 3), got shape {shape:?}"
        )));
    }
    let (target, params) = (
        stains_from(&he, &max_c)?,
        crate::stain::MacenkoParams { io, alpha, beta },
    );
    let done = py.detach(|| {
        pool::install(threads, || {
            crate::stain::macenko_transform(&mut data, shape[1] * shape[2], &target, &params)
        })
    })?;
    Ok((u8_array(py, data, &shape)?, done))
}

/// Reinhard target statistics (3, 2): mean and standard deviation of L, a, b.
#[pyfunction]
fn reinhard_fit<'py>(
    py: Python<'py>,
    pixels: numpy::PyReadonlyArrayDyn<'py, u8>,
) -> PyResult<Bound<'py, PyArray2<f32>>> {
    let data = rgb_slice(&pixels, "the target")?;
    let stats = py.detach(|| crate::stain::reinhard_fit(data))?;
    matrix(py, stats.iter().flatten().copied().collect(), 3, 2)
}

/// Reinhard-normalised copies of patches (n, h, w, 3).
#[pyfunction]
#[pyo3(signature = (patches, stats, threads=None))]
fn reinhard_transform<'py>(
    py: Python<'py>,
    patches: numpy::PyReadonlyArrayDyn<'py, u8>,
    stats: numpy::PyReadonlyArray2<'py, f32>,
    threads: Option<usize>,
) -> PyResult<U8Array<'py>> {
    let shape = patches.shape().to_vec();
    let mut data = rgb_slice(&patches, "patches")?.to_vec();
    let s = stats.as_array();
    if shape.len() != 4 || s.shape() != [3, 2] {
        return Err(BleepError::new_err(
            "patches must be (n, h, w, 3) and the statistics (3, 2)",
        ));
    }
    let target: crate::stain::LabStats = std::array::from_fn(|c| [s[[c, 0]], s[[c, 1]]]);
    py.detach(|| {
        pool::install(threads, || {
            crate::stain::reinhard_transform(&mut data, shape[1] * shape[2], &target)
        })
    })?;
    u8_array(py, data, &shape)
}

/// Writes float32 (n, 3, h, w) tensors `(v / 255 - mean) / std` of uint8 patches (n, h, w, 3) into `out`.
#[pyfunction]
#[pyo3(signature = (patches, mean, std, out, threads=None))]
fn to_tensor_into(
    py: Python<'_>,
    patches: numpy::PyReadonlyArrayDyn<'_, u8>,
    mean: [f32; 3],
    std: [f32; 3],
    mut out: numpy::PyReadwriteArrayDyn<'_, f32>,
    threads: Option<usize>,
) -> PyResult<()> {
    let shape = patches.shape().to_vec();
    let data = rgb_slice(&patches, "patches")?;
    if shape.len() != 4 || std.iter().any(|&s| s.is_nan() || s <= 0.0) {
        return Err(BleepError::new_err(
            "patches must be (n, h, w, 3) and every std positive",
        ));
    }
    let (n, h, w) = (shape[0], shape[1], shape[2]);
    if out.shape() != [n, 3, h, w] {
        return Err(BleepError::new_err(format!(
            "out must have shape ({n}, 3, {h}, {w}), not {:?}",
            out.shape()
        )));
    }
    let dst = out
        .as_slice_mut()
        .map_err(|_| BleepError::new_err("out must be C-contiguous"))?;
    py.detach(|| {
        pool::install(threads, || {
            crate::stain::to_tensor(data, n, h, w, mean, std, dst)
        })
    })?;
    Ok(())
}

/// Set the default number of threads for native work (0: automatic, from BLEEP_RS_NUM_THREADS or the
/// number of CPUs).
#[pyfunction]
fn set_num_threads(n: usize) {
    pool::set_default_threads(n);
}

/// The number of threads native work uses by default.
#[pyfunction]
fn get_num_threads() -> PyResult<usize> {
    Ok(pool::default_threads()?)
}

/// The score kernel this CPU runs ("avx512", "avx2" or "portable").
#[pyfunction]
fn kernel_name() -> &'static str {
    crate::kernel::Kernel::detect().name()
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("BleepError", m.py().get_type::<BleepError>())?;
    m.add_class::<PyReference>()?;
    m.add_class::<PySlide>()?;
    for f in [
        wrap_pyfunction!(tissue_mask, m)?,
        wrap_pyfunction!(tissue_grid, m)?,
        wrap_pyfunction!(macenko_fit, m)?,
        wrap_pyfunction!(macenko_transform, m)?,
        wrap_pyfunction!(reinhard_fit, m)?,
        wrap_pyfunction!(reinhard_transform, m)?,
        wrap_pyfunction!(to_tensor_into, m)?,
    ] {
        m.add_function(f)?;
    }
    m.add_function(wrap_pyfunction!(set_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(get_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(kernel_name, m)?)?;
    m.add("FORMAT_VERSION", crate::reference::FORMAT_VERSION)?;
    Ok(())
}
