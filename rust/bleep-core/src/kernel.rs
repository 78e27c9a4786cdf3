//! Score micro-kernels for exact search.
//!
//! A tile is MR queries x NR reference rows. The reference is packed once into panels of NR rows stored
//! dimension-major (`[d][NR]`), so one vector load gives 16 rows' values of one dimension; each query value
//! is broadcast and fused-multiply-added into MR x NR/16 accumulators that stay in registers over the whole
//! dimension. The tile ends with a vector compare of each query's scores against its running k-th best
//! score: the caller touches its heap only for the (rare) bits set in the returned masks.

/// Queries per tile.
pub const MR: usize = 24;
/// Reference rows per panel (one 16-lane vector).
pub const NR: usize = 16;

use crate::cpu::Kernel;

impl Kernel {
    /// Scores of MR queries (`q`, packed dimension-major as d x MR by [`pack_tile`]) against one packed
    /// panel (d x NR). Returns, per
    /// query, the bit mask of panel columns whose score is strictly above `thr[i]`; those scores are
    /// written to `scores[i]` (other rows of `scores` are left as they were).
    #[inline]
    pub(crate) fn tile(
        self,
        q: &[f32],
        d: usize,
        panel: &[f32],
        thr: &[f32; MR],
        scores: &mut [[f32; NR]; MR],
    ) -> [u32; MR] {
        assert!(q.len() >= MR * d && panel.len() >= d * NR);
        match self {
            // SAFETY: the variant is only chosen when the CPU has the feature; lengths checked above.
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 | Kernel::Avx512Bf16 => unsafe {
                x86::tile_avx512(q, d, panel, thr, scores)
            },
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => unsafe { x86::tile_avx2(q, d, panel, thr, scores) },
            _ => tile_portable(q, d, panel, thr, scores),
        }
    }
}

/// The bf16 tile: MR queries packed by [`pack_tile_bf16`] against one panel packed by
/// [`pack_panels_bf16`]; `dp` = ceil(d / 2) dimension pairs. Same contract as [`Kernel::tile`], with
/// approximate scores. Only for [`Kernel::Avx512Bf16`].
#[inline]
pub fn tile_bf16(
    q: &[u32],
    dp: usize,
    panel: &[u32],
    thr: &[f32; MR],
    scores: &mut [[f32; NR]; MR],
) -> [u32; MR] {
    assert!(q.len() >= MR * dp && panel.len() >= dp * NR);
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::cpu().available[0] == Kernel::Avx512Bf16 {
        // SAFETY: the CPU has AVX512-BF16 (the best kernel it runs); lengths checked above.
        return unsafe { x86::tile_avx512bf16(q, dp, panel, thr, scores) };
    }
    unreachable!("the bf16 kernel runs only where the CPU has AVX512-BF16")
}

/// A bound on |bf16 score - exact score| for unit vectors of dimension d: each product of two values
/// rounded to bf16 (8 significant bits, unit roundoff u = 2^-8) is off by at most (2u + u^2) |q_i r_i|,
/// the sum of |q_i r_i| is at most 1 (Cauchy-Schwarz), plus fp32 accumulation over d terms.
#[cfg(test)]
pub fn bf16_margin(d: usize) -> f32 {
    let u = 2f64.powi(-8);
    (2.0 * u + u * u + d as f64 * 2f64.powi(-23) + 1e-6) as f32
}

fn bf16_bits(v: f32) -> u32 {
    half::bf16::from_f32(v).to_bits() as u32
}

/// Two consecutive dimensions of a row as one 32-bit word of two bf16 (the low half is the even one).
fn pair(row: &[f32], j: usize) -> u32 {
    let lo = bf16_bits(row[2 * j]);
    let hi = row.get(2 * j + 1).map_or(0, |&v| bf16_bits(v));
    lo | (hi << 16)
}

/// [`pack_tile`] for the bf16 kernel: `[dp][MR]` words of dimension pairs.
pub fn pack_tile_bf16(rows: &[f32], d: usize, out: &mut [u32]) {
    let dp = d.div_ceil(2);
    out[..dp * MR].fill(0);
    for (i, row) in rows.chunks_exact(d).enumerate() {
        for j in 0..dp {
            out[j * MR + i] = pair(row, j);
        }
    }
}

/// What the bf16 rounding did to the reference rows: the largest norm of a row's rounding residual
/// (r - bf16(r)) and the largest norm of a rounded row. With a query's own two norms they bound its
/// bf16 score error far more tightly than [`bf16_margin`] (see [`bf16_query_margin`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Bf16Rounding {
    pub max_residual: f64,
    pub max_rounded_norm: f64,
}

