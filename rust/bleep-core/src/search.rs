//! Exact top-k cosine search.
//!
//! The reference is L2-normalised and packed into panels ([`crate::kernel`]). A search splits the
//! queries into blocks (and, when there are too few blocks to keep every thread busy, the reference into
//! ranges); each task walks its reference range in L2-sized chunks, scores MR queries against one panel
//! at a time in registers, and hands a query's `TopK` only the scores above its current threshold. No
//! score matrix is ever stored.
//!
//! On CPUs with AVX512-BF16 the scan scores in bf16 (twice the fp32 rate) and keeps every candidate
//! within twice the bf16 error bound of the k-th best; the survivors are rescored exactly (f64, from the
//! rows as given and their norms: no normalised copy is kept), so the result is the exact top k all the
//! same.

use crate::buf::Buf;
use crate::cpu::Kernel;
use crate::error::{Error, Result};
use crate::kernel::{
    bf16_query_margin, pack_panels, pack_panels_bf16, pack_tile, pack_tile_bf16, tile_bf16,
    Bf16Rounding, MR, NR,
};
use crate::topk::TopK;
use rayon::prelude::*;
use std::ops::Range;
use std::sync::OnceLock;

/// Query rows per task when there are plenty of queries (4 tiles). Each task streams its reference
/// range once, so even this small block does about 50 flops per byte read; small tasks balance well.
const QUERY_BLOCK: usize = 4 * MR;
/// Enough tasks per thread that uneven finishing times average out.
const TASKS_PER_THREAD: usize = 8;
/// Bytes of packed reference a task keeps hot while every tile row of its block passes over them.
const L2_CHUNK_BYTES: usize = 384 * 1024;

/// The reference embeddings as given, their norms, and their panels (the rows normalised) for each kind
/// of kernel (packed on first use): the search structure of a [`Reference`](crate::Reference), usable
/// alone. No normalised copy of the rows is kept: panels are packed and candidates rescored from the
/// rows and their norms.
///
/// The rows and norms may be borrowed from a mapped reference file ([`PackedIndex::from_file`]); such
/// an index is checked (finite rows, each stored norm that of its row and not zero) on first use.
pub struct PackedIndex {
    n: usize,
    d: usize,
    rows: Buf<f32>,
    norms: Buf<f64>,
    /// The outcome of the check of rows read from a file (set at once for rows given in memory).
    checked: OnceLock<std::result::Result<Verified, String>>,
    /// Panels read from a file, used once [`PackedIndex::check`] has found them equal to a fresh packing.
    stored: StoredPanels,
    panels_f32: OnceLock<Buf<f32>>,
    panels_bf16: OnceLock<(Buf<u32>, Bf16Rounding)>,
}

/// Search panels as a reference file may store them (see [`PackedIndex::from_file`]).
#[derive(Default)]
pub(crate) struct StoredPanels {
    /// The fp32 panels (`pack_panels`).
    pub f32: Option<Buf<f32>>,
    /// The bf16 panels and their rounding statistics (`pack_panels_bf16`).
    pub bf16: Option<(Buf<u32>, Bf16Rounding)>,
}

/// Which stored panels the check found equal to a fresh packing of the rows.
#[derive(Clone, Copy, Default)]
struct Verified {
    f32: bool,
    bf16: bool,
}

/// Panels compared per parallel task when checking stored ones.
const CHECK_PANELS: usize = 64;

/// Search results: `indices[q * k + j]` is query q's j-th best reference row, `scores` their cosines.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Neighbours {
    /// Neighbours per query: min(k asked, reference rows).
    pub k: usize,
    /// Reference rows, `queries x k`, best first (ties: lower row first).
    pub indices: Vec<u32>,
    /// Their cosine similarities, laid out as `indices`.
    pub scores: Vec<f32>,
}

/// A score tile over packed words of type T (see [`Kernel::tile`]).
type TileFn<'a, T> =
    &'a (dyn Fn(&[T], usize, &[T], &[f32; MR], &mut [[f32; NR]; MR]) -> [u32; MR] + Sync);

