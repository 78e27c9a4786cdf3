//! Macenko stain normalisation (Macenko et al., ISBI 2009) as torchstain's torch backend does it:
//! a stain basis per patch from the optical densities of its stained pixels, then each patch unmixed
//! and remixed with the target's basis.

use super::{store_levels, BLOCK};
use crate::shape;
use crate::simd::multiversion;
use bleep_core::{Error, Matrix, Result};
use rayon::prelude::*;

/// Macenko's parameters (torchstain's defaults: `Io = 240`, `alpha = 1`, `beta = 0.15`).
#[derive(Clone, Copy, Debug)]
pub struct MacenkoParams {
    /// The transmitted light intensity (white), positive.
    pub io: f32,
    /// The percentile (0 to 100) of the stain angles taken as the extreme stain vectors.
    pub alpha: f32,
    /// The optical density below which (in any channel) a pixel counts as unstained.
    pub beta: f32,
}

impl MacenkoParams {
    /// The parameters, or an error naming the one out of range.
    pub fn check(self) -> Result<Self> {
        if !(self.io.is_finite() && self.io > 0.0) {
            return Err(Error::invalid(format!(
                "io must be a positive intensity (torchstain uses 240), not {}",
                self.io
            )));
        }
        if !(0.0..=100.0).contains(&self.alpha) {
            return Err(Error::invalid(format!(
                "alpha is a percentile and must be between 0 and 100 (torchstain uses 1), not {}",
                self.alpha
            )));
        }
        if !self.beta.is_finite() {
            return Err(Error::invalid(format!(
                "beta must be a finite optical density (torchstain uses 0.15), not {}",
                self.beta
            )));
        }
        Ok(self)
    }
}

impl Default for MacenkoParams {
    fn default() -> Self {
        MacenkoParams {
            io: 240.0,
            alpha: 1.0,
            beta: 0.15,
        }
    }
}

/// A stain basis: the H and E optical-density vectors (columns) and their 99th-percentile concentrations.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Stains {
    /// Rows R, G, B; columns H, E.
    pub he: [[f32; 2]; 3],
    /// The 99th-percentile concentration of H and of E.
    pub max_c: [f32; 2],
}

impl Stains {
    /// A basis given as a (3, 2) matrix and 2 maximum concentrations, all finite.
    pub fn from_parts(he: Matrix<'_, f32>, max_c: &[f32]) -> Result<Stains> {
        let values = he.check("the stain matrix")?;
        if (he.rows, he.cols) != (3, 2) || max_c.len() != 2 {
            return Err(Error::invalid(format!(
                "a stain basis is a (3, 2) matrix and 2 maximum concentrations, not ({}, {}) and {}",
                he.rows,
                he.cols,
                max_c.len()
            )));
        }
        if !values.iter().chain(max_c).all(|v| v.is_finite()) {
            return Err(Error::invalid(
                "the stain basis holds a NaN or infinite value: fit the normaliser again",
            ));
        }
        Ok(Stains {
            he: std::array::from_fn(|r| [values[2 * r], values[2 * r + 1]]),
            max_c: [max_c[0], max_c[1]],
        })
    }

    /// torchstain's reference (its default target before `fit`).
    pub const REFERENCE: Stains = Stains {
        he: [[0.5626, 0.2159], [0.7201, 0.8012], [0.4062, 0.5581]],
        max_c: [1.9705, 1.0308],
    };
}

/// Eigenvectors of a symmetric 3 x 3 matrix by cyclic Jacobi rotations, as columns, eigenvalues ascending.
#[allow(clippy::needless_range_loop)] // the rotations read clearest as index arithmetic
fn eigh3(a: [[f64; 3]; 3]) -> [[f64; 3]; 3] {
    let (mut a, mut v) = (a, [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]);
    for _ in 0..50 {
        let off = a[0][1].abs() + a[0][2].abs() + a[1][2].abs();
        if off < 1e-30 {
            break;
        }
        for (p, q) in [(0, 1), (0, 2), (1, 2)] {
            if a[p][q].abs() < 1e-300 {
                continue;
            }
            let theta = (a[q][q] - a[p][p]) / (2.0 * a[p][q]);
            let t = if theta >= 0.0 { 1.0 } else { -1.0 }
                / (theta.abs() + (theta * theta + 1.0).sqrt());
            let (c, s) = (1.0 / (t * t + 1.0).sqrt(), t / (t * t + 1.0).sqrt());
            for k in 0..3 {
                let (akp, akq) = (a[k][p], a[k][q]);
                a[k][p] = c * akp - s * akq;
                a[k][q] = s * akp + c * akq;
            }
            for k in 0..3 {
                let (apk, aqk) = (a[p][k], a[q][k]);
                a[p][k] = c * apk - s * aqk;
                a[q][k] = s * apk + c * aqk;
            }
            for row in v.iter_mut() {
                let (vkp, vkq) = (row[p], row[q]);
                row[p] = c * vkp - s * vkq;
                row[q] = s * vkp + c * vkq;
            }
        }
    }
    let mut order = [0, 1, 2];
    order.sort_by(|&i, &j| a[i][i].total_cmp(&a[j][j]));
    let mut out = [[0.0; 3]; 3];
    for (col, &i) in order.iter().enumerate() {
        for r in 0..3 {
            out[r][col] = v[r][i];
        }
    }
    out
}

/// A number in (-2, 2] that orders points as `atan2(y, x)` does (the "diamond angle"), without a
/// transcendental function.
#[inline]
fn pseudo_angle(y: f32, x: f32) -> f32 {
    // Each quadrant's formula is evaluated and the right one selected (no branches: it vectorises).
    let (ax, ay) = (x.abs(), y.abs());
    let r = ay / (ax + ay); // in [0, 1]: 0 on the x axis, 1 on the y axis
    let upper = if x >= 0.0 { r } else { 2.0 - r };
    let d = if y >= 0.0 { upper } else { -upper };
    if d.is_nan() {
        0.0
    } else {
        d
    }
}

/// Per-thread buffers, reused across the patches of a batch.
#[derive(Default)]
struct Scratch {
    od: [Vec<f32>; 3],
    /// Pseudo-angles of the pixels (see [`project`]).
    phi: Vec<f32>,
    c: [Vec<f32>; 2],
    ranks: RankScratch,
}

