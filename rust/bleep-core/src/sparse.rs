//! A sparse expression table: compressed sparse rows (CSR), as scipy.sparse keeps them.
//!
//! Row r's stored entries are `indptr[r]..indptr[r + 1]`: their gene columns in `indices` (strictly
//! increasing within a row, each below the number of genes; 16-bit when every column fits, as for any
//! panel of up to 65,536 genes, else 32-bit) and their values in `values`. Every other
//! value is zero. A table built in memory is checked in full ([`SparseRows::check_all`]); a table mapped
//! from a file is checked row by row as the kernels read it ([`SparseRows::row_range`]), so that loading
//! reads nothing but the header and a damaged file is an error, never an out-of-bounds read.

use crate::aggregate::{Dtype, Table, Values, Write};
use crate::buf::Buf;
use crate::error::{Error, Result};
use half::{bf16, f16};
use rayon::prelude::*;
use std::ops::Range;

/// Queries per parallel task.
const QUERY_CHUNK: usize = 64;

/// The gene column of each stored value: 16 bits where every column fits, else 32.
#[derive(Clone, Debug)]
pub(crate) enum Cols {
    U16(Buf<u16>),
    U32(Buf<u32>),
}

impl Cols {
    /// The narrowest columns for a table of `g` genes (kept 32-bit when a column is out of range, so
    /// that the check reports it rather than a narrowing hiding it).
    pub fn narrowest(cols: Vec<u32>, g: usize) -> Cols {
        if g <= 1 << 16 && cols.iter().all(|&c| (c as usize) < g) {
            Cols::U16(Buf::from(
                cols.iter().map(|&c| c as u16).collect::<Vec<u16>>(),
            ))
        } else {
            Cols::U32(Buf::from(cols))
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Cols::U16(c) => c.len(),
            Cols::U32(c) => c.len(),
        }
    }

    pub fn as_bytes(&self) -> &[u8] {
        match self {
            Cols::U16(c) => c.as_bytes(),
            Cols::U32(c) => c.as_bytes(),
        }
    }

    /// Column of entry `e`.
    #[inline]
    pub fn get(&self, e: usize) -> usize {
        match self {
            Cols::U16(c) => c[e] as usize,
            Cols::U32(c) => c[e] as usize,
        }
    }

    /// Whether the columns `range` are strictly increasing and below `g` (branch-free, so that it
    /// vectorises).
    fn valid(&self, range: Range<usize>, g: usize) -> bool {
        fn ok<T: Copy + Ord + Into<u64>>(c: &[T], g: usize) -> bool {
            let unordered = c.windows(2).fold(false, |acc, p| acc | (p[0] >= p[1]));
            !unordered && c.last().is_none_or(|&l| (l.into() as usize) < g)
        }
        match self {
            Cols::U16(c) => ok(&c[range], g),
            Cols::U32(c) => ok(&c[range], g),
        }
    }

    pub fn to_u32(&self) -> Vec<u32> {
        match self {
            Cols::U16(c) => c.iter().map(|&x| x as u32).collect(),
            Cols::U32(c) => c.to_vec(),
        }
    }
}

/// n spots x g genes as compressed sparse rows.
#[derive(Clone, Debug)]
pub(crate) struct SparseRows {
    pub n: usize,
    pub g: usize,
    /// n + 1 offsets into `indices` and `values`.
    pub indptr: Buf<i64>,
    /// The gene column of each stored value.
    pub indices: Cols,
    pub values: Values,
}

impl SparseRows {
    /// Sizes checked (n + 1 offsets, one column per value); the row structure is not.
    pub fn new(
        n: usize,
        g: usize,
        indptr: Buf<i64>,
        indices: Cols,
        values: Values,
    ) -> Result<SparseRows> {
        if indptr.len() != n + 1 {
            return Err(Error::invalid(format!(
                "the sparse expression has {} row offsets for {n} spots: it needs n_spots + 1",
                indptr.len()
            )));
        }
        if indices.len() != values.len() {
            return Err(Error::invalid(format!(
                "the sparse expression has {} column indices but {} values",
                indices.len(),
                values.len()
            )));
        }
        if g > u32::MAX as usize {
            return Err(Error::invalid(format!(
                "{g} genes are more than a sparse table indexes (2^32 - 1)"
            )));
        }
        Ok(SparseRows {
            n,
            g,
            indptr,
            indices,
            values,
        })
    }