/// How one kind of kernel sees the data: words per packed dimension group, and its two functions.
struct Scan<'a, T> {
    panels: &'a [T],
    /// Packed words per row: d (fp32) or ceil(d / 2) (bf16 pairs).
    dk: usize,
    pack: fn(&[f32], usize, &mut [T]),
    tile: TileFn<'a, T>,
    /// Per query: keep candidates within this of the k-th best (0 for exact kernels).
    margins: Option<&'a [f32]>,
}

impl PackedIndex {
    /// `rows`: n x d row-major, any norm (a zero row scores 0 against every query).
    pub fn new(rows: Vec<f32>, n: usize, d: usize) -> Result<Self> {
        if n.checked_mul(d) != Some(rows.len()) || d == 0 || n > u32::MAX as usize {
            return Err(Error::invalid(format!(
                "an index of {n} rows x {d} dimensions (at least 1, at most 2^32 rows) cannot hold {} values",
                rows.len()
            )));
        }
        let index = PackedIndex {
            n,
            d,
            norms: Buf::from(row_norms(&rows, d)),
            rows: Buf::from(rows),
            checked: OnceLock::from(Ok(Verified::default())),
            stored: StoredPanels::default(),
            panels_f32: OnceLock::new(),
            panels_bf16: OnceLock::new(),
        };
        // Pack for the kernel this CPU will use now, so the first search pays nothing.
        if crate::cpu::kernel().is_bf16() {
            index.bf16_panels();
        } else {
            index.f32_panels();
        }
        Ok(index)
    }

    /// Rows (n x d), their norms and, optionally, their search panels as read from a file: nothing is
    /// checked or packed here ([`PackedIndex::check`] checks, once, on first use; panels the file lacks,
    /// or whose check fails, are packed in memory on first search).
    pub(crate) fn from_file(
        rows: Buf<f32>,
        norms: Buf<f64>,
        n: usize,
        d: usize,
        stored: StoredPanels,
    ) -> Result<Self> {
        if n.checked_mul(d) != Some(rows.len())
            || norms.len() != n
            || d == 0
            || n > u32::MAX as usize
        {
            return Err(Error::invalid(format!(
                "{} embedding values and {} norms are not {n} rows x {d} dimensions (at least 1, at most 2^32 rows)",
                rows.len(),
                norms.len()
            )));
        }
        Ok(PackedIndex {
            n,
            d,
            rows,
            norms,
            checked: OnceLock::new(),
            stored,
            panels_f32: OnceLock::new(),
            panels_bf16: OnceLock::new(),
        })
    }

    /// Check, once, rows read from a file: finite, not zero, and each stored norm exactly that of its
    /// row (a damaged file is an error here, before a search trusts it); and stored panels, chunk by
    /// chunk, against a fresh packing of the rows (panels that differ are not used: the first search
    /// packs its own). Rows given in memory were checked when the reference was built. The check reads
    /// the whole file's embeddings once, in parallel, and allocates only a chunk per thread.
    pub fn check(&self) -> Result<()> {
        let outcome = self.checked.get_or_init(|| self.verify());
        outcome.clone().map(|_| ()).map_err(Error::invalid)
    }