/// The optical density of each 8-bit value, `-ln((v + 1) / Io)` in float32, and the same table split
/// into its four bytes (the VBMI lookup permutes bytes, not floats).
struct OdTable {
    values: [f32; 256],
    /// `bytes[j][v]`: byte j (little-endian) of `values[v]`.
    bytes: [[u8; 256]; 4],
}

impl OdTable {
    fn new(io: f32) -> OdTable {
        let values: [f32; 256] = std::array::from_fn(|v| -((v as f32 + 1.0) / io).ln());
        OdTable {
            values,
            bytes: std::array::from_fn(|j| std::array::from_fn(|v| values[v].to_le_bytes()[j])),
        }
    }
}

/// The optical densities of a run of pixels, one plane per channel (the planes as long as the pixels).
fn od_lookup(pixels: &[u8], table: &OdTable, planes: [&mut [f32]; 3]) {
    #[cfg(target_arch = "x86_64")]
    if bleep_core::cpu::cpu().avx512vbmi {
        // SAFETY: the CPU has AVX-512 F, BW and VBMI (and their use was not turned off).
        return unsafe { od_lookup_vbmi(pixels, table, planes) };
    }
    od_lookup_from(pixels, &table.values, planes, 0);
}

/// The lookup from pixel `from` on, one value at a time.
fn od_lookup_from(pixels: &[u8], table: &[f32; 256], [x, y, z]: [&mut [f32]; 3], from: usize) {
    for (i, px) in pixels.chunks_exact(3).enumerate().skip(from) {
        (x[i], y[i], z[i]) = (
            table[px[0] as usize],
            table[px[1] as usize],
            table[px[2] as usize],
        );
    }
}

/// 64 pixels a step, without a gather (Zen 4 runs one 16-lane gather in about as long as 16 loads):
/// two byte permutes split a channel out of the 192 bytes, and the table, as four 256-byte planes, is
/// looked up one byte of the floats at a time (two 128-entry permutes, blended on the index's top bit).
/// Unpacking the four byte vectors into floats interleaves them within 128-bit lanes; the channel split
/// puts the pixels in the order that this unpacking restores.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
unsafe fn od_lookup_vbmi(pixels: &[u8], table: &OdTable, mut planes: [&mut [f32]; 3]) {
    use std::arch::x86_64::*;
    let n = pixels.len() / 3;
    let quarter =
        |k: usize| _mm512_loadu_si512(table.bytes.as_ptr().cast::<u8>().add(64 * k).cast());
    let t: [__m512i; 16] = std::array::from_fn(quarter);
    let split = split_channels();
    for g in 0..n / 64 {
        let src = pixels.as_ptr().add(192 * g);
        let rgb = [0, 64, 128].map(|o| _mm512_loadu_si512(src.add(o).cast()));
        for (plane, &(index, from_third)) in planes.iter_mut().zip(&split) {
            let two = _mm512_permutex2var_epi8(rgb[0], index, rgb[1]);
            let v = _mm512_mask_permutexvar_epi8(two, from_third, index, rgb[2]);
            let top = _mm512_movepi8_mask(v);
            let b: [__m512i; 4] = std::array::from_fn(|j| {
                let lo = _mm512_permutex2var_epi8(t[4 * j], v, t[4 * j + 1]);
                let hi = _mm512_permutex2var_epi8(t[4 * j + 2], v, t[4 * j + 3]);
                _mm512_mask_blend_epi8(top, lo, hi)
            });
            let (lo01, hi01) = (
                _mm512_unpacklo_epi8(b[0], b[1]),
                _mm512_unpackhi_epi8(b[0], b[1]),
            );
            let (lo23, hi23) = (
                _mm512_unpacklo_epi8(b[2], b[3]),
                _mm512_unpackhi_epi8(b[2], b[3]),
            );
            let floats = [
                _mm512_unpacklo_epi16(lo01, lo23),
                _mm512_unpackhi_epi16(lo01, lo23),
                _mm512_unpacklo_epi16(hi01, hi23),
                _mm512_unpackhi_epi16(hi01, hi23),
            ];
            let out = plane.as_mut_ptr().add(64 * g);
            for (k, f) in floats.into_iter().enumerate() {
                _mm512_storeu_si512(out.add(16 * k).cast(), f);
            }
        }
    }
    od_lookup_from(pixels, &table.values, planes, n / 64 * 64);
}

/// Unpacking 64 bytes into four vectors of 16 floats (or packing them back) works within 128-bit lanes:
/// byte q = 16 L + 4 k + e goes to float vector k, element 4 L + e, i.e. pixel 16 k + 4 L + e of the 64.
/// This maps a byte's position to that pixel, and (swapping k and L) the pixel back to the position.
fn lane_order(i: usize) -> usize {
    16 * ((i / 4) % 4) + 4 * (i / 16) + i % 4
}

/// For each channel, the byte permute that takes it out of 64 interleaved pixels (192 bytes in three
/// vectors): the source byte's index (the first permute reads its low 7 bits from the first two vectors,
/// the second its low 6 from the third), and the mask of the bytes in the third. Byte q holds pixel
/// [`lane_order`]`(q)`, which the unpacking of [`od_lookup_vbmi`] puts back in place.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn split_channels() -> [(std::arch::x86_64::__m512i, u64); 3] {
    std::array::from_fn(|c| {
        let source: [u8; 64] = std::array::from_fn(|q| (3 * lane_order(q) + c) as u8);
        let third = source
            .iter()
            .enumerate()
            .fold(0u64, |m, (q, &s)| m | (u64::from(s >= 128) << q));
        // SAFETY: reads 64 bytes from a 64-byte array.
        (
            unsafe { std::arch::x86_64::_mm512_loadu_si512(source.as_ptr().cast()) },
            third,
        )
    })
}

/// Values of the given ranks (0-based, ascending) of `values`, exactly. The ranks lie among the
/// `valid.0` values below `valid.1`; the others (unstained pixels' angles, set above every angle) rank
/// after them.
///
/// Each rank is looked for among the values lying between two order statistics of a sample that
/// bracket it (a few per cent of the valid values, found in one vector pass), then selected there. When
/// the sample misleads (the rank falls outside its window, or the windows overlap) the histogram method
/// finds it instead: the answer is exact either way.
fn ranks<const R: usize>(
    values: &[f32],
    wanted: [usize; R],
    valid: (usize, f32),
    s: &mut RankScratch,
) -> [f32; R] {
    ranks_in_windows(values, wanted, valid, s)
        .unwrap_or_else(|| ranks_by_histogram(values, wanted, s))
}