    /// Check that the offsets start at 0 and end at the number of stored values (O(1)).
    pub fn check_ends(&self) -> Result<()> {
        if self.indptr[0] != 0 {
            return Err(self.corrupt(0, "the first row offset is not 0"));
        }
        if self.indptr[self.n] as usize != self.indices.len() {
            return Err(self.corrupt(
                self.n.saturating_sub(1),
                "the last row offset is not the number of stored values",
            ));
        }
        Ok(())
    }

    /// Check every row's structure (in parallel): what `build` does before anything reads the table.
    pub fn check_all(&self) -> Result<()> {
        self.check_ends()?;
        (0..self.n)
            .into_par_iter()
            .try_for_each(|r| self.row_range(r).map(|_| ()))
    }

    /// Row r's range of stored entries, once its offsets and columns are checked.
    #[inline]
    pub fn row_range(&self, r: usize) -> Result<Range<usize>> {
        let (a, b) = (self.indptr[r], self.indptr[r + 1]);
        if a < 0 || b < a || b as usize > self.indices.len() {
            return Err(self.corrupt(
                r,
                &format!(
                    "its offsets {a}..{b} are not an increasing range within the {} stored values",
                    self.indices.len()
                ),
            ));
        }
        let range = a as usize..b as usize;
        if !self.indices.valid(range.clone(), self.g) {
            return Err(self.corrupt(
                r,
                &format!(
                    "its gene columns are not strictly increasing and below {} (the number of genes)",
                    self.g
                ),
            ));
        }
        Ok(range)
    }

    fn corrupt(&self, r: usize, what: &str) -> Error {
        Error::invalid(format!(
            "the sparse expression is malformed at spot row {r}: {what}; canonicalise the matrix (scipy: sum_duplicates()) before building, or rebuild a damaged reference file"
        ))
    }

    /// The non-zero values of row-major float32 `values` (n x g), stored as `dtype`.
    pub fn from_dense(values: &[f32], n: usize, g: usize, dtype: Dtype) -> Result<SparseRows> {
        if n.checked_mul(g) != Some(values.len()) {
            return Err(Error::invalid(format!(
                "{} expression values are not {n} spots x {g} genes",
                values.len()
            )));
        }
        let counts: Vec<i64> = match g {
            0 => vec![0; n],
            _ => values
                .par_chunks(g)
                .map(|row| row.iter().filter(|&&v| v != 0.0).count() as i64)
                .collect(),
        };
        let mut indptr = Vec::with_capacity(n + 1);
        indptr.push(0i64);
        for (r, c) in counts.iter().enumerate().take(n) {
            indptr.push(indptr[r] + c);
        }
        let nnz = indptr[n] as usize;
        let mut indices = crate::memory::filled(nnz, 0u32, "the sparse expression's columns")?;
        let mut kept = crate::memory::filled(nnz, 0f32, "the sparse expression's values")?;
        // Each row fills its own slice of the outputs.
        let mut cols_left: &mut [u32] = &mut indices;
        let mut vals_left: &mut [f32] = &mut kept;
        let mut parts = Vec::with_capacity(n);
        for &c in &counts[..n] {
            let (ci, cr) = std::mem::take(&mut cols_left).split_at_mut(c as usize);
            let (vi, vr) = std::mem::take(&mut vals_left).split_at_mut(c as usize);
            parts.push((ci, vi));
            (cols_left, vals_left) = (cr, vr);
        }
        parts.into_par_iter().enumerate().for_each(|(r, (ci, vi))| {
            let row = &values[r * g..(r + 1) * g];
            let mut e = 0;
            for (j, &v) in row.iter().enumerate() {
                if v != 0.0 {
                    ci[e] = j as u32;
                    vi[e] = v;
                    e += 1;
                }
            }
        });
        SparseRows::new(
            n,
            g,
            Buf::from(indptr),
            Cols::narrowest(indices, g),
            Values::from_f32(&kept, dtype),
        )
    }

