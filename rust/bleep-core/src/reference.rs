//! The reference: spots' embeddings and expression with their metadata, searchable, and its one file
//! format.
//!
//! File: a standard safetensors file with tensors `embeddings` (N x d, F32) and `expression` (N x G, F32,
//! F16 or BF16), and string metadata `format` = "bleep-rs.reference", `format_version`, `n_spots`, `dim`,
//! `expression_dtype`, and JSON-encoded `genes`, `spot_ids`, `sections` (optional) and `provenance`.
//! Any safetensors reader opens it; bleep-rs memory-maps it and copies each tensor out once.

use crate::aggregate::{weights, Dtype, Expression, Method, Table};
use crate::error::{Error, Result};
use crate::matrix::Matrix;
use crate::search::{normalise_rows, row_norms, Neighbours, PackedIndex};
use rayon::prelude::*;
use safetensors::{Dtype as StDtype, SafeTensors};
use std::collections::{HashMap, HashSet};
use std::path::Path;

/// The `format` entry of a reference file's metadata.
pub const FORMAT: &str = "bleep-rs.reference";
/// The reference file format this version writes (and the newest it reads).
pub const FORMAT_VERSION: u32 = 1;

/// Reference spots: their embeddings (searchable by cosine similarity), their expression on a gene
/// panel, and their labels.
pub struct Reference {
    n: usize,
    dim: usize,
    /// The embeddings as given (un-normalised, saved to file; their norms drive the "weighted"
    /// aggregation), and their search panels.
    index: PackedIndex,
    expression: Expression,
    genes: Vec<String>,
    spot_ids: Vec<String>,
    sections: Option<Vec<String>>,
    provenance: String,
}

/// What `Reference::build` takes besides the numbers.
#[derive(Default, Clone)]
pub struct Labels {
    /// One name per expression column, unique.
    pub genes: Vec<String>,
    /// One id per spot. Default: "0", "1", ...
    pub spot_ids: Option<Vec<String>>,
    /// The section each spot comes from, if known.
    pub sections: Option<Vec<String>>,
    /// A JSON object (model, date, anything); default `{}`.
    pub provenance: Option<String>,
}

/// A prediction with the neighbours it came from.
pub struct Imputation {
    /// nq x G, row-major.
    pub expression: Vec<f32>,
    /// The neighbours each prediction aggregates.
    pub neighbours: Neighbours,
}

impl Reference {
    /// Validate and index. `embeddings`: spots x dim; `expression`: spots x genes, stored as `dtype`.
    pub fn build(
        embeddings: Matrix<'_, f32>,
        expression: Matrix<'_, f32>,
        dtype: Dtype,
        labels: Labels,
    ) -> Result<Reference> {
        let (emb, expr) = (
            embeddings.check("embeddings")?,
            expression.check("expression")?,
        );
        let (n, g) = (embeddings.rows, expression.cols);
        if expression.rows != n {
            return Err(Error::invalid(format!(
                "embeddings have {n} rows but expression has {}: give one row per reference spot in both",
                expression.rows
            )));
        }
        if g != labels.genes.len() {
            return Err(Error::invalid(format!(
                "expression has {g} columns but {} gene names were given: one name per column",
                labels.genes.len()
            )));
        }
        let table = Table::from_f32(expr, dtype);
        Reference::from_parts(emb.to_vec(), n, embeddings.cols, table, labels)
    }

