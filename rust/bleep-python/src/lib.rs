//! The PyO3 binding: the `bleep_rs._core` module. Marshalling only: arguments arrive as NumPy arrays
//! (C-contiguous, coerced by the Python layer) and Python numbers; bleep-core and bleep-slide check
//! them and do the work; results go back as NumPy arrays.
//!
//! Every call that does native work runs it through [`native`]: the interpreter is released, the work
//! runs on the named pool of the configured size (never rayon's global pool, which hangs in a forked
//! child; `bleep_core::pool::run`), and an error or a panic anywhere in native code comes back as
//! `BleepError`.

use bleep_core::{pool, Dtype, Format, Matrix, Method, Reference, Table, Write};
use bleep_slide::{MacenkoParams, Mask, Slide, Stains};
use numpy::{
    PyArray1, PyArray2, PyArrayDyn, PyArrayMethods, PyReadonlyArray1, PyReadonlyArray2,
    PyReadonlyArrayDyn, PyReadwriteArrayDyn, PyUntypedArrayMethods,
};
use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use pyo3::types::PyInt;
use std::path::PathBuf;

create_exception!(
    bleep_rs._core,
    BleepError,
    PyException,
    "The error bleep-rs raises for bad input and unreadable files; the message says what to fix."
);

/// Runs `work` with the interpreter released, on the named pool of `threads` threads (None: the
/// configured default). Its error, or a panic anywhere inside it, becomes `BleepError`.
fn native<T: Send>(
    py: Python<'_>,
    threads: Option<usize>,
    work: impl FnOnce() -> bleep_core::Result<T> + Send,
) -> PyResult<T> {
    py.detach(|| pool::run(threads, work))
        .map_err(|e| BleepError::new_err(e.to_string()))
}

/// The extractors `#[pyo3(from_py_with = ...)]` takes, one per whole-number argument: a Python int
/// that does not fit (a negative count, 2**64 and above) is a `BleepError` naming the argument, rather
/// than PyO3's bare OverflowError.
macro_rules! whole_numbers {
    ($($f:ident: $t:ty = $name:literal),* $(,)?) => {$(
        fn $f(v: &Bound<'_, PyAny>) -> PyResult<$t> {
            match v.extract::<$t>() {
                Err(_) if v.is_instance_of::<PyInt>() => Err(BleepError::new_err(format!(
                    "{}={v} is out of range: it must be a whole number from {} to {}",
                    $name,
                    <$t>::MIN,
                    <$t>::MAX
                ))),
                Err(_) => Err(BleepError::new_err(format!(
                    "{}={} must be a whole number",
                    $name,
                    v.repr().map_or_else(|_| "?".to_string(), |r| r.to_string())
                ))),
                Ok(n) => Ok(n),
            }
        }
    )*};
}

whole_numbers!(
    k_arg: usize = "k",
    n_arg: usize = "n",
    threads_count: usize = "threads",
    level_arg: usize = "level",
    w_arg: usize = "w",
    h_arg: usize = "h",
    size_arg: usize = "size",
    batch_arg: usize = "batch_size",
    max_side_arg: usize = "max_side",
    median_arg: usize = "median",
    close_arg: usize = "close",
    width_arg: usize = "width",
    height_arg: usize = "height",
    x_arg: i64 = "x",
    y_arg: i64 = "y",
);

/// `threads=`: None (the default pool) or a count.
fn threads_arg(v: &Bound<'_, PyAny>) -> PyResult<Option<usize>> {
    if v.is_none() {
        return Ok(None);
    }
    threads_count(v).map(Some)
}

/// The values of a C-contiguous array. (rust-numpy's `as_slice` also takes a Fortran-ordered one, whose
/// values would then be read in the wrong order.)
fn contiguous<'a, T: numpy::Element, D: numpy::ndarray::Dimension>(
    a: &'a numpy::PyReadonlyArray<'_, T, D>,
    what: &str,
) -> PyResult<&'a [T]> {
    if !a.is_c_contiguous() {
        return Err(not_c_contiguous(what));
    }
    a.as_slice().map_err(|_| not_c_contiguous(what))
}

/// The values of a C-contiguous array to write into (as [`contiguous`]).
fn contiguous_mut<'a, T: numpy::Element, D: numpy::ndarray::Dimension>(
    a: &'a mut numpy::PyReadwriteArray<'_, T, D>,
    what: &str,
) -> PyResult<&'a mut [T]> {
    if !a.is_c_contiguous() {
        return Err(not_c_contiguous(what));
    }
    a.as_slice_mut().map_err(|_| not_c_contiguous(what))
}