    /// Each stored entry of `range` as (gene column, value as float32); one monomorphised loop per
    /// (column type, value type).
    #[inline]
    pub fn for_each_entry(&self, range: Range<usize>, mut f: impl FnMut(usize, f32)) {
        match &self.indices {
            Cols::U16(c) => {
                let c = &c[range.clone()];
                self.values.for_each(range, |e, v| f(c[e] as usize, v))
            }
            Cols::U32(c) => {
                let c = &c[range.clone()];
                self.values.for_each(range, |e, v| f(c[e] as usize, v))
            }
        }
    }

    /// Bytes of the offsets, columns and values.
    pub fn nbytes(&self) -> usize {
        self.indptr.as_bytes().len() + self.indices.as_bytes().len() + self.values.as_bytes().len()
    }

    /// The dense gene blocks (`blocks x n x width`, zero-padded) of the table. Checks every row.
    pub fn to_blocks(&self, width: usize) -> Result<Values> {
        self.check_all()?;
        Ok(match &self.values {
            Values::F32(v) => Values::F32(Buf::from(self.fill_blocks(v, width)?)),
            Values::F16(v) => Values::F16(Buf::from(self.fill_blocks(v, width)?)),
            Values::Bf16(v) => Values::Bf16(Buf::from(self.fill_blocks(v, width)?)),
        })
    }

    fn fill_blocks<T: Copy + Default + Send + Sync>(
        &self,
        values: &[T],
        width: usize,
    ) -> Result<Vec<T>> {
        let (n, blocks) = (self.n, self.g.div_ceil(width));
        let len = crate::memory::bytes(
            &[blocks, n, width],
            "the dense expression table",
            "store it sparse",
        )?;
        let mut out = crate::memory::huge_zeroed::<T>(len, "the expression table")?;
        for r in 0..n {
            let range = self.indptr[r] as usize..self.indptr[r + 1] as usize;
            for (e, &v) in range.clone().zip(&values[range]) {
                let c = self.indices.get(e);
                out[(c / width) * n * width + r * width + c % width] = v;
            }
        }
        Ok(out)
    }

    /// The table row-major and dense, in its storage type.
    pub fn row_major(&self) -> Table {
        match &self.values {
            Values::F32(v) => Table::F32(self.densify(v)),
            Values::F16(v) => Table::F16(self.densify(v)),
            Values::Bf16(v) => Table::Bf16(self.densify(v)),
        }
    }

    fn densify<T: Copy + Default + Send + Sync>(&self, values: &[T]) -> Vec<T> {
        let g = self.g;
        let mut out = vec![T::default(); self.n * g];
        out.par_chunks_mut(g.max(1))
            .enumerate()
            .for_each(|(r, row)| {
                // A malformed row (possible only in a damaged file) reads as zeros here; the kernels
                // report it.
                if let Ok(range) = self.row_range(r) {
                    for (e, &v) in range.clone().zip(&values[range]) {
                        row[self.indices.get(e)] = v;
                    }
                }
            });
        out
    }

    /// (row offsets, columns, float32 values), copies; every row checked.
    pub fn to_csr(&self) -> Result<(Vec<i64>, Vec<u32>, Vec<f32>)> {
        self.check_all()?;
        let values = match &self.values {
            Values::F32(v) => v.to_vec(),
            Values::F16(v) => v.par_iter().map(|x: &f16| x.to_f32()).collect(),
            Values::Bf16(v) => v.par_iter().map(|x: &bf16| x.to_f32()).collect(),
        };
        Ok((self.indptr.to_vec(), self.indices.to_u32(), values))
    }