/// Values sampled per selection, and the spread (in standard deviations of a sample quantile) of the
/// window kept around each rank.
const SAMPLE: usize = 256;
const SPREAD: f64 = 4.0;

fn ranks_in_windows<const R: usize>(
    values: &[f32],
    wanted: [usize; R],
    (count, cap): (usize, f32),
    s: &mut RankScratch,
) -> Option<[f32; R]> {
    let m = values.len();
    if m < 8 * SAMPLE {
        return None;
    }
    s.sample.clear();
    s.sample
        .extend((0..SAMPLE).map(|i| values[i * (m / SAMPLE)]));
    s.sample.sort_unstable_by(f32::total_cmp);
    // The sampled valid values stand for all the valid ones (the others would only widen the windows).
    let sampled = s.sample.partition_point(|&v| v < cap);
    if sampled < 2 {
        return None;
    }
    let bounds: [(f32, f32); R] = wanted.map(|k| {
        let p = k as f64 / count as f64 * sampled as f64;
        let spread = SPREAD * (p * (1.0 - p / sampled as f64)).max(0.0).sqrt() + 2.0;
        let (lo, hi) = ((p - spread).floor(), (p + spread).ceil());
        (
            if lo < 0.0 {
                f32::NEG_INFINITY
            } else {
                s.sample[lo as usize]
            },
            if hi >= (sampled - 1) as f64 {
                cap.next_down()
            } else {
                s.sample[hi as usize]
            },
        )
    });
    if bounds.windows(2).any(|w| w[1].0 <= w[0].1)
        || bounds
            .iter()
            .any(|w| w.0.is_nan() || w.1.is_nan() || w.0 > w.1)
    {
        return None;
    }
    s.windows
        .resize_with(R.max(s.windows.len()), Window::default);
    for (w, &(lo, hi)) in s.windows.iter_mut().zip(&bounds) {
        (w.lo, w.hi) = (lo, hi);
    }
    collect_windows(values, &mut s.windows[..R]);
    let mut out = [0f32; R];
    for r in 0..R {
        let (k, w) = (wanted[r], &mut s.windows[r]);
        if k < w.below || k - w.below >= w.hits {
            return None;
        }
        out[r] = *w.values[..w.hits]
            .select_nth_unstable_by(k - w.below, f32::total_cmp)
            .1;
    }
    Some(out)
}

/// One rank's window [lo, hi], and what a pass over the values finds: how many lie below it, and
/// those within it (the first `hits` of `values`).
#[derive(Default)]
struct Window {
    lo: f32,
    hi: f32,
    below: usize,
    hits: usize,
    values: Vec<f32>,
}

/// Fills each window from one pass over the values.
fn collect_windows(values: &[f32], windows: &mut [Window]) {
    for w in windows.iter_mut() {
        (w.below, w.hits) = (0, 0);
        if w.values.len() < values.len() + 16 {
            w.values.resize(values.len() + 16, 0.0);
        }
    }
    #[cfg(target_arch = "x86_64")]
    if bleep_core::cpu::cpu().simd == bleep_core::cpu::SimdLevel::Avx512 {
        // SAFETY: the CPU has AVX-512 F (and its use was not turned off), so also POPCNT (x86-64-v2).
        return unsafe { collect_windows_avx512(values, windows) };
    }
    collect_from(values, windows, 0);
}

/// The windows' pass from value `from` on, one value at a time, compacted without branches (every
/// value is written, the count advances on a hit).
fn collect_from(values: &[f32], windows: &mut [Window], from: usize) {
    for w in windows.iter_mut() {
        for &v in &values[from..] {
            w.values[w.hits] = v;
            w.hits += usize::from(w.lo <= v && v <= w.hi);
            w.below += usize::from(v < w.lo);
        }
    }
}

/// 16 values a step: two compares give the window's and the below mask, the hits are compressed in
/// registers and stored unaligned (a compressing store to memory is slow on Zen 4). The masks are
/// counted by `popcnt` (without it, a vector emulation sat in the loop's chain from count to address).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,popcnt")]
unsafe fn collect_windows_avx512(values: &[f32], windows: &mut [Window]) {
    use std::arch::x86_64::*;
    let full = values.len() / 16 * 16;
    for w in windows.iter_mut() {
        let (lo, hi) = (_mm512_set1_ps(w.lo), _mm512_set1_ps(w.hi));
        let vp = w.values.as_mut_ptr();
        let (mut hits, mut below) = (0usize, 0usize);
        for start in (0..full).step_by(16) {
            let v = _mm512_loadu_ps(values.as_ptr().add(start));
            let under = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(v, lo);
            let inside =
                _mm512_cmp_ps_mask::<_CMP_GE_OQ>(v, lo) & _mm512_cmp_ps_mask::<_CMP_LE_OQ>(v, hi);
            // hits <= start, so the 16 stored lanes end within the buffer (values.len() + 16 long).
            _mm512_storeu_ps(vp.add(hits), _mm512_maskz_compress_ps(inside, v));
            hits += inside.count_ones() as usize;
            below += under.count_ones() as usize;
        }
        (w.hits, w.below) = (hits, below);
    }
    collect_from(values, windows, full);
}

multiversion! {
    /// The index of the first of `values` equal to `v` (0 if none is): blocks of 16 compared at once.
    fn first_index(values: &[f32], v: f32) -> usize {
        let blocks = values.chunks_exact(16);
        let rest = 16 * blocks.len();
        let block = blocks.take_while(|b| !b.iter().fold(false, |hit, &x| hit | (x == v))).count();
        let from = (16 * block).min(rest);
        values[from..].iter().position(|&x| x == v).map_or(0, |i| from + i)
    }
}

