//! The reference: spots' embeddings and expression with their metadata, searchable, and its one file
//! format.
//!
//! File (format version 2): a standard safetensors file with tensors
//! * `embeddings` (N x d, F32) and `norms` (N, F64: each embedding's L2 norm, so that loading computes
//!   nothing per spot);
//! * the expression, either dense, `expression_blocks` (ceil(G / 16) x N x 16, F32, F16 or BF16: the
//!   gene blocks the aggregation kernels read, block b holding genes 16b..16b+15, zero-padded), or
//!   sparse, as compressed sparse rows: `expression_indptr` (N + 1, I64), `expression_indices` (nnz,
//!   U16 where G <= 65,536, else U32; strictly increasing within a row) and `expression_values` (nnz, F32, F16 or BF16);
//!
//! * the search panels of the embeddings (optional; what the exact search scans, so that a mapped
//!   reference searches without packing them in memory): `search_panels_f32` (ceil(N / 16) x d x 16,
//!   F32: each panel of 16 rows, normalised, dimension-major), `search_panels_bf16` (ceil(N / 16) x
//!   ceil(d / 2) x 16, U32: pairs of bf16 dimensions) and `search_bf16_rounding` (2, F64: the largest
//!   rounding residual norm and rounded row norm). They are checked against the rows (re-packed chunk
//!   by chunk) on the first search, and packed afresh where absent or different;
//! * `spot_ids` and `sections` (each optional; U8: the UTF-8 text of a JSON list of N strings; no
//!   `spot_ids` means "0", "1", ...): tensors rather than metadata, so that opening the file does not
//!   parse N names (they are parsed when first asked for);
//!
//! and string metadata `format` = "bleep-rs.reference", `format_version`, `n_spots`, `dim`,
//! `expression_dtype`, `expression_format` ("dense" or "sparse"), and JSON-encoded `genes` and
//! `provenance`. Any safetensors reader opens it.
//!
//! bleep-rs memory-maps the file and borrows the tensors from the map: loading reads the header only,
//! and the rows a search or an aggregation needs are paged in as it reads them. Such values are
//! checked when first used rather than when loaded: the embeddings and norms in full on the first
//! search (which packs its panels from them anyway), each sparse row's structure as it is read, and
//! the expression values where a result comes out non-finite (see [`Expression`]).
//!
//! Version 1 files (tensors `embeddings` and a row-major N x G `expression`) still load; they are copied
//! into memory and checked in full, as before.

use crate::aggregate::{weights, Dtype, Expression, Format, Method, Table, Values, Write};
use crate::buf::Buf;
use crate::error::{Error, Result};
use crate::kernel::{Bf16Rounding, NR};
use crate::matrix::Matrix;
use crate::search::{normalise_rows, row_norms, Neighbours, PackedIndex, StoredPanels};
use crate::sparse::{Cols, SparseRows};
use rayon::prelude::*;
use safetensors::{Dtype as StDtype, SafeTensors};
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, OnceLock};

/// The `format` entry of a reference file's metadata.
pub const FORMAT: &str = "bleep-rs.reference";
/// The reference file format this version writes (and the newest it reads).
pub const FORMAT_VERSION: u32 = 2;

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
    spot_ids: Names,
    sections: Option<Names>,
    provenance: String,
    /// The file this reference reads in place (a version-2 file), for [`Reference::release_pages`].
    map: Option<Arc<memmap2::Mmap>>,
}

/// One name per spot (ids, sections): given, the default "0", "1", ..., or the JSON text of a list in the
/// mapped file, parsed when first asked for.
struct Names {
    n: usize,
    what: &'static str,
    json: Option<Buf<u8>>,
    parsed: OnceLock<std::result::Result<Vec<String>, String>>,
}

impl Names {
    fn given(names: Vec<String>) -> Names {
        Names {
            n: names.len(),
            what: "",
            json: None,
            parsed: OnceLock::from(Ok(names)),
        }
    }

    fn default_ids(n: usize) -> Names {
        Names {
            n,
            what: "spot_ids",
            json: None,
            parsed: OnceLock::new(),
        }
    }

