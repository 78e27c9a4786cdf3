//! From neighbours to a prediction: per-neighbour weights (method.md, section 5), then one fused
//! gather-and-weighted-sum over the reference expression table.
//!
//! The table is walked in blocks of genes whose slice of the table fits in L3, so the rows that many
//! queries share are read from DRAM once per block rather than once per query.

use crate::buf::Buf;
use crate::cpu::Kernel;
use crate::error::{Error, Result};
use crate::sparse::{Cols, SparseRows};
use half::{bf16, f16};
use rayon::prelude::*;
use std::ops::Range;
use std::sync::Mutex;

/// How the k neighbours' expression is combined.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Method {
    /// Unweighted mean (BLEEP's default and best).
    Mean,
    /// BLEEP's weights: softmax of minus the squared Euclidean distance of the un-normalised embeddings.
    Weighted,
    /// Softmax of cosine / temperature.
    Softmax {
        /// Divides the cosines (positive: smaller is sharper).
        temperature: f32,
    },
    /// The single nearest spot.
    Top1,
}

impl Method {
    /// The method called `name` ("mean", "weighted", "softmax" with its `temperature`, "top1").
    pub fn parse(name: &str, temperature: f32) -> Result<Method> {
        match name {
            "mean" => Ok(Method::Mean),
            "weighted" => Ok(Method::Weighted),
            "softmax" if temperature.is_finite() && temperature > 0.0 => {
                Ok(Method::Softmax { temperature })
            }
            "softmax" => Err(Error::invalid(format!(
                "temperature must be a positive finite number, got {temperature}"
            ))),
            "top1" => Ok(Method::Top1),
            other => Err(Error::invalid(format!(
                "unknown method {other:?}: use one of \"mean\", \"weighted\", \"softmax\", \"top1\""
            ))),
        }
    }
}

/// Weights of each query's k neighbours (rows of `k`, each summing to 1).
///
/// `cos`: the neighbours' cosine similarities, best first; `query_norms` and `neighbour_norms` (the
/// latter laid out like `cos`) are needed by [`Method::Weighted`] only.
pub fn weights(
    method: Method,
    k: usize,
    cos: &[f32],
    query_norms: &[f64],
    neighbour_norms: &[f64],
) -> Vec<f32> {
    let mut w = vec![0.0f32; cos.len()];
    if k == 0 {
        return w;
    }
    w.par_chunks_mut(k).enumerate().for_each(|(q, wq)| {
        let c = &cos[q * k..(q + 1) * k];
        match method {
            Method::Mean => wq.fill(1.0 / k as f32),
            Method::Top1 => wq[0] = 1.0,
            Method::Softmax { temperature } => {
                let logits: Vec<f64> = c.iter().map(|&x| x as f64 / temperature as f64).collect();
                softmax_into(&logits, wq);
            }
            Method::Weighted => {
                // |q - r|^2 as (a - b)^2 + 2ab(1 - cos): never negative, and no difference of two
                // huge squares (which overflows, or cancels to NaN, for large finite embeddings).
                let a = query_norms[q];
                let logits: Vec<f64> = c
                    .iter()
                    .zip(&neighbour_norms[q * k..(q + 1) * k])
                    .map(|(&c, &b)| -((a - b) * (a - b) + 2.0 * a * b * (1.0 - c as f64)))
                    .collect();
                softmax_into(&logits, wq);
            }
        }
    });
    w
}

fn softmax_into(logits: &[f64], out: &mut [f32]) {
    let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = logits.iter().map(|&l| (l - max).exp()).collect();
    let total: f64 = e.iter().sum();
    for (o, v) in out.iter_mut().zip(e) {
        *o = (v / total) as f32;
    }
}

/// Storage type of the expression table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    /// float32.
    F32,
    /// IEEE float16 (half the memory; values beyond +-65504 do not fit).
    F16,
    /// bfloat16 (half the memory, float32's range, 8 significant bits).
    Bf16,
}

impl Dtype {
    /// The dtype called `name`: "float32", "float16" or "bfloat16".
    pub fn parse(name: &str) -> Result<Dtype> {
        match name {
            "float32" => Ok(Dtype::F32),
            "float16" => Ok(Dtype::F16),
            "bfloat16" => Ok(Dtype::Bf16),
            other => Err(Error::invalid(format!(
                "unknown expression dtype {other:?}: use \"float32\", \"float16\" or \"bfloat16\""
            ))),
        }
    }

    /// Bytes per value.
    pub fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::Bf16 => 2,
        }
    }

    /// The dtype's name, as [`Dtype::parse`] reads it.
    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "float32",
            Dtype::F16 => "float16",
            Dtype::Bf16 => "bfloat16",
        }
    }
}

/// The reference expression table, n spots x g genes, row-major.
#[derive(Clone, Debug, PartialEq)]
pub enum Table {
    /// float32 values.
    F32(Vec<f32>),
    /// float16 values.
    F16(Vec<f16>),
    /// bfloat16 values.
    Bf16(Vec<bf16>),
}

impl Table {
    /// `values` converted to `dtype` (rounded to nearest; float16 overflows to infinity).
    pub fn from_f32(values: &[f32], dtype: Dtype) -> Table {
        match dtype {
            Dtype::F32 => Table::F32(values.to_vec()),
            Dtype::F16 => Table::F16(values.par_iter().map(|&v| f16::from_f32(v)).collect()),
            Dtype::Bf16 => Table::Bf16(values.par_iter().map(|&v| bf16::from_f32(v)).collect()),
        }
    }

    /// The storage type.
    pub fn dtype(&self) -> Dtype {
        match self {
            Table::F32(_) => Dtype::F32,
            Table::F16(_) => Dtype::F16,
            Table::Bf16(_) => Dtype::Bf16,
        }
    }

    /// Number of values.
    pub fn len(&self) -> usize {
        match self {
            Table::F32(v) => v.len(),
            Table::F16(v) => v.len(),
            Table::Bf16(v) => v.len(),
        }
    }