/// Values of the given ranks (0-based) of `values`, exactly: a histogram between the minimum and
/// the maximum finds each rank's bucket, then a selection within the bucket.
fn ranks_by_histogram<const R: usize>(
    values: &[f32],
    wanted: [usize; R],
    s: &mut RankScratch,
) -> [f32; R] {
    let (lo, hi) = min_max(values);
    if hi.is_nan() || lo.is_nan() || hi <= lo {
        return [lo; R];
    }
    bucket_histogram(values, lo, (BUCKETS as f32 - 1.0) / (hi - lo), s);
    let targets: [(u16, usize); R] = wanted.map(|k| {
        let (mut b, mut below) = (0, 0usize);
        while below + s.counts[b] as usize <= k {
            below += s.counts[b] as usize;
            b += 1;
        }
        (b as u16, k - below)
    });
    std::array::from_fn(|r| {
        let (b, k) = targets[r];
        s.bucket.clear();
        s.bucket.extend(
            values
                .iter()
                .zip(&s.index)
                .filter(|(_, &i)| i == b)
                .map(|(&v, _)| v),
        );
        *s.bucket.select_nth_unstable_by(k, f32::total_cmp).1
    })
}

const BUCKETS: usize = 2048;

/// Buffers of [`ranks`].
#[derive(Default)]
struct RankScratch {
    index: Vec<u16>,
    counts: Vec<u32>,
    bucket: Vec<f32>,
    sample: Vec<f32>,
    windows: Vec<Window>,
}

multiversion! {
    /// Each value's bucket (monotone in the value) and the bucket counts.
    fn bucket_histogram(values: &[f32], lo: f32, scale: f32, s: &mut RankScratch) {
        s.index.clear();
        s.index.extend(values.iter().map(|&v| (((v - lo) * scale) as u16).min(BUCKETS as u16 - 1)));
        // Four interleaved histograms: clustered values would otherwise chain every increment on the
        // previous one through memory.
        let mut counts = vec![[0u32; 4]; BUCKETS];
        let mut quads = s.index.chunks_exact(4);
        for q in &mut quads {
            for (lane, &i) in q.iter().enumerate() {
                counts[i as usize][lane] += 1;
            }
        }
        for &i in quads.remainder() {
            counts[i as usize][0] += 1;
        }
        s.counts.clear();
        s.counts.extend(counts.iter().map(|c| c.iter().sum::<u32>()));
    }
}

multiversion! {
    fn min_max(values: &[f32]) -> (f32, f32) {
        let (mut lo, mut hi) = ([f32::INFINITY; 16], [f32::NEG_INFINITY; 16]);
        let mut chunks = values.chunks_exact(16);
        for c in &mut chunks {
            for l in 0..16 {
                lo[l] = if c[l] < lo[l] { c[l] } else { lo[l] };
                hi[l] = if c[l] > hi[l] { c[l] } else { hi[l] };
            }
        }
        for &v in chunks.remainder() {
            lo[0] = lo[0].min(v);
            hi[0] = hi[0].max(v);
        }
        (lo.iter().copied().fold(f32::INFINITY, f32::min), hi.iter().copied().fold(f32::NEG_INFINITY, f32::max))
    }
}

/// Optical-density planes of the pixels, and the count, sums and products (upper triangle) of the
/// stained pixels' optical densities: each chunk of pixels is looked up, then summed while it is in
/// cache, in float32 lanes flushed to float64 per chunk.
fn od_moments(pixels: &[u8], table: &OdTable, beta: f32, od: &mut [Vec<f32>; 3]) -> [f64; 10] {
    const CHUNK: usize = 2048; // three planes of it fit in L1
    let n = pixels.len() / 3;
    let mut total = [0f64; 10];
    for plane in od.iter_mut() {
        plane.resize(n, 0.0);
    }
    let [a, b, c] = od;
    let planes = a
        .chunks_mut(CHUNK)
        .zip(b.chunks_mut(CHUNK))
        .zip(c.chunks_mut(CHUNK));
    for (((a, b), c), chunk) in planes.zip(pixels.chunks(CHUNK * 3)) {
        od_lookup(chunk, table, [&mut *a, &mut *b, &mut *c]);
        let lanes = chunk_moments([a, b, c], beta);
        for (t, lanes) in total.iter_mut().zip(lanes) {
            *t += lanes.iter().map(|&v| v as f64).sum::<f64>();
        }
    }
    total
}

multiversion! {
    /// [`od_moments`] of one chunk, in 16 float32 lanes per moment: the whole blocks of 16 pixels, then
    /// the rest padded with NaN (which counts as unstained) into lanes of its own.
    fn chunk_moments(planes: [&[f32]; 3], beta: f32) -> [[f32; 32]; 10] {
        let whole = planes[0].len() / 16 * 16;
        let main = block_moments(planes.map(|p| &p[..whole]), beta);
        let pad = planes.map(|p| -> [f32; 16] { std::array::from_fn(|i| p.get(whole + i).copied().unwrap_or(f32::NAN)) });
        let rest = block_moments(pad.each_ref().map(|p| &p[..]), beta);
        std::array::from_fn(|t| std::array::from_fn(|l| if l < 16 { main[t][l] } else { rest[t][l - 16] }))
    }
}

/// The count, sums and products of the stained pixels (all three optical densities >= beta) of whole
/// blocks of 16, in one lane per pixel of a block. Returning the accumulators by value (rather than
/// adding to a caller's) keeps them in registers.
#[inline(always)]
fn block_moments([a, b, c]: [&[f32]; 3], beta: f32) -> [[f32; 16]; 10] {
    let mut acc = [[0f32; 16]; 10];
    for ((x, y), z) in a
        .chunks_exact(16)
        .zip(b.chunks_exact(16))
        .zip(c.chunks_exact(16))
    {
        for l in 0..16 {
            let (x, y, z) = (x[l], y[l], z[l]);
            let stained = x >= beta && y >= beta && z >= beta;
            let terms = [1.0, x, y, z, x * x, x * y, x * z, y * y, y * z, z * z];
            for (sum, t) in acc.iter_mut().zip(terms) {
                sum[l] += if stained { t } else { 0.0 };
            }
        }
    }
    acc
}