    fn verify(&self) -> std::result::Result<Verified, String> {
        let (n, d) = (self.n, self.d);
        let bad = (0..n).into_par_iter().find_first(|&i| {
            let row = &self.rows[i * d..(i + 1) * d];
            let stored = self.norms[i];
            !row.iter().all(|v| v.is_finite()) || norm(row) != stored || stored == 0.0
        });
        if let Some(i) = bad {
            return Err(format!(
                "reference embedding row {i} is not finite, is all zeros, or does not match its stored norm: the reference file is damaged; rebuild it"
            ));
        }
        let n_panels = n.div_ceil(NR);
        let chunk_rows = |c: usize| {
            let (r0, r1) = (c * CHECK_PANELS * NR, ((c + 1) * CHECK_PANELS * NR).min(n));
            (&self.rows[r0 * d..r1 * d], &self.norms[r0..r1], r0 / NR)
        };
        let chunks = n_panels.div_ceil(CHECK_PANELS);
        let f32_ok = self.stored.f32.as_ref().is_some_and(|stored| {
            stored.len() == n_panels * d * NR
                && (0..chunks).into_par_iter().all(|c| {
                    let (rows, norms, p0) = chunk_rows(c);
                    let fresh = pack_panels(rows, norms, d);
                    let at = p0 * d * NR;
                    fresh
                        .iter()
                        .zip(&stored[at..at + fresh.len()])
                        .all(|(a, b)| a.to_bits() == b.to_bits())
                })
        });
        let dp = d.div_ceil(2);
        let bf16_ok = self.stored.bf16.as_ref().is_some_and(|(stored, rounding)| {
            if stored.len() != n_panels * dp * NR {
                return false;
            }
            let most = (0..chunks)
                .into_par_iter()
                .map(|c| {
                    let (rows, norms, p0) = chunk_rows(c);
                    let (fresh, r) = pack_panels_bf16(rows, norms, d);
                    let at = p0 * dp * NR;
                    let same = fresh == stored[at..at + fresh.len()];
                    (same, r.max_residual, r.max_rounded_norm)
                })
                .reduce(
                    || (true, 0.0, 0.0),
                    |a, b| (a.0 && b.0, a.1.max(b.1), a.2.max(b.2)),
                );
            most.0
                && most.1.to_bits() == rounding.max_residual.to_bits()
                && most.2.to_bits() == rounding.max_rounded_norm.to_bits()
        });
        Ok(Verified {
            f32: f32_ok,
            bf16: bf16_ok,
        })
    }

    /// The panels of both kernels (packed now where they are not yet), for saving.
    pub(crate) fn all_panels(&self) -> (&Buf<f32>, &(Buf<u32>, Bf16Rounding)) {
        (self.f32_panels(), self.bf16_panels())
    }

    /// Whether the search reads panels stored in a mapped file (rather than packed in memory).
    /// (Known after the first search, false before it.)
    pub fn panels_mapped(&self) -> bool {
        self.panels_f32.get().is_some_and(|p| p.is_mapped())
            || self.panels_bf16.get().is_some_and(|p| p.0.is_mapped())
    }

    /// Whether the rows are read from a mapped file.
    pub fn is_mapped(&self) -> bool {
        self.rows.is_mapped()
    }

    /// The rows and norms as stored (for saving).
    pub(crate) fn stored(&self) -> (&Buf<f32>, &Buf<f64>) {
        (&self.rows, &self.norms)
    }

    /// What the check found of the stored panels (nothing yet: none of them is trusted).
    fn verified(&self) -> Verified {
        match self.checked.get() {
            Some(Ok(v)) => *v,
            _ => Verified::default(),
        }
    }

    fn f32_panels(&self) -> &Buf<f32> {
        self.panels_f32.get_or_init(|| match &self.stored.f32 {
            Some(stored) if self.verified().f32 => stored.clone(),
            _ => Buf::from(pack_panels(&self.rows, &self.norms, self.d)),
        })
    }

    fn bf16_panels(&self) -> &(Buf<u32>, Bf16Rounding) {
        self.panels_bf16.get_or_init(|| match &self.stored.bf16 {
            Some((stored, rounding)) if self.verified().bf16 => (stored.clone(), *rounding),
            _ => {
                let (panels, rounding) = pack_panels_bf16(&self.rows, &self.norms, self.d);
                (Buf::from(panels), rounding)
            }
        })
    }

    /// Reference rows.
    pub fn len(&self) -> usize {
        self.n
    }

    /// Whether there are no reference rows.
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// Embedding dimension.
    pub fn dim(&self) -> usize {
        self.d
    }

    /// The rows as given, n x d row-major.
    pub fn rows(&self) -> &[f32] {
        &self.rows
    }

    /// The L2 norm of each row (in f64, which holds the norm of any finite float32 row).
    pub fn norms(&self) -> &[f64] {
        &self.norms
    }

    /// The cosine of a unit query with row i, from the row as given and its norm: f64 throughout, so
    /// huge rows do not overflow and the score is as exact as float32 holds it.
    fn cosine(&self, query: &[f32], i: u32) -> f32 {
        let (i, d) = (i as usize, self.d);
        let norm = self.norms[i];
        if norm > 0.0 {
            (dot_f64(query, &self.rows[i * d..(i + 1) * d]) / norm) as f32
        } else {
            0.0
        }
    }