    /// Validate and index: `embeddings` n x dim and `expression` n x genes, row-major.
    fn from_parts(
        embeddings: Vec<f32>,
        n: usize,
        dim: usize,
        expression: Table,
        labels: Labels,
    ) -> Result<Reference> {
        if n == 0 {
            return Err(Error::invalid(
                "the reference is empty: it needs at least one spot",
            ));
        }
        if dim == 0 {
            return Err(Error::invalid(
                "embeddings have 0 columns: the embedding dimension must be at least 1",
            ));
        }
        if embeddings.len() != n * dim {
            return Err(Error::invalid(format!(
                "embeddings have {} values, not {n} spots x {dim} dimensions",
                embeddings.len()
            )));
        }
        let g = labels.genes.len();
        if g == 0 {
            return Err(Error::invalid(
                "the gene list is empty: the reference needs at least one gene",
            ));
        }
        if expression.len() != n * g {
            return Err(Error::invalid(format!(
                "expression has {} values but {n} spots x {g} genes need {}: give one row per spot and one column per gene",
                expression.len(),
                n * g
            )));
        }
        check_unique(&labels.genes, "gene")?;
        check_finite(&embeddings, dim, "reference embeddings")?;
        check_finite_table(&expression, g)?;
        let spot_ids = match labels.spot_ids {
            Some(ids) if ids.len() != n => {
                return Err(Error::invalid(format!(
                    "spot_ids has {} entries for {n} spots",
                    ids.len()
                )))
            }
            Some(ids) => ids,
            None => (0..n).map(|i| i.to_string()).collect(),
        };
        if let Some(s) = &labels.sections {
            if s.len() != n {
                return Err(Error::invalid(format!(
                    "sections has {} entries for {n} spots",
                    s.len()
                )));
            }
        }
        let provenance = labels.provenance.unwrap_or_else(|| "{}".into());
        match serde_json::from_str::<serde_json::Value>(&provenance) {
            Ok(serde_json::Value::Object(_)) => {}
            _ => return Err(Error::invalid("provenance must be a JSON object")),
        }
        check_nonzero(&row_norms(&embeddings, dim), "reference embeddings")?;
        Ok(Reference {
            n,
            dim,
            index: PackedIndex::new(embeddings, n, dim)?,
            expression: Expression::new(&expression, n, g)?,
            genes: labels.genes,
            spot_ids,
            sections: labels.sections,
            provenance,
        })
    }

    /// Number of reference spots.
    pub fn n_spots(&self) -> usize {
        self.n
    }
    /// Embedding dimension.
    pub fn dim(&self) -> usize {
        self.dim
    }
    /// The gene names, one per expression column.
    pub fn genes(&self) -> &[String] {
        &self.genes
    }
    /// The spot ids.
    pub fn spot_ids(&self) -> &[String] {
        &self.spot_ids
    }
    /// Each spot's section, when given.
    pub fn sections(&self) -> Option<&[String]> {
        self.sections.as_deref()
    }
    /// The provenance, a JSON object.
    pub fn provenance(&self) -> &str {
        &self.provenance
    }
    /// The embeddings as given (not normalised), spots x dim, row-major.
    pub fn embeddings(&self) -> &[f32] {
        self.index.rows()
    }
    /// The expression table, row-major (a copy: the reference keeps it in gene blocks).
    pub fn expression(&self) -> Table {
        self.expression.row_major()
    }

    /// The storage type of the expression table.
    pub fn expression_dtype(&self) -> Dtype {
        self.expression.dtype()
    }

    /// The min(k, n) most cosine-similar reference spots of each query (queries x dim).
    pub fn search(&self, queries: Matrix<'_, f32>, k: usize) -> Result<Neighbours> {
        Ok(self.search_with_norms(queries, k)?.0)
    }

    fn search_with_norms(
        &self,
        queries: Matrix<'_, f32>,
        k: usize,
    ) -> Result<(Neighbours, Vec<f64>)> {
        let values = queries.check("queries")?;
        if queries.cols != self.dim {
            return Err(Error::invalid(format!(
                "queries have {} columns but the reference embeddings have {}: embed the queries with the model that built this reference",
                queries.cols, self.dim
            )));
        }
        if k == 0 {
            return Err(Error::invalid("k must be at least 1"));
        }
        check_finite(values, self.dim, "queries")?;
        let mut unit = values.to_vec();
        let norms = normalise_rows(&mut unit, self.dim);
        check_nonzero(&norms, "queries")?;
        Ok((self.index.search(&unit, norms.len(), k)?, norms))
    }

