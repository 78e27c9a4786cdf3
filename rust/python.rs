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
    m.add_function(wrap_pyfunction!(set_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(get_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(kernel_name, m)?)?;
    m.add("FORMAT_VERSION", crate::reference::FORMAT_VERSION)?;
    Ok(())
}