    /// The min(k, n) best reference rows of each of the `nq` normalised queries (nq x d, row-major), best
    /// first (ties: lower index first). Runs on the current rayon pool.
    pub fn search(&self, queries: &[f32], nq: usize, k: usize) -> Result<Neighbours> {
        if nq.checked_mul(self.d) != Some(queries.len()) {
            return Err(Error::invalid(format!(
                "{} query values are not {nq} queries of dimension {}",
                queries.len(),
                self.d
            )));
        }
        self.check()?;
        Ok(self.search_with(crate::cpu::kernel(), queries, nq, k))
    }

    /// [`PackedIndex::search`] with a given score kernel, one the CPU has (tests run each of them).
    pub(crate) fn search_with(
        &self,
        kernel: Kernel,
        queries: &[f32],
        nq: usize,
        k: usize,
    ) -> Neighbours {
        assert_eq!(queries.len(), nq * self.d);
        let k = k.min(self.n);
        if nq == 0 || k == 0 {
            return Neighbours {
                k,
                ..Default::default()
            };
        }
        let d = self.d;
        let heaps = if kernel.is_bf16() {
            let (panels, rounding) = self.bf16_panels();
            // Each query's bf16 scores are within m of its fp32 ones: keep candidates within 2m.
            let margins: Vec<f32> = queries
                .par_chunks(d)
                .map(|q| bf16_query_margin(q, rounding))
                .collect();
            let keep: Vec<f32> = margins.iter().map(|m| 2.0 * m).collect();
            let scan = Scan {
                panels: &panels[..],
                dk: d.div_ceil(2),
                pack: pack_tile_bf16,
                tile: &tile_bf16,
                margins: Some(&keep),
            };
            let approx = self.scan_all(&scan, queries, nq, k);
            approx
                .into_par_iter()
                .enumerate()
                .map(|(q, h)| self.rescore(&queries[q * d..(q + 1) * d], h, k, margins[q]))
                .collect()
        } else {
            let tile =
                move |q: &[f32], d: usize, p: &[f32], thr: &[f32; MR], s: &mut [[f32; NR]; MR]| {
                    kernel.tile(q, d, p, thr, s)
                };
            let scan = Scan {
                panels: &self.f32_panels()[..],
                dk: self.d,
                pack: pack_tile,
                tile: &tile,
                margins: None,
            };
            self.scan_all(&scan, queries, nq, k)
                .into_par_iter()
                .map(TopK::into_sorted)
                .collect::<Vec<_>>()
        };
        let mut out = Neighbours {
            k,
            indices: Vec::with_capacity(nq * k),
            scores: Vec::with_capacity(nq * k),
        };
        for best in heaps {
            for &(s, i) in &best[..k] {
                out.scores.push(s);
                out.indices.push(i);
            }
        }
        out
    }

    /// Exact cosines of the candidates the bf16 scan kept; the best k, best first.
    ///
    /// The k best by approximate score are rescored first; their worst exact score E bounds the final
    /// k-th from below, so any other candidate needs an approximate score of at least E - margin (the
    /// query's bf16 error bound) to have a chance, and the rest are never rescored.
    fn rescore(&self, query: &[f32], kept: TopK, k: usize, margin: f32) -> Vec<(f32, u32)> {
        let exact_of = |i: u32| self.cosine(query, i);
        let mut items = kept.into_items();
        items.select_nth_unstable_by(k - 1, |a, b| b.0.total_cmp(&a.0));
        let mut exact = TopK::new(k);
        let mut floor = f32::INFINITY;
        for &(_, i) in &items[..k] {
            let s = exact_of(i);
            floor = floor.min(s);
            exact.push(s, i);
        }
        let floor = floor - margin;
        for &(approx, i) in &items[k..] {
            if approx >= floor {
                exact.push(exact_of(i), i);
            }
        }
        exact.into_sorted()
    }