fn not_c_contiguous(what: &str) -> PyErr {
    BleepError::new_err(format!(
        "{what} must be C-contiguous (np.ascontiguousarray makes it so)"
    ))
}

/// A 2-D array as a core matrix.
fn matrix_of<'a, T: numpy::Element>(
    a: &'a PyReadonlyArray2<'_, T>,
    what: &str,
) -> PyResult<Matrix<'a, T>> {
    Ok(Matrix::new(
        contiguous(a, what)?,
        a.shape()[0],
        a.shape()[1],
    ))
}

/// An array of `shape` holding `values`.
fn array<'py, T: numpy::Element>(
    py: Python<'py>,
    values: Vec<T>,
    shape: &[usize],
) -> PyResult<Bound<'py, PyArrayDyn<T>>> {
    PyArray1::from_vec(py, values).reshape(shape.to_vec())
}

fn matrix<'py, T: numpy::Element>(
    py: Python<'py>,
    values: Vec<T>,
    rows: usize,
    cols: usize,
) -> PyResult<Bound<'py, PyArray2<T>>> {
    PyArray1::from_vec(py, values).reshape([rows, cols])
}

/// `out=` arguments: an array of `T` that may be written, or a `BleepError` naming `what` (a read-only
/// array, one of another dtype, or one borrowed elsewhere) instead of PyO3's TypeError.
fn writable<'py, T: numpy::Element>(
    a: &Bound<'py, PyAny>,
    what: &str,
) -> PyResult<PyReadwriteArrayDyn<'py, T>> {
    let dtype = numpy::dtype::<T>(a.py());
    let array = a
        .cast::<PyArrayDyn<T>>()
        .map_err(|_| BleepError::new_err(format!("{what} must be a NumPy array of {dtype}")))?;
    array.try_readwrite().map_err(|e| {
        BleepError::new_err(format!(
            "{what} must be a writable array ({e}): pass a fresh array, e.g. np.empty(...)"
        ))
    })
}

/// (indices, similarities) as NumPy arrays.
type NeighbourArrays<'py> = (Bound<'py, PyArray2<i64>>, Bound<'py, PyArray2<f32>>);

fn neighbour_arrays<'py>(
    py: Python<'py>,
    nb: bleep_core::Neighbours,
    nq: usize,
) -> PyResult<NeighbourArrays<'py>> {
    let idx: Vec<i64> = nb.indices.iter().map(|&i| i as i64).collect();
    Ok((matrix(py, idx, nq, nb.k)?, matrix(py, nb.scores, nq, nb.k)?))
}

/// The native reference: embeddings, expression and labels, with exact search and imputation.
#[pyclass(name = "ReferenceCore", module = "bleep_rs._core", frozen)]
struct PyReference {
    inner: Reference,
}