    /// Predicted expression (queries x genes) of each query from its k nearest reference spots.
    pub fn impute(&self, queries: Matrix<'_, f32>, k: usize, method: Method) -> Result<Imputation> {
        let (nb, qnorms) = self.search_with_norms(queries, k)?;
        let nq = qnorms.len();
        let nnorms: Vec<f64> = nb
            .indices
            .iter()
            .map(|&i| self.index.norms()[i as usize])
            .collect();
        let w = weights(method, nb.k, &nb.scores, &qnorms, &nnorms);
        let g = self.genes.len();
        let mut out =
            crate::memory::huge_zeroed::<f32>(nq * g, "the prediction (queries x genes, float32)")?;
        self.expression
            .gather_weighted_sum(&nb.indices, &w, nb.k, &mut out)?;
        Ok(Imputation {
            expression: out,
            neighbours: nb,
        })
    }

    /// `out[q, :] = sum_j weights[q, j] * expression[indices[q, j], :]` (both queries x k): the
    /// aggregation step alone, for neighbours and weights chosen elsewhere. Returns queries x genes.
    pub fn aggregate(
        &self,
        indices: Matrix<'_, i64>,
        weights: Matrix<'_, f32>,
    ) -> Result<Vec<f32>> {
        let w = weights.check("weights")?;
        if (indices.rows, indices.cols) != (weights.rows, weights.cols) {
            return Err(Error::invalid(format!(
                "indices ({}, {}) and weights ({}, {}) must have the same shape (queries x k)",
                indices.rows, indices.cols, weights.rows, weights.cols
            )));
        }
        let (idx, k) = self.spot_indices(indices)?;
        check_finite(w, k, "weights")?;
        let mut out = crate::memory::huge_zeroed::<f32>(
            indices.rows * self.genes.len(),
            "the aggregate (queries x genes, float32)",
        )?;
        self.expression.gather_weighted_sum(&idx, w, k, &mut out)?;
        Ok(out)
    }

    /// Per query, the mean over genes of the standard deviation of its neighbours' expression
    /// (`indices`: queries x k): how much the spots a prediction averages disagree, the uncertainty
    /// `predict` reports.
    pub fn neighbour_spread(&self, indices: Matrix<'_, i64>) -> Result<Vec<f32>> {
        let (idx, k) = self.spot_indices(indices)?;
        let mut out = vec![0f32; indices.rows];
        self.expression.neighbour_spread(&idx, k, &mut out)?;
        Ok(out)
    }

    /// The L2 norms (f64) of the embeddings of the spots `indices` (queries x k) names, laid out like it:
    /// what [`neighbour_weights`](crate::neighbour_weights) needs for the "weighted" method when the
    /// neighbours were merged from several references (shards).
    pub fn norms_of(&self, indices: Matrix<'_, i64>) -> Result<Vec<f64>> {
        let (idx, _) = self.spot_indices(indices)?;
        Ok(idx
            .iter()
            .map(|&i| self.index.norms()[i as usize])
            .collect())
    }

    /// Neighbour indices (queries x k, k >= 1) checked against the spots, as u32, and k.
    fn spot_indices(&self, indices: Matrix<'_, i64>) -> Result<(Vec<u32>, usize)> {
        let idx = indices.check("indices")?;
        let k = indices.cols;
        if k == 0 {
            return Err(Error::invalid(
                "indices must have at least one column (k >= 1)",
            ));
        }
        let n = self.n as i64;
        if let Some(p) = idx.iter().position(|&i| i < 0 || i >= n) {
            return Err(Error::invalid(format!(
                "index {} (row {} of indices) is out of range for a reference of {n} spots",
                idx[p],
                p / k
            )));
        }
        Ok((idx.iter().map(|&i| i as u32).collect(), k))
    }