    /// Every query's candidates: tasks over (query block, reference range), merged per query.
    fn scan_all<T: Copy + Default + Send + Sync>(
        &self,
        scan: &Scan<'_, T>,
        queries: &[f32],
        nq: usize,
        k: usize,
    ) -> Vec<TopK> {
        let threads = rayon::current_num_threads().max(1);
        // Small query sets: smaller blocks first, then split the reference, so every thread has work.
        let block = QUERY_BLOCK
            .min(nq.div_ceil(threads).next_multiple_of(MR))
            .max(MR);
        let n_blocks = nq.div_ceil(block);
        let n_panels = self.n.div_ceil(NR);
        let chunk_panels = (L2_CHUNK_BYTES / (scan.dk * NR * std::mem::size_of::<T>())).max(1);
        let splits = if n_blocks >= TASKS_PER_THREAD * threads {
            1
        } else {
            (TASKS_PER_THREAD * threads)
                .div_ceil(n_blocks)
                .min(n_panels.div_ceil(chunk_panels))
                .max(1)
        };
        let per_split = n_panels.div_ceil(splits);
        let partial: Vec<Vec<TopK>> = (0..n_blocks * splits)
            .into_par_iter()
            .map(|task| {
                let (b, s) = (task / splits, task % splits);
                let rows = b * block..((b + 1) * block).min(nq);
                let panels = s * per_split..((s + 1) * per_split).min(n_panels);
                self.scan(scan, queries, rows, panels, k, chunk_panels)
            })
            .collect();
        let mut merged = Vec::with_capacity(nq);
        for group in partial.chunks(splits) {
            let mut group = group.to_vec();
            let mut first = group.remove(0);
            for other in group {
                for (h, o) in first.iter_mut().zip(other) {
                    h.merge(o);
                }
            }
            merged.extend(first);
        }
        merged
    }

    /// One task: the candidates of a block of queries (`block` of all `queries`) over a range of panels.
    fn scan<T: Copy + Default>(
        &self,
        scan: &Scan<'_, T>,
        queries: &[f32],
        block: Range<usize>,
        panels: Range<usize>,
        k: usize,
        chunk_panels: usize,
    ) -> Vec<TopK> {
        let (d, dk) = (self.d, scan.dk);
        let rows = block.len();
        let margin = |q: usize| scan.margins.map_or(0.0, |m| m[block.start + q]);
        let mut heaps: Vec<TopK> = (0..rows).map(|q| TopK::with_margin(k, margin(q))).collect();
        let queries = &queries[block.start * d..block.end * d];
        // Pack the block tile by tile; padded rows get an infinite threshold and never accept.
        let mut q = vec![T::default(); rows.next_multiple_of(MR) * dk];
        for (rows, out) in queries.chunks(MR * d).zip(q.chunks_exact_mut(MR * dk)) {
            (scan.pack)(rows, d, out);
        }
        let mut scores = [[0.0f32; NR]; MR];
        let mut chunk = panels.start;
        while chunk < panels.end {
            let chunk_end = (chunk + chunk_panels).min(panels.end);
            for (t, qt) in q.chunks_exact(MR * dk).enumerate() {
                let heaps = &mut heaps[t * MR..((t + 1) * MR).min(rows)];
                let mut thr = [f32::INFINITY; MR];
                for (th, h) in thr.iter_mut().zip(heaps.iter()) {
                    *th = h.threshold();
                }
                for p in chunk..chunk_end {
                    let panel = &scan.panels[p * dk * NR..(p + 1) * dk * NR];
                    let masks = (scan.tile)(qt, dk, panel, &thr, &mut scores);
                    let valid = valid_columns(self.n, p);
                    for (i, heap) in heaps.iter_mut().enumerate() {
                        let mut m = masks[i] & valid;
                        if m == 0 {
                            continue;
                        }
                        while m != 0 {
                            let j = m.trailing_zeros() as usize;
                            heap.push(scores[i][j], (p * NR + j) as u32);
                            m &= m - 1;
                        }
                        thr[i] = heap.threshold();
                    }
                }
            }
            chunk = chunk_end;
        }
        heaps
    }
}