#[pymethods]
impl PyReference {
    #[staticmethod]
    #[pyo3(signature = (embeddings, expression, genes, spot_ids=None, sections=None, provenance=None, expression_dtype="float32", threads=None, expression_format="auto"))]
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
        #[pyo3(from_py_with = threads_arg)] threads: Option<usize>,
        expression_format: &str,
    ) -> PyResult<Self> {
        let (emb, expr) = (
            matrix_of(&embeddings, "embeddings")?,
            matrix_of(&expression, "expression")?,
        );
        let labels = bleep_core::Labels {
            genes,
            spot_ids,
            sections,
            provenance,
        };
        let inner = native(py, threads, || {
            let (dtype, format) = (
                Dtype::parse(expression_dtype)?,
                Format::parse(expression_format)?,
            );
            Reference::build_as(emb, expr, dtype, format, labels)
        })?;
        Ok(PyReference { inner })
    }

    /// A reference whose expression arrives as compressed sparse rows (canonical: columns strictly
    /// increasing within each row): `indptr` (N + 1 int64), `indices` (nnz uint32), `values` (nnz float32).
    #[staticmethod]
    #[pyo3(signature = (embeddings, indptr, indices, values, genes, spot_ids=None, sections=None, provenance=None, expression_dtype="float32", expression_format="auto", threads=None))]
    #[allow(clippy::too_many_arguments)]
    fn build_csr(
        py: Python<'_>,
        embeddings: PyReadonlyArray2<'_, f32>,
        indptr: PyReadonlyArray1<'_, i64>,
        indices: PyReadonlyArray1<'_, u32>,
        values: PyReadonlyArray1<'_, f32>,
        genes: Vec<String>,
        spot_ids: Option<Vec<String>>,
        sections: Option<Vec<String>>,
        provenance: Option<String>,
        expression_dtype: &str,
        expression_format: &str,
        #[pyo3(from_py_with = threads_arg)] threads: Option<usize>,
    ) -> PyResult<Self> {
        let emb = matrix_of(&embeddings, "embeddings")?;
        let (indptr, indices, values) = (
            contiguous(&indptr, "indptr")?,
            contiguous(&indices, "indices")?,
            contiguous(&values, "values")?,
        );
        let labels = bleep_core::Labels {
            genes,
            spot_ids,
            sections,
            provenance,
        };
        let inner = native(py, threads, || {
            let (dtype, format) = (
                Dtype::parse(expression_dtype)?,
                Format::parse(expression_format)?,
            );
            Reference::build_csr(
                emb,
                indptr.to_vec(),
                indices.to_vec(),
                values,
                dtype,
                format,
                labels,
            )
        })?;
        Ok(PyReference { inner })
    }

    #[staticmethod]
    #[pyo3(signature = (path, threads=None))]
    fn load(
        py: Python<'_>,
        path: PathBuf,
        #[pyo3(from_py_with = threads_arg)] threads: Option<usize>,
    ) -> PyResult<Self> {
        let inner = native(py, threads, || Reference::load(&path))?;
        Ok(PyReference { inner })
    }

    fn save(&self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        native(py, None, || self.inner.save(&path))
    }

    /// (indices int64 Q x k', cosine similarities float32 Q x k'), k' = min(k, n_spots), best first.
    #[pyo3(signature = (queries, k, threads=None))]
    fn search<'py>(
        &self,
        py: Python<'py>,
        queries: PyReadonlyArray2<'py, f32>,
        #[pyo3(from_py_with = k_arg)] k: usize,
        #[pyo3(from_py_with = threads_arg)] threads: Option<usize>,
    ) -> PyResult<NeighbourArrays<'py>> {
        let q = matrix_of(&queries, "queries")?;
        let nb = native(py, threads, || self.inner.search(q, k))?;
        neighbour_arrays(py, nb, q.rows)
    }

    /// (prediction float32 Q x G, indices int64 Q x k', similarities float32 Q x k').
    #[pyo3(signature = (queries, k, method="mean", temperature=0.1, threads=None))]
    #[allow(clippy::type_complexity)]
    fn impute<'py>(
        &self,
        py: Python<'py>,
        queries: PyReadonlyArray2<'py, f32>,
        #[pyo3(from_py_with = k_arg)] k: usize,
        method: &str,
        temperature: f32,
        #[pyo3(from_py_with = threads_arg)] threads: Option<usize>,
    ) -> PyResult<(
        Bound<'py, PyArray2<f32>>,
        Bound<'py, PyArray2<i64>>,
        Bound<'py, PyArray2<f32>>,
    )> {
        let q = matrix_of(&queries, "queries")?;
        let out = native(py, threads, || {
            self.inner.impute(q, k, Method::parse(method, temperature)?)
        })?;
        let (idx, sims) = neighbour_arrays(py, out.neighbours, q.rows)?;
        let g = self.inner.genes().len();
        Ok((matrix(py, out.expression, q.rows, g)?, idx, sims))
    }

    /// Weighted sums of expression rows: (Q x k int64 indices, Q x k float32 weights) -> Q x G.
    #[pyo3(signature = (indices, weights, threads=None))]
    fn aggregate<'py>(
        &self,
        py: Python<'py>,
        indices: PyReadonlyArray2<'py, i64>,
        weights: PyReadonlyArray2<'py, f32>,
        #[pyo3(from_py_with = threads_arg)] threads: Option<usize>,
    ) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let (idx, w) = (
            matrix_of(&indices, "indices")?,
            matrix_of(&weights, "weights")?,
        );
        let out = native(py, threads, || self.inner.aggregate(idx, w))?;
        matrix(py, out, idx.rows, self.inner.genes().len())
    }

    /// Adds the weighted sums of expression rows to `out` (Q x G float32, C-contiguous, written in
    /// place): how a sharded reference sums its shards' shares into one output.
    #[pyo3(signature = (indices, weights, out, threads=None))]
    fn aggregate_add<'py>(
        &self,
        py: Python<'py>,
        indices: PyReadonlyArray2<'py, i64>,
        weights: PyReadonlyArray2<'py, f32>,
        out: &Bound<'py, PyAny>,
        #[pyo3(from_py_with = threads_arg)] threads: Option<usize>,
    ) -> PyResult<()> {
        let (idx, w) = (
            matrix_of(&indices, "indices")?,
            matrix_of(&weights, "weights")?,
        );
        let mut out = writable::<f32>(out, "out")?;
        let g = self.inner.genes().len();
        if out.shape() != [idx.rows, g] {
            return Err(BleepError::new_err(format!(
                "out has shape {:?} but {} queries x {g} genes are needed",
                out.shape(),
                idx.rows
            )));
        }
        let dst = contiguous_mut(&mut out, "out")?;
        native(py, threads, || {
            self.inner.aggregate_into(idx, w, dst, Write::Add)
        })
    }

    /// Per query, the mean over genes of the std of its neighbours' expression: (Q x k int64) -> Q.
    #[pyo3(signature = (indices, threads=None))]
    fn neighbour_spread<'py>(
        &self,
        py: Python<'py>,
        indices: PyReadonlyArray2<'py, i64>,
        #[pyo3(from_py_with = threads_arg)] threads: Option<usize>,
    ) -> PyResult<Bound<'py, PyArray1<f32>>> {
        let idx = matrix_of(&indices, "indices")?;
        let out = native(py, threads, || self.inner.neighbour_spread(idx))?;
        Ok(PyArray1::from_vec(py, out))
    }

    /// The f64 norms of the embeddings of the spots `indices` (Q x k int64) names: Q x k.
    fn norms_of<'py>(
        &self,
        py: Python<'py>,
        indices: PyReadonlyArray2<'py, i64>,
    ) -> PyResult<Bound<'py, PyArray2<f64>>> {
        let idx = matrix_of(&indices, "indices")?;
        let out = native(py, None, || self.inner.norms_of(idx))?;
        matrix(py, out, idx.rows, idx.cols)
    }

    /// Drops this process's mapping of the file's pages (resident memory falls; the page cache keeps
    /// them, and the next read maps them again). True where the reference reads a mapped file.
    fn release_pages(&self, py: Python<'_>) -> PyResult<bool> {
        py.detach(|| self.inner.release_pages())
            .map_err(|e| BleepError::new_err(e.to_string()))
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
    fn spot_ids(&self) -> PyResult<Vec<String>> {
        Ok(self
            .inner
            .spot_ids()
            .map_err(|e| BleepError::new_err(e.to_string()))?
            .to_vec())
    }
    #[getter]
    fn sections(&self) -> PyResult<Option<Vec<String>>> {
        let sections = self
            .inner
            .sections()
            .map_err(|e| BleepError::new_err(e.to_string()))?;
        Ok(sections.map(<[String]>::to_vec))
    }
    #[getter]
    fn provenance(&self) -> String {
        self.inner.provenance().to_string()
    }
    #[getter]
    fn expression_dtype(&self) -> &'static str {
        self.inner.expression_dtype().name()
    }
    /// "dense" or "sparse".
    #[getter]
    fn expression_format(&self) -> &'static str {
        self.inner.expression_table().format().name()
    }
    /// Bytes of the stored expression (values, and the sparse structure).
    #[getter]
    fn expression_nbytes(&self) -> usize {
        self.inner.expression_table().nbytes()
    }
    /// Whether the expression and the embeddings are read from the mapped file (not held in memory).
    #[getter]
    fn mapped(&self) -> bool {
        self.inner.expression_table().is_mapped() && self.inner.index().is_mapped()
    }

    /// The expression as compressed sparse rows, copies: (indptr int64 N + 1, indices int32, values
    /// float32).
    #[allow(clippy::type_complexity)]
    fn expression_csr<'py>(
        &self,
        py: Python<'py>,
    ) -> PyResult<(
        Bound<'py, PyArray1<i64>>,
        Bound<'py, PyArray1<i32>>,
        Bound<'py, PyArray1<f32>>,
    )> {
        let r = &self.inner;
        let (indptr, indices, values) = native(py, None, || {
            let (p, i, v) = r.expression_table().to_csr()?;
            Ok((p, i.into_iter().map(|c| c as i32).collect::<Vec<i32>>(), v))
        })?;
        Ok((
            PyArray1::from_vec(py, indptr),
            PyArray1::from_vec(py, indices),
            PyArray1::from_vec(py, values),
        ))
    }

    /// The reference embeddings as given (not normalised), a float32 copy.
    fn embeddings<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let r = &self.inner;
        let values = native(py, None, || Ok(r.embeddings().to_vec()))?;
        matrix(py, values, r.n_spots(), r.dim())
    }

    /// The expression table as float32 (16-bit tables are widened), a copy.
    fn expression<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let r = &self.inner;
        let values = native(py, None, || {
            Ok(match r.expression() {
                Table::F32(v) => v,
                other => other.to_f32(),
            })
        })?;
        matrix(py, values, r.n_spots(), r.genes().len())
    }
}