    /// Whether there are no values.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The values as float32 (16-bit values widened exactly).
    pub fn to_f32(&self) -> Vec<f32> {
        match self {
            Table::F32(v) => v.clone(),
            Table::F16(v) => v.par_iter().map(|x| x.to_f32()).collect(),
            Table::Bf16(v) => v.par_iter().map(|x| x.to_f32()).collect(),
        }
    }
}

/// Expression values of one storage type, owned or borrowed from a mapped file: the gene blocks of a
/// dense table, or the non-zero values of a sparse one.
#[derive(Clone, Debug)]
pub(crate) enum Values {
    /// float32 values.
    F32(Buf<f32>),
    /// float16 values.
    F16(Buf<f16>),
    /// bfloat16 values.
    Bf16(Buf<bf16>),
}

impl Values {
    /// Owned values converted from float32 to `dtype`.
    pub(crate) fn from_f32(values: &[f32], dtype: Dtype) -> Values {
        Values::from(Table::from_f32(values, dtype))
    }

    /// The storage type.
    pub(crate) fn dtype(&self) -> Dtype {
        match self {
            Values::F32(_) => Dtype::F32,
            Values::F16(_) => Dtype::F16,
            Values::Bf16(_) => Dtype::Bf16,
        }
    }

    /// Number of values.
    pub(crate) fn len(&self) -> usize {
        match self {
            Values::F32(v) => v.len(),
            Values::F16(v) => v.len(),
            Values::Bf16(v) => v.len(),
        }
    }

    /// The values as little-endian bytes.
    pub(crate) fn as_bytes(&self) -> &[u8] {
        match self {
            Values::F32(v) => v.as_bytes(),
            Values::F16(v) => v.as_bytes(),
            Values::Bf16(v) => v.as_bytes(),
        }
    }

    /// Whether the values are read from a mapped file.
    pub(crate) fn is_mapped(&self) -> bool {
        match self {
            Values::F32(v) => v.is_mapped(),
            Values::F16(v) => v.is_mapped(),
            Values::Bf16(v) => v.is_mapped(),
        }
    }

    /// The values `range` as float32, each passed to `f` with its position in the range.
    #[inline]
    pub(crate) fn for_each(&self, range: Range<usize>, mut f: impl FnMut(usize, f32)) {
        match self {
            Values::F32(t) => t[range].iter().enumerate().for_each(|(j, &v)| f(j, v)),
            Values::F16(t) => t[range]
                .iter()
                .enumerate()
                .for_each(|(j, v)| f(j, v.to_f32())),
            Values::Bf16(t) => t[range]
                .iter()
                .enumerate()
                .for_each(|(j, v)| f(j, v.to_f32())),
        }
    }

    /// Position of the first value that is NaN or infinite in `range`.
    pub(crate) fn first_non_finite(&self, range: Range<usize>) -> Option<usize> {
        match self {
            Values::F32(t) => t[range].iter().position(|v| !v.is_finite()),
            Values::F16(t) => t[range].iter().position(|v| !v.is_finite()),
            Values::Bf16(t) => t[range].iter().position(|v| !v.is_finite()),
        }
    }

    /// `out[j] += w * self[start + j]` for j < out.len(), widening 16-bit values (the portable kernels).
    fn add_scaled(&self, start: usize, w: f32, out: &mut [f32]) {
        let range = start..start + out.len();
        match self {
            Values::F32(t) => out
                .iter_mut()
                .zip(&t[range])
                .for_each(|(o, &v)| *o += w * v),
            Values::F16(t) => out
                .iter_mut()
                .zip(&t[range])
                .for_each(|(o, v)| *o += w * v.to_f32()),
            Values::Bf16(t) => out
                .iter_mut()
                .zip(&t[range])
                .for_each(|(o, v)| *o += w * v.to_f32()),
        }
    }
}

impl From<Values> for Table {
    /// A copy of the values in memory.
    fn from(v: Values) -> Table {
        match v {
            Values::F32(v) => Table::F32(v.to_vec()),
            Values::F16(v) => Table::F16(v.to_vec()),
            Values::Bf16(v) => Table::Bf16(v.to_vec()),
        }
    }
}

impl From<Table> for Values {
    fn from(t: Table) -> Values {
        match t {
            Table::F32(v) => Values::F32(Buf::from(v)),
            Table::F16(v) => Values::F16(Buf::from(v)),
            Table::Bf16(v) => Values::Bf16(Buf::from(v)),
        }
    }
}

/// Genes per block: one 16-lane f32 vector of results per query.
const BLOCK_GENES: usize = 16;
/// A streaming task's results (its queries x one block) stay within this much of L2.
const TASK_RESULT_BYTES: usize = 6144 << 10;
/// At most this many gene blocks are scattered in one pass over the rows.
const MAX_BLOCKS_PER_PASS: usize = 8;
/// Queries per parallel task when gathering row by row.
const QUERY_CHUNK: usize = 64;

/// How the expression table is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Whichever of dense and sparse takes fewer bytes.
    Auto,
    /// Every value, in gene blocks.
    Dense,
    /// Compressed sparse rows: the non-zero values of each spot with their gene columns.
    Sparse,
}

impl Format {
    /// The format called `name`: "auto", "dense" or "sparse".
    pub fn parse(name: &str) -> Result<Format> {
        match name {
            "auto" => Ok(Format::Auto),
            "dense" => Ok(Format::Dense),
            "sparse" => Ok(Format::Sparse),
            other => Err(Error::invalid(format!(
                "unknown expression format {other:?}: use \"auto\", \"dense\" or \"sparse\""
            ))),
        }
    }

    /// The format's name, as [`Format::parse`] reads it.
    pub fn name(self) -> &'static str {
        match self {
            Format::Auto => "auto",
            Format::Dense => "dense",
            Format::Sparse => "sparse",
        }
    }
}