    fn mapped(n: usize, what: &'static str, json: Buf<u8>) -> Names {
        Names {
            n,
            what,
            json: Some(json),
            parsed: OnceLock::new(),
        }
    }

    fn get(&self) -> Result<&[String]> {
        let parsed = self.parsed.get_or_init(|| match &self.json {
            None => Ok((0..self.n).map(|i| i.to_string()).collect()),
            Some(text) => {
                let what = self.what;
                let names: Vec<String> = serde_json::from_slice(text).map_err(|e| {
                    format!("the reference file's {what} are not a JSON list of strings ({e}): the file is damaged; rebuild it")
                })?;
                if names.len() != self.n {
                    return Err(format!(
                        "the reference file holds {} {what} for {} spots: the file is damaged; rebuild it",
                        names.len(),
                        self.n
                    ));
                }
                Ok(names)
            }
        });
        match parsed {
            Ok(v) => Ok(v),
            Err(e) => Err(Error::invalid(e.clone())),
        }
    }

    /// The JSON text of the list (for saving): the mapped bytes as they are, else serialised; None for
    /// default ids not yet asked for (the file then stores none).
    fn json(&self) -> Result<Option<std::borrow::Cow<'_, [u8]>>> {
        if let Some(text) = &self.json {
            return Ok(Some(std::borrow::Cow::Borrowed(text)));
        }
        match self.parsed.get() {
            None => Ok(None),
            Some(_) => Ok(Some(std::borrow::Cow::Owned(
                serde_json::to_vec(self.get()?).expect("strings serialise"),
            ))),
        }
    }
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
    /// Validate and index. `embeddings`: spots x dim; `expression`: spots x genes, stored dense as
    /// `dtype`.
    pub fn build(
        embeddings: Matrix<'_, f32>,
        expression: Matrix<'_, f32>,
        dtype: Dtype,
        labels: Labels,
    ) -> Result<Reference> {
        Reference::build_as(embeddings, expression, dtype, Format::Dense, labels)
    }

    /// [`Reference::build`], the expression stored in `format` ([`Format::Auto`]: whichever of dense
    /// and sparse is smaller).
    pub fn build_as(
        embeddings: Matrix<'_, f32>,
        expression: Matrix<'_, f32>,
        dtype: Dtype,
        format: Format,
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
        check_shape(n, embeddings.cols, emb.len(), "embeddings have")?;
        check_gene_count(g, &labels)?;
        let table = Expression::from_dense(expr, n, g, dtype, format)?;
        Reference::from_parts(emb.to_vec(), n, embeddings.cols, table, labels)
    }

    /// A reference whose expression is given as compressed sparse rows: `indptr` (spots + 1 offsets),
    /// `indices` (the gene column of each stored value, strictly increasing within a row) and `values`
    /// (float32), with one gene name per column in `labels`. Stored as `dtype` in `format`; never
    /// densified unless `format` asks for (or `Auto` finds) dense storage smaller.
    #[allow(clippy::too_many_arguments)]
    pub fn build_csr(
        embeddings: Matrix<'_, f32>,
        indptr: Vec<i64>,
        indices: Vec<u32>,
        values: &[f32],
        dtype: Dtype,
        format: Format,
        labels: Labels,
    ) -> Result<Reference> {
        let emb = embeddings.check("embeddings")?;
        let n = embeddings.rows;
        if indptr.len() != n + 1 {
            return Err(Error::invalid(format!(
                "embeddings have {n} rows but the sparse expression has {} row offsets ({} rows): give one row per reference spot in both",
                indptr.len(),
                indptr.len().saturating_sub(1)
            )));
        }
        check_shape(n, embeddings.cols, emb.len(), "embeddings have")?;
        let g = labels.genes.len();
        check_gene_count(g, &labels)?;
        let table = Expression::from_csr(n, g, indptr, indices, values, dtype, format)?;
        Reference::from_parts(emb.to_vec(), n, embeddings.cols, table, labels)
    }

    /// Validate everything and index: `embeddings` n x dim, row-major.
    fn from_parts(
        embeddings: Vec<f32>,
        n: usize,
        dim: usize,
        expression: Expression,
        labels: Labels,
    ) -> Result<Reference> {
        check_shape(n, dim, embeddings.len(), "embeddings have")?;
        check_gene_count(expression.shape().1, &labels)?;
        check_finite(&embeddings, dim, "reference embeddings")?;
        expression.check_finite()?;
        check_nonzero(&row_norms(&embeddings, dim), "reference embeddings")?;
        let index = PackedIndex::new(embeddings, n, dim)?;
        Reference::assemble(index, expression, labels)
    }

    /// The reference from its checked (or lazily checked) numbers: the labels are checked here.
    fn assemble(index: PackedIndex, expression: Expression, labels: Labels) -> Result<Reference> {
        let Labels {
            genes,
            spot_ids,
            sections,
            provenance,
        } = labels;
        let n = index.len();
        let spot_ids = match spot_ids {
            Some(ids) if ids.len() != n => {
                return Err(Error::invalid(format!(
                    "spot_ids has {} entries for {n} spots",
                    ids.len()
                )))
            }
            Some(ids) => Names::given(ids),
            None => Names::default_ids(n),
        };
        if let Some(s) = &sections {
            if s.len() != n {
                return Err(Error::invalid(format!(
                    "sections has {} entries for {n} spots",
                    s.len()
                )));
            }
        }
        Reference::assemble_names(
            index,
            expression,
            genes,
            spot_ids,
            sections.map(Names::given),
            provenance,
        )
    }

    /// The reference from its numbers and names (the names' counts checked by the caller).
    fn assemble_names(
        index: PackedIndex,
        expression: Expression,
        genes: Vec<String>,
        spot_ids: Names,
        sections: Option<Names>,
        provenance: Option<String>,
    ) -> Result<Reference> {
        let labels = Labels {
            genes,
            provenance,
            ..Default::default()
        };
        let (n, dim) = (index.len(), index.dim());
        let g = labels.genes.len();
        if g == 0 {
            return Err(Error::invalid(
                "the gene list is empty: the reference needs at least one gene",
            ));
        }
        if expression.shape() != (n, g) {
            return Err(Error::invalid(format!(
                "the expression is {} spots x {} genes but the reference has {n} spots and {g} gene names",
                expression.shape().0,
                expression.shape().1
            )));
        }
        check_unique(&labels.genes, "gene")?;
        let provenance = labels.provenance.unwrap_or_else(|| "{}".into());
        match serde_json::from_str::<serde_json::Value>(&provenance) {
            Ok(serde_json::Value::Object(_)) => {}
            _ => return Err(Error::invalid("provenance must be a JSON object")),
        }
        Ok(Reference {
            n,
            dim,
            index,
            expression,
            genes: labels.genes,
            spot_ids,
            sections,
            provenance,
            map: None,
        })
    }

    /// Drops this process's mapping of the file's pages (`madvise(MADV_DONTNEED)`; true where there was
    /// a mapped file). Resident memory falls by whatever reads touched; the pages stay in the kernel's
    /// page cache while memory allows, and the next read maps them again (a minor fault). For processes whose
    /// memory is accounted by resident size, mapped file pages included: a Dask worker spills its data,
    /// then pauses, when it counts them (`bleep_rs.cluster`).
    pub fn release_pages(&self) -> Result<bool> {
        let Some(map) = &self.map else {
            return Ok(false);
        };
        #[cfg(unix)]
        // SAFETY: the map is a shared, read-only mapping of a file nobody modifies in place (see `load`):
        // pages dropped from this process read back the same bytes from the page cache or the file.
        unsafe { map.unchecked_advise(memmap2::UncheckedAdvice::DontNeed) }
            .map_err(|e| Error::invalid(format!("madvise(MADV_DONTNEED) failed: {e}")))?;
        #[cfg(not(unix))]
        let _ = map;
        Ok(true)
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
    /// The spot ids (read from a mapped file when first asked for: an error if it holds no valid list).
    pub fn spot_ids(&self) -> Result<&[String]> {
        self.spot_ids.get()
    }
    /// Each spot's section, when given (read from a mapped file when first asked for).
    pub fn sections(&self) -> Result<Option<&[String]>> {
        self.sections.as_ref().map(Names::get).transpose()
    }
    /// The provenance, a JSON object.
    pub fn provenance(&self) -> &str {
        &self.provenance
    }
    /// The embeddings as given (not normalised), spots x dim, row-major.
    pub fn embeddings(&self) -> &[f32] {
        self.index.rows()
    }
    /// The expression table, row-major and dense (a copy: the reference keeps it in gene blocks or
    /// sparse rows).
    pub fn expression(&self) -> Table {
        self.expression.row_major()
    }

    /// The expression as stored (dense or sparse, in memory or mapped from the file).
    pub fn expression_table(&self) -> &Expression {
        &self.expression
    }

    /// The search index (the embeddings and their norms).
    pub fn index(&self) -> &PackedIndex {
        &self.index
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
            .gather_weighted_sum(&nb.indices, &w, nb.k, &mut out, Write::Store)?;
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
        let mut out = crate::memory::huge_zeroed::<f32>(
            indices.rows * self.genes.len(),
            "the aggregate (queries x genes, float32)",
        )?;
        self.aggregate_into(indices, weights, &mut out, Write::Store)?;
        Ok(out)
    }

    /// As [`Self::aggregate`], into `out` (queries x genes): replacing its values, or added to them
    /// ([`Write::Add`]: how a sharded reference sums its shards' shares into one output).
    pub fn aggregate_into(
        &self,
        indices: Matrix<'_, i64>,
        weights: Matrix<'_, f32>,
        out: &mut [f32],
        write: Write,
    ) -> Result<()> {
        let w = weights.check("weights")?;
        if (indices.rows, indices.cols) != (weights.rows, weights.cols) {
            return Err(Error::invalid(format!(
                "indices ({}, {}) and weights ({}, {}) must have the same shape (queries x k)",
                indices.rows, indices.cols, weights.rows, weights.cols
            )));
        }
        let (idx, k) = self.spot_indices(indices)?;
        check_finite(w, k, "weights")?;
        if out.len() != indices.rows * self.genes.len() {
            return Err(Error::invalid(format!(
                "out has {} values but {} queries x {} genes need {}",
                out.len(),
                indices.rows,
                self.genes.len(),
                indices.rows * self.genes.len()
            )));
        }
        self.expression.gather_weighted_sum(&idx, w, k, out, write)
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
        self.index.check()?;
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

    /// Write the reference to `path` atomically (format version 2): a temporary file beside it,
    /// flushed, then renamed. The numbers are written as stored (a mapped reference is read from its
    /// file as it is written; the file it was loaded from stays intact until the rename).
    pub fn save(&self, path: &Path) -> Result<()> {
        // A mapped reference's embeddings are checked (once) before they are copied, and its stored
        // panels then written as they are rather than packed again.
        self.index.check()?;
        let g = self.genes.len();
        let st_dtype = match self.expression.dtype() {
            Dtype::F32 => StDtype::F32,
            Dtype::F16 => StDtype::F16,
            Dtype::Bf16 => StDtype::BF16,
        };
        let view = |dt, shape: Vec<usize>, data| {
            safetensors::tensor::TensorView::new(dt, shape, data)
                .map_err(|e| Error::invalid(format!("cannot lay out tensor: {e}")))
        };
        let (rows, norms) = self.index.stored();
        let (panels_f32, (panels_bf16, rounding)) = self.index.all_panels();
        let rounding = [rounding.max_residual, rounding.max_rounded_norm];
        let rounding_bytes: Vec<u8> = rounding.iter().flat_map(|v| v.to_le_bytes()).collect();
        let (n_panels, dp) = (self.n.div_ceil(NR), self.dim.div_ceil(2));
        let (ids_json, sections_json) = (
            self.spot_ids.json()?,
            self.sections
                .as_ref()
                .map(Names::json)
                .transpose()?
                .flatten(),
        );
        let mut tensors = vec![
            (
                "embeddings",
                view(StDtype::F32, vec![self.n, self.dim], rows.as_bytes())?,
            ),
            ("norms", view(StDtype::F64, vec![self.n], norms.as_bytes())?),
            (
                "search_panels_f32",
                view(
                    StDtype::F32,
                    vec![n_panels, self.dim, NR],
                    panels_f32.as_bytes(),
                )?,
            ),
            (
                "search_panels_bf16",
                view(StDtype::U32, vec![n_panels, dp, NR], panels_bf16.as_bytes())?,
            ),
            (
                "search_bf16_rounding",
                view(StDtype::F64, vec![2], &rounding_bytes)?,
            ),
        ];
        if let Some(blocks) = self.expression.blocks_values() {
            let shape = vec![g.div_ceil(BLOCK), self.n, BLOCK];
            tensors.push((
                "expression_blocks",
                view(st_dtype, shape, blocks.as_bytes())?,
            ));
        }
        if let Some(sp) = self.expression.sparse_rows() {
            let nnz = sp.indices.len();
            tensors.extend([
                (
                    "expression_indptr",
                    view(StDtype::I64, vec![self.n + 1], sp.indptr.as_bytes())?,
                ),
                (
                    "expression_indices",
                    view(
                        match sp.indices {
                            Cols::U16(_) => StDtype::U16,
                            Cols::U32(_) => StDtype::U32,
                        },
                        vec![nnz],
                        sp.indices.as_bytes(),
                    )?,
                ),
                (
                    "expression_values",
                    view(st_dtype, vec![nnz], sp.values.as_bytes())?,
                ),
            ]);
        }
        for (name, text) in [("spot_ids", &ids_json), ("sections", &sections_json)] {
            if let Some(text) = text {
                tensors.push((name, view(StDtype::U8, vec![text.len()], text)?));
            }
        }
        let json = |v: &Vec<String>| serde_json::to_string(v).expect("strings serialise");
        let meta = HashMap::from([
            ("format".to_string(), FORMAT.to_string()),
            ("format_version".into(), FORMAT_VERSION.to_string()),
            ("n_spots".into(), self.n.to_string()),
            ("dim".into(), self.dim.to_string()),
            ("n_genes".into(), self.genes.len().to_string()),
            (
                "expression_dtype".into(),
                self.expression.dtype().name().into(),
            ),
            (
                "expression_format".into(),
                self.expression.format().name().into(),
            ),
            ("genes".into(), json(&self.genes)),
            ("provenance".into(), self.provenance.clone()),
        ]);
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let name = path
            .file_name()
            .ok_or_else(|| Error::invalid(format!("{} is not a file path", path.display())))?;
        let tmp = dir.join(crate::memory::temporary_name(&name.to_string_lossy()));
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

    /// Read a file written by [`Reference::save`] (or by any tool that follows the format above):
    /// version 2 is mapped, not copied; version 1 is copied and checked in full.
    pub fn load(path: &Path) -> Result<Reference> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the map is read-only, and bleep-rs never modifies a reference file in place (saves
        // write a temporary and rename it). Another program truncating the file while it is mapped
        // would fault the reads, as with any mapped file.
        let map = Arc::new(unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?);
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
        let parse_list = |key: &str| -> Result<Vec<String>> {
            serde_json::from_str(&field(key)?)
                .map_err(|e| bad(format!("{key} is not a JSON list of strings: {e}")))
        };
        let genes = parse_list("genes")?;
        // Written since 2026-12-06: a gene list edited out of step with the expression (a column more
        // or less within the dense table's padding) is otherwise read without complaint.
        if let Some(count) = meta.get("n_genes") {
            if count.parse::<usize>().ok() != Some(genes.len()) {
                return Err(bad(format!(
                    "its metadata lists {} genes but records n_genes = {count:?}: the header is damaged",
                    genes.len()
                )));
            }
        }
        let tensor = |name: &str| {
            st.tensor(name)
                .map_err(|_| bad(format!("missing tensor {name:?}")))
        };
        let emb = tensor("embeddings")?;
        let (n, dim) =
            matrix_shape(emb.shape()).ok_or_else(|| bad("embeddings is not a matrix".into()))?;
        if emb.dtype() != StDtype::F32 {
            return Err(bad(format!(
                "embeddings are {:?}, expected F32",
                emb.dtype()
            )));
        }
        if version < 2 {
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
            let expr = tensor("expression")?;
            let (n_expr, g) = matrix_shape(expr.shape())
                .ok_or_else(|| bad("expression is not a matrix".into()))?;
            if n_expr != n {
                return Err(bad(format!(
                    "embeddings have {n} rows but expression has {n_expr}"
                )));
            }
            check_gene_count(g, &labels).map_err(|e| bad(e.to_string()))?;
            let table = expression_values(expr.dtype(), expr.data(), &map).ok_or_else(|| {
                bad(format!(
                    "expression is {:?}, expected F32, F16 or BF16",
                    expr.dtype()
                ))
            })?;
            let table =
                Expression::new(&Table::from(table), n, g).map_err(|e| bad(e.to_string()))?;
            let embeddings = from_le(emb.data(), f32::from_le_bytes);
            return Reference::from_parts(embeddings, n, dim, table, labels)
                .map_err(|e| bad(e.to_string()));
        }
        let norms = tensor("norms")?;
        if norms.dtype() != StDtype::F64 || norms.shape() != [n] {
            return Err(bad(format!(
                "norms is {:?} {:?}, expected F64 of shape [{n}]",
                norms.dtype(),
                norms.shape()
            )));
        }
        let g = genes.len();
        let values = |t: &safetensors::tensor::TensorView<'_>, name: &str| {
            expression_values(t.dtype(), t.data(), &map).ok_or_else(|| {
                bad(format!(
                    "{name} is {:?}, expected F32, F16 or BF16",
                    t.dtype()
                ))
            })
        };
        let expression = match field("expression_format")?.as_str() {
            "dense" => {
                let blocks = tensor("expression_blocks")?;
                if blocks.shape() != [g.div_ceil(BLOCK), n, BLOCK] {
                    return Err(bad(format!(
                        "expression_blocks has shape {:?}, not [{}, {n}, {BLOCK}] for {n} spots and {g} genes",
                        blocks.shape(),
                        g.div_ceil(BLOCK)
                    )));
                }
                Expression::from_blocks(n, g, values(&blocks, "expression_blocks")?)
            }
            "sparse" => {
                let (indptr, indices) = (tensor("expression_indptr")?, tensor("expression_indices")?);
                let vals = tensor("expression_values")?;
                let cols = match indices.dtype() {
                    StDtype::U16 => Some(Cols::U16(Buf::mapped(&map, indices.data()))),
                    StDtype::U32 => Some(Cols::U32(Buf::mapped(&map, indices.data()))),
                    _ => None,
                };
                let (Some(cols), StDtype::I64) = (cols, indptr.dtype()) else {
                    return Err(bad(format!(
                        "expression_indptr is {:?} and expression_indices {:?}: expected I64, and U16 or U32",
                        indptr.dtype(),
                        indices.dtype()
                    )));
                };
                let rows = SparseRows::new(
                    n,
                    g,
                    Buf::mapped(&map, indptr.data()),
                    cols,
                    values(&vals, "expression_values")?,
                )
                .and_then(|rows| {
                    // The two ends are read now (two pages); each row's structure when it is read.
                    rows.check_ends()?;
                    Ok(Expression::from_sparse(rows))
                });
                rows
            }
            other => {
                return Err(bad(format!(
                    "expression_format is {other:?}, expected \"dense\" or \"sparse\""
                )))
            }
        }
        .map_err(|e| bad(e.to_string()))?;
        let (n_panels, dp) = (n.div_ceil(NR), dim.div_ceil(2));
        let shaped = |name: &str, dtype: StDtype, shape: &[usize]| {
            st.tensor(name)
                .ok()
                .filter(|t| t.dtype() == dtype && t.shape() == shape)
        };
        // Panels of another shape or type (another layout) are ignored: the first search packs its own.
        let stored = StoredPanels {
            f32: shaped("search_panels_f32", StDtype::F32, &[n_panels, dim, NR])
                .map(|t| Buf::mapped(&map, t.data())),
            bf16: shaped("search_panels_bf16", StDtype::U32, &[n_panels, dp, NR]).and_then(|t| {
                let r = shaped("search_bf16_rounding", StDtype::F64, &[2])?;
                let r: Buf<f64> = Buf::mapped(&map, r.data());
                let rounding = Bf16Rounding {
                    max_residual: r[0],
                    max_rounded_norm: r[1],
                };
                Some((Buf::mapped(&map, t.data()), rounding))
            }),
        };
        let index = PackedIndex::from_file(
            Buf::mapped(&map, emb.data()),
            Buf::mapped(&map, norms.data()),
            n,
            dim,
            stored,
        )
        .map_err(|e| bad(e.to_string()))?;
        let names = |name: &str, what: &'static str| match st.tensor(name) {
            Err(_) => Ok(None),
            Ok(t) if t.dtype() == StDtype::U8 => {
                Ok(Some(Names::mapped(n, what, Buf::mapped(&map, t.data()))))
            }
            Ok(t) => Err(bad(format!(
                "{name} is {:?}, expected U8 (JSON text)",
                t.dtype()
            ))),
        };
        let spot_ids = names("spot_ids", "spot_ids")?.unwrap_or_else(|| Names::default_ids(n));
        let sections = names("sections", "sections")?;
        let mut reference = Reference::assemble_names(
            index,
            expression,
            genes,
            spot_ids,
            sections,
            meta.get("provenance").cloned(),
        )
        .map_err(|e| bad(e.to_string()))?;
        reference.map = Some(Arc::clone(&map));
        Ok(reference)
    }
}