const _: () = assert!(bleep_slide::BATCH == 256, "the batch=256 defaults below");

/// A whole-slide image or plain image, read tile by tile.
#[pyclass(name = "SlideCore", module = "bleep_rs._core", frozen)]
struct PySlide {
    inner: Slide,
}

#[pymethods]
impl PySlide {
    #[staticmethod]
    fn open(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        let inner = native(py, None, || Slide::open(&path))?;
        Ok(PySlide { inner })
    }

    /// Pickled by path: unpickling (in a `spawn` child ...) opens the file again.
    fn __reduce__<'py>(slf: &Bound<'py, Self>) -> PyResult<(Bound<'py, PyAny>, (PathBuf,))> {
        let open = slf.get_type().getattr("open")?;
        Ok((open, (slf.get().inner.path().to_path_buf(),)))
    }

    /// What the file says that was not believed (a pixel size outside the plausible range ...).
    #[getter]
    fn warnings(&self) -> Vec<String> {
        self.inner.warnings.clone()
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
        #[pyo3(from_py_with = x_arg)] x: i64,
        #[pyo3(from_py_with = y_arg)] y: i64,
        #[pyo3(from_py_with = level_arg)] level: usize,
        #[pyo3(from_py_with = w_arg)] w: usize,
        #[pyo3(from_py_with = h_arg)] h: usize,
    ) -> PyResult<Bound<'py, PyArrayDyn<u8>>> {
        let rgb = native(py, None, || self.inner.read_region(x, y, level, w, h))?;
        array(py, rgb, &[h, w, 3])
    }

    /// Writes patches into `out` (n, size, size, 3) uint8: top-left corners `origins` (n x 2, level-0
    /// px), `scale` level-0 px per px; the tiles of `batch` patches decoded together.
    // batch=256: bleep_slide::BATCH (a signature default must be a literal to show in Python).
    #[pyo3(signature = (origins, size, scale, out, threads=None, batch=256))]
    #[allow(clippy::too_many_arguments)]
    fn patches_into(
        &self,
        py: Python<'_>,
        origins: PyReadonlyArray2<'_, f64>,
        #[pyo3(from_py_with = size_arg)] size: usize,
        scale: f64,
        out: &Bound<'_, PyAny>,
        #[pyo3(from_py_with = threads_arg)] threads: Option<usize>,
        #[pyo3(from_py_with = batch_arg)] batch: usize,
    ) -> PyResult<()> {
        self.fields_into(py, origins, size, vec![scale], out, threads, batch)
    }

    /// Writes several fields of view per location into `out` (n, F, size, size, 3) uint8 in one pass:
    /// field f of row i has its top-left corner at `origins[i, 2f:2f + 2]` (n x 2F, level-0 px) and
    /// `scales[f]` level-0 px per px.
    #[pyo3(signature = (origins, size, scales, out, threads=None, batch=256))]
    #[allow(clippy::too_many_arguments)]
    fn fields_into(
        &self,
        py: Python<'_>,
        origins: PyReadonlyArray2<'_, f64>,
        #[pyo3(from_py_with = size_arg)] size: usize,
        scales: Vec<f64>,
        out: &Bound<'_, PyAny>,
        #[pyo3(from_py_with = threads_arg)] threads: Option<usize>,
        #[pyo3(from_py_with = batch_arg)] batch: usize,
    ) -> PyResult<()> {
        let xy = matrix_of(&origins, "origins")?;
        let mut out = writable::<u8>(out, "out")?;
        let dst = contiguous_mut(&mut out, "out")?;
        native(py, threads, || {
            self.inner.fields_into(xy, size, &scales, batch, dst)
        })
    }

    /// The whole slide with its longer side at most `max_side` px: RGB (h, w, 3).
    fn thumbnail<'py>(
        &self,
        py: Python<'py>,
        #[pyo3(from_py_with = max_side_arg)] max_side: usize,
    ) -> PyResult<Bound<'py, PyArrayDyn<u8>>> {
        let (rgb, w, h) = native(py, None, || self.inner.thumbnail(max_side))?;
        array(py, rgb, &[h, w, 3])
    }
}