    /// Write the reference to `path` atomically: a temporary file beside it, flushed, then renamed.
    pub fn save(&self, path: &Path) -> Result<()> {
        let g = self.genes.len();
        let table = self.expression.row_major();
        let (dtype, bytes): (StDtype, &[u8]) = match &table {
            Table::F32(v) => (StDtype::F32, as_bytes(v)),
            Table::F16(v) => (StDtype::F16, as_bytes(v)),
            Table::Bf16(v) => (StDtype::BF16, as_bytes(v)),
        };
        let view = |dt, shape: Vec<usize>, data| {
            safetensors::tensor::TensorView::new(dt, shape, data)
                .map_err(|e| Error::invalid(format!("cannot lay out tensor: {e}")))
        };
        let tensors = vec![
            (
                "embeddings",
                view(
                    StDtype::F32,
                    vec![self.n, self.dim],
                    as_bytes(self.index.rows()),
                )?,
            ),
            ("expression", view(dtype, vec![self.n, g], bytes)?),
        ];
        let json = |v: &Vec<String>| serde_json::to_string(v).expect("strings serialise");
        let mut meta = HashMap::from([
            ("format".to_string(), FORMAT.to_string()),
            ("format_version".into(), FORMAT_VERSION.to_string()),
            ("n_spots".into(), self.n.to_string()),
            ("dim".into(), self.dim.to_string()),
            (
                "expression_dtype".into(),
                self.expression.dtype().name().into(),
            ),
            ("genes".into(), json(&self.genes)),
            ("spot_ids".into(), json(&self.spot_ids)),
            ("provenance".into(), self.provenance.clone()),
        ]);
        if let Some(s) = &self.sections {
            meta.insert("sections".into(), json(s));
        }
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let name = path
            .file_name()
            .ok_or_else(|| Error::invalid(format!("{} is not a file path", path.display())))?;
        let tmp = dir.join(format!(
            ".{}.{}.tmp",
            name.to_string_lossy(),
            std::process::id()
        ));
        let written = safetensors::serialize_to_file(tensors, Some(meta), &tmp)
            .map_err(|e| Error::format(path, format!("cannot write: {e}")))
            .and_then(|_| {
                std::fs::File::open(&tmp)
                    .and_then(|f| f.sync_all())
                    .map_err(|e| Error::io(&tmp, e))
            })
            .and_then(|_| std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e)));
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        written
    }

    /// Read a file written by [`Reference::save`] (or by any tool that follows the format above).
    pub fn load(path: &Path) -> Result<Reference> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the map is only read while this function runs, and every tensor is copied out of it.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let bad = |reason: String| Error::format(path, reason);
        let st = SafeTensors::deserialize(&map).map_err(|e| {
            bad(format!("not a readable safetensors file ({e}); is it truncated, or not a bleep-rs reference?"))
        })?;
        let (_, header) = SafeTensors::read_metadata(&map).map_err(|e| bad(e.to_string()))?;
        let meta = header.metadata().clone().unwrap_or_default();
        let field = |key: &str| {
            meta.get(key)
                .cloned()
                .ok_or_else(|| bad(format!("its metadata has no {key:?} entry")))
        };
        if meta.get("format").map(String::as_str) != Some(FORMAT) {
            return Err(bad(format!(
                "not a bleep-rs reference: its metadata lacks format = {FORMAT:?}; build one with Reference.build(...).save(path)"
            )));
        }
        let version: u32 = field("format_version")?
            .parse()
            .map_err(|_| bad("format_version is not a number".into()))?;
        if version > FORMAT_VERSION {
            return Err(bad(format!(
                "written in reference format {version}, newer than this bleep-rs reads ({FORMAT_VERSION}): upgrade bleep-rs"
            )));
        }
        let tensor = |name: &str| {
            st.tensor(name)
                .map_err(|_| bad(format!("missing tensor {name:?}")))
        };
        let emb = tensor("embeddings")?;
        let expr = tensor("expression")?;
        let (n, dim) =
            matrix_shape(emb.shape()).ok_or_else(|| bad("embeddings is not a matrix".into()))?;
        let (n_expr, g) =
            matrix_shape(expr.shape()).ok_or_else(|| bad("expression is not a matrix".into()))?;
        if n_expr != n {
            return Err(bad(format!(
                "embeddings have {n} rows but expression has {n_expr}"
            )));
        }
        if emb.dtype() != StDtype::F32 {
            return Err(bad(format!(
                "embeddings are {:?}, expected F32",
                emb.dtype()
            )));
        }
        let table = match expr.dtype() {
            StDtype::F32 => Table::F32(from_le(expr.data(), f32::from_le_bytes)),
            StDtype::F16 => Table::F16(from_le(expr.data(), |b| {
                half::f16::from_bits(u16::from_le_bytes(b))
            })),
            StDtype::BF16 => Table::Bf16(from_le(expr.data(), |b| {
                half::bf16::from_bits(u16::from_le_bytes(b))
            })),
            other => {
                return Err(bad(format!(
                    "expression is {other:?}, expected F32, F16 or BF16"
                )))
            }
        };
        let parse_list = |key: &str| -> Result<Vec<String>> {
            serde_json::from_str(&field(key)?)
                .map_err(|e| bad(format!("{key} is not a JSON list of strings: {e}")))
        };
        let genes = parse_list("genes")?;
        if genes.len() != g {
            return Err(bad(format!(
                "metadata names {} genes but expression has {g} columns",
                genes.len()
            )));
        }
        let labels = Labels {
            genes,
            spot_ids: Some(parse_list("spot_ids")?),
            sections: if meta.contains_key("sections") {
                Some(parse_list("sections")?)
            } else {
                None
            },
            provenance: meta.get("provenance").cloned(),
        };
        let embeddings = from_le(emb.data(), f32::from_le_bytes);
        Reference::from_parts(embeddings, n, dim, table, labels).map_err(|e| bad(e.to_string()))
    }
}