/// The reference expression, n spots x g genes, stored dense or sparse.
///
/// Dense, it is kept in gene blocks 16 genes wide: block b (genes `b*width..(b+1)*width`,
/// zero-padded) is its own dense n x width matrix. Aggregation then runs one of two ways. With many
/// neighbour references per row (Q*k of the order of n or more) it streams each block once, in row
/// order, and scatters every row into the results of the queries that picked it (an inverted index
/// built per call): the table is read from DRAM exactly once as a sequential stream and the scattered
/// writes land in an L2-sized buffer. With few references it gathers each query's rows directly.
///
/// Sparse, it is kept as compressed sparse rows ([`crate::sparse`]) and each query's rows are
/// scattered into its output row.
///
/// Either way the values may be borrowed from a mapped reference file rather than held in memory.
/// Values read from a file are not checked for NaN or infinity when it is loaded: a result that comes
/// out non-finite is traced back to its rows, and a row holding such a value is an error.
#[derive(Clone, Debug)]
pub struct Expression {
    n: usize,
    g: usize,
    store: Store,
}

#[derive(Clone, Debug)]
enum Store {
    Blocked(Values),
    Sparse(SparseRows),
}

impl Expression {
    /// From a row-major n x g table, stored dense.
    pub fn new(row_major: &Table, n: usize, g: usize) -> Result<Expression> {
        check_len(row_major.len(), n, g)?;
        let blocked = match row_major {
            Table::F32(v) => Values::F32(Buf::from(to_blocks(v, n, g)?)),
            Table::F16(v) => Values::F16(Buf::from(to_blocks(v, n, g)?)),
            Table::Bf16(v) => Values::Bf16(Buf::from(to_blocks(v, n, g)?)),
        };
        Ok(Expression {
            n,
            g,
            store: Store::Blocked(blocked),
        })
    }

    /// From row-major float32 values (n x g), stored as `dtype` in `format` (`Auto`: the smaller).
    pub fn from_dense(
        values: &[f32],
        n: usize,
        g: usize,
        dtype: Dtype,
        format: Format,
    ) -> Result<Expression> {
        check_len(values.len(), n, g)?;
        let sparse = match format {
            Format::Dense => false,
            Format::Sparse => true,
            Format::Auto => {
                let nnz = values.par_iter().filter(|&&v| v != 0.0).count();
                sparse_bytes(n, g, nnz, dtype) < dense_bytes(n, g, dtype)
            }
        };
        if sparse {
            let rows = SparseRows::from_dense(values, n, g, dtype)?;
            Ok(Expression {
                n,
                g,
                store: Store::Sparse(rows),
            })
        } else {
            Expression::new(&Table::from_f32(values, dtype), n, g)
        }
    }

    /// From compressed sparse rows (n + 1 row offsets, and the gene column and float32 value of each
    /// stored entry, columns increasing within a row), stored as `dtype` in `format` (`Auto`: the
    /// smaller). The structure is checked in full.
    pub fn from_csr(
        n: usize,
        g: usize,
        indptr: Vec<i64>,
        indices: Vec<u32>,
        values: &[f32],
        dtype: Dtype,
        format: Format,
    ) -> Result<Expression> {
        if indices.len() != values.len() {
            return Err(Error::invalid(format!(
                "the sparse expression has {} column indices but {} values: give one of each per stored entry",
                indices.len(),
                values.len()
            )));
        }
        let rows = SparseRows::new(
            n,
            g,
            Buf::from(indptr),
            Cols::narrowest(indices, g),
            Values::from_f32(values, dtype),
        )?;
        rows.check_all()?;
        let dense = match format {
            Format::Dense => true,
            Format::Sparse => false,
            Format::Auto => dense_bytes(n, g, dtype) <= sparse_bytes(n, g, values.len(), dtype),
        };
        let store = if dense {
            Store::Blocked(rows.to_blocks(BLOCK_GENES)?)
        } else {
            Store::Sparse(rows)
        };
        Ok(Expression { n, g, store })
    }

    /// Dense gene blocks (`blocks(g) x n x 16` values) as they are stored in a file: not checked.
    pub(crate) fn from_blocks(n: usize, g: usize, blocked: Values) -> Result<Expression> {
        if n.checked_mul(g.div_ceil(BLOCK_GENES) * BLOCK_GENES) != Some(blocked.len()) {
            return Err(Error::invalid(format!(
                "the expression blocks hold {} values, not {n} spots x {g} genes in blocks of {BLOCK_GENES}",
                blocked.len()
            )));
        }
        Ok(Expression {
            n,
            g,
            store: Store::Blocked(blocked),
        })
    }

    /// Sparse rows as they are stored in a file: sizes checked now, each row's structure when it is read.
    pub(crate) fn from_sparse(rows: SparseRows) -> Expression {
        Expression {
            n: rows.n,
            g: rows.g,
            store: Store::Sparse(rows),
        }
    }

    /// (spots, genes).
    pub fn shape(&self) -> (usize, usize) {
        (self.n, self.g)
    }

    /// The storage type.
    pub fn dtype(&self) -> Dtype {
        match &self.store {
            Store::Blocked(v) => v.dtype(),
            Store::Sparse(s) => s.values.dtype(),
        }
    }

    /// How it is stored: [`Format::Dense`] or [`Format::Sparse`].
    pub fn format(&self) -> Format {
        match &self.store {
            Store::Blocked(_) => Format::Dense,
            Store::Sparse(_) => Format::Sparse,
        }
    }

    /// Bytes of the stored values (and of the sparse structure).
    pub fn nbytes(&self) -> usize {
        match &self.store {
            Store::Blocked(v) => v.as_bytes().len(),
            Store::Sparse(s) => s.nbytes(),
        }
    }

    /// Whether the values are read from a mapped file rather than held in memory.
    pub fn is_mapped(&self) -> bool {
        match &self.store {
            Store::Blocked(v) => v.is_mapped(),
            Store::Sparse(s) => s.values.is_mapped(),
        }
    }

    /// The dense gene blocks, when stored dense.
    pub(crate) fn blocks_values(&self) -> Option<&Values> {
        match &self.store {
            Store::Blocked(v) => Some(v),
            Store::Sparse(_) => None,
        }
    }

    /// The sparse rows, when stored sparse.
    pub(crate) fn sparse_rows(&self) -> Option<&SparseRows> {
        match &self.store {
            Store::Blocked(_) => None,
            Store::Sparse(s) => Some(s),
        }
    }