multiversion! {
    /// Pseudo-angles of the pixels, [`UNSTAINED`] for those with an optical density below beta (so the
    /// stained ones sort first, in pixel order, and need no compaction); returns how many are stained.
    fn project(od: &[Vec<f32>; 3], ev: &[[f32; 2]; 3], beta: f32, phi: &mut Vec<f32>) -> usize {
        phi.resize(od[0].len(), 0.0);
        let mut kept = 0;
        for (((p, &x), &y), &z) in phi.iter_mut().zip(&od[0]).zip(&od[1]).zip(&od[2]) {
            let (t0, t1) = plane_xy(x, y, z, ev);
            let stained = x >= beta && y >= beta && z >= beta;
            *p = if stained { pseudo_angle(t1, t0) } else { UNSTAINED };
            kept += usize::from(stained);
        }
        kept
    }
}

/// The pseudo-angle of a pixel without stain: above every angle.
const UNSTAINED: f32 = 4.0;

/// A pixel's coordinates in the plane of the two leading eigenvectors.
#[inline(always)]
fn plane_xy(x: f32, y: f32, z: f32, ev: &[[f32; 2]; 3]) -> (f32, f32) {
    (
        x * ev[0][0] + y * ev[1][0] + z * ev[2][0],
        x * ev[0][1] + y * ev[1][1] + z * ev[2][1],
    )
}

multiversion! {
    /// Concentrations C = pinv · OD for every pixel.
    fn concentrations(od: &[Vec<f32>; 3], pinv: &[[f32; 3]; 2], c: &mut [Vec<f32>; 2]) {
        for (row, plane) in c.iter_mut().enumerate() {
            let p = pinv[row];
            plane.clear();
            plane.extend(od[0].iter().zip(&od[1]).zip(&od[2]).map(|((x, y), z)| p[0] * x + p[1] * y + p[2] * z));
        }
    }
}

/// The rank torchstain's `percentile(t, q)` picks (0-based): `round(q/100 (n - 1))`, half to even.
fn percentile_rank(n: usize, q: f32) -> usize {
    (0.01 * q as f64 * (n - 1) as f64).round_ties_even() as usize
}

/// Estimates the stain basis of one patch; `None` when it has too few stained pixels for Macenko (an
/// empty or near-white patch), where the method is undefined. Leaves the concentrations in `s.c`.
fn estimate(pixels: &[u8], p: &MacenkoParams, table: &OdTable, s: &mut Scratch) -> Option<Stains> {
    let n = pixels.len() / 3;
    // Covariance of the stained pixels (all three ODs >= beta).
    let m = od_moments(pixels, table, p.beta, &mut s.od);
    let count = m[0] as usize;
    if count < 10.max(n / 100) {
        return None;
    }
    let (sum, prod) = (
        [m[1], m[2], m[3]],
        [[m[4], m[5], m[6]], [m[5], m[7], m[8]], [m[6], m[8], m[9]]],
    );
    let cov: [[f64; 3]; 3] = std::array::from_fn(|i| {
        std::array::from_fn(|j| (prod[i][j] - sum[i] * sum[j] / count as f64) / (count - 1) as f64)
    });
    let e = eigh3(cov);
    let ev: [[f32; 2]; 3] = std::array::from_fn(|r| [e[r][1] as f32, e[r][2] as f32]);
    // The angle percentiles are taken on a pseudo-angle (same order, no atan2 per pixel); the two
    // chosen points' true angles are computed from their coordinates.
    let kept = project(&s.od, &ev, p.beta, &mut s.phi);
    let wanted = [
        percentile_rank(kept, p.alpha),
        percentile_rank(kept, 100.0 - p.alpha),
    ];
    let picked = ranks(&s.phi, wanted, (kept, UNSTAINED), &mut s.ranks);
    let angle_of = |v: f32| -> f32 {
        let i = first_index(&s.phi, v);
        let (t0, t1) = plane_xy(s.od[0][i], s.od[1][i], s.od[2][i], &ev);
        t1.atan2(t0)
    };
    let (min_phi, max_phi) = (angle_of(picked[0]), angle_of(picked[1]));
    let dir = |phi: f32| -> [f32; 3] {
        std::array::from_fn(|r| ev[r][0] * phi.cos() + ev[r][1] * phi.sin())
    };
    let (v_min, v_max) = (dir(min_phi), dir(max_phi));
    let (h, e2) = if v_min[0] > v_max[0] {
        (v_min, v_max)
    } else {
        (v_max, v_min)
    };
    let he: [[f32; 2]; 3] = std::array::from_fn(|r| [h[r], e2[r]]);
    // Least squares C = (HE^T HE)^-1 HE^T OD, for every pixel.
    let g = [
        [dot3(&h, &h) as f64, dot3(&h, &e2) as f64],
        [dot3(&h, &e2) as f64, dot3(&e2, &e2) as f64],
    ];
    let det = g[0][0] * g[1][1] - g[0][1] * g[1][0];
    if det.abs() < 1e-12 {
        return None;
    }
    let pinv: [[f32; 3]; 2] = std::array::from_fn(|i| {
        std::array::from_fn(|r| {
            let (a, b) = if i == 0 {
                (g[1][1], -g[0][1])
            } else {
                (-g[1][0], g[0][0])
            };
            ((a * h[r] as f64 + b * e2[r] as f64) / det) as f32
        })
    });
    concentrations(&s.od, &pinv, &mut s.c);
    let k = [percentile_rank(n, 99.0)];
    let max_c = [
        ranks(&s.c[0], k, (n, f32::INFINITY), &mut s.ranks)[0],
        ranks(&s.c[1], k, (n, f32::INFINITY), &mut s.ranks)[0],
    ];
    Some(Stains { he, max_c })
}

fn dot3(a: &[f32; 3], b: &[f32; 3]) -> f32 {
    a[0] * b[0] + a[1] * b[1] + a[2] * b[2]
}

/// The stain basis of a target image of shape `(..., 3)` (its pixels pooled), to normalise other
/// patches towards.
pub fn macenko_fit(pixels: &[u8], shape: &[usize], p: &MacenkoParams) -> Result<Stains> {
    shape::rgb_pixels(shape, pixels.len(), "the target")?;
    let p = p.check()?;
    estimate(pixels, &p, &OdTable::new(p.io), &mut Scratch::default()).ok_or_else(|| {
        Error::invalid("the Macenko target has too few stained pixels (at least 1% must have optical density >= beta in every channel): fit on a patch with tissue")
    })
}