/// Dot product in f64: AVX-512 where the CPU has it (always, on the bf16 path that rescores), else 8
/// partial sums that the compiler vectorises.
fn dot_f64(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::cpu().available.contains(&Kernel::Avx512) {
        // SAFETY: the CPU has AVX-512F; equal lengths checked.
        return unsafe { dot_f64_avx512(a, b) };
    }
    dot_f64_portable(a, b)
}

fn dot_f64_portable(a: &[f32], b: &[f32]) -> f64 {
    let mut acc = [0.0f64; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f64 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(&x, &y)| x as f64 * y as f64)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] as f64 * y[i] as f64;
        }
    }
    acc.iter().sum::<f64>() + tail
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dot_f64_avx512(a: &[f32], b: &[f32]) -> f64 {
    use std::arch::x86_64::*;
    let (mut s0, mut s1) = (_mm512_setzero_pd(), _mm512_setzero_pd());
    let whole = a.len() / 16 * 16;
    for i in (0..whole).step_by(16) {
        let (x, y) = (
            _mm512_loadu_ps(a.as_ptr().add(i)),
            _mm512_loadu_ps(b.as_ptr().add(i)),
        );
        let lo = |v: __m512| _mm512_cvtps_pd(_mm512_castps512_ps256(v));
        let hi = |v: __m512| {
            _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(
                _mm512_castps_pd(v),
            )))
        };
        s0 = _mm512_fmadd_pd(lo(x), lo(y), s0);
        s1 = _mm512_fmadd_pd(hi(x), hi(y), s1);
    }
    _mm512_reduce_add_pd(_mm512_add_pd(s0, s1)) + dot_f64_portable(&a[whole..], &b[whole..])
}

/// Bit mask of the columns of panel `p` that are real rows (the last panel is zero-padded).
#[inline]
fn valid_columns(n: usize, p: usize) -> u32 {
    let real = n - p * NR;
    if real >= 32 {
        u32::MAX
    } else {
        ((1u64 << real) - 1) as u32
    }
}

/// L2-normalise rows of `d` values in place and return their norms (in f64, which holds the norm of
/// any finite float32 row). A zero row is left as it is.
pub fn normalise_rows(rows: &mut [f32], d: usize) -> Vec<f64> {
    rows.par_chunks_mut(d.max(1))
        .map(|row| {
            let norm = norm(row);
            if norm > 0.0 {
                let inv = 1.0 / norm;
                row.iter_mut().for_each(|v| *v = (*v as f64 * inv) as f32);
            }
            norm
        })
        .collect()
}

/// The L2 norm of each row of `d` values, in f64.
pub fn row_norms(rows: &[f32], d: usize) -> Vec<f64> {
    rows.par_chunks(d.max(1)).map(norm).collect()
}