/// The memory behind an array from [`patch_array`]: handed back to bleep-core's pool when NumPy
/// releases the array, for the next batch to reuse.
#[pyclass(module = "bleep_rs._core", frozen)]
struct Recycled {
    array: Option<numpy::ndarray::ArrayD<u8>>,
}

impl Drop for Recycled {
    fn drop(&mut self) {
        if let Some(a) = self.array.take() {
            bleep_core::memory::recycle(a.into_raw_vec_and_offset().0);
        }
    }
}

/// An uninitialised uint8 array of `shape` for outputs written whole (patches): the memory of a
/// released one when there is one (no page faults, no clearing by the kernel), else fresh.
#[pyfunction]
fn patch_array(py: Python<'_>, shape: Vec<usize>) -> PyResult<Bound<'_, PyArrayDyn<u8>>> {
    let what = format!("a patch array of shape {shape:?}");
    let len = bleep_core::memory::bytes(&shape, &what, "ask for fewer or smaller patches")
        .map_err(|e| BleepError::new_err(e.to_string()))?;
    let buf =
        bleep_core::memory::recycled(len, &what).map_err(|e| BleepError::new_err(e.to_string()))?;
    let array = numpy::ndarray::ArrayD::from_shape_vec(shape, buf)
        .map_err(|e| BleepError::new_err(format!("{what}: {e}")))?;
    let owner = Bound::new(py, Recycled { array: Some(array) })?;
    let view = owner.get().array.as_ref().expect("set above");
    // SAFETY: `owner` becomes the array's base object, so the memory lives as long as the array;
    // it is never reallocated (the pyclass is frozen and its Drop runs only after the array is gone).
    Ok(unsafe { PyArrayDyn::borrow_from_array(view, owner.clone().into_any()) })
}

/// (mask (h, w) uint8 of 0/1, Otsu threshold) of an RGB thumbnail.
#[pyfunction]
fn tissue_mask<'py>(
    py: Python<'py>,
    rgb: PyReadonlyArrayDyn<'py, u8>,
    #[pyo3(from_py_with = median_arg)] median: usize,
    #[pyo3(from_py_with = close_arg)] close: usize,
) -> PyResult<(Bound<'py, PyArrayDyn<u8>>, u8)> {
    let (data, shape) = (contiguous(&rgb, "the thumbnail")?, rgb.shape());
    let mask = native(py, None, || {
        bleep_slide::tissue_mask(data, shape, median, close)
    })?;
    Ok((
        array(py, mask.pixels, &[mask.height, mask.width])?,
        mask.threshold,
    ))
}