    /// The table in plain row-major order (for users; a dense copy either way).
    pub fn row_major(&self) -> Table {
        let (n, g) = (self.n, self.g);
        match &self.store {
            Store::Blocked(Values::F32(v)) => Table::F32(from_blocks(v, n, g)),
            Store::Blocked(Values::F16(v)) => Table::F16(from_blocks(v, n, g)),
            Store::Blocked(Values::Bf16(v)) => Table::Bf16(from_blocks(v, n, g)),
            Store::Sparse(s) => s.row_major(),
        }
    }

    /// The table as compressed sparse rows in float32: (row offsets, gene columns, values), the stored
    /// entries of a sparse table or the non-zero values of a dense one.
    pub fn to_csr(&self) -> Result<(Vec<i64>, Vec<u32>, Vec<f32>)> {
        match &self.store {
            Store::Sparse(s) => s.to_csr(),
            Store::Blocked(_) => {
                let dense = self.row_major().to_f32();
                let rows = SparseRows::from_dense(&dense, self.n, self.g, Dtype::F32)?;
                rows.to_csr()
            }
        }
    }

    /// Refuse NaN and infinite values (what `build` does; a loaded table is checked lazily instead).
    pub fn check_finite(&self) -> Result<()> {
        let bad = match &self.store {
            Store::Blocked(v) => {
                let total = v.len();
                first_non_finite_par(v, total).map(|p| {
                    let (b, rest) = (p / (self.n * BLOCK_GENES), p % (self.n * BLOCK_GENES));
                    (rest / BLOCK_GENES, b * BLOCK_GENES + rest % BLOCK_GENES)
                })
            }
            Store::Sparse(s) => first_non_finite_par(&s.values, s.values.len()).map(|p| {
                let row = s.indptr.partition_point(|&o| o as usize <= p) - 1;
                (row, s.indices.get(p))
            }),
        };
        match bad {
            None => Ok(()),
            Some((row, gene)) => Err(Error::invalid(format!(
                "expression row {row} has a NaN or infinite value (gene column {gene}; values beyond the float16 range become infinite)"
            ))),
        }
    }

    /// `out[q, :] = sum_j w[q, j] * expression[idx[q, j], :]` for `out.len() / g` queries of `k`
    /// neighbours ([`Write::Store`]), or that sum added to what `out` holds ([`Write::Add`]: how a
    /// sharded reference sums its shards' shares into one output instead of a fresh queries x genes
    /// array per shard; a sparse shard then touches only its stored values). Zero weights are skipped.
    /// Runs on the current rayon pool.
    pub fn gather_weighted_sum(
        &self,
        idx: &[u32],
        w: &[f32],
        k: usize,
        out: &mut [f32],
        write: Write,
    ) -> Result<()> {
        let g = self.g;
        let nq = out.len() / g.max(1);
        if k == 0 || idx.len() != nq * k || w.len() != nq * k || out.len() != nq * g {
            return Err(Error::invalid(format!(
                "{} indices and {} weights of k = {k} neighbours do not fit an output of {} values ({g} genes per query)",
                idx.len(),
                w.len(),
                out.len()
            )));
        }
        self.check_rows(idx)?;
        if g == 0 || nq == 0 {
            return Ok(());
        }
        match &self.store {
            Store::Blocked(table) => {
                let kernel = crate::cpu::kernel();
                if 4 * nq * k >= self.n {
                    self.stream(table, kernel, idx, w, k, out, write);
                } else {
                    self.gather(table, kernel, idx, w, k, out, write);
                }
            }
            Store::Sparse(rows) => rows.gather_weighted_sum(idx, w, k, out, write)?,
        }
        self.trace_non_finite(out, idx)
    }

    /// `out[q]`: the mean over genes of the standard deviation (ddof 0) of the expression of query q's
    /// `k` neighbours (`idx`, queries x k), computed as NumPy's `std` does (the mean, then the squared
    /// deviations). Dense, gene blocks are the outer loop, so that a block (n x 16 values) stays in
    /// cache for every query of a chunk (row by row, each row's blocks lie far apart: 3x slower than
    /// NumPy's contiguous gathers). Runs on the current rayon pool.
    pub fn neighbour_spread(&self, idx: &[u32], k: usize, out: &mut [f32]) -> Result<()> {
        if k == 0 || idx.len() != out.len() * k {
            return Err(Error::invalid(format!(
                "{} indices do not hold k = {k} neighbours for each of {} queries",
                idx.len(),
                out.len()
            )));
        }
        self.check_rows(idx)?;
        let g = self.g;
        let table = match &self.store {
            Store::Blocked(table) => table,
            Store::Sparse(rows) => {
                rows.neighbour_spread(idx, k, out)?;
                return self.trace_non_finite(out, idx);
            }
        };
        out.par_chunks_mut(QUERY_CHUNK)
            .enumerate()
            .for_each(|(c, chunk)| {
                let mut totals = vec![0f64; chunk.len()];
                for b in 0..self.blocks() {
                    for (r, total) in totals.iter_mut().enumerate() {
                        let q = c * QUERY_CHUNK + r;
                        *total += self.block_spread(table, b, &idx[q * k..(q + 1) * k]);
                    }
                }
                // No genes: NaN, as the mean of nothing.
                for (o, t) in chunk.iter_mut().zip(totals) {
                    *o = (t / g as f64) as f32;
                }
            });
        if g == 0 {
            return Ok(());
        }
        self.trace_non_finite(out, idx)
    }

    /// When a result is NaN or infinite, the first of the rows `idx` that holds such a value is an
    /// error (a table read from a file is not checked when loaded). A non-finite result from finite
    /// rows (a sum that overflows) is returned as it is.
    fn trace_non_finite(&self, out: &[f32], idx: &[u32]) -> Result<()> {
        // Whole chunks, branch-free (so the test vectorises): a few ms for the largest outputs.
        if out
            .par_chunks(1 << 14)
            .all(|c| c.iter().fold(true, |ok, v| ok & v.is_finite()))
        {
            return Ok(());
        }
        let mut rows = idx.to_vec();
        rows.sort_unstable();
        rows.dedup();
        for r in rows {
            if let Some(gene) = self.non_finite_in_row(r as usize) {
                return Err(Error::invalid(format!(
                    "the reference expression of spot row {r} has a NaN or infinite value (gene column {gene}): the reference file is damaged; rebuild it"
                )));
            }
        }
        Ok(())
    }