fn matrix_shape(shape: &[usize]) -> Option<(usize, usize)> {
    match shape {
        [a, b] => Some((*a, *b)),
        _ => None,
    }
}

#[cfg(target_endian = "little")]
fn as_bytes<T: Copy>(v: &[T]) -> &[u8] {
    // SAFETY: plain numeric types without padding, viewed as their little-endian bytes.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
}

fn from_le<T: Send, const B: usize>(data: &[u8], f: impl Fn([u8; B]) -> T + Sync) -> Vec<T> {
    data.par_chunks_exact(B)
        .map(|c| f(c.try_into().expect("chunk of B bytes")))
        .collect()
}

fn check_unique(names: &[String], what: &str) -> Result<()> {
    let mut seen = HashSet::with_capacity(names.len());
    for n in names {
        if !seen.insert(n) {
            return Err(Error::invalid(format!(
                "{what} {n:?} appears more than once: {what} names must be unique"
            )));
        }
    }
    Ok(())
}

/// Position of the first value for which `bad` holds: whole chunks are tested branch-free (so the test
/// vectorises), and only a chunk that fails is searched element by element.
fn first_bad<T: Copy + Sync>(values: &[T], bad: impl Fn(T) -> bool + Sync) -> Option<usize> {
    const CHUNK: usize = 1 << 14;
    let chunk = values
        .par_chunks(CHUNK)
        .position_first(|c| c.iter().fold(false, |acc, &v| acc | bad(v)))?;
    let start = chunk * CHUNK;
    values[start..]
        .iter()
        .position(|&v| bad(v))
        .map(|p| start + p)
}