/// Remixes one patch's concentrations (scaled per stain) with the target's stain vectors:
/// `min(255, Io exp(-HE c))`, truncated to 8 bits as torchstain does. Computed as `2^(log2 Io - K c)`
/// with `K = HE diag(scale) log2 e` folded once per patch (see [`level`]).
fn remix(patch: &mut [u8], c: &[Vec<f32>; 2], scale: [f32; 2], he: &[[f32; 2]; 3], io: f32) {
    let e = Exponents {
        neg_k: std::array::from_fn(|r| {
            std::array::from_fn(|j| {
                -(he[r][j] as f64 * scale[j] as f64 * std::f64::consts::LOG2_E) as f32
            })
        }),
        top: (io as f64).log2() as f32,
    };
    #[cfg(target_arch = "x86_64")]
    if bleep_core::cpu::cpu().avx512vbmi {
        // SAFETY: the CPU has AVX-512 F, BW and VBMI (and their use was not turned off).
        return unsafe { remix_vbmi(patch, c, &e) };
    }
    remix_from(patch, c, &e, 0);
}

/// The exponent of base 2 of each output channel r: `top + neg_k[r] . c`.
struct Exponents {
    neg_k: [[f32; 2]; 3],
    top: f32,
}

impl Exponents {
    #[inline(always)]
    fn at(&self, r: usize, c0: f32, c1: f32) -> f32 {
        let k = self.neg_k[r];
        k[0].mul_add(c0, k[1].mul_add(c1, self.top))
    }
}

/// `2^f` on [-1/2, 1/2]: a degree-5 fit of relative error 1.7e-7 with the constant 1 exact, by
/// Horner's rule in fused multiply-adds.
#[allow(clippy::approx_constant)] // the fitted coefficient of f, near ln 2 but not it
const POW2: [f32; 6] = [
    1.0,
    0.693147,
    0.24022242,
    0.055507336,
    0.009671513,
    0.0013264737,
];

/// The level `min(255, 2^y)` as a float. Only 8 bits survive, so the range needs no reduction beyond
/// the integer part: `y` is clamped to [-32, 9] (2^9 is above 255, 2^-32 far below one level, and 2^n
/// stays a normal float), `2^y = 2^n 2^f` with `n` the nearest integer, and `2^n` made from its bits
/// (exactly what the AVX-512 path's `vscalefps` gives).
#[inline(always)]
fn level(y: f32) -> f32 {
    let y = y.clamp(-32.0, 9.0);
    let n = y.round_ties_even();
    let f = y - n;
    let p = POW2[..5]
        .iter()
        .rev()
        .fold(POW2[5], |p, &a| p.mul_add(f, a));
    // n is read out of the mantissa after adding 1.5 * 2^23 (vectorises where a float-to-int cast does not).
    let n_bits = (n + 12_582_912.0).to_bits().wrapping_sub(0x4B40_0000);
    (p * f32::from_bits(n_bits.wrapping_add(127) << 23)).min(255.0)
}

multiversion! {
    /// [`remix`] from pixel `from` (a multiple of [`BLOCK`]) on, a block of levels at a time.
    fn remix_from(patch: &mut [u8], c: &[Vec<f32>; 2], e: &Exponents, from: usize) {
        let blocks = (from..c[0].len()).step_by(BLOCK).zip(patch[3 * from..].chunks_mut(BLOCK * 3));
        for (start, block) in blocks {
            let len = block.len() / 3;
            let (c0, c1) = (&c[0][start..start + len], &c[1][start..start + len]);
            let mut out = [[0f32; BLOCK]; 3];
            for (r, plane) in out.iter_mut().enumerate() {
                for i in 0..len {
                    plane[i] = level(e.at(r, c0[i], c1[i]));
                }
            }
            store_levels(block, &out);
        }
    }
}

/// 64 pixels a step: [`level`] in 16 lanes (its `2^n` by `vscalefps`), truncated, packed to bytes per
/// channel (which orders them within 128-bit lanes as [`lane_order`] says), and interleaved into RGB
/// by two byte permutes per 64 output bytes that also undo that order.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
unsafe fn remix_vbmi(patch: &mut [u8], c: &[Vec<f32>; 2], e: &Exponents) {
    use std::arch::x86_64::*;
    let n = c[0].len();
    let weave = interleave_channels();
    for g in 0..n / 64 {
        let mut levels = [[_mm512_setzero_si512(); 4]; 3];
        for q in 0..4 {
            let at = 64 * g + 16 * q;
            let (c0, c1) = (
                _mm512_loadu_ps(c[0].as_ptr().add(at)),
                _mm512_loadu_ps(c[1].as_ptr().add(at)),
            );
            for (r, channel) in levels.iter_mut().enumerate() {
                let k = e.neg_k[r];
                let y = _mm512_fmadd_ps(
                    _mm512_set1_ps(k[0]),
                    c0,
                    _mm512_fmadd_ps(_mm512_set1_ps(k[1]), c1, _mm512_set1_ps(e.top)),
                );
                channel[q] = _mm512_cvttps_epi32(level_avx512(y));
            }
        }
        let bytes = levels.map(|d| {
            _mm512_packus_epi16(
                _mm512_packus_epi32(d[0], d[1]),
                _mm512_packus_epi32(d[2], d[3]),
            )
        });
        let out = patch.as_mut_ptr().add(192 * g);
        for (j, &(index, from_third)) in weave.iter().enumerate() {
            let two = _mm512_permutex2var_epi8(bytes[0], index, bytes[1]);
            let rgb = _mm512_mask_permutexvar_epi8(two, from_third, index, bytes[2]);
            _mm512_storeu_si512(out.add(64 * j).cast(), rgb);
        }
    }
    remix_from(patch, c, e, n / 64 * 64);
}

/// [`level`] of 16 exponents.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
fn level_avx512(y: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let y = _mm512_min_ps(_mm512_max_ps(y, _mm512_set1_ps(-32.0)), _mm512_set1_ps(9.0));
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(y);
    let f = _mm512_sub_ps(y, n);
    let mut p = _mm512_set1_ps(POW2[5]);
    for &a in POW2[..5].iter().rev() {
        p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(a));
    }
    _mm512_min_ps(_mm512_scalef_ps(p, n), _mm512_set1_ps(255.0))
}