    /// The gene column of a NaN or infinite value in row `r`, if any.
    fn non_finite_in_row(&self, r: usize) -> Option<usize> {
        match &self.store {
            Store::Blocked(table) => (0..self.blocks()).find_map(|b| {
                let at = b * self.n * BLOCK_GENES + r * BLOCK_GENES;
                table
                    .first_non_finite(at..at + BLOCK_GENES)
                    .map(|j| b * BLOCK_GENES + j)
            }),
            Store::Sparse(rows) => {
                let range = rows.row_range(r).ok()?;
                let start = range.start;
                rows.values
                    .first_non_finite(range)
                    .map(|j| rows.indices.get(start + j))
            }
        }
    }

    /// The sum over the genes of block `b` of the standard deviation of the rows `iq`.
    fn block_spread(&self, table: &Values, b: usize, iq: &[u32]) -> f64 {
        let (base, valid) = (
            b * self.n * BLOCK_GENES,
            BLOCK_GENES.min(self.g - b * BLOCK_GENES),
        );
        match table {
            Values::F32(t) => rows_spread(&t[base..], iq, valid, |v| *v),
            Values::F16(t) => rows_spread(&t[base..], iq, valid, |v| v.to_f32()),
            Values::Bf16(t) => rows_spread(&t[base..], iq, valid, |v| v.to_f32()),
        }
    }

    fn blocks(&self) -> usize {
        self.g.div_ceil(BLOCK_GENES)
    }