/// Top-left corners (n, 2) of the grid tiles with enough tissue.
#[pyfunction]
fn tissue_grid<'py>(
    py: Python<'py>,
    mask: PyReadonlyArrayDyn<'py, u8>,
    mask_scale: f64,
    #[pyo3(from_py_with = width_arg)] width: usize,
    #[pyo3(from_py_with = height_arg)] height: usize,
    tile: f64,
    min_tissue: f64,
) -> PyResult<Bound<'py, PyArray2<f64>>> {
    let (pixels, shape) = (contiguous(&mask, "mask")?, mask.shape());
    let xy = native(py, None, || {
        let mask = Mask::from_shape(pixels, shape)?;
        bleep_slide::tissue_grid(&mask, mask_scale, width, height, tile, min_tissue)
    })?;
    let n = xy.len();
    matrix(py, xy.into_iter().flat_map(|(x, y)| [x, y]).collect(), n, 2)
}

/// Macenko's stain basis of the target pixels: (HE (3, 2), max concentrations (2,)).
#[pyfunction]
fn macenko_fit<'py>(
    py: Python<'py>,
    pixels: PyReadonlyArrayDyn<'py, u8>,
    io: f32,
    alpha: f32,
    beta: f32,
) -> PyResult<(Bound<'py, PyArray2<f32>>, Vec<f32>)> {
    let (data, shape) = (contiguous(&pixels, "the target")?, pixels.shape());
    let params = MacenkoParams { io, alpha, beta };
    let s = native(py, None, || bleep_slide::macenko_fit(data, shape, &params))?;
    Ok((
        matrix(py, s.he.iter().flatten().copied().collect(), 3, 2)?,
        s.max_c.to_vec(),
    ))
}

