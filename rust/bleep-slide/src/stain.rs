//! Colour normalisation of RGB patches: Macenko and Reinhard stain normalisation, transcribed from
//! torchstain's torch backend (float32, the same percentile and rounding rules), and the per-channel
//! mean/std conversion of uint8 HWC patches into the float32 CHW tensors encoders take.
//!
//! Patches are `n` contiguous `h x w x 3` uint8 images; every function works on a batch in parallel.

use crate::shape;
use crate::simd::multiversion;
use bleep_core::{Error, Matrix, Result};
use rayon::prelude::*;

mod reinhard;
pub use reinhard::{reinhard_fit, reinhard_transform, LabStats};

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

/// The optical density of each 8-bit value: `-ln((v + 1) / Io)` in float32.
fn od_table(io: f32) -> [f32; 256] {
    std::array::from_fn(|v| -((v as f32 + 1.0) / io).ln())
}

/// Values of the given ranks (0-based, ascending) of `values`, exactly, with the index of the first
/// value equal to each.
///
/// Each rank is looked for among the values lying between two order statistics of a sample that
/// bracket it (a few per cent of the values, found in one pass that a vector compare skips through
/// where a block holds none), then selected there. When the sample misleads (the rank falls outside its
/// window, or the windows overlap) the histogram method finds it instead: the answer is exact either way.
fn ranks<const R: usize>(
    values: &[f32],
    wanted: [usize; R],
    s: &mut RankScratch,
) -> [(f32, usize); R] {
    let m = values.len();
    if let Some(found) = ranks_in_windows(values, wanted, s) {
        return found;
    }
    let picked = ranks_by_histogram(values, wanted, s);
    picked.map(|v| {
        (
            v,
            values
                .iter()
                .position(|&x| x == v)
                .unwrap_or(m.saturating_sub(1)),
        )
    })
}

/// Values sampled per selection, and the spread (in standard deviations of a sample quantile) of the
/// window kept around each rank.
const SAMPLE: usize = 256;
const SPREAD: f64 = 4.0;