    /// An error naming the first neighbour index that is not a row of the table.
    fn check_rows(&self, idx: &[u32]) -> Result<()> {
        match idx.iter().find(|&&i| i as usize >= self.n) {
            Some(&i) => Err(Error::invalid(format!(
                "neighbour index {i} is out of range for a table of {} spots",
                self.n
            ))),
            None => Ok(()),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn gather(
        &self,
        table: &Values,
        kernel: Kernel,
        idx: &[u32],
        w: &[f32],
        k: usize,
        out: &mut [f32],
        write: Write,
    ) {
        let (g, width, n) = (self.g, BLOCK_GENES, self.n);
        let kernel = accumulate_kernel(kernel);
        out.par_chunks_mut(QUERY_CHUNK * g)
            .enumerate()
            .for_each(|(c, rows)| {
                let mut part = vec![0.0f32; width];
                for (r, row) in rows.chunks_exact_mut(g).enumerate() {
                    let q = c * QUERY_CHUNK + r;
                    let (iq, wq) = (&idx[q * k..(q + 1) * k], &w[q * k..(q + 1) * k]);
                    for b in 0..self.blocks() {
                        kernel(table, b * n * width, width, iq, wq, &mut part);
                        let g0 = b * width;
                        let valid = width.min(g - g0);
                        write.put(&mut row[g0..g0 + valid], &part[..valid]);
                    }
                }
            });
    }

    #[allow(clippy::too_many_arguments)]
    fn stream(
        &self,
        table: &Values,
        kernel: Kernel,
        idx: &[u32],
        w: &[f32],
        k: usize,
        out: &mut [f32],
        write: Write,
    ) {
        let (g, n) = (self.g, self.n);
        let nq = out.len() / g;
        // Blocks per pass: as many as keep every query's results in the L2 budget (amortising the walk
        // over the inverted index), and queries per task: as many as fit beside them.
        let nv = (TASK_RESULT_BYTES / (nq * 4 * BLOCK_GENES)).clamp(1, MAX_BLOCKS_PER_PASS);
        let width = nv * BLOCK_GENES;
        let per_task = (TASK_RESULT_BYTES / (4 * width)).clamp(1, nq);
        let ranges: Vec<(usize, usize)> = (0..nq)
            .step_by(per_task)
            .map(|q0| (q0, (q0 + per_task).min(nq)))
            .collect();
        let csrs: Vec<Csr> = ranges
            .par_iter()
            .map(|&(q0, q1)| Csr::build(&idx[q0 * k..q1 * k], &w[q0 * k..q1 * k], k, n))
            .collect();
        let scatter = scatter_kernel(kernel);
        let out_ptr = SharedOut(out.as_mut_ptr());
        let passes = self.blocks().div_ceil(nv);
        // One results buffer per worker thread, reused by all its tasks.
        let parts: Vec<Mutex<Vec<f32>>> = (0..rayon::current_num_threads())
            .map(|_| Mutex::new(Vec::new()))
            .collect();
        (0..passes * ranges.len()).into_par_iter().for_each(|task| {
            let (p, r) = (task / ranges.len(), task % ranges.len());
            let (q0, q1) = ranges[r];
            let blocks = nv.min(self.blocks() - p * nv);
            let width = blocks * BLOCK_GENES;
            let mut part = parts[rayon::current_thread_index().unwrap_or(0) % parts.len()]
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            part.clear();
            part.resize((q1 - q0) * width, 0.0);
            scatter(
                table,
                p * nv * n * BLOCK_GENES,
                n,
                blocks,
                &csrs[r],
                &mut part,
            );
            let g0 = p * nv * BLOCK_GENES;
            let valid = width.min(g - g0);
            for (q, src) in (q0..q1).zip(part.chunks_exact(width)) {
                // SAFETY: tasks own disjoint (query range, gene range) rectangles of `out`.
                let dst = unsafe { out_ptr.slice(q * g + g0, valid) };
                write.put(dst, &src[..valid]);
            }
        });
    }
}

/// The sum over the first `valid` of 16 genes of the standard deviation (ddof 0) of the rows `iq` of a
/// block (`block`: its n x 16 values): fixed-width rows, so that both passes vectorise.
fn rows_spread<T>(block: &[T], iq: &[u32], valid: usize, to_f32: impl Fn(&T) -> f32) -> f64 {
    let row = |i: u32| -> &[T; BLOCK_GENES] {
        let at = i as usize * BLOCK_GENES;
        block[at..at + BLOCK_GENES].try_into().expect("16 values")
    };
    let (mut mean, mut dev) = ([0f32; BLOCK_GENES], [0f32; BLOCK_GENES]);
    for &i in iq {
        let r = row(i);
        for j in 0..BLOCK_GENES {
            mean[j] += to_f32(&r[j]);
        }
    }
    let k = iq.len() as f32;
    mean.iter_mut().for_each(|m| *m /= k);
    for &i in iq {
        let r = row(i);
        for j in 0..BLOCK_GENES {
            let d = to_f32(&r[j]) - mean[j];
            dev[j] += d * d;
        }
    }
    dev[..valid].iter().map(|&d| (d / k).sqrt() as f64).sum()
}

/// The output of `stream`, written by many tasks at once, each to its own rectangle.
struct SharedOut(*mut f32);
unsafe impl Sync for SharedOut {}
impl SharedOut {
    /// `len` values of the output from `at`. SAFETY: no other task holds an overlapping slice.
    #[allow(clippy::mut_from_ref)]
    unsafe fn slice(&self, at: usize, len: usize) -> &mut [f32] {
        std::slice::from_raw_parts_mut(self.0.add(at), len)
    }
}

/// Whether a weighted sum replaces the output's values or is added to them.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Write {
    /// Replace the output's values.
    Store,
    /// Add to them.
    Add,
}

impl Write {
    pub(crate) fn put(self, dst: &mut [f32], src: &[f32]) {
        match self {
            Write::Store => dst.copy_from_slice(src),
            Write::Add => dst.iter_mut().zip(src).for_each(|(d, s)| *d += s),
        }
    }
}

/// For one range of queries: which (query, weight) pairs read each table row (compressed sparse rows).
struct Csr {
    offsets: Vec<u32>,
    queries: Vec<u32>,
    weights: Vec<f32>,
}

impl Csr {
    /// `idx`, `w`: the range's queries x k neighbours; query numbers are relative to the range.
    fn build(idx: &[u32], w: &[f32], k: usize, n: usize) -> Csr {
        let mut offsets = vec![0u32; n + 1];
        for (&i, &wj) in idx.iter().zip(w) {
            if wj != 0.0 {
                offsets[i as usize + 1] += 1;
            }
        }
        for r in 0..n {
            offsets[r + 1] += offsets[r];
        }
        let total = offsets[n] as usize;
        let (mut queries, mut weights) = (vec![0u32; total], vec![0.0f32; total]);
        let mut cursor = offsets.clone();
        for (e, (&i, &wj)) in idx.iter().zip(w).enumerate() {
            if wj != 0.0 {
                let c = &mut cursor[i as usize];
                queries[*c as usize] = (e / k) as u32;
                weights[*c as usize] = wj;
                *c += 1;
            }
        }
        Csr {
            offsets,
            queries,
            weights,
        }
    }
}

fn check_len(len: usize, n: usize, g: usize) -> Result<()> {
    if n.checked_mul(g) != Some(len) {
        return Err(Error::invalid(format!(
            "an expression table of {n} spots x {g} genes needs {} values, not {len}",
            n.saturating_mul(g),
        )));
    }
    Ok(())
}

/// Bytes of a dense table (gene blocks, padded to 16 genes).
pub(crate) fn dense_bytes(n: usize, g: usize, dtype: Dtype) -> usize {
    n.saturating_mul(g.div_ceil(BLOCK_GENES) * BLOCK_GENES)
        .saturating_mul(dtype.size())
}

/// Bytes of a sparse table: 8-byte row offsets, the gene columns (2 bytes each up to 65,536 genes,
/// else 4) and the values.
pub(crate) fn sparse_bytes(n: usize, g: usize, nnz: usize, dtype: Dtype) -> usize {
    let column = if g <= 1 << 16 { 2 } else { 4 };
    (n + 1)
        .saturating_mul(8)
        .saturating_add(nnz.saturating_mul(column + dtype.size()))
}

/// Position of the first NaN or infinite value among the first `len` of `values` (in parallel).
fn first_non_finite_par(values: &Values, len: usize) -> Option<usize> {
    const CHUNK: usize = 1 << 14;
    (0..len.div_ceil(CHUNK))
        .into_par_iter()
        .find_map_first(|c| {
            let start = c * CHUNK;
            values
                .first_non_finite(start..(start + CHUNK).min(len))
                .map(|p| start + p)
        })
}

fn to_blocks<T: Copy + Default + Send + Sync>(v: &[T], n: usize, g: usize) -> Result<Vec<T>> {
    let width = BLOCK_GENES;
    let blocks = g.div_ceil(width);
    let mut out = crate::memory::huge_zeroed::<T>(blocks * n * width, "the expression table")?;
    out.par_chunks_mut((n * width).max(1))
        .enumerate()
        .for_each(|(b, slab)| {
            let g0 = b * width;
            let valid = width.min(g - g0);
            for (r, dst) in slab.chunks_exact_mut(width).enumerate() {
                dst[..valid].copy_from_slice(&v[r * g + g0..r * g + g0 + valid]);
            }
        });
    Ok(out)
}

fn from_blocks<T: Copy + Send + Sync>(v: &[T], n: usize, g: usize) -> Vec<T> {
    let width = BLOCK_GENES;
    let mut out = Vec::with_capacity(n * g);
    for r in 0..n {
        for g0 in (0..g).step_by(width) {
            let valid = width.min(g - g0);
            let at = (g0 / width) * n * width + r * width;
            out.extend_from_slice(&v[at..at + valid]);
        }
    }
    out
}

/// One query, one gene block: `out = sum_j w[j] * table[base + idx[j] * stride ..][..out.len()]`
/// (`out.len()` is BLOCK_GENES).
type AccumulateFn = fn(&Values, usize, usize, &[u32], &[f32], &mut [f32]);

fn accumulate_kernel(kernel: Kernel) -> AccumulateFn {
    #[cfg(target_arch = "x86_64")]
    if kernel.has_avx512() {
        // SAFETY: only returned when the CPU has AVX-512F.
        return |t, base, stride, i, w, out| unsafe {
            x86::accumulate_avx512(t, base, stride, i, w, out)
        };
    }
    accumulate_portable
}

fn accumulate_portable(
    table: &Values,
    base: usize,
    stride: usize,
    idx: &[u32],
    w: &[f32],
    out: &mut [f32],
) {
    out.fill(0.0);
    for (&i, &wj) in idx.iter().zip(w) {
        if wj == 0.0 {
            continue;
        }
        let start = base + i as usize * stride;
        table.add_scaled(start, wj, out);
    }
}

/// `blocks` consecutive gene blocks (from element `base`, each n x 16), one range of queries: for each
/// table row in order, `part[q] += w * row` for every (q, w) of the row in `csr`. `part`: the range's
/// queries x (16 * blocks).
type ScatterFn = fn(&Values, usize, usize, usize, &Csr, &mut [f32]);

fn scatter_kernel(kernel: Kernel) -> ScatterFn {
    #[cfg(target_arch = "x86_64")]
    if kernel.has_avx512() {
        // SAFETY: only returned when the CPU has AVX-512F.
        return |t, base, n, blocks, csr, part| unsafe {
            x86::scatter_avx512(t, base, n, blocks, csr, part)
        };
    }
    scatter_portable
}

fn scatter_portable(
    table: &Values,
    base: usize,
    n: usize,
    blocks: usize,
    csr: &Csr,
    part: &mut [f32],
) {
    let width = blocks * BLOCK_GENES;
    let mut row = vec![0.0f32; width];
    for r in 0..n {
        let (a, b) = (csr.offsets[r] as usize, csr.offsets[r + 1] as usize);
        if a == b {
            continue;
        }
        for (v, dst) in row.chunks_exact_mut(BLOCK_GENES).enumerate() {
            let at = base + v * n * BLOCK_GENES + r * BLOCK_GENES;
            dst.fill(0.0);
            table.add_scaled(at, 1.0, dst);
        }
        for e in a..b {
            let (q, wq) = (csr.queries[e] as usize, csr.weights[e]);
            for (o, &v) in part[q * width..(q + 1) * width].iter_mut().zip(&row) {
                *o += wq * v;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Values, BLOCK_GENES};
    use std::arch::x86_64::*;

    /// A table element that loads as 16 f32 lanes.
    trait Elem: Copy + Into<f32> {
        unsafe fn load16(p: *const Self) -> __m512;
    }

    impl Elem for f32 {
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn load16(p: *const f32) -> __m512 {
            _mm512_loadu_ps(p)
        }
    }

    impl Elem for half::f16 {
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn load16(p: *const half::f16) -> __m512 {
            _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
        }
    }

    impl Elem for half::bf16 {
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn load16(p: *const half::bf16) -> __m512 {
            let wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(p as *const __m256i));
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(wide))
        }
    }

    /// One query's weighted sum over one gene block: a block row is one vector, so the whole sum stays
    /// in one register.
    #[target_feature(enable = "avx512f")]
    unsafe fn accumulate<E: Elem>(
        table: &[E],
        base: usize,
        stride: usize,
        idx: &[u32],
        w: &[f32],
        out: &mut [f32],
    ) {
        assert_eq!(out.len(), BLOCK_GENES);
        let mut acc = _mm512_setzero_ps();
        for (&i, &wj) in idx.iter().zip(w) {
            if wj == 0.0 {
                continue;
            }
            let start = base + i as usize * stride;
            assert!(start + BLOCK_GENES <= table.len());
            acc = _mm512_fmadd_ps(
                _mm512_set1_ps(wj),
                E::load16(table.as_ptr().add(start)),
                acc,
            );
        }
        _mm512_storeu_ps(out.as_mut_ptr(), acc);
    }

    /// Row r of NV consecutive blocks is NV vectors; they are loaded once and added into every query
    /// that references the row.
    #[target_feature(enable = "avx512f")]
    unsafe fn scatter<E: Elem, const NV: usize>(
        t: &[E],
        base: usize,
        n: usize,
        csr: &super::Csr,
        part: &mut [f32],
    ) {
        let width = 16 * NV;
        assert!(base + NV * n * 16 <= t.len() && csr.offsets.len() == n + 1);
        assert!(csr
            .queries
            .iter()
            .all(|&q| (q as usize + 1) * width <= part.len()));
        let (sp, pp) = (t.as_ptr().add(base), part.as_mut_ptr());
        let last = csr.queries.len().saturating_sub(1);
        const PREFETCH: usize = 8;
        for r in 0..n {
            let (a, b) = (csr.offsets[r] as usize, csr.offsets[r + 1] as usize);
            if a == b {
                continue;
            }
            let mut row = [_mm512_setzero_ps(); NV];
            for (v, x) in row.iter_mut().enumerate() {
                *x = E::load16(sp.add(v * n * 16 + r * 16));
            }
            for e in a..b {
                // The results of an entry a few ahead are fetched while this one is added.
                let ahead = *csr.queries.get_unchecked((e + PREFETCH).min(last));
                _mm_prefetch::<_MM_HINT_T0>(pp.add(ahead as usize * width) as *const i8);
                let wv = _mm512_set1_ps(*csr.weights.get_unchecked(e));
                let dst = pp.add(*csr.queries.get_unchecked(e) as usize * width);
                for (v, x) in row.iter().enumerate() {
                    let d = dst.add(16 * v);
                    _mm512_storeu_ps(d, _mm512_fmadd_ps(wv, *x, _mm512_loadu_ps(d)));
                }
            }
        }
    }

    unsafe fn scatter_typed<E: Elem>(
        t: &[E],
        base: usize,
        n: usize,
        blocks: usize,
        csr: &super::Csr,
        part: &mut [f32],
    ) {
        match blocks {
            1 => scatter::<E, 1>(t, base, n, csr, part),
            2 => scatter::<E, 2>(t, base, n, csr, part),
            3 => scatter::<E, 3>(t, base, n, csr, part),
            4 => scatter::<E, 4>(t, base, n, csr, part),
            5 => scatter::<E, 5>(t, base, n, csr, part),
            6 => scatter::<E, 6>(t, base, n, csr, part),
            7 => scatter::<E, 7>(t, base, n, csr, part),
            _ => scatter::<E, 8>(t, base, n, csr, part),
        }
    }

    /// SAFETY: the CPU must have AVX-512F; `blocks` is 1 to 8.
    pub unsafe fn scatter_avx512(
        table: &Values,
        base: usize,
        n: usize,
        blocks: usize,
        csr: &super::Csr,
        part: &mut [f32],
    ) {
        match table {
            Values::F32(t) => scatter_typed(&t[..], base, n, blocks, csr, part),
            Values::F16(t) => scatter_typed(&t[..], base, n, blocks, csr, part),
            Values::Bf16(t) => scatter_typed(&t[..], base, n, blocks, csr, part),
        }
    }

    /// SAFETY: the CPU must have AVX-512F. Row ranges are checked against the table.
    pub unsafe fn accumulate_avx512(
        table: &Values,
        base: usize,
        stride: usize,
        idx: &[u32],
        w: &[f32],
        out: &mut [f32],
    ) {
        match table {
            Values::F32(t) => accumulate(&t[..], base, stride, idx, w, out),
            Values::F16(t) => accumulate(&t[..], base, stride, idx, w, out),
            Values::Bf16(t) => accumulate(&t[..], base, stride, idx, w, out),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn oracle(table: &[f32], g: usize, idx: &[u32], w: &[f32], k: usize) -> Vec<f32> {
        let nq = idx.len() / k.max(1);
        let mut out = vec![0.0f64; nq * g];
        for q in 0..nq {
            for j in 0..k {
                let r = idx[q * k + j] as usize;
                for gi in 0..g {
                    out[q * g + gi] += w[q * k + j] as f64 * table[r * g + gi] as f64;
                }
            }
        }
        out.into_iter().map(|v| v as f32).collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(40))]
        #[test]
        fn gather_matches_oracle(n in 1usize..60, g in 1usize..400, nq in 0usize..150, k in 1usize..90, seed in any::<u64>()) {
            let mut s = seed;
            let mut next = || { s = s.wrapping_mul(6364136223846793005).wrapping_add(1); (s >> 33) as u32 };
            let values: Vec<f32> = (0..n * g).map(|_| (next() % 1000) as f32 / 100.0).collect();
            let idx: Vec<u32> = (0..nq * k).map(|_| next() % n as u32).collect();
            let w: Vec<f32> = (0..nq * k).map(|_| (next() % 5) as f32 / 4.0).collect();
            for dtype in [Dtype::F32, Dtype::F16, Dtype::Bf16] {
                let table = Table::from_f32(&values, dtype);
                let exact = table.to_f32();
                let want = oracle(&exact, g, &idx, &w, k);
                let expr = Expression::new(&table, n, g).unwrap();
                prop_assert_eq!(expr.row_major(), table);
                // Both strategies with every kernel this CPU has, and the automatic choice.
                let mut chosen = vec![f32::NAN; nq * g];
                expr.gather_weighted_sum(&idx, &w, k, &mut chosen, Write::Store)
                    .unwrap();
                let mut all = vec![chosen];
                for kernel in crate::cpu::cpu().available.clone() {
                    let mut streamed = vec![f32::NAN; nq * g];
                    let mut gathered = vec![f32::NAN; nq * g];
                    // Added to an output of ones: the same sums once the ones are taken away.
                    let (mut streamed_add, mut gathered_add) = (vec![1f32; nq * g], vec![1f32; nq * g]);
                    if nq > 0 {
                        let t = expr.blocks_values().unwrap();
                        expr.stream(t, kernel, &idx, &w, k, &mut streamed, Write::Store);
                        expr.gather(t, kernel, &idx, &w, k, &mut gathered, Write::Store);
                        expr.stream(t, kernel, &idx, &w, k, &mut streamed_add, Write::Add);
                        expr.gather(t, kernel, &idx, &w, k, &mut gathered_add, Write::Add);
                    }
                    for v in streamed_add.iter_mut().chain(gathered_add.iter_mut()) {
                        *v -= 1.0;
                    }
                    all.extend([streamed, gathered, streamed_add, gathered_add]);
                }
                for got in &all {
                    for (a, b) in got.iter().zip(&want) {
                        prop_assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{dtype:?}: {a} vs {b}");
                    }
                }
            }
        }
    }

    #[test]
    fn weights_sum_to_one_and_follow_their_formulas() {
        let k = 3;
        let cos = [0.9f32, 0.5, 0.1];
        let qn = [2.0f64];
        let rn = [1.0f64, 3.0, 1.0];
        for m in [
            Method::Mean,
            Method::Weighted,
            Method::Softmax { temperature: 0.1 },
            Method::Top1,
        ] {
            let w = weights(m, k, &cos, &qn, &rn);
            assert!((w.iter().sum::<f32>() - 1.0).abs() < 1e-6, "{m:?}");
        }
        let w = weights(Method::Softmax { temperature: 0.5 }, k, &cos, &qn, &rn);
        let e: Vec<f64> = cos.iter().map(|&c| (c as f64 / 0.5).exp()).collect();
        let t: f64 = e.iter().sum();
        for (a, b) in w.iter().zip(&e) {
            assert!((*a as f64 - b / t).abs() < 1e-6);
        }
        let w = weights(Method::Weighted, k, &cos, &qn, &rn);
        let d: Vec<f64> = cos
            .iter()
            .zip(&rn)
            .map(|(&c, &b)| 4.0 + b * b - 4.0 * b * c as f64)
            .collect();
        let e: Vec<f64> = d.iter().map(|&x| (-(x - d[0])).exp()).collect();
        let t: f64 = e.iter().sum();
        for (a, b) in w.iter().zip(&e) {
            assert!((*a as f64 - b / t).abs() < 1e-6);
        }
        assert_eq!(
            weights(Method::Top1, k, &cos, &qn, &rn),
            vec![1.0, 0.0, 0.0]
        );
    }

    #[test]
    fn bad_method_and_dtype_names_are_errors() {
        assert!(Method::parse("median", 1.0).is_err());
        assert!(Method::parse("softmax", 0.0).is_err());
        assert!(Dtype::parse("int8").is_err());
    }
}