/// Genes per dense block of the file (the kernels' block width).
const BLOCK: usize = 16;

/// The expression values of a tensor of `dtype` (None: not a float type it can hold), borrowed from
/// `map`.
fn expression_values(dtype: StDtype, data: &[u8], map: &Arc<memmap2::Mmap>) -> Option<Values> {
    match dtype {
        StDtype::F32 => Some(Values::F32(Buf::mapped(map, data))),
        StDtype::F16 => Some(Values::F16(Buf::mapped(map, data))),
        StDtype::BF16 => Some(Values::Bf16(Buf::mapped(map, data))),
        _ => None,
    }
}

fn check_gene_count(g: usize, labels: &Labels) -> Result<()> {
    if labels.genes.is_empty() {
        return Err(Error::invalid(
            "the gene list is empty: the reference needs at least one gene",
        ));
    }
    if g != labels.genes.len() {
        return Err(Error::invalid(format!(
            "expression has {g} columns but {} gene names were given: one name per column",
            labels.genes.len()
        )));
    }
    Ok(())
}

fn check_shape(n: usize, dim: usize, len: usize, what: &str) -> Result<()> {
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
    if n.checked_mul(dim) != Some(len) {
        return Err(Error::invalid(format!(
            "{what} {len} values, not {n} spots x {dim} dimensions"
        )));
    }
    Ok(())
}