fn ranks_in_windows<const R: usize>(
    values: &[f32],
    wanted: [usize; R],
    s: &mut RankScratch,
) -> Option<[(f32, usize); R]> {
    let m = values.len();
    if m < 8 * SAMPLE {
        return None;
    }
    s.sample.clear();
    s.sample
        .extend((0..SAMPLE).map(|i| values[i * (m / SAMPLE)]));
    s.sample.sort_unstable_by(f32::total_cmp);
    let bounds: [(f32, f32); R] = wanted.map(|k| {
        let p = k as f64 / m as f64 * SAMPLE as f64;
        let spread = SPREAD * (p * (1.0 - p / SAMPLE as f64)).max(0.0).sqrt() + 2.0;
        let (lo, hi) = ((p - spread).floor(), (p + spread).ceil());
        (
            if lo < 0.0 {
                f32::NEG_INFINITY
            } else {
                s.sample[lo as usize]
            },
            if hi >= (SAMPLE - 1) as f64 {
                f32::INFINITY
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
    let mut out = [(0f32, 0usize); R];
    for r in 0..R {
        let (k, w) = (wanted[r], &mut s.windows[r]);
        if k < w.below || k - w.below >= w.hits {
            return None;
        }
        // Selected on a copy: the candidates stay in index order, so the first equal one is the first.
        s.selected.clear();
        s.selected.extend_from_slice(&w.values[..w.hits]);
        let v = *s
            .selected
            .select_nth_unstable_by(k - w.below, f32::total_cmp)
            .1;
        let at = w.values[..w.hits].iter().position(|&x| x == v)?;
        out[r] = (v, w.indices[at] as usize);
    }
    Some(out)
}

/// One rank's window [lo, hi], and what a pass over the values finds: how many lie below it, and
/// those within it (the first `hits` of `values`) with their indices, in index order.
#[derive(Default)]
struct Window {
    lo: f32,
    hi: f32,
    below: usize,
    hits: usize,
    values: Vec<f32>,
    indices: Vec<u32>,
}

/// Fills each window from one pass over the values.
fn collect_windows(values: &[f32], windows: &mut [Window]) {
    for w in windows.iter_mut() {
        (w.below, w.hits) = (0, 0);
        if w.values.len() < values.len() + 16 {
            w.values.resize(values.len() + 16, 0.0);
            w.indices.resize(values.len() + 16, 0);
        }
    }
    #[cfg(target_arch = "x86_64")]
    if bleep_core::cpu::cpu().simd == bleep_core::cpu::SimdLevel::Avx512 {
        // SAFETY: the CPU has AVX-512 F (and its use was not turned off).
        return unsafe { collect_windows_avx512(values, windows) };
    }
    collect_from(values, windows, 0);
}

/// The windows' pass from value `from` on, one value at a time, compacted without branches (every
/// value is written, the count advances on a hit).
fn collect_from(values: &[f32], windows: &mut [Window], from: usize) {
    for w in windows.iter_mut() {
        for (i, &v) in values.iter().enumerate().skip(from) {
            w.values[w.hits] = v;
            w.indices[w.hits] = i as u32;
            w.hits += usize::from(w.lo <= v && v <= w.hi);
            w.below += usize::from(v < w.lo);
        }
    }
}

/// 16 values a step: two compares give the window's and the below mask, the hits are compressed in
/// registers and stored unaligned (a compressing store to memory is slow on Zen 4).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn collect_windows_avx512(values: &[f32], windows: &mut [Window]) {
    use std::arch::x86_64::*;
    let full = values.len() / 16 * 16;
    for w in windows.iter_mut() {
        let (lo, hi) = (_mm512_set1_ps(w.lo), _mm512_set1_ps(w.hi));
        let mut index = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        let (vp, ip) = (w.values.as_mut_ptr(), w.indices.as_mut_ptr());
        let (mut hits, mut below) = (0usize, 0usize);
        for start in (0..full).step_by(16) {
            let v = _mm512_loadu_ps(values.as_ptr().add(start));
            let under = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(v, lo);
            let inside =
                _mm512_cmp_ps_mask::<_CMP_GE_OQ>(v, lo) & _mm512_cmp_ps_mask::<_CMP_LE_OQ>(v, hi);
            // hits <= start, so the 16 stored lanes end within the buffers (values.len() + 16 long).
            _mm512_storeu_ps(vp.add(hits), _mm512_maskz_compress_ps(inside, v));
            _mm512_storeu_si512(
                ip.add(hits).cast(),
                _mm512_maskz_compress_epi32(inside, index),
            );
            hits += inside.count_ones() as usize;
            below += under.count_ones() as usize;
            index = _mm512_add_epi32(index, _mm512_set1_epi32(16));
        }
        (w.hits, w.below) = (hits, below);
    }
    collect_from(values, windows, full);
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
    selected: Vec<f32>,
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

multiversion! {
    /// Optical-density planes of the pixels, and the count, sums and products (upper triangle) of the
    /// stained pixels' optical densities, in one pass: each chunk of 4096 pixels is looked up, then
    /// summed while it is in cache, in 16 float32 lanes per accumulator flushed to float64.
    fn od_moments(pixels: &[u8], table: &[f32; 256], beta: f32, od: &mut [Vec<f32>; 3]) -> [f64; 10] {
        let n = pixels.len() / 3;
        let mut total = [0f64; 10];
        for plane in od.iter_mut() {
            plane.resize(n, 0.0);
        }
        let [a, b, c] = od;
        let planes = a.chunks_mut(4096).zip(b.chunks_mut(4096)).zip(c.chunks_mut(4096));
        for (((a, b), c), chunk) in planes.zip(pixels.chunks(4096 * 3)) {
            for (((x, y), z), px) in a.iter_mut().zip(b.iter_mut()).zip(c.iter_mut()).zip(chunk.chunks_exact(3)) {
                (*x, *y, *z) = (table[px[0] as usize], table[px[1] as usize], table[px[2] as usize]);
            }
            let mut acc = [[0f32; 16]; 10];
            // Fixed-size blocks: no bounds checks, so the lanes vectorise.
            let (ab, bb, cb) = (a.chunks_exact(16), b.chunks_exact(16), c.chunks_exact(16));
            let rest = (ab.remainder(), bb.remainder(), cb.remainder());
            for ((x, y), z) in ab.zip(bb).zip(cb) {
                for l in 0..16 {
                    add_moments(&mut acc, l, x[l], y[l], z[l], beta);
                }
            }
            for ((&x, &y), &z) in rest.0.iter().zip(rest.1).zip(rest.2) {
                add_moments(&mut acc, 0, x, y, z, beta);
            }
            for (t, lanes) in acc.iter().enumerate() {
                total[t] += lanes.iter().map(|&v| v as f64).sum::<f64>();
            }
        }
        total
    }
}

/// Adds one pixel's count, sums and products (when all three optical densities are >= beta) to lane l.
#[inline(always)]
fn add_moments(acc: &mut [[f32; 16]; 10], l: usize, x: f32, y: f32, z: f32, beta: f32) {
    let m = if x >= beta && y >= beta && z >= beta {
        1.0
    } else {
        0.0
    };
    let (mx, my, mz) = (m * x, m * y, m * z);
    acc[0][l] += m;
    acc[1][l] += mx;
    acc[2][l] += my;
    acc[3][l] += mz;
    acc[4][l] += mx * x;
    acc[5][l] += mx * y;
    acc[6][l] += mx * z;
    acc[7][l] += my * y;
    acc[8][l] += my * z;
    acc[9][l] += mz * z;
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
fn estimate(
    pixels: &[u8],
    p: &MacenkoParams,
    table: &[f32; 256],
    s: &mut Scratch,
) -> Option<Stains> {
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
    let picked = ranks(&s.phi, wanted, &mut s.ranks);
    let angle_of = |(_, i): (f32, usize)| -> f32 {
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
        ranks(&s.c[0], k, &mut s.ranks)[0].0,
        ranks(&s.c[1], k, &mut s.ranks)[0].0,
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
    estimate(pixels, &p, &od_table(p.io), &mut Scratch::default()).ok_or_else(|| {
        Error::invalid("the Macenko target has too few stained pixels (at least 1% must have optical density >= beta in every channel): fit on a patch with tissue")
    })
}

/// The 8-bit level of a value in [0, 255], truncated as torchstain's casts do: floor, then the integer
/// read from the mantissa after adding 1.5 * 2^23 (no float-to-int cast, which does not vectorise).
#[inline]
fn level_byte(v: f32) -> u8 {
    (v.floor() + 12_582_912.0).to_bits() as u8
}

/// Writes a block of pixels (at most [`BLOCK`]) from three planes of levels: each plane truncated to
/// bytes in one vector pass, then the three interleaved (converting as it interleaves does not vectorise).
#[inline(always)]
fn store_levels(block: &mut [u8], planes: &[[f32; BLOCK]; 3]) {
    let mut bytes = [[0u8; BLOCK]; 3];
    for (b, p) in bytes.iter_mut().zip(planes) {
        for (b, &v) in b.iter_mut().zip(p) {
            *b = level_byte(v);
        }
    }
    let [r, g, b] = &bytes;
    for (((px, &r), &g), &b) in block.chunks_exact_mut(3).zip(r).zip(g).zip(b) {
        px.copy_from_slice(&[r, g, b]);
    }
}

/// e^x in float32 (Cephes' `expf`: Cody-Waite reduction, degree-6 polynomial, within 2 ulp), written
/// without branches so that it vectorises.
#[inline]
fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    let n = (x * std::f32::consts::LOG2_E).round_ties_even();
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 0.166_666_65)
        * r
        + 0.5;
    let e = p * r * r + r + 1.0;
    // 2^n by the exponent bits; n (an integer in [-126, 127]) is read out of the mantissa after adding
    // 1.5 * 2^23, which vectorises where a float-to-int cast does not.
    let n_bits = (n + 12_582_912.0).to_bits().wrapping_sub(0x4B40_0000);
    e * f32::from_bits(n_bits.wrapping_add(127) << 23)
}

multiversion! {
    /// Remixes one patch's concentrations (scaled per stain) with the target's stain vectors:
    /// `min(255, Io exp(-HE c))`, truncated to 8 bits as torchstain does.
    fn remix(patch: &mut [u8], c: &[Vec<f32>; 2], scale: [f32; 2], he: &[[f32; 2]; 3], io: f32) {
        for (start, block) in (0..c[0].len()).step_by(BLOCK).zip(patch.chunks_mut(BLOCK * 3)) {
            let len = block.len() / 3;
            let (c0, c1) = (&c[0][start..start + len], &c[1][start..start + len]);
            let mut out = [[0f32; BLOCK]; 3];
            for (r, plane) in out.iter_mut().enumerate() {
                let (h0, h1) = (he[r][0] * scale[0], he[r][1] * scale[1]);
                for i in 0..len {
                    plane[i] = (io * exp(-(h0 * c0[i] + h1 * c1[i]))).min(255.0);
                }
            }
            store_levels(block, &out);
        }
    }
}

/// Normalises each patch of `patches` (shape `(n, h, w, 3)`) to `target` in place. Returns, per patch,
/// whether it was normalised: a patch without enough stained pixels is left as it was.
pub fn macenko_transform(
    patches: &mut [u8],
    shape: &[usize],
    target: &Stains,
    p: &MacenkoParams,
) -> Result<Vec<bool>> {
    let (n, h, w) = shape::patches(shape, patches.len(), "patches")?;
    let p = p.check()?;
    if n == 0 {
        return Ok(Vec::new());
    }
    let table = od_table(p.io);
    Ok(patches
        .par_chunks_mut(h * w * 3)
        .map_init(Scratch::default, |s, patch| {
            let Some(source) = estimate(patch, &p, &table, s) else {
                return false;
            };
            let scale = [
                target.max_c[0] / source.max_c[0],
                target.max_c[1] / source.max_c[1],
            ];
            remix(patch, &s.c, scale, &target.he, p.io);
            true
        })
        .collect())
}

/// Pixels per block of the colour kernels: planes of this many floats stay in L1 and vectorise.
const BLOCK: usize = 64;

/// Natural logarithm of a positive normal float32 (exponent split, atanh series on [sqrt 1/2, sqrt 2),
/// within 2 ulp), without branches so that it vectorises.
#[inline]
fn ln(x: f32) -> f32 {
    let bits = x.to_bits();
    let mut e = ((bits >> 23) & 0xff) as i32 - 127;
    let mut m = f32::from_bits((bits & 0x007f_ffff) | 0x3f80_0000);
    let big = m > std::f32::consts::SQRT_2;
    m = if big { m * 0.5 } else { m };
    e += i32::from(big);
    let t = (m - 1.0) / (m + 1.0);
    let t2 = t * t;
    let series = 1.0 + t2 * (1.0 / 3.0 + t2 * (0.2 + t2 * (1.0 / 7.0 + t2 * (1.0 / 9.0))));
    2.0 * t * series + e as f32 * std::f32::consts::LN_2
}

/// uint8 HWC patches (shape `(n, h, w, 3)`) to float32 CHW in `out` (shape `out_shape`, which must be
/// `(n, 3, h, w)`): `(v / 255 - mean[c]) / std[c]`, per channel, through a 256-entry table per channel
/// (bit-identical to the float32 formula).
pub fn to_tensor(
    patches: &[u8],
    shape: &[usize],
    mean: [f32; 3],
    std: [f32; 3],
    out: &mut [f32],
    out_shape: &[usize],
) -> Result<()> {
    let (n, h, w) = shape::patches(shape, patches.len(), "patches")?;
    if std.iter().any(|&s| !(s.is_finite() && s > 0.0)) || mean.iter().any(|m| !m.is_finite()) {
        return Err(Error::invalid(format!(
            "every std must be positive and every mean finite, got mean {mean:?} and std {std:?}"
        )));
    }
    if out_shape != [n, 3, h, w] || out.len() != n * 3 * h * w {
        return Err(Error::invalid(format!(
            "out must have shape ({n}, 3, {h}, {w}), not {out_shape:?}"
        )));
    }
    if n == 0 {
        return Ok(());
    }
    let table: [[f32; 256]; 3] =
        std::array::from_fn(|c| std::array::from_fn(|v| (v as f32 / 255.0 - mean[c]) / std[c]));
    let plane = h * w;
    out.par_chunks_mut(3 * plane)
        .zip(patches.par_chunks(3 * plane))
        .take(n)
        .for_each(|(dst, src)| tensor_patch(src, &table, mean, std, dst));
    Ok(())
}

/// One patch: interleaved RGB bytes to three planes, through the per-channel tables.
fn tensor_patch(
    src: &[u8],
    table: &[[f32; 256]; 3],
    mean: [f32; 3],
    std: [f32; 3],
    dst: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if bleep_core::cpu::cpu().avx512vbmi {
        // SAFETY: the CPU has AVX-512 F, BW and VBMI (and their use was not turned off).
        return unsafe { tensor_patch_avx512(src, table, mean, std, dst) };
    }
    tensor_patch_portable(src, table, dst, 0);
}

fn tensor_patch_portable(src: &[u8], table: &[[f32; 256]; 3], dst: &mut [f32], from: usize) {
    let plane = src.len() / 3;
    let (r, rest) = dst.split_at_mut(plane);
    let (g, b) = rest.split_at_mut(plane);
    for i in from..plane {
        r[i] = table[0][src[3 * i] as usize];
        g[i] = table[1][src[3 * i + 1] as usize];
        b[i] = table[2][src[3 * i + 2] as usize];
    }
}

/// 16 pixels a step: one byte permutation splits R, G and B, each widened to float32 and put through
/// `(v / 255 - mean) / std` with true divisions (bit-identical to the table), then stored;
/// non-temporal when the planes are 64-byte aligned (a batch of tensors does not fit in cache, and
/// skipping the read-for-ownership nearly halves the traffic).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
unsafe fn tensor_patch_avx512(
    src: &[u8],
    table: &[[f32; 256]; 3],
    mean: [f32; 3],
    std: [f32; 3],
    dst: &mut [f32],
) {
    use std::arch::x86_64::*;
    let plane = src.len() / 3;
    let order: [u8; 64] = std::array::from_fn(|k| {
        if k < 48 {
            ((k % 16) * 3 + k / 16) as u8
        } else {
            0
        }
    });
    let idx = _mm512_loadu_si512(order.as_ptr().cast());
    let base = dst.as_mut_ptr();
    let aligned = (base as usize).is_multiple_of(64) && (plane * 4).is_multiple_of(64);
    let steps = plane / 16;
    for s in 0..steps {
        let bytes = _mm512_maskz_loadu_epi8(0xFFFF_FFFF_FFFF, src.as_ptr().add(s * 48).cast());
        let split = _mm512_permutexvar_epi8(idx, bytes);
        let channels = [
            _mm512_castsi512_si128(split),
            _mm512_extracti32x4_epi32::<1>(split),
            _mm512_extracti32x4_epi32::<2>(split),
        ];
        for (c, bytes) in channels.into_iter().enumerate() {
            let v = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(bytes));
            let scaled = _mm512_sub_ps(
                _mm512_div_ps(v, _mm512_set1_ps(255.0)),
                _mm512_set1_ps(mean[c]),
            );
            let values = _mm512_div_ps(scaled, _mm512_set1_ps(std[c]));
            let at = base.add(c * plane + s * 16);
            if aligned {
                _mm512_stream_ps(at, values);
            } else {
                _mm512_storeu_ps(at, values);
            }
        }
    }
    if aligned {
        _mm_sfence();
    }
    tensor_patch_portable(src, table, dst, steps * 16);
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
        /// Both selections give the sorted order's values (and the first index of each), on values with
        /// many ties or none, near the ends and in the middle.
        #[test]
        fn ranks_equal_the_sorted_values(
            n in 1usize..9000,
            levels in proptest::sample::select(vec![3u32, 50, 4000, u32::MAX]),
            q in proptest::collection::vec(0.0f64..=1.0, 2),
            seed in proptest::prelude::any::<u64>(),
        ) {
            let mut x = seed | 1;
            let values: Vec<f32> = (0..n)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    ((x >> 32) as u32 % levels) as f32 * 0.37 - 11.0
                })
                .collect();
            let mut sorted = values.clone();
            sorted.sort_unstable_by(f32::total_cmp);
            let mut k = [(q[0] * (n - 1) as f64) as usize, (q[1] * (n - 1) as f64) as usize];
            k.sort_unstable();
            let mut s = RankScratch::default();
            let got = ranks(&values, k, &mut s);
            let hist = ranks_by_histogram(&values, k, &mut s);
            for r in 0..2 {
                proptest::prop_assert_eq!(got[r].0, sorted[k[r]]);
                proptest::prop_assert_eq!(hist[r], sorted[k[r]]);
                proptest::prop_assert_eq!(got[r].1, values.iter().position(|&v| v == sorted[k[r]]).unwrap());
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
        let found = ranks_in_windows(&values, k, &mut RankScratch::default())
            .expect("windows hold the ranks");
        let mut sorted = values.clone();
        sorted.sort_unstable_by(f32::total_cmp);
        assert_eq!([found[0].0, found[1].0], [sorted[k[0]], sorted[k[1]]]);
    }

    #[test]
    fn level_byte_truncates_like_a_cast() {
        for v in [0.0f32, 0.5, 1.0, 1.999, 127.5, 254.99, 255.0] {
            assert_eq!(level_byte(v), v as u8, "{v}");
        }
    }

    #[test]
    fn ln_is_within_two_ulp() {
        for i in 1..=20_000 {
            let x = i as f32 * 1e-4 + 1e-3;
            let (got, want) = (ln(x) as f64, (x as f64).ln());
            assert!(
                (got - want).abs() <= 3.0 * f32::EPSILON as f64 * want.abs().max(1e-3),
                "{x}: {got} vs {want}"
            );
        }
    }

    #[test]
    fn exp_is_within_two_ulp() {
        for i in -8000..=600 {
            let x = i as f32 * 0.01;
            let (got, want) = (exp(x), (x as f64).exp());
            assert!(
                ((got as f64) - want).abs() <= 2.5 * f32::EPSILON as f64 * want,
                "{x}"
            );
        }
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

    #[test]
    fn a_white_patch_is_left_alone() {
        let mut patch = vec![250u8; 16 * 16 * 3];
        let done = macenko_transform(
            &mut patch,
            &[1, 16, 16, 3],
            &Stains::REFERENCE,
            &MacenkoParams::default(),
        )
        .unwrap();
        assert_eq!(done, vec![false]);
        assert!(patch.iter().all(|&v| v == 250));
    }

    #[test]
    fn zero_size_patches_and_bad_parameters_are_errors() {
        let p = MacenkoParams::default();
        let message = |r: Result<()>| r.unwrap_err().to_string();
        let mut none: Vec<u8> = Vec::new();
        let zero = [2, 0, 0, 3];
        assert!(
            message(macenko_transform(&mut none, &zero, &Stains::REFERENCE, &p).map(|_| ()))
                .contains("no pixels")
        );
        let stats = [50.0, 10.0, 0.0, 5.0, 0.0, 5.0];
        assert!(message(reinhard_transform(
            &none,
            &zero,
            Matrix::new(&stats, 3, 2),
            &mut []
        ))
        .contains("no pixels"));
        let mut out: Vec<f32> = Vec::new();
        assert!(message(to_tensor(
            &none,
            &zero,
            [0.5; 3],
            [0.2; 3],
            &mut out,
            &[2, 3, 0, 0]
        ))
        .contains("no pixels"));
        // An empty batch is fine.
        assert_eq!(
            macenko_transform(&mut none, &[0, 4, 4, 3], &Stains::REFERENCE, &p).unwrap(),
            Vec::<bool>::new()
        );
        let mut patch = vec![100u8; 4 * 4 * 3];
        for alpha in [-5.0, 150.0, f32::NAN] {
            let bad = MacenkoParams { alpha, ..p };
            let e = macenko_transform(&mut patch, &[1, 4, 4, 3], &Stains::REFERENCE, &bad);
            assert!(message(e.map(|_| ())).contains("alpha"));
            assert!(macenko_fit(&patch, &[4, 4, 3], &bad).is_err());
        }
        let io = MacenkoParams { io: 0.0, ..p };
        assert!(message(macenko_fit(&patch, &[4, 4, 3], &io).map(|_| ())).contains("io must"));
    }
}