/// For each 64-byte third of 64 interleaved RGB pixels, the byte permute that gathers it from the three
/// channels' bytes (each in [`lane_order`]): the source index (bit 6 picks the second channel in the
/// first permute) and the mask of the bytes taken from the third channel.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn interleave_channels() -> [(std::arch::x86_64::__m512i, u64); 3] {
    std::array::from_fn(|j| {
        let source: [u8; 64] = std::array::from_fn(|t| {
            let (pixel, channel) = ((64 * j + t) / 3, (64 * j + t) % 3);
            (lane_order(pixel) + 64 * (channel % 2)) as u8
        });
        let third = (0..64).fold(0u64, |m, t| m | (u64::from((64 * j + t) % 3 == 2) << t));
        // SAFETY: reads 64 bytes from a 64-byte array.
        (
            unsafe { std::arch::x86_64::_mm512_loadu_si512(source.as_ptr().cast()) },
            third,
        )
    })
}

/// Normalises each patch of `patches` (shape `(n, h, w, 3)`) to `target` in place. Returns, per patch,
/// whether it was normalised: a patch without enough stained pixels is left as it was.
pub fn macenko_transform(
    patches: &mut [u8],
    shape: &[usize],
    target: &Stains,
    p: &MacenkoParams,
) -> Result<Vec<bool>> {
    let (size, p) = transform_checks(shape, patches.len(), p)?;
    let table = OdTable::new(p.io);
    Ok(patches
        .par_chunks_mut(size)
        .map_init(Scratch::default, |s, patch| {
            normalise(None, patch, target, &p, &table, s)
        })
        .collect())
}

/// [`macenko_transform`] into `out` (as long as `patches`), leaving `patches` as they are: saves the
/// caller a copy of the batch.
pub fn macenko_transform_into(
    patches: &[u8],
    out: &mut [u8],
    shape: &[usize],
    target: &Stains,
    p: &MacenkoParams,
) -> Result<Vec<bool>> {
    let (size, p) = transform_checks(shape, patches.len(), p)?;
    if out.len() != patches.len() {
        return Err(Error::invalid(format!(
            "out must hold {} bytes, as many as the patches, not {}",
            patches.len(),
            out.len()
        )));
    }
    let table = OdTable::new(p.io);
    Ok(out
        .par_chunks_mut(size)
        .zip(patches.par_chunks(size))
        .map_init(Scratch::default, |s, (dst, src)| {
            normalise(Some(src), dst, target, &p, &table, s)
        })
        .collect())
}

/// The bytes per patch of a batch of `shape` (at least 1: an empty batch has no patches to visit), and
/// the parameters, checked.
fn transform_checks(
    shape: &[usize],
    len: usize,
    p: &MacenkoParams,
) -> Result<(usize, MacenkoParams)> {
    let (_, h, w) = shape::patches(shape, len, "patches")?;
    Ok(((h * w * 3).max(1), p.check()?))
}