fn matrix_shape(shape: &[usize]) -> Option<(usize, usize)> {
    match shape {
        [a, b] => Some((*a, *b)),
        _ => None,
    }
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
            assert_eq!(back.spot_ids().unwrap(), ["0", "1", "2"]);
            assert_eq!(back.sections().unwrap(), r.sections().unwrap());
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

    fn small_as(dtype: Dtype, format: Format) -> Reference {
        let emb = vec![1.0, 0.0, 0.0, 2.0, 3.0, 3.0];
        let expr = vec![1.0, 0.0, 0.0, 4.0, 0.0, 0.0];
        let labels = Labels {
            genes: vec!["A".into(), "B".into()],
            ..Default::default()
        };
        Reference::build_as(
            Matrix::new(&emb, 3, 2),
            Matrix::new(&expr, 3, 2),
            dtype,
            format,
            labels,
        )
        .unwrap()
    }

    fn temp_dir(tag: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("bleep-rs-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn v2_files_are_mapped_and_round_trip_dense_and_sparse() {
        let dir = temp_dir("v2");
        for format in [Format::Dense, Format::Sparse] {
            for dtype in [Dtype::F32, Dtype::F16, Dtype::Bf16] {
                let r = small_as(dtype, format);
                assert_eq!(r.expression_table().format(), format);
                let path = dir.join("ref.safetensors");
                r.save(&path).unwrap();
                let back = Reference::load(&path).unwrap();
                assert!(back.expression_table().is_mapped() && back.index().is_mapped());
                assert_eq!(back.expression_table().format(), format);
                assert_eq!(back.expression(), r.expression());
                assert_eq!(back.embeddings(), r.embeddings());
                let q = Matrix::new(&[5.0f32, 0.0], 1, 2);
                let (a, b) = (
                    r.impute(q, 2, Method::Mean).unwrap(),
                    back.impute(q, 2, Method::Mean).unwrap(),
                );
                assert_eq!(a.expression, b.expression);
                assert_eq!(a.expression, vec![0.5, 0.0]);
                // The search read the panels stored in the file.
                assert!(back.index().panels_mapped() && !r.index().panels_mapped());
                // Pages released from the process read back the same (from the page cache).
                assert!(back.release_pages().unwrap() && !r.release_pages().unwrap());
                assert_eq!(
                    back.impute(q, 2, Method::Mean).unwrap().expression,
                    a.expression
                );
                assert_eq!(back.expression(), r.expression());
                // Saving a mapped reference over its own file leaves the mapped one intact.
                back.save(&path).unwrap();
                assert_eq!(back.expression(), r.expression());
                assert_eq!(Reference::load(&path).unwrap().expression(), r.expression());
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A version-1 file (row-major `expression`, no norms), as bleep-rs wrote before version 2.
    fn write_v1(r: &Reference, path: &Path) {
        let t = r.expression().to_f32();
        let bytes: Vec<u8> = t.iter().flat_map(|v| v.to_le_bytes()).collect();
        let emb: Vec<u8> = r
            .embeddings()
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let view =
            |shape, data| safetensors::tensor::TensorView::new(StDtype::F32, shape, data).unwrap();
        let meta = HashMap::from([
            ("format".to_string(), FORMAT.to_string()),
            ("format_version".into(), "1".into()),
            ("genes".into(), serde_json::to_string(r.genes()).unwrap()),
            (
                "spot_ids".into(),
                serde_json::to_string(r.spot_ids().unwrap()).unwrap(),
            ),
        ]);
        let tensors = vec![
            ("embeddings", view(vec![r.n_spots(), r.dim()], &emb[..])),
            (
                "expression",
                view(vec![r.n_spots(), r.genes().len()], &bytes[..]),
            ),
        ];
        safetensors::serialize_to_file(tensors, Some(meta), path).unwrap();
    }

    #[test]
    fn version_1_files_still_load() {
        let dir = temp_dir("v1");
        let r = small(Dtype::F32);
        let path = dir.join("v1.safetensors");
        write_v1(&r, &path);
        let back = Reference::load(&path).unwrap();
        assert!(!back.expression_table().is_mapped());
        assert_eq!(back.expression(), r.expression());
        assert_eq!(back.embeddings(), r.embeddings());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn damaged_mapped_files_are_errors_when_used() {
        let dir = temp_dir("damaged");
        let path = dir.join("ref.safetensors");
        small_as(Dtype::F32, Format::Sparse).save(&path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let header = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize + 8;
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let offset = |name: &str| {
            st.tensor(name).unwrap().data().as_ptr() as usize - bytes.as_ptr() as usize
        };
        let (cols, norms) = (offset("expression_indices"), offset("norms"));
        assert!(cols > header && norms >= header);
        // A gene column out of range (row 1 holds one value, at column 1): an error when row 1 is read.
        let mut bad = bytes.clone();
        assert_eq!(
            st.tensor("expression_indices").unwrap().dtype(),
            StDtype::U16
        );
        bad[cols + 2..cols + 4].copy_from_slice(&7u16.to_le_bytes());
        std::fs::write(&path, &bad).unwrap();
        let r = Reference::load(&path).unwrap();
        let e = r
            .aggregate(Matrix::new(&[1i64], 1, 1), Matrix::new(&[1.0f32], 1, 1))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("malformed at spot row 1"), "{e}");
        assert!(r.neighbour_spread(Matrix::new(&[1i64], 1, 1)).is_err());
        // A norm that does not match its row: an error on the first search.
        let mut bad = bytes.clone();
        bad[norms..norms + 8].copy_from_slice(&3.0f64.to_le_bytes());
        std::fs::write(&path, &bad).unwrap();
        let r = Reference::load(&path).unwrap();
        let e = r
            .search(Matrix::new(&[1.0f32, 0.0], 1, 2), 1)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("damaged"), "{e}");
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