fn norm(row: &[f32]) -> f64 {
    row.iter()
        .map(|&v| (v as f64) * (v as f64))
        .sum::<f64>()
        .sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The oracle: every score in f64, full sort by (score desc, index asc).
    fn brute_force(r: &[f32], q: &[f32], d: usize, k: usize) -> Vec<Vec<(f64, u32)>> {
        q.chunks_exact(d)
            .map(|qv| {
                let mut all: Vec<(f64, u32)> = r
                    .chunks_exact(d)
                    .enumerate()
                    .map(|(i, rv)| {
                        let s = qv.iter().zip(rv).map(|(&a, &b)| a as f64 * b as f64).sum();
                        (s, i as u32)
                    })
                    .collect();
                all.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap().then(a.1.cmp(&b.1)));
                all.truncate(k);
                all
            })
            .collect()
    }

    fn unit_rows(values: Vec<f32>, d: usize) -> Vec<f32> {
        let mut v = values;
        let norms = normalise_rows(&mut v, d);
        for (row, n) in v.chunks_exact_mut(d).zip(norms) {
            if n == 0.0 {
                row[0] = 1.0;
            }
        }
        v
    }

    /// Same neighbour sets as the f64 oracle, except where a swap is explained by a near-tie at the k-th score.
    fn check(r: &[f32], q: &[f32], d: usize, k: usize, got: &Neighbours) {
        let want = brute_force(r, q, d, k);
        let k_eff = k.min(r.len() / d);
        assert_eq!(got.k, k_eff);
        for (qi, w) in want.iter().enumerate() {
            let gi = &got.indices[qi * k_eff..(qi + 1) * k_eff];
            let gs = &got.scores[qi * k_eff..(qi + 1) * k_eff];
            let kth = w.last().unwrap().0;
            for (j, &(s, i)) in w.iter().enumerate() {
                if (s - kth).abs() > 1e-5 {
                    assert!(gi.contains(&i), "query {qi}: row {i} (score {s}) missing");
                }
                assert!((gs[j] as f64 - s).abs() < 1e-4, "query {qi}: score {j}");
            }
            assert!(gs.windows(2).all(|p| p[0] >= p[1]), "scores not sorted");
        }
    }

    /// The search with every kernel this CPU has.
    fn run(r: &[f32], q: &[f32], d: usize, k: usize, threads: usize) -> Vec<Neighbours> {
        let index = PackedIndex::new(r.to_vec(), r.len() / d, d).unwrap();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        crate::cpu::cpu()
            .available
            .clone()
            .into_iter()
            .map(|kern| pool.install(|| index.search_with(kern, q, q.len() / d, k)))
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn matches_brute_force(
            n in 1usize..300, nq in 1usize..40, d in 1usize..70, k in 1usize..80,
            threads in 1usize..4, seed in any::<u64>(),
        ) {
            let mut s = seed;
            let mut next = || { s = s.wrapping_mul(6364136223846793005).wrapping_add(1); ((s >> 33) as f32 / (1u64 << 31) as f32) - 0.5 };
            let r = unit_rows((0..n * d).map(|_| next()).collect(), d);
            let q = unit_rows((0..nq * d).map(|_| next()).collect(), d);
            for got in run(&r, &q, d, k, threads) {
                check(&r, &q, d, k, &got);
            }
        }
    }

    #[test]
    fn exact_ties_break_by_lower_index_across_splits() {
        // 1000 identical reference rows: every score ties, so the answer must be rows 0..k in order.
        let d = 8;
        let r = unit_rows(vec![1.0; 1000 * d], d);
        let q = unit_rows(vec![1.0; 3 * d], d);
        for threads in [1, 2, 3] {
            for got in run(&r, &q, d, 7, threads) {
                for qi in 0..3 {
                    assert_eq!(&got.indices[qi * 7..qi * 7 + 7], &[0, 1, 2, 3, 4, 5, 6]);
                }
            }
        }
    }

    #[test]
    fn queries_equal_to_reference_rows_find_themselves() {
        let d = 16;
        let mut s = 3u64;
        let r = unit_rows(
            (0..500 * d)
                .map(|_| {
                    s = s.wrapping_mul(6364136223846793005).wrapping_add(1);
                    (s >> 40) as f32 - 8e6
                })
                .collect(),
            d,
        );
        let q = r[37 * d..41 * d].to_vec();
        for got in run(&r, &q, d, 1, 2) {
            assert_eq!(got.indices, vec![37, 38, 39, 40]);
        }
    }

    #[test]
    fn k_above_n_returns_all_rows() {
        let d = 4;
        let r = unit_rows((0..5 * d).map(|i| (i % 7) as f32 - 3.0).collect(), d);
        let q = r[..d].to_vec();
        for got in run(&r, &q, d, 50, 2) {
            assert_eq!(got.k, 5);
            let mut idx = got.indices.clone();
            idx.sort();
            assert_eq!(idx, vec![0, 1, 2, 3, 4]);
        }
    }

    #[test]
    fn large_block_paths_match() {
        // Enough queries for whole blocks and enough rows for several L2 chunks and splits.
        let d = 64;
        let mut s = 11u64;
        let mut next = || {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1);
            ((s >> 33) as f32 / (1u64 << 31) as f32) - 0.5
        };
        let r = unit_rows((0..5000 * d).map(|_| next()).collect(), d);
        let q = unit_rows((0..450 * d).map(|_| next()).collect(), d);
        for threads in [1, 2] {
            for got in run(&r, &q, d, 50, threads) {
                check(&r, &q, d, 50, &got);
            }
        }
        let few = &q[..2 * d];
        for got in run(&r, few, d, 50, 2) {
            check(&r, few, d, 50, &got);
        }
    }
}