/// Writes Macenko-normalised copies of patches (n, h, w, 3) into `out` (as large); returns whether each
/// had enough stain to normalise (those without are copied as they are).
#[pyfunction]
#[pyo3(signature = (patches, he, max_c, io, alpha, beta, out, threads=None))]
#[allow(clippy::too_many_arguments)]
fn macenko_transform<'py>(
    py: Python<'py>,
    patches: PyReadonlyArrayDyn<'py, u8>,
    he: PyReadonlyArray2<'py, f32>,
    max_c: Vec<f32>,
    io: f32,
    alpha: f32,
    beta: f32,
    mut out: PyReadwriteArrayDyn<'py, u8>,
    #[pyo3(from_py_with = threads_arg)] threads: Option<usize>,
) -> PyResult<Vec<bool>> {
    let (data, shape) = (contiguous(&patches, "patches")?, patches.shape());
    let he = matrix_of(&he, "the stain matrix")?;
    let params = MacenkoParams { io, alpha, beta };
    // Into the caller's (uninitialised) array: a copy transformed in place would cost a pass more.
    let dst = contiguous_mut(&mut out, "out")?;
    native(py, threads, || {
        let target = Stains::from_parts(he, &max_c)?;
        bleep_slide::macenko_transform_into(data, dst, shape, &target, &params)
    })
}

/// Reinhard target statistics (3, 2): mean and standard deviation of L, a, b.
#[pyfunction]
fn reinhard_fit<'py>(
    py: Python<'py>,
    pixels: PyReadonlyArrayDyn<'py, u8>,
) -> PyResult<Bound<'py, PyArray2<f32>>> {
    let (data, shape) = (contiguous(&pixels, "the target")?, pixels.shape());
    let stats = native(py, None, || bleep_slide::reinhard_fit(data, shape))?;
    matrix(py, stats.iter().flatten().copied().collect(), 3, 2)
}

/// Writes Reinhard-normalised patches (n, h, w, 3) into `out` (uint8, the same shape).
#[pyfunction]
#[pyo3(signature = (patches, stats, out, threads=None))]
fn reinhard_transform(
    py: Python<'_>,
    patches: PyReadonlyArrayDyn<'_, u8>,
    stats: PyReadonlyArray2<'_, f32>,
    mut out: PyReadwriteArrayDyn<'_, u8>,
    #[pyo3(from_py_with = threads_arg)] threads: Option<usize>,
) -> PyResult<()> {
    let (data, shape) = (contiguous(&patches, "patches")?, patches.shape());
    let target = matrix_of(&stats, "the Reinhard statistics")?;
    let dst = contiguous_mut(&mut out, "out")?;
    native(py, threads, || {
        bleep_slide::reinhard_transform(data, shape, target, dst)
    })
}

/// Writes float32 (n, 3, h, w) tensors `(v / 255 - mean) / std` of uint8 patches (n, h, w, 3) into `out`.
#[pyfunction]
#[pyo3(signature = (patches, mean, std, out, threads=None))]
fn to_tensor_into(
    py: Python<'_>,
    patches: PyReadonlyArrayDyn<'_, u8>,
    mean: [f32; 3],
    std: [f32; 3],
    out: &Bound<'_, PyAny>,
    #[pyo3(from_py_with = threads_arg)] threads: Option<usize>,
) -> PyResult<()> {
    let (data, shape) = (contiguous(&patches, "patches")?, patches.shape());
    let mut out = writable::<f32>(out, "out")?;
    let out_shape = out.shape().to_vec();
    let dst = contiguous_mut(&mut out, "out")?;
    native(py, threads, || {
        bleep_slide::to_tensor(data, shape, mean, std, dst, &out_shape)
    })
}

/// `value` if it is a plausible pixel size (micrometres per pixel: finite, within the range every
/// source of a pixel size is held to), else `BleepError` naming `source` and the value.
#[pyfunction]
fn check_um_per_px(value: f64, source: &str) -> PyResult<f64> {
    bleep_slide::check_um_per_px(value, source).map_err(|e| BleepError::new_err(e.to_string()))
}