/// Normalises one patch from `source` (or in place: `None`) into `out`; whether it had the stain to
/// be normalised (if not, `out` holds the source as it was).
fn normalise(
    source: Option<&[u8]>,
    out: &mut [u8],
    target: &Stains,
    p: &MacenkoParams,
    table: &OdTable,
    s: &mut Scratch,
) -> bool {
    let Some(basis) = estimate(source.unwrap_or(out), p, table, s) else {
        if let Some(source) = source {
            out.copy_from_slice(source);
        }
        return false;
    };
    let scale = [
        target.max_c[0] / basis.max_c[0],
        target.max_c[1] / basis.max_c[1],
    ];
    remix(out, &s.c, scale, &target.he, p.io);
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::needless_range_loop)]
    fn jacobi_diagonalises() {
        let a = [[4.0, 1.0, 0.5], [1.0, 3.0, 0.2], [0.5, 0.2, 1.0]];
        let v = eigh3(a);
        // A v = lambda v for each column, eigenvalues ascending.
        let mut last = f64::NEG_INFINITY;
        for col in 0..3 {
            let x = [v[0][col], v[1][col], v[2][col]];
            let ax: Vec<f64> = (0..3)
                .map(|r| (0..3).map(|k| a[r][k] * x[k]).sum())
                .collect();
            let lambda: f64 = (0..3).map(|r| ax[r] * x[r]).sum();
            assert!(lambda >= last);
            last = lambda;
            for r in 0..3 {
                assert!((ax[r] - lambda * x[r]).abs() < 1e-9);
            }
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        /// Both selections give the sorted order's values, and `first_index` the first of each, on
        /// angles with many ties or none, some of them unstained or none, near the ends and in the middle.
        #[test]
        fn ranks_equal_the_sorted_values(
            n in 1usize..9000,
            levels in proptest::sample::select(vec![3u32, 50, 4000, u32::MAX]),
            unstained in proptest::sample::select(vec![0u32, 1, 30]),
            q in proptest::collection::vec(0.0f64..=1.0, 2),
            seed in proptest::prelude::any::<u64>(),
        ) {
            let mut x = seed | 1;
            let mut next = || {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 32) as u32
            };
            let values: Vec<f32> = (0..n)
                .map(|_| match next() % 100 < unstained {
                    true => UNSTAINED,
                    false => (next() % levels) as f32 / levels as f32 * 3.9 - 2.0,
                })
                .collect();
            let kept = values.iter().filter(|&&v| v < UNSTAINED).count();
            proptest::prop_assume!(kept > 0);
            let valid = if kept == n { (n, f32::INFINITY) } else { (kept, UNSTAINED) };
            let mut sorted = values.clone();
            sorted.sort_unstable_by(f32::total_cmp);
            let mut k = [(q[0] * (kept - 1) as f64) as usize, (q[1] * (kept - 1) as f64) as usize];
            k.sort_unstable();
            let mut s = RankScratch::default();
            let got = ranks(&values, k, valid, &mut s);
            let hist = ranks_by_histogram(&values, k, &mut s);
            for r in 0..2 {
                proptest::prop_assert_eq!(got[r], sorted[k[r]]);
                proptest::prop_assert_eq!(hist[r], sorted[k[r]]);
                let first = values.iter().position(|&v| v == sorted[k[r]]).unwrap();
                proptest::prop_assert_eq!(first_index(&values, got[r]), first);
            }
        }
    }

    #[test]
    fn the_windows_find_percentiles_of_a_patch_without_the_histogram() {
        // A patch's worth of values, skewed: the 1st / 99th percentiles come out of the windows.
        let values: Vec<f32> = (0..50_176u32)
            .map(|i| ((i.wrapping_mul(2_654_435_761) >> 7) as f32).sqrt())
            .collect();
        let n = values.len();
        let k = [percentile_rank(n, 1.0), percentile_rank(n, 99.0)];
        let found = ranks_in_windows(&values, k, (n, f32::INFINITY), &mut RankScratch::default())
            .expect("windows hold the ranks");
        let mut sorted = values.clone();
        sorted.sort_unstable_by(f32::total_cmp);
        assert_eq!(found, [sorted[k[0]], sorted[k[1]]]);
        // With a third of the pixels unstained, the ranks among the others.
        let angles: Vec<f32> = values
            .iter()
            .enumerate()
            .map(|(i, &v)| {
                if i % 3 == 0 {
                    UNSTAINED
                } else {
                    v / 3000.0 - 2.0
                }
            })
            .collect();
        let kept = n - n.div_ceil(3);
        let k = [percentile_rank(kept, 1.0), percentile_rank(kept, 99.0)];
        let found = ranks_in_windows(&angles, k, (kept, UNSTAINED), &mut RankScratch::default())
            .expect("windows hold the ranks");
        let mut sorted = angles.clone();
        sorted.sort_unstable_by(f32::total_cmp);
        assert!(sorted[kept - 1] < 2.0 && sorted[kept] == UNSTAINED);
        assert_eq!(found, [sorted[k[0]], sorted[k[1]]]);
    }

    /// Planes of `n` pixels whose channels run through every byte value, in every position of a step.
    fn sweep(n: usize) -> (Vec<u8>, [Vec<f32>; 3]) {
        let pixels = (0..3 * n)
            .map(|k| ((k / 3) * 5 + 85 * (k % 3)) as u8)
            .collect();
        (pixels, std::array::from_fn(|_| vec![0.0; n]))
    }

    #[test]
    fn the_vbmi_lookup_equals_the_table() {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512vbmi") {
            let table = OdTable::new(240.0);
            // Whole steps of 64 and a tail.
            let (pixels, [mut x, mut y, mut z]) = sweep(64 * 13 + 37);
            let (_, [mut x2, mut y2, mut z2]) = sweep(64 * 13 + 37);
            od_lookup_from(&pixels, &table.values, [&mut x, &mut y, &mut z], 0);
            // SAFETY: the CPU has AVX-512 VBMI (and so F and BW).
            unsafe { od_lookup_vbmi(&pixels, &table, [&mut x2, &mut y2, &mut z2]) };
            let bits = |p: &[f32]| p.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(
                [bits(&x), bits(&y), bits(&z)],
                [bits(&x2), bits(&y2), bits(&z2)]
            );
            assert_eq!(
                x[..256].iter().filter(|&&v| v == table.values[0]).count(),
                1
            );
        }
    }

    #[test]
    fn level_is_two_to_the_y_within_two_ulp() {
        assert!(level(-1e4) < 1e-9);
        for i in -32_000..=10_000 {
            let y = i as f32 * 1e-3;
            let want = (y as f64).exp2().min(255.0);
            let got = level(y) as f64;
            assert!(
                (got - want).abs() <= 2.0 * f32::EPSILON as f64 * want,
                "{y}: {got} vs {want}"
            );
        }
    }

    #[test]
    fn the_vbmi_remix_equals_the_portable_one() {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512vbmi") {
            // Concentrations from far below to far above the clamps, whole steps of 64 and a tail.
            let n = 64 * 9 + 23;
            let c: [Vec<f32>; 2] = std::array::from_fn(|j| {
                (0..n)
                    .map(|i| ((i * (3 + j)) % 401) as f32 * 0.025 - 2.0)
                    .collect()
            });
            let e = Exponents {
                neg_k: [[-0.9, -0.3], [-1.1, -1.2], [-0.6, -0.8]],
                top: 240f32.log2(),
            };
            let (mut want, mut got) = (vec![0u8; 3 * n], vec![0u8; 3 * n]);
            remix_from(&mut want, &c, &e, 0);
            // SAFETY: the CPU has AVX-512 VBMI (and so F and BW).
            unsafe { remix_vbmi(&mut got, &c, &e) };
            assert_eq!(got, want);
            assert!(
                want.contains(&0) && want.contains(&255) && want.iter().any(|&v| v > 0 && v < 255)
            );
        }
    }

    #[test]
    fn transforming_into_a_buffer_equals_transforming_in_place() {
        // A stained patch (a sweep of the byte values, darkened) and a blank one.
        let (pixels, _) = sweep(48 * 48);
        let mut batch: Vec<u8> = pixels.iter().map(|&v| v / 2).collect();
        batch.extend(std::iter::repeat_n(250u8, 48 * 48 * 3));
        let (shape, p) = ([2, 48, 48, 3], MacenkoParams::default());
        let mut out = vec![7u8; batch.len()];
        let done =
            macenko_transform_into(&batch, &mut out, &shape, &Stains::REFERENCE, &p).unwrap();
        let mut in_place = batch.clone();
        assert_eq!(
            macenko_transform(&mut in_place, &shape, &Stains::REFERENCE, &p).unwrap(),
            done
        );
        assert_eq!((done, out), (vec![true, false], in_place));
        let short = macenko_transform_into(&batch, &mut [0u8; 3], &shape, &Stains::REFERENCE, &p);
        assert!(short.unwrap_err().to_string().contains("out must hold"));
    }

    #[test]
    fn pseudo_angle_orders_as_atan2() {
        let mut pts: Vec<(f32, f32)> = (0..360)
            .map(|d| ((d as f32 * 0.0174).sin(), (d as f32 * 0.0174).cos()))
            .collect();
        pts.push((0.0, -1.0));
        let mut by_atan = pts.clone();
        by_atan.sort_by(|a, b| a.0.atan2(a.1).total_cmp(&b.0.atan2(b.1)));
        pts.sort_by(|a, b| pseudo_angle(a.0, a.1).total_cmp(&pseudo_angle(b.0, b.1)));
        assert_eq!(pts, by_atan);
    }
}