/// (norm of bf16(x), norm of x - bf16(x)), in f64.
fn rounding_norms(x: &[f32]) -> (f64, f64) {
    let (mut rounded, mut residual) = (0.0f64, 0.0f64);
    for &v in x {
        let b = half::bf16::from_f32(v).to_f32() as f64;
        rounded += b * b;
        residual += (v as f64 - b) * (v as f64 - b);
    }
    (rounded.sqrt(), residual.sqrt())
}

/// A rigorous bound on |bf16 score - fp32 score| for one unit query against every row of a reference.
///
/// With q = q~ + e and r = r~ + h (bf16 roundings and residuals), q.r - q~.r~ = q~.h + e.r~ + e.h, which
/// Cauchy-Schwarz bounds by |q~| H + |e| R + |e| H (H, R from [`Bf16Rounding`]). Both the bf16 dot
/// product and the fp32 rescoring accumulate d terms in fp32, each off by at most d 2^-24 |q||r|; the
/// last term covers bf16 inputs flushed to zero (below 2^-126) and rounding of the bound itself.
pub fn bf16_query_margin(query: &[f32], rows: &Bf16Rounding) -> f32 {
    let (qn, e) = rounding_norms(query);
    let (h, r) = (rows.max_residual, rows.max_rounded_norm);
    let gamma = query.len() as f64 * 2f64.powi(-24) * 1.01;
    let bound = qn * h + e * r + e * h + gamma * (qn * r + 1.0) + 1e-6;
    (bound * (1.0 + 1e-6)) as f32
}

/// [`pack_panels`] for the bf16 kernel: panels of NR rows as `[dp][NR]` words of dimension pairs,
/// and the rounding statistics of the unit rows.
pub fn pack_panels_bf16(rows: &[f32], norms: &[f64], d: usize) -> (Vec<u32>, Bf16Rounding) {
    use rayon::prelude::*;
    let (n, dp) = (norms.len(), d.div_ceil(2));
    let mut out = vec![0u32; n.div_ceil(NR) * dp * NR];
    let (max_rounded_norm, max_residual) = out
        .par_chunks_mut(dp * NR)
        .enumerate()
        .map_init(
            || vec![0.0f32; d],
            |unit, (p, panel)| {
                let mut most = (0.0f64, 0.0f64);
                for (r, i) in (p * NR..((p + 1) * NR).min(n)).enumerate() {
                    unit_row(&rows[i * d..(i + 1) * d], norms[i], unit);
                    for j in 0..dp {
                        panel[j * NR + r] = pair(unit, j);
                    }
                    let (rounded, residual) = rounding_norms(unit);
                    most = (most.0.max(rounded), most.1.max(residual));
                }
                most
            },
        )
        .reduce(|| (0.0, 0.0), |a, b| (a.0.max(b.0), a.1.max(b.1)));
    (
        out,
        Bf16Rounding {
            max_residual,
            max_rounded_norm,
        },
    )
}

/// Pack MR query rows (at most MR; the rest are zeros) dimension-major, `[d][MR]`: the kernel broadcasts
/// MR adjacent values per dimension instead of MR values 4 d bytes apart, which would all fall in the
/// same L1 bank and serialise the loads.
pub fn pack_tile(rows: &[f32], d: usize, out: &mut [f32]) {
    out[..d * MR].fill(0.0);
    for (i, row) in rows.chunks_exact(d).enumerate() {
        for (k, &v) in row.iter().enumerate() {
            out[k * MR + i] = v;
        }
    }
}

/// Pack row-major rows (n x d), each divided by its norm (one per row) as it is copied, into
/// zero-padded panels of NR rows, each stored as `[d][NR]`.
pub fn pack_panels(rows: &[f32], norms: &[f64], d: usize) -> Vec<f32> {
    use rayon::prelude::*;
    let n = norms.len();
    let mut out = vec![0.0f32; n.div_ceil(NR) * d * NR];
    out.par_chunks_mut(d * NR).enumerate().for_each_init(
        || vec![0.0f32; d],
        |unit, (p, panel)| {
            for (j, i) in (p * NR..((p + 1) * NR).min(n)).enumerate() {
                unit_row(&rows[i * d..(i + 1) * d], norms[i], unit);
                for (k, &v) in unit.iter().enumerate() {
                    panel[k * NR + j] = v;
                }
            }
        },
    );
    out
}

/// A row divided by its norm, in f64 then rounded (a zero norm leaves the row as it is): what
/// [`crate::normalise_rows`] does in place.
#[inline]
pub fn unit_row(row: &[f32], norm: f64, out: &mut [f32]) {
    let inv = if norm > 0.0 { 1.0 / norm } else { 1.0 };
    for (o, &v) in out.iter_mut().zip(row) {
        *o = (v as f64 * inv) as f32;
    }
}