    /// `out[q, :] = sum_j w[q, j] * row(idx[q, j])` (or `+=` with [`Write::Add`]): each query's rows
    /// scattered into its output row (zero weights skipped). `idx` must be rows of the table.
    pub fn gather_weighted_sum(
        &self,
        idx: &[u32],
        w: &[f32],
        k: usize,
        out: &mut [f32],
        write: Write,
    ) -> Result<()> {
        let g = self.g;
        out.par_chunks_mut(QUERY_CHUNK * g)
            .enumerate()
            .try_for_each(|(c, rows)| {
                for (r, row) in rows.chunks_exact_mut(g).enumerate() {
                    let q = c * QUERY_CHUNK + r;
                    if write == Write::Store {
                        row.fill(0.0);
                    }
                    for (&i, &wj) in idx[q * k..(q + 1) * k].iter().zip(&w[q * k..(q + 1) * k]) {
                        if wj == 0.0 {
                            continue;
                        }
                        let range = self.row_range(i as usize)?;
                        // Columns are checked below g = row.len().
                        self.for_each_entry(range, |c, v| row[c] += wj * v);
                    }
                }
                Ok(())
            })
    }

    /// Per query, the mean over genes of the standard deviation (ddof 0) of its k rows `idx`: the
    /// per-gene mean, then the squared deviations of the stored values plus those of the implicit
    /// zeros ((k - stored) * mean^2), in float64.
    pub fn neighbour_spread(&self, idx: &[u32], k: usize, out: &mut [f32]) -> Result<()> {
        let g = self.g;
        out.par_chunks_mut(QUERY_CHUNK)
            .enumerate()
            .try_for_each_init(
                || (vec![0f64; g], vec![0u32; g], vec![0f64; g]),
                |(mean, count, dev), (c, chunk)| {
                    for (r, o) in chunk.iter_mut().enumerate() {
                        let q = c * QUERY_CHUNK + r;
                        let iq = &idx[q * k..(q + 1) * k];
                        mean.fill(0.0);
                        count.fill(0);
                        dev.fill(0.0);
                        let mut ranges = Vec::with_capacity(k);
                        for &i in iq {
                            let range = self.row_range(i as usize)?;
                            self.for_each_entry(range.clone(), |c, v| {
                                mean[c] += v as f64;
                                count[c] += 1;
                            });
                            ranges.push(range);
                        }
                        let kf = k as f64;
                        mean.iter_mut().for_each(|m| *m /= kf);
                        for range in ranges {
                            self.for_each_entry(range, |c, v| {
                                let d = v as f64 - mean[c];
                                dev[c] += d * d;
                            });
                        }
                        let total: f64 = (0..g)
                            .map(|c| {
                                let zeros = (k - count[c] as usize) as f64;
                                ((dev[c] + zeros * mean[c] * mean[c]) / kf).sqrt()
                            })
                            .sum();
                        // No genes: NaN, as the mean of nothing.
                        *o = (total / g as f64) as f32;
                    }
                    Ok(())
                },
            )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::{Expression, Format};
    use proptest::prelude::*;

    fn dense_oracle_spread(t: &[f32], g: usize, idx: &[u32], k: usize) -> Vec<f64> {
        idx.chunks(k)
            .map(|iq| {
                let mut total = 0.0;
                for c in 0..g {
                    let v: Vec<f64> = iq.iter().map(|&i| t[i as usize * g + c] as f64).collect();
                    let m = v.iter().sum::<f64>() / k as f64;
                    total += (v.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / k as f64).sqrt();
                }
                total / g as f64
            })
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(40))]
        #[test]
        fn sparse_matches_dense(n in 1usize..50, g in 1usize..70, nq in 0usize..40, k in 1usize..30,
                                zeros in 0u32..10, seed in any::<u64>()) {
            let mut s = seed;
            let mut next = || { s = s.wrapping_mul(6364136223846793005).wrapping_add(1); (s >> 33) as u32 };
            let values: Vec<f32> = (0..n * g)
                .map(|_| if next() % 10 < zeros { 0.0 } else { (next() % 1000) as f32 / 100.0 })
                .collect();
            let idx: Vec<u32> = (0..nq * k).map(|_| next() % n as u32).collect();
            let w: Vec<f32> = (0..nq * k).map(|_| (next() % 5) as f32 / 4.0).collect();
            for dtype in [Dtype::F32, Dtype::F16, Dtype::Bf16] {
                let dense = Expression::from_dense(&values, n, g, dtype, Format::Dense).unwrap();
                let sparse = Expression::from_dense(&values, n, g, dtype, Format::Sparse).unwrap();
                prop_assert_eq!(sparse.format(), Format::Sparse);
                prop_assert_eq!(sparse.row_major(), dense.row_major());
                let exact = dense.row_major().to_f32();
                let (mut a, mut b) = (vec![f32::NAN; nq * g], vec![f32::NAN; nq * g]);
                dense.gather_weighted_sum(&idx, &w, k, &mut a, Write::Store).unwrap();
                sparse.gather_weighted_sum(&idx, &w, k, &mut b, Write::Store).unwrap();
                for (x, y) in a.iter().zip(&b) {
                    prop_assert!((x - y).abs() <= 1e-4 * (1.0 + x.abs()), "{dtype:?}: {x} vs {y}");
                }
                // Added to an output that holds values: base + the sum, dense and sparse alike.
                let base: Vec<f32> = (0..nq * g).map(|i| (i % 7) as f32 - 3.0).collect();
                for table in [&dense, &sparse] {
                    let mut c = base.clone();
                    table
                        .gather_weighted_sum(&idx, &w, k, &mut c, Write::Add)
                        .unwrap();
                    for ((x, y), z) in c.iter().zip(&base).zip(&a) {
                        prop_assert!((x - (y + z)).abs() <= 1e-4 * (1.0 + x.abs()), "{dtype:?}: add {x} vs {y} + {z}");
                    }
                }
                let (mut a, mut b) = (vec![0f32; nq], vec![0f32; nq]);
                dense.neighbour_spread(&idx, k, &mut a).unwrap();
                sparse.neighbour_spread(&idx, k, &mut b).unwrap();
                let want = dense_oracle_spread(&exact, g, &idx, k);
                for ((x, y), z) in a.iter().zip(&b).zip(&want) {
                    prop_assert!((*y as f64 - z).abs() <= 1e-4 * (1.0 + z.abs()), "{dtype:?}: sparse {y} vs {z}");
                    prop_assert!((*x as f64 - z).abs() <= 1e-3 * (1.0 + z.abs()), "{dtype:?}: dense {x} vs {z}");
                }
                // Through CSR and back, and a CSR stored dense.
                let (p, i, v) = sparse.to_csr().unwrap();
                let again = Expression::from_csr(n, g, p, i, &v, dtype, Format::Dense).unwrap();
                prop_assert_eq!(again.format(), Format::Dense);
                prop_assert_eq!(again.row_major(), dense.row_major());
            }
        }
    }

    #[test]
    fn wide_panels_use_32_bit_columns() {
        let (n, g) = (3, 70_000);
        let mut values = vec![0f32; n * g];
        for (r, c) in [(0, 5), (0, 69_999), (1, 65_536), (2, 0), (2, 65_535)] {
            values[r * g + c] = (r * 7 + c % 13) as f32 + 1.0;
        }
        let sparse = Expression::from_dense(&values, n, g, Dtype::F32, Format::Sparse).unwrap();
        assert!(matches!(
            sparse.sparse_rows().unwrap().indices,
            Cols::U32(_)
        ));
        let dense = Expression::from_dense(&values, n, g, Dtype::F32, Format::Dense).unwrap();
        assert_eq!(sparse.row_major(), dense.row_major());
        let (idx, w) = ([0u32, 1, 2, 2], [0.5f32, 0.25, 1.0, 0.0]);
        let (mut a, mut b) = (vec![0f32; 2 * g], vec![0f32; 2 * g]);
        dense
            .gather_weighted_sum(&idx, &w, 2, &mut a, Write::Store)
            .unwrap();
        sparse
            .gather_weighted_sum(&idx, &w, 2, &mut b, Write::Store)
            .unwrap();
        assert_eq!(a, b);
        let (mut a, mut b) = (vec![0f32; 2], vec![0f32; 2]);
        dense.neighbour_spread(&idx, 2, &mut a).unwrap();
        sparse.neighbour_spread(&idx, 2, &mut b).unwrap();
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() <= 1e-6 * (1.0 + x.abs()), "{x} vs {y}");
        }
        // Up to 65,536 genes the columns take 16 bits.
        let narrow =
            Expression::from_dense(&values[..3 * 65_536], 3, 65_536, Dtype::F32, Format::Sparse);
        assert!(matches!(
            narrow.unwrap().sparse_rows().unwrap().indices,
            Cols::U16(_)
        ));
    }

    #[test]
    fn malformed_rows_are_errors_not_panics() {
        let make = |indptr: Vec<i64>, indices: Vec<u32>| {
            let values = vec![1.0f32; indices.len()];
            Expression::from_csr(2, 3, indptr, indices, &values, Dtype::F32, Format::Sparse)
        };
        assert!(make(vec![0, 1, 2], vec![0, 2]).is_ok());
        for (indptr, indices, what) in [
            (vec![0, 1], vec![0], "row offsets"),
            (vec![1, 1, 2], vec![0, 2], "first row offset"),
            (vec![0, -1, 2], vec![0, 2], "not an increasing range"),
            (vec![0, 1, 3], vec![0, 2], "last row offset"),
            (vec![0, 1, 2], vec![0, 3], "below 3"),
            (vec![0, 2, 2], vec![2, 1], "strictly increasing"),
            (vec![0, 2, 2], vec![1, 1], "strictly increasing"),
        ] {
            let e = make(indptr, indices).err().unwrap().to_string();
            assert!(e.contains(what), "{e}");
        }
        // Unchecked (as from a file): the kernels report the bad row.
        let rows = SparseRows::new(
            2,
            3,
            Buf::from(vec![0i64, 1, 5]),
            Cols::U32(Buf::from(vec![0u32, 1])),
            Values::from_f32(&[1.0, 2.0], Dtype::F32),
        )
        .unwrap();
        let expr = Expression::from_sparse(rows);
        let mut out = vec![0f32; 3];
        let e = expr
            .gather_weighted_sum(&[1], &[1.0], 1, &mut out, Write::Store)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("spot row 1"), "{e}");
        assert!(expr
            .gather_weighted_sum(&[0], &[1.0], 1, &mut out, Write::Store)
            .is_ok());
        assert_eq!(out, vec![1.0, 0.0, 0.0]);
        let mut spread = vec![0f32; 1];
        assert!(expr.neighbour_spread(&[1], 1, &mut spread).is_err());
    }

    #[test]
    fn non_finite_values_in_unchecked_rows_are_traced() {
        let rows = SparseRows::new(
            2,
            2,
            Buf::from(vec![0i64, 1, 2]),
            Cols::U32(Buf::from(vec![0u32, 1])),
            Values::from_f32(&[1.0, f32::NAN], Dtype::F32),
        )
        .unwrap();
        let expr = Expression::from_sparse(rows);
        assert!(expr.check_finite().is_err());
        let mut out = vec![0f32; 2];
        expr.gather_weighted_sum(&[0], &[1.0], 1, &mut out, Write::Store)
            .unwrap();
        let e = expr
            .gather_weighted_sum(&[1], &[1.0], 1, &mut out, Write::Store)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("spot row 1") && e.contains("gene column 1"),
            "{e}"
        );
    }
}