/// The weights (Q x k float32, rows summing to 1) `method` gives neighbours with cosine similarities
/// `scores` (Q x k, best first), for queries of norms `query_norms` (Q) and neighbours of norms
/// `neighbour_norms` (Q x k; both used by "weighted" only): the weighting step of imputation alone, for
/// neighbours merged from several references.
#[pyfunction]
#[pyo3(signature = (scores, query_norms, neighbour_norms, method="mean", temperature=0.1))]
fn neighbour_weights<'py>(
    py: Python<'py>,
    scores: PyReadonlyArray2<'py, f32>,
    query_norms: numpy::PyReadonlyArray1<'py, f64>,
    neighbour_norms: PyReadonlyArray2<'py, f64>,
    method: &str,
    temperature: f32,
) -> PyResult<Bound<'py, PyArray2<f32>>> {
    let s = matrix_of(&scores, "scores")?;
    let nn = matrix_of(&neighbour_norms, "neighbour_norms")?;
    let qn = contiguous(&query_norms, "query_norms")?;
    if (nn.rows, nn.cols) != (s.rows, s.cols) || qn.len() != s.rows {
        return Err(BleepError::new_err(format!(
            "scores ({}, {}), query_norms ({},) and neighbour_norms ({}, {}) do not agree: give Q x k, Q and Q x k",
            s.rows,
            s.cols,
            qn.len(),
            nn.rows,
            nn.cols
        )));
    }
    let w = native(py, None, || {
        let (cos, nnv) = (s.check("scores")?, nn.check("neighbour_norms")?);
        let m = Method::parse(method, temperature)?;
        Ok(bleep_core::neighbour_weights(m, s.cols, cos, qn, nnv))
    })?;
    matrix(py, w, s.rows, s.cols)
}

/// Set the default number of threads for native work (0: automatic, from BLEEP_RS_NUM_THREADS or the
/// number of CPUs).
#[pyfunction]
fn set_num_threads(#[pyo3(from_py_with = n_arg)] n: usize) -> PyResult<()> {
    pool::set_default_threads(n).map_err(|e| BleepError::new_err(e.to_string()))
}

/// The number of threads native work uses by default.
#[pyfunction]
fn get_num_threads() -> PyResult<usize> {
    pool::default_threads().map_err(|e| BleepError::new_err(e.to_string()))
}

/// The score kernel this CPU runs ("avx512bf16", "avx512", "avx2" or "portable").
#[pyfunction]
fn kernel_name(py: Python<'_>) -> &'static str {
    py.detach(|| bleep_core::cpu::kernel().name())
}

/// The score kernels this CPU can run, best by its flags first (no measurement).
#[pyfunction]
fn available_kernels() -> Vec<&'static str> {
    bleep_core::cpu::cpu()
        .available
        .iter()
        .map(|k| k.name())
        .collect()
}

/// Which score kernel runs and why: (kernel, reason, available kernels, measured queries/s per
/// candidate (empty when read from the cache), a BLEEP_RS_KERNEL value that was ignored or None, CPU model).
#[pyfunction]
#[allow(clippy::type_complexity)]
fn kernel_choice(
    py: Python<'_>,
) -> (
    &'static str,
    String,
    Vec<&'static str>,
    Vec<(&'static str, f64)>,
    Option<String>,
    String,
) {
    let c = py.detach(bleep_core::cpu::kernel_choice);
    (
        c.kernel.name(),
        c.reason.clone(),
        available_kernels(),
        c.rates.iter().map(|(k, r)| (k.name(), *r)).collect(),
        c.ignored_request.clone(),
        bleep_core::calibrate::cpu_model(),
    )
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
        wrap_pyfunction!(check_um_per_px, m)?,
        wrap_pyfunction!(set_num_threads, m)?,
        wrap_pyfunction!(get_num_threads, m)?,
        wrap_pyfunction!(kernel_name, m)?,
        wrap_pyfunction!(kernel_choice, m)?,
        wrap_pyfunction!(available_kernels, m)?,
        wrap_pyfunction!(neighbour_weights, m)?,
        wrap_pyfunction!(patch_array, m)?,
    ] {
        m.add_function(f)?;
    }
    m.add("FORMAT_VERSION", bleep_core::FORMAT_VERSION)?;
    Ok(())
}