fn check_finite(values: &[f32], width: usize, what: &str) -> Result<()> {
    match first_bad(values, |v: f32| !v.is_finite()) {
        None => Ok(()),
        Some(p) => Err(Error::invalid(format!(
            "{what} row {} has a NaN or infinite value (column {})",
            p / width,
            p % width
        ))),
    }
}

fn check_finite_table(t: &Table, g: usize) -> Result<()> {
    let bad = match t {
        Table::F32(v) => first_bad(v, |x: f32| !x.is_finite()),
        Table::F16(v) => first_bad(v, |x: half::f16| !x.is_finite()),
        Table::Bf16(v) => first_bad(v, |x: half::bf16| !x.is_finite()),
    };
    match bad {
        None => Ok(()),
        Some(p) => Err(Error::invalid(format!(
            "expression row {} has a NaN or infinite value (gene column {}; values beyond the float16 range become infinite)",
            p / g,
            p % g
        ))),
    }
}

fn check_nonzero(norms: &[f64], what: &str) -> Result<()> {
    match norms.iter().position(|&n| n == 0.0) {
        None => Ok(()),
        Some(r) => Err(Error::invalid(format!(
            "{what} row {r} is all zeros: cosine similarity is undefined for a zero vector"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small(dtype: Dtype) -> Reference {
        let emb = vec![1.0, 0.0, 0.0, 2.0, 3.0, 3.0];
        let expr = vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let labels = Labels {
            genes: vec!["A".into(), "B".into()],
            sections: Some(vec!["s1".into(), "s1".into(), "s2".into()]),
            provenance: Some(r#"{"model": "test"}"#.into()),
            ..Default::default()
        };
        Reference::build(
            Matrix::new(&emb, 3, 2),
            Matrix::new(&expr, 3, 2),
            dtype,
            labels,
        )
        .unwrap()
    }

    #[test]
    fn file_round_trip_keeps_everything() {
        let dir = std::env::temp_dir().join(format!("bleep-rs-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for dtype in [Dtype::F32, Dtype::F16, Dtype::Bf16] {
            let r = small(dtype);
            let path = dir.join(format!("ref-{}.safetensors", dtype.name()));
            r.save(&path).unwrap();
            let back = Reference::load(&path).unwrap();
            assert_eq!(back.embeddings(), r.embeddings());
            assert_eq!(back.expression(), r.expression());
            assert_eq!(back.genes(), r.genes());
            assert_eq!(back.spot_ids(), ["0", "1", "2"]);
            assert_eq!(back.sections(), r.sections());
            assert_eq!(back.provenance(), r.provenance());
        }
        // No temporary files are left beside the outputs.
        let left: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .collect();
        assert_eq!(left.len(), 3);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn truncated_and_foreign_files_are_format_errors() {
        let dir = std::env::temp_dir().join(format!("bleep-rs-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ref.safetensors");
        small(Dtype::F32).save(&path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let cut = dir.join("cut.safetensors");
        std::fs::write(&cut, &bytes[..bytes.len() - 5]).unwrap();
        assert!(matches!(Reference::load(&cut), Err(Error::Format { .. })));
        let foreign = dir.join("foreign.safetensors");
        let t = safetensors::tensor::TensorView::new(StDtype::F32, vec![1], &[0u8; 4]).unwrap();
        safetensors::serialize_to_file(vec![("x", t)], None, &foreign).unwrap();
        let err = Reference::load(&foreign).err().unwrap().to_string();
        assert!(err.contains("not a bleep-rs reference"), "{err}");
        assert!(matches!(
            Reference::load(&dir.join("absent")),
            Err(Error::Io { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn impute_mean_of_neighbours() {
        let r = small(Dtype::F32);
        // Query along x: nearest by cosine are row 0 (cos 1) then row 2 (cos 0.707).
        let out = r
            .impute(Matrix::new(&[5.0, 0.0], 1, 2), 2, Method::Mean)
            .unwrap();
        assert_eq!(out.neighbours.indices, vec![0, 2]);
        assert_eq!(out.expression, vec![3.0, 4.0]);
    }

    #[test]
    fn weighted_imputation_of_huge_finite_embeddings_is_finite() {
        // Norms beyond the float32 range: the squared distances must not become inf - inf.
        let big = 3e38f32;
        let emb = vec![big, big, big, -big, -big, big];
        let labels = Labels {
            genes: vec!["A".into()],
            ..Default::default()
        };
        let r = Reference::build(
            Matrix::new(&emb, 3, 2),
            Matrix::new(&[1.0, 2.0, 3.0], 3, 1),
            Dtype::F32,
            labels,
        )
        .unwrap();
        let out = r
            .impute(Matrix::new(&[big, big * 0.9], 1, 2), 3, Method::Weighted)
            .unwrap();
        // The nearest row (0) takes all the weight: the others are astronomically farther.
        assert_eq!(out.expression, vec![1.0]);
    }

    #[test]
    fn bad_inputs_are_named() {
        let labels = |g: &[&str]| Labels {
            genes: g.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        let build = |emb: &[f32], expr: &[f32], rows: [usize; 2], genes: &[&str]| {
            let cols = [emb.len() / rows[0].max(1), expr.len() / rows[1].max(1)];
            Reference::build(
                Matrix::new(emb, rows[0], cols[0]),
                Matrix::new(expr, rows[1], cols[1]),
                Dtype::F32,
                labels(genes),
            )
            .err()
            .unwrap()
            .to_string()
        };
        assert!(build(&[], &[], [0, 0], &[]).contains("empty"));
        assert!(build(&[1.0, 1.0], &[1.0], [1, 1], &["A", "B"])
            .contains("expression has 1 columns but 2 gene names"));
        assert!(build(&[1.0, 1.0], &[1.0, 2.0], [1, 2], &["A"])
            .contains("embeddings have 1 rows but expression has 2"));
        assert!(build(&[1.0, f32::NAN], &[1.0], [1, 1], &["A"]).contains("NaN"));
        assert!(build(&[0.0, 0.0], &[1.0], [1, 1], &["A"]).contains("all zeros"));
        assert!(build(&[1.0, 0.0], &[1.0, 2.0], [1, 1], &["A", "A"]).contains("more than once"));
        let claims = Reference::build(
            Matrix::new(&[1.0, 0.0], 2, 2),
            Matrix::new(&[1.0], 1, 1),
            Dtype::F32,
            labels(&["A"]),
        );
        assert!(claims.err().unwrap().to_string().contains("claims 2 x 2"));
        let r = small(Dtype::F32);
        let q = |v: &'static [f32], rows| Matrix::new(v, rows, v.len() / rows);
        assert!(r
            .search(q(&[1.0, 0.0, 1.0], 1), 1)
            .err()
            .unwrap()
            .to_string()
            .contains("queries have 3 columns"));
        assert!(r.search(q(&[1.0, 0.0], 1), 0).is_err());
        assert!(r
            .search(q(&[0.0, 0.0], 1), 1)
            .err()
            .unwrap()
            .to_string()
            .contains("queries row 0"));
        let agg = |idx: &[i64], w: &[f32], rows| {
            r.aggregate(
                Matrix::new(idx, rows, idx.len() / rows),
                Matrix::new(w, rows, w.len() / rows),
            )
        };
        assert_eq!(agg(&[2, 0], &[1.0, 0.5], 1).unwrap(), vec![5.5, 7.0]);
        for (idx, w, message) in [
            (&[3i64, 0][..], &[1.0f32, 1.0][..], "out of range"),
            (&[-1, 0], &[1.0, 1.0], "out of range"),
            (&[0, 0], &[1.0], "same shape"),
            (&[0, 0], &[1.0, f32::NAN], "NaN"),
        ] {
            let e = agg(idx, w, 1).err().unwrap().to_string();
            assert!(e.contains(message), "{e}");
        }
    }
}