#[inline(always)]
fn tile_generic(
    q: &[f32],
    d: usize,
    panel: &[f32],
    thr: &[f32; MR],
    scores: &mut [[f32; NR]; MR],
) -> [u32; MR] {
    let mut acc = [[0.0f32; NR]; MR];
    for (k, b) in panel[..d * NR].chunks_exact(NR).enumerate() {
        for (i, acc_i) in acc.iter_mut().enumerate() {
            let a = q[k * MR + i];
            for (c, &bv) in acc_i.iter_mut().zip(b) {
                *c += a * bv;
            }
        }
    }
    let mut masks = [0u32; MR];
    for i in 0..MR {
        for (j, &s) in acc[i].iter().enumerate() {
            masks[i] |= ((s > thr[i]) as u32) << j;
        }
        if masks[i] != 0 {
            scores[i] = acc[i];
        }
    }
    masks
}

fn tile_portable(
    q: &[f32],
    d: usize,
    panel: &[f32],
    thr: &[f32; MR],
    scores: &mut [[f32; NR]; MR],
) -> [u32; MR] {
    tile_generic(q, d, panel, thr, scores)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{tile_generic, MR, NR};
    use std::arch::x86_64::*;

    /// The generic tile compiled for AVX2 + FMA (half the width of AVX-512, for older CPUs).
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn tile_avx2(
        q: &[f32],
        d: usize,
        panel: &[f32],
        thr: &[f32; MR],
        scores: &mut [[f32; NR]; MR],
    ) -> [u32; MR] {
        tile_generic(q, d, panel, thr, scores)
    }

    /// The end of every AVX-512 tile: one vector compare per query against its threshold; the scores of
    /// queries with any hit are stored for the caller.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn compare(
        c: &[__m512; MR],
        thr: &[f32; MR],
        scores: &mut [[f32; NR]; MR],
    ) -> [u32; MR] {
        let mut masks = [0u32; MR];
        for i in 0..MR {
            masks[i] = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(c[i], _mm512_set1_ps(thr[i])) as u32;
            if masks[i] != 0 {
                _mm512_storeu_ps(scores[i].as_mut_ptr(), c[i]);
            }
        }
        masks
    }

    /// As `tile_avx512`, with `vdpbf16ps`: each instruction adds two dimensions' products per lane.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn tile_avx512bf16(
        q: &[u32],
        dp: usize,
        panel: &[u32],
        thr: &[f32; MR],
        scores: &mut [[f32; NR]; MR],
    ) -> [u32; MR] {
        let qp = q.as_ptr();
        let bp = panel.as_ptr();
        let mut c = [_mm512_setzero_ps(); MR];
        for j in 0..dp {
            let b = _mm512_loadu_ps(bp.add(j * NR) as *const f32);
            for (i, ci) in c.iter_mut().enumerate() {
                // The query pair as an embedded broadcast operand: LLVM does not fold a broadcast into
                // vdpbf16ps by itself, and a separate broadcast costs as much as the dot product.
                std::arch::asm!(
                    "vdpbf16ps {acc}, {b}, dword ptr [{q}]{{1to16}}",
                    acc = inout(zmm_reg) *ci,
                    b = in(zmm_reg) b,
                    q = in(reg) qp.add(j * MR + i),
                    options(pure, readonly, nostack, preserves_flags),
                );
            }
        }
        compare(&c, thr, scores)
    }

    /// MR zmm accumulators (24 of the 32 registers); per dimension one panel load and MR FMAs, each with
    /// its query value as an embedded broadcast (a broadcast used twice would cost a separate uop).
    #[target_feature(enable = "avx512f")]
    pub unsafe fn tile_avx512(
        q: &[f32],
        d: usize,
        panel: &[f32],
        thr: &[f32; MR],
        scores: &mut [[f32; NR]; MR],
    ) -> [u32; MR] {
        let qp = q.as_ptr();
        let bp = panel.as_ptr();
        let mut c = [_mm512_setzero_ps(); MR];
        for k in 0..d {
            let b = _mm512_loadu_ps(bp.add(k * NR));
            for (i, ci) in c.iter_mut().enumerate() {
                *ci = _mm512_fmadd_ps(_mm512_set1_ps(*qp.add(k * MR + i)), b, *ci);
            }
        }
        compare(&c, thr, scores)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
    }

    #[test]
    fn every_kernel_matches_plain_dot_products() {
        let d = 37;
        let mut seed = 7;
        let q: Vec<f32> = (0..MR * d).map(|_| lcg(&mut seed)).collect();
        let rows: Vec<f32> = (0..NR * d).map(|_| lcg(&mut seed)).collect();
        let panel = pack_panels(&rows, &[1.0; NR], d);
        let mut qt = vec![0.0; MR * d];
        pack_tile(&q, d, &mut qt);
        let thr = [f32::NEG_INFINITY; MR];
        for kernel in crate::cpu::cpu().available.clone() {
            let mut scores = [[0.0; NR]; MR];
            let masks = kernel.tile(&qt, d, &panel, &thr, &mut scores);
            for i in 0..MR {
                assert_eq!(masks[i], (1u32 << NR) - 1, "{kernel:?}");
                for j in 0..NR {
                    let want: f32 = (0..d).map(|k| q[i * d + k] * rows[j * d + k]).sum();
                    assert!((scores[i][j] - want).abs() < 1e-4, "{kernel:?} {i} {j}");
                }
            }
        }
    }

    #[test]
    fn bf16_kernel_is_within_its_margin() {
        if !crate::cpu::cpu().available.contains(&Kernel::Avx512Bf16) {
            // No skip status in the test harness: say so (tests/test_retrieval.py reports a pytest skip).
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return;
        }
        let d = 75;
        let mut seed = 9;
        let unit = |v: Vec<f32>| {
            let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            v.into_iter().map(|x| x / norm).collect::<Vec<_>>()
        };
        let q: Vec<f32> = (0..MR)
            .flat_map(|_| unit((0..d).map(|_| lcg(&mut seed)).collect()))
            .collect();
        let rows: Vec<f32> = (0..NR)
            .flat_map(|_| unit((0..d).map(|_| lcg(&mut seed)).collect()))
            .collect();
        let (panel, rounding) = pack_panels_bf16(&rows, &[1.0; NR], d);
        let mut qt = vec![0; MR * d.div_ceil(2)];
        pack_tile_bf16(&q, d, &mut qt);
        let mut scores = [[0.0; NR]; MR];
        let masks = tile_bf16(
            &qt,
            d.div_ceil(2),
            &panel,
            &[f32::NEG_INFINITY; MR],
            &mut scores,
        );
        for i in 0..MR {
            assert_eq!(masks[i], (1u32 << NR) - 1);
            for j in 0..NR {
                let exact: f64 = (0..d)
                    .map(|k| q[i * d + k] as f64 * rows[j * d + k] as f64)
                    .sum();
                // The per-query bound holds, and is within the worst-case one.
                let err = (scores[i][j] as f64 - exact).abs();
                let margin = bf16_query_margin(&q[i * d..(i + 1) * d], &rounding);
                assert!(err <= margin as f64, "{i} {j}: error {err} above {margin}");
                assert!(margin <= bf16_margin(d), "{margin}");
            }
        }
    }

    #[test]
    fn bf16_bound_holds_when_every_rounding_error_adds_up() {
        if !crate::cpu::cpu().available.contains(&Kernel::Avx512Bf16) {
            // No skip status in the test harness: say so (tests/test_retrieval.py reports a pytest skip).
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return;
        }
        // Every value just below a bf16 midpoint: all round down, and all products err the same way,
        // so the error (about 2u) meets the bound (about 2u + u^2).
        let d = 64;
        let x = 0.125f32 * (1.0 + 0.99 * 2f32.powi(-8));
        let q = vec![x; MR * d];
        let rows = vec![x; NR * d];
        let (panel, rounding) = pack_panels_bf16(&rows, &[1.0; NR], d);
        let mut qt = vec![0; MR * d.div_ceil(2)];
        pack_tile_bf16(&q, d, &mut qt);
        let mut scores = [[0.0; NR]; MR];
        tile_bf16(&qt, d / 2, &panel, &[f32::NEG_INFINITY; MR], &mut scores);
        let exact = d as f64 * (x as f64) * (x as f64);
        let err = (scores[0][0] as f64 - exact).abs();
        let margin = bf16_query_margin(&q[..d], &rounding) as f64;
        assert!(
            err > 0.9 * margin && err <= margin,
            "error {err}, bound {margin}"
        );
    }

    #[test]
    fn masks_respect_thresholds() {
        let d = 4;
        let q = vec![1.0f32; MR * d];
        let mut rows = vec![0.0f32; NR * d];
        rows[3 * d] = 2.0; // row 3 scores 2.0 for every query
        let panel = pack_panels(&rows, &[1.0; NR], d);
        let mut thr = [1.0; MR];
        thr[5] = 2.0; // strictly greater: row 3 does not pass for query 5
        let mut scores = [[0.0; NR]; MR];
        let masks = crate::cpu::kernel().tile(&q, d, &panel, &thr, &mut scores);
        for (i, &m) in masks.iter().enumerate() {
            assert_eq!(m, if i == 5 { 0 } else { 1 << 3 });
        }
    }
}
