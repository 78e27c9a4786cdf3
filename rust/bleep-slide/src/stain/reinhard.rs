//! Reinhard colour transfer (Reinhard et al. 2001) in torchstain's float32 LAB: each LAB channel of a
//! patch is standardised and given the target's mean and standard deviation.
//!
//! A patch takes two passes: RGB to LAB planes (then their mean and standard deviation), and the planes
//! back to RGB with the new statistics. Each pass has a portable per-pixel form (the reference, and the
//! fallback) and an AVX-512 VBMI form that does the same float operations in the same order on 16
//! pixels at a time, so the two give identical bytes. The sRGB encoding and truncation to 8 bits is a
//! monotone step function, so it is found by comparing with its thresholds ([`Levels`]); the vector
//! form computes most levels directly and is checked equal to the table on every float32.

use super::{exp, level_byte, ln, BLOCK};
use crate::shape;
use crate::simd::multiversion;
use bleep_core::{Error, Matrix, Result};
use rayon::prelude::*;
use std::sync::OnceLock;

/// Mean and (unbiased) standard deviation of each LAB channel, in torchstain's units
/// (L in 0..100, a and b centred on 0).
pub type LabStats = [[f32; 2]; 3];

const RGB2XYZ: [[f32; 3]; 3] = [
    [0.412453, 0.357580, 0.180423],
    [0.212671, 0.715160, 0.072169],
    [0.019334, 0.119193, 0.950227],
];
const WHITE: [f32; 3] = [0.95047, 1.0, 1.08883];

/// What both passes read: the sRGB decoding of each byte, the colour matrices, the level table.
struct Colour {
    /// sRGB to linear for each 8-bit value.
    linear: [f32; 256],
    /// Linear RGB to XYZ over the white point.
    to_xyz: [[f32; 3]; 3],
    /// XYZ (relative to the white point) to linear RGB.
    to_rgb: [[f32; 3]; 3],
    levels: &'static Levels,
}

impl Colour {
    fn new() -> Colour {
        let m = xyz2rgb();
        Colour {
            linear: std::array::from_fn(|v| {
                let x = v as f32 / 255.0;
                if x > 0.04045 {
                    ((x + 0.055) / 1.055).powf(2.4)
                } else {
                    x / 12.92
                }
            }),
            to_xyz: std::array::from_fn(|i| RGB2XYZ[i].map(|v| v * (1.0 / WHITE[i]))),
            to_rgb: std::array::from_fn(|i| std::array::from_fn(|j| m[i][j] * WHITE[j])),
            levels: Levels::get(),
        }
    }
}

fn xyz2rgb() -> [[f32; 3]; 3] {
    let m = RGB2XYZ.map(|r| r.map(|v| v as f64));
    let det = m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1])
        - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
        + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0]);
    std::array::from_fn(|i| {
        std::array::from_fn(|j| {
            let (r0, r1) = ((j + 1) % 3, (j + 2) % 3);
            let (c0, c1) = ((i + 1) % 3, (i + 2) % 3);
            ((m[r0][c0] * m[r1][c1] - m[r0][c1] * m[r1][c0]) / det) as f32
        })
    })
}

/// The LAB statistics of a target image of shape `(..., 3)`, to normalise other patches towards.
pub fn reinhard_fit(pixels: &[u8], shape: &[usize]) -> Result<LabStats> {
    shape::rgb_pixels(shape, pixels.len(), "the target")?;
    if pixels.len() < 6 {
        return Err(Error::invalid(
            "the Reinhard target needs at least two pixels",
        ));
    }
    Ok(lab_stats(pixels, &Colour::new(), &mut Default::default()))
}

/// Reinhard normalisation of `patches` (shape `(n, h, w, 3)`) into `out` (as long): each LAB channel
/// standardised, then given the target's mean and standard deviation (`target`: a (3, 2) matrix, rows
/// L, a, b). A channel with no spread (a uniform patch) is moved to the target mean. The output is the
/// caller's (the Python side allocates it with NumPy, which asks for huge pages: faulting in fresh 4 KiB
/// pages costs a quarter of the transform).
pub fn reinhard_transform(
    patches: &[u8],
    shape: &[usize],
    target: Matrix<'_, f32>,
    out: &mut [u8],
) -> Result<()> {
    let (n, h, w) = shape::patches(shape, patches.len(), "patches")?;
    let values = target.check("the Reinhard statistics")?;
    if (target.rows, target.cols) != (3, 2) || !values.iter().all(|v| v.is_finite()) {
        return Err(Error::invalid(format!(
            "the Reinhard statistics must be a finite (3, 2) matrix, not ({}, {})",
            target.rows, target.cols
        )));
    }
    if out.len() != patches.len() {
        return Err(Error::invalid(format!(
            "out must hold as many bytes as the patches ({}), not {}",
            patches.len(),
            out.len()
        )));
    }
    if n == 0 {
        return Ok(());
    }
    let target: LabStats = std::array::from_fn(|c| [values[2 * c], values[2 * c + 1]]);
    let colour = Colour::new();
    out.par_chunks_mut(h * w * 3)
        .zip(patches.par_chunks(h * w * 3))
        .for_each_init(<[Vec<f32>; 3]>::default, |lab, (dst, src)| {
            let stats = lab_stats(src, &colour, lab);
            let (gain, offset) = affine(&stats, &target);
            let [l, a, b] = lab;
            rgb_bytes([l, a, b].map(|p| &p[..]), gain, offset, &colour, dst);
        });
    Ok(())
}

/// `v' = (v - mean) / std * target_std + target_mean` as one multiply-add per value (a channel
/// without spread goes to the target mean).
fn affine(stats: &LabStats, target: &LabStats) -> ([f32; 3], [f32; 3]) {
    let gain: [f32; 3] = std::array::from_fn(|c| {
        if stats[c][1] > 0.0 {
            target[c][1] / stats[c][1]
        } else {
            0.0
        }
    });
    let offset = std::array::from_fn(|c| target[c][0] - stats[c][0] * gain[c]);
    (gain, offset)
}

fn lab_stats(pixels: &[u8], colour: &Colour, lab: &mut [Vec<f32>; 3]) -> LabStats {
    let n = pixels.len() / 3;
    for plane in lab.iter_mut() {
        plane.resize(n, 0.0);
    }
    let [l, a, b] = lab;
    lab_planes(pixels, colour, [l, a, b].map(|p| &mut p[..n]));
    std::array::from_fn(|c| mean_std(&lab[c]))
}

multiversion! {
    /// Mean and unbiased standard deviation, two passes, 16 float32 lanes flushed to float64 per 4096.
    fn mean_std(values: &[f32]) -> [f32; 2] {
        let n = values.len().max(2) as f64;
        let (mut sum, mut sq) = (0f64, 0f64);
        for block in values.chunks(4096) {
            sum += lane_sum(block, 0.0, false);
        }
        let mean = (sum / n) as f32;
        for block in values.chunks(4096) {
            sq += lane_sum(block, mean, true);
        }
        [mean, (sq / (n - 1.0)).sqrt() as f32]
    }
}

/// The sum of `v - shift` (or of its square) over a short block, in 16 float32 lanes.
#[inline(always)]
fn lane_sum(block: &[f32], shift: f32, square: bool) -> f64 {
    let mut acc = [0f32; 16];
    let mut chunks = block.chunks_exact(16);
    for ch in &mut chunks {
        for l in 0..16 {
            let d = ch[l] - shift;
            acc[l] += if square { d * d } else { d };
        }
    }
    let rest: f64 = chunks
        .remainder()
        .iter()
        .map(|&v| {
            if square {
                ((v - shift) * (v - shift)) as f64
            } else {
                (v - shift) as f64
            }
        })
        .sum();
    acc.iter().map(|&v| v as f64).sum::<f64>() + rest
}

// ---- Pass 1: RGB bytes to LAB planes (torchstain's rgb2lab, L in 0..100, a and b centred on 0).

/// LAB planes of RGB pixels (as many as the planes are long).
fn lab_planes(pixels: &[u8], colour: &Colour, lab: [&mut [f32]; 3]) {
    #[cfg(target_arch = "x86_64")]
    if bleep_core::cpu::cpu().avx512vbmi {
        // SAFETY: the CPU has AVX-512 F, BW and VBMI (and their use was not turned off).
        return unsafe { lab_planes_avx512(pixels, colour, lab) };
    }
    lab_planes_portable(pixels, colour, lab);
}

multiversion! {
    /// The portable pass 1: each block's bytes are looked up, then converted in a loop that vectorises.
    fn lab_planes_portable(pixels: &[u8], colour: &Colour, lab: [&mut [f32]; 3]) {
        let [l_out, a_out, b_out] = lab;
        for (start, block) in (0..l_out.len()).step_by(BLOCK).zip(pixels.chunks(BLOCK * 3)) {
            let len = block.len() / 3;
            let mut rgb = [[0f32; BLOCK]; 3];
            for (i, px) in block.chunks_exact(3).enumerate() {
                for c in 0..3 {
                    rgb[c][i] = colour.linear[px[c] as usize];
                }
            }
            for i in 0..len {
                let [l, a, b] = lab_of([rgb[0][i], rgb[1][i], rgb[2][i]], &colour.to_xyz);
                (l_out[start + i], a_out[start + i], b_out[start + i]) = (l, a, b);
            }
        }
    }
}

/// LAB of one pixel's linear RGB.
#[inline(always)]
fn lab_of(rgb: [f32; 3], to_xyz: &[[f32; 3]; 3]) -> [f32; 3] {
    let [x, y, z] = to_xyz.map(|m| lab_f(m[0] * rgb[0] + m[1] * rgb[1] + m[2] * rgb[2]));
    [116.0 * y - 16.0, 500.0 * (x - y), 200.0 * (y - z)]
}

/// CIE's f: the cube root, linear near 0.
#[inline(always)]
fn lab_f(t: f32) -> f32 {
    if t > 0.008856 {
        cbrt(t)
    } else {
        7.787 * t + 16.0 / 116.0
    }
}

/// Cube root of a positive normal float32, within 1 ulp, without a division (a division is several
/// times the cost of a multiply-add): `x^(-1/3)` guessed from the bits (a third of the exponent,
/// within 4 %) and corrected by a factor for its mantissa's top 5 bits (within 0.7 %), one
/// third-order Newton step, then `x (x^(-1/3))^2` polished by a Newton step on `c^3 = x`.
#[inline(always)]
fn cbrt(x: f32) -> f32 {
    // A third of the bits through float32 (exact enough, and it vectorises).
    let third = ((x.to_bits() as i32) as f32 * (1.0 / 3.0)) as i32;
    let guess = f32::from_bits(RCBRT_MAGIC.wrapping_sub(third) as u32);
    let y = guess * RCBRT_FIX[(guess.to_bits() >> 18) as usize & 31];
    let e = 1.0 - x * (y * y * y);
    let y = y + y * e * (1.0 / 3.0 + e * (2.0 / 9.0));
    let y2 = y * y;
    let c = x * y2;
    c - (c * c * c - x) * y2 * (1.0 / 3.0)
}

/// 4/3 of 1.0's bits less a bias: the bits of the guess of `x^(-1/3)` are this less a third of x's.
const RCBRT_MAGIC: i32 = 0x54a2_1d2a;

/// The guess's error is a function of its mantissa (of x's place in a cycle of 3 octaves): the
/// middle of `x^(-1/3) / guess` over each value of the mantissa's top 5 bits.
const RCBRT_FIX: [f32; 32] = [
    1.0291747, 1.016919, 1.0067823, 0.99878526, 0.99298966, 0.98950607, 0.9884015, 0.9902363,
    0.99275124, 0.9868956, 0.9799922, 0.9745459, 0.97060555, 0.96824497, 0.96749777, 0.9687135,
    0.97187114, 0.9772913, 0.9853099, 0.9908433, 0.988279, 0.9865149, 0.9859574, 0.9868515,
    0.9891574, 0.99307406, 0.9987902, 1.0065486, 1.0166653, 1.0284615, 1.0345125, 1.0352215,
];

// ---- Pass 2: LAB planes to RGB bytes (torchstain's lab2rgb, then its truncating cast).

/// Writes pixels (as many as the planes are long) from LAB planes, standardised as `v gain + offset`.
fn rgb_bytes(lab: [&[f32]; 3], gain: [f32; 3], offset: [f32; 3], colour: &Colour, out: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    if bleep_core::cpu::cpu().avx512vbmi {
        // SAFETY: the CPU has AVX-512 F, BW and VBMI (and their use was not turned off).
        return unsafe { rgb_bytes_avx512(lab, gain, offset, colour, out) };
    }
    rgb_bytes_portable(lab, gain, offset, colour, out);
}

multiversion! {
    /// The portable pass 2, one pixel at a time.
    fn rgb_bytes_portable(lab: [&[f32]; 3], gain: [f32; 3], offset: [f32; 3], colour: &Colour, out: &mut [u8]) {
        let [l, a, b] = lab;
        for (i, px) in out.chunks_exact_mut(3).enumerate().take(l.len()) {
            let rgb = linear_rgb([l[i], a[i], b[i]], gain, offset, &colour.to_rgb);
            px.copy_from_slice(&rgb.map(|v| colour.levels.level(v)));
        }
    }
}

/// Linear RGB of one pixel's LAB, standardised first.
#[inline(always)]
fn linear_rgb(lab: [f32; 3], gain: [f32; 3], offset: [f32; 3], to_rgb: &[[f32; 3]; 3]) -> [f32; 3] {
    let [l, a, b]: [f32; 3] = std::array::from_fn(|c| lab[c] * gain[c] + offset[c]);
    let y = (l + 16.0) * (1.0 / 116.0);
    let [x, y, z] = [a * 0.002 + y, y, y - b * 0.005].map(lab_f_inv);
    to_rgb.map(|m| m[0] * x + m[1] * y + m[2] * z)
}

/// The inverse of [`lab_f`].
#[inline(always)]
fn lab_f_inv(v: f32) -> f32 {
    if v > 0.2068966 {
        v * v * v
    } else {
        (v - 16.0 / 116.0) * (1.0 / 7.787)
    }
}

// ---- The 8-bit sRGB level of a linear value.

/// torchstain's sRGB encoding and truncating cast: `floor(255 clamp(gamma(x), 0, 1))` with this
/// crate's float32 `exp` and `ln`. The definition of a level; [`Levels`] finds the same by compares.
fn srgb_level(x: f32) -> u8 {
    let curve = 1.055 * exp(ln(x.max(0.0031308)) * (1.0 / 2.4)) - 0.055;
    let value = if x > 0.0031308 { curve } else { x * 12.92 };
    level_byte(255.0 * value.clamp(0.0, 1.0))
}

/// [`srgb_level`] is monotone in x (the tests check every float32 where it is not 0 or 255), so it is
/// the number of its 255 thresholds (the least x of each level 1..=255) at or below x. The thresholds
/// are found once; x is then placed by a table over its top 16 bits (exponent and 7 mantissa bits:
/// 128 buckets an octave, where a level spans at least 1.5 buckets, so no bucket holds two
/// thresholds) and one integer compare of its low 16 bits with the threshold within its bucket.
struct Levels {
    /// Per bucket: the level at its start << 17 | the low 16 bits of the threshold within it
    /// (`NO_THRESHOLD` when none is).
    buckets: [u32; LEVEL_BUCKETS],
}

/// Below LEVEL_LO every value is level 0 (level 1 starts at 3.0e-4); from LEVEL_HI on, level 255 (it
/// starts just above 1.0: 1.055 - 0.055 rounds below 1). Both are powers of 2: bucket boundaries fall
/// on the float's bits.
const LEVEL_LO: f32 = 1.0 / 4096.0;
const LEVEL_HI: f32 = 2.0;
const LEVEL_BUCKETS: usize = ((LEVEL_HI.to_bits() - LEVEL_LO.to_bits()) >> 16) as usize + 1;
const NO_THRESHOLD: u32 = 1 << 16;

impl Levels {
    fn get() -> &'static Levels {
        static LEVELS: OnceLock<Levels> = OnceLock::new();
        LEVELS.get_or_init(Levels::new)
    }

    fn new() -> Levels {
        let mut buckets = [0u32; LEVEL_BUCKETS];
        for (b, entry) in buckets.iter_mut().enumerate() {
            let start = LEVEL_LO.to_bits() + ((b as u32) << 16);
            let base = srgb_level(f32::from_bits(start));
            // The first float of the bucket of a higher level (by bisection: the level is monotone).
            let end = (start + (1 << 16)).min(LEVEL_HI.to_bits() + 1);
            let (mut lo, mut hi) = (start, end);
            while lo < hi {
                let mid = lo + (hi - lo) / 2;
                if srgb_level(f32::from_bits(mid)) > base {
                    hi = mid;
                } else {
                    lo = mid + 1;
                }
            }
            *entry = (u32::from(base) << 17) | if lo < end { lo & 0xFFFF } else { NO_THRESHOLD };
        }
        Levels { buckets }
    }

    /// The level of a linear value, equal to [`srgb_level`].
    #[inline(always)]
    fn level(&self, x: f32) -> u8 {
        // Clamped into the table's range by compares (NaN goes to LEVEL_LO, level 0, as srgb_level
        // gives it).
        let x = if x > LEVEL_LO { x } else { LEVEL_LO };
        let x = if x < LEVEL_HI { x } else { LEVEL_HI };
        let bits = x.to_bits() - LEVEL_LO.to_bits();
        let entry = self.buckets[((bits >> 16) as usize).min(LEVEL_BUCKETS - 1)];
        ((entry >> 17) + u32::from(bits & 0xFFFF >= entry & 0x1FFFF)) as u8
    }
}

// ---- The AVX-512 VBMI passes: the per-pixel functions above, 16 pixels a step.

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{Colour, LEVEL_HI, LEVEL_LO, RCBRT_FIX, RCBRT_MAGIC};
    use std::arch::x86_64::*;

    /// Byte k of 16 RGB pixels' 48 bytes as planes: R in bytes 0..16, G in 16..32, B in 32..48.
    pub(super) fn split_order() -> [u8; 64] {
        std::array::from_fn(|k| {
            if k < 48 {
                ((k % 16) * 3 + k / 16) as u8
            } else {
                0
            }
        })
    }

    /// The inverse of [`split_order`]: three planes of 16 bytes back to 48 interleaved bytes.
    pub(super) fn merge_order() -> [u8; 64] {
        std::array::from_fn(|k| {
            if k < 48 {
                (16 * (k % 3) + k / 3) as u8
            } else {
                0
            }
        })
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(super) fn splat(v: f32) -> __m512 {
        _mm512_set1_ps(v)
    }

    /// `m[0] v[0] + m[1] v[1] + m[2] v[2]`, in that order (no fused multiply-add: the portable
    /// code has none).
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(super) fn dot(m: [f32; 3], v: [__m512; 3]) -> __m512 {
        let (p0, p1, p2) = (
            _mm512_mul_ps(splat(m[0]), v[0]),
            _mm512_mul_ps(splat(m[1]), v[1]),
            _mm512_mul_ps(splat(m[2]), v[2]),
        );
        _mm512_add_ps(_mm512_add_ps(p0, p1), p2)
    }

    /// [`super::lab_f`] on 16 values.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(super) fn lab_f(t: __m512) -> __m512 {
        let (above, root) = (
            _mm512_cmp_ps_mask::<_CMP_GT_OQ>(t, splat(0.008856)),
            cbrt(t),
        );
        // The linear segment (near black) is rare in tissue: computed only when a lane needs it.
        if above == 0xFFFF {
            return root;
        }
        let linear = _mm512_add_ps(_mm512_mul_ps(splat(7.787), t), splat(16.0 / 116.0));
        _mm512_mask_blend_ps(above, linear, root)
    }

    /// [`super::cbrt`] on 16 values (the correction from two registers by the guess's bits 18..23).
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(super) fn cbrt(x: __m512) -> __m512 {
        let bits = _mm512_cvtepi32_ps(_mm512_castps_si512(x));
        let third = _mm512_cvttps_epi32(_mm512_mul_ps(bits, splat(1.0 / 3.0)));
        let guess = _mm512_sub_epi32(_mm512_set1_epi32(RCBRT_MAGIC), third);
        // SAFETY: RCBRT_FIX holds 32 floats.
        let fix = unsafe {
            let p = RCBRT_FIX.as_ptr();
            _mm512_permutex2var_ps(
                _mm512_loadu_ps(p),
                _mm512_srli_epi32::<18>(guess),
                _mm512_loadu_ps(p.add(16)),
            )
        };
        let y = _mm512_mul_ps(_mm512_castsi512_ps(guess), fix);
        let y3 = _mm512_mul_ps(_mm512_mul_ps(y, y), y);
        let e = _mm512_sub_ps(splat(1.0), _mm512_mul_ps(x, y3));
        let poly = _mm512_add_ps(splat(1.0 / 3.0), _mm512_mul_ps(e, splat(2.0 / 9.0)));
        let y = _mm512_add_ps(y, _mm512_mul_ps(_mm512_mul_ps(y, e), poly));
        let y2 = _mm512_mul_ps(y, y);
        let c = _mm512_mul_ps(x, y2);
        let c3 = _mm512_mul_ps(_mm512_mul_ps(c, c), c);
        let step = _mm512_mul_ps(_mm512_mul_ps(_mm512_sub_ps(c3, x), y2), splat(1.0 / 3.0));
        _mm512_sub_ps(c, step)
    }

    /// [`super::lab_f_inv`] on 16 values.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(super) fn lab_f_inv(v: __m512) -> __m512 {
        let cube = _mm512_mul_ps(_mm512_mul_ps(v, v), v);
        let above = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(v, splat(0.2068966));
        // As in lab_f: the linear segment only when a lane needs it.
        if above == 0xFFFF {
            return cube;
        }
        let linear = _mm512_mul_ps(_mm512_sub_ps(v, splat(16.0 / 116.0)), splat(1.0 / 7.787));
        _mm512_mask_blend_ps(above, linear, cube)
    }

    /// [`super::Levels::level`] on 16 values. A gather is slow (a quarter of the transform when every
    /// value took one), so the level is first computed: `255 (1.055 x^(5/12) - 0.055)` from the
    /// exponent (`2^(5e/12)` from a register) and a polynomial in the mantissa, within [`SLACK`] of
    /// the float formula's value (the tests check every float32). Its floor is the level unless it
    /// lies within SLACK of an integer, or x is in the linear segment, tiny or NaN: those (under 1 %)
    /// go through the table.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(super) fn levels(x: __m512, scale: __m512, buckets: &[u32]) -> __m512i {
        // max and min return their second operand when the first is NaN: NaN goes to the knee.
        let knee = splat(0.0031308);
        let xc = _mm512_min_ps(_mm512_max_ps(x, knee), splat(2.0));
        let e = _mm512_cvtps_epi32(_mm512_add_ps(_mm512_getexp_ps(xc), splat(9.0)));
        let m = _mm512_getmant_ps::<_MM_MANT_NORM_1_2, _MM_MANT_SIGN_SRC>(xc);
        let t = _mm512_sub_ps(m, splat(1.5));
        let poly = POLY[..7]
            .iter()
            .rev()
            .fold(splat(POLY[7]), |acc, &c| _mm512_fmadd_ps(acc, t, splat(c)));
        let p = _mm512_fmsub_ps(_mm512_permutexvar_ps(e, scale), poly, splat(255.0 * 0.055));
        let floor = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC }>(p);
        let frac = _mm512_sub_ps(p, floor);
        let unsure = _mm512_cmp_ps_mask::<_CMP_LE_OQ>(xc, knee)
            | _mm512_cmp_ps_mask::<_CMP_LT_OQ>(frac, splat(SLACK))
            | _mm512_cmp_ps_mask::<_CMP_GT_OQ>(frac, splat(1.0 - SLACK));
        let level = _mm512_min_epi32(_mm512_cvttps_epi32(floor), _mm512_set1_epi32(255));
        if unsure == 0 {
            return level;
        }
        _mm512_mask_blend_epi32(unsure, level, table_levels(x, buckets))
    }

    /// `m^(5/12)` on [1, 2) as a polynomial in `m - 1.5` (a Chebyshev fit, within 2e-7).
    const POLY: [f32; 8] = [
        1.184_053_7,
        0.328_903_73,
        -0.063_955_99,
        0.022_504_93,
        -0.009_634_767,
        0.004_586_605_4,
        -0.002_716_104_3,
        0.001_485_560_3,
    ];

    /// How close to an integer a computed level may come before the table decides (the computed one
    /// is within 1/16384 of the formula: a tighter slack fails the exhaustive test).
    const SLACK: f32 = 1.0 / 8192.0;

    /// `255 1.055 2^(5e/12)` for the exponents e = -9 (the knee, 0.0031308, is above 2^-9) to 1,
    /// at index e + 9.
    pub(super) fn level_scale() -> [f32; 16] {
        std::array::from_fn(|i| (255.0 * 1.055 * 2f64.powf(5.0 * (i as f64 - 9.0) / 12.0)) as f32)
    }

    /// [`super::Levels::level`] on 16 values by one gather from the bucket table.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(super) fn table_levels(x: __m512, buckets: &[u32]) -> __m512i {
        // max and min return their second operand when the first is NaN: NaN goes to LEVEL_LO.
        let x = _mm512_min_ps(_mm512_max_ps(x, splat(LEVEL_LO)), splat(LEVEL_HI));
        let bits = _mm512_sub_epi32(
            _mm512_castps_si512(x),
            _mm512_set1_epi32(LEVEL_LO.to_bits() as i32),
        );
        // SAFETY: bits >> 16 is at most the last bucket's index (x <= LEVEL_HI).
        let entry = unsafe {
            _mm512_i32gather_epi32::<4>(_mm512_srli_epi32::<16>(bits), buckets.as_ptr().cast())
        };
        let low = _mm512_and_si512(bits, _mm512_set1_epi32(0xFFFF));
        let threshold = _mm512_and_si512(entry, _mm512_set1_epi32(0x1FFFF));
        let up = _mm512_cmpge_epu32_mask(low, threshold);
        let base = _mm512_srli_epi32::<17>(entry);
        _mm512_mask_add_epi32(base, up, base, _mm512_set1_epi32(1))
    }

    /// Pass 1 on the first multiple of 16 pixels; returns how many it did.
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
    pub(super) fn lab_planes(pixels: &[u8], colour: &Colour, lab: &mut [&mut [f32]; 3]) -> usize {
        let split = split_order();
        // SAFETY: split is 64 bytes.
        let split = unsafe { _mm512_loadu_si512(split.as_ptr().cast()) };
        let steps = lab[0].len().min(pixels.len() / 3) / 16;
        for s in 0..steps {
            // SAFETY: pixels 16 s .. 16 s + 16 are in bounds (the mask reads 48 bytes).
            let bytes = unsafe {
                _mm512_maskz_loadu_epi8(0xFFFF_FFFF_FFFF, pixels.as_ptr().add(48 * s).cast())
            };
            let planes = _mm512_permutexvar_epi8(split, bytes);
            let channels = [
                _mm512_castsi512_si128(planes),
                _mm512_extracti32x4_epi32::<1>(planes),
                _mm512_extracti32x4_epi32::<2>(planes),
            ];
            // SAFETY: the indices are bytes, the table has 256 entries.
            let rgb = channels.map(|c| unsafe {
                _mm512_i32gather_ps::<4>(_mm512_cvtepu8_epi32(c), colour.linear.as_ptr())
            });
            let [x, y, z] = colour.to_xyz.map(|m| lab_f(dot(m, rgb)));
            let values = [
                _mm512_sub_ps(_mm512_mul_ps(splat(116.0), y), splat(16.0)),
                _mm512_mul_ps(splat(500.0), _mm512_sub_ps(x, y)),
                _mm512_mul_ps(splat(200.0), _mm512_sub_ps(y, z)),
            ];
            for (plane, v) in lab.iter_mut().zip(values) {
                // SAFETY: 16 s + 16 <= the plane's length.
                unsafe { _mm512_storeu_ps(plane.as_mut_ptr().add(16 * s), v) };
            }
        }
        16 * steps
    }

    /// Pass 2 on the first multiple of 16 pixels; returns how many it did.
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
    pub(super) fn rgb_bytes(
        lab: [&[f32]; 3],
        gain: [f32; 3],
        offset: [f32; 3],
        colour: &Colour,
        out: &mut [u8],
    ) -> usize {
        let (merge, scale) = (merge_order(), level_scale());
        // SAFETY: merge is 64 bytes, scale 16 floats.
        let (merge, scale) = unsafe {
            (
                _mm512_loadu_si512(merge.as_ptr().cast()),
                _mm512_loadu_ps(scale.as_ptr()),
            )
        };
        let steps = lab[0].len().min(out.len() / 3) / 16;
        for s in 0..steps {
            // SAFETY: 16 s + 16 <= every plane's length.
            let v: [__m512; 3] =
                std::array::from_fn(|c| unsafe { _mm512_loadu_ps(lab[c].as_ptr().add(16 * s)) });
            let [l, a, b]: [__m512; 3] = std::array::from_fn(|c| {
                _mm512_add_ps(_mm512_mul_ps(v[c], splat(gain[c])), splat(offset[c]))
            });
            let y = _mm512_mul_ps(_mm512_add_ps(l, splat(16.0)), splat(1.0 / 116.0));
            let xyz = [
                _mm512_add_ps(_mm512_mul_ps(a, splat(0.002)), y),
                y,
                _mm512_sub_ps(y, _mm512_mul_ps(b, splat(0.005))),
            ]
            .map(|v| lab_f_inv(v));
            let [r, g, b] = colour
                .to_rgb
                .map(|m| _mm512_cvtepi32_epi8(levels(dot(m, xyz), scale, &colour.levels.buckets)));
            let planes =
                _mm512_inserti32x4::<2>(_mm512_inserti32x4::<1>(_mm512_castsi128_si512(r), g), b);
            let bytes = _mm512_permutexvar_epi8(merge, planes);
            // SAFETY: pixels 16 s .. 16 s + 16 are in bounds (the mask writes 48 bytes).
            unsafe {
                _mm512_mask_storeu_epi8(
                    out.as_mut_ptr().add(48 * s).cast(),
                    0xFFFF_FFFF_FFFF,
                    bytes,
                )
            };
        }
        16 * steps
    }
}

/// Pass 1: the vector steps, then the portable code on the last pixels.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
fn lab_planes_avx512(pixels: &[u8], colour: &Colour, mut lab: [&mut [f32]; 3]) {
    let done = avx512::lab_planes(pixels, colour, &mut lab);
    let [l, a, b] = lab;
    lab_planes_portable(
        &pixels[3 * done..],
        colour,
        [&mut l[done..], &mut a[done..], &mut b[done..]],
    );
}

/// Pass 2: the vector steps, then the portable code on the last pixels.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
fn rgb_bytes_avx512(
    lab: [&[f32]; 3],
    gain: [f32; 3],
    offset: [f32; 3],
    colour: &Colour,
    out: &mut [u8],
) {
    let done = avx512::rgb_bytes(lab, gain, offset, colour, out);
    rgb_bytes_portable(
        lab.map(|p| &p[done..]),
        gain,
        offset,
        colour,
        &mut out[3 * done..],
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cbrt_is_within_one_ulp() {
        // Every float where lab_f takes the cube root (of a colour) in release builds.
        let step = if cfg!(debug_assertions) { 997 } else { 1 };
        for x in (0.008856f32.to_bits()..=1.2f32.to_bits())
            .step_by(step)
            .map(f32::from_bits)
        {
            let (got, want) = (cbrt(x) as f64, (x as f64).cbrt());
            assert!((got - want).abs() <= f32::EPSILON as f64 * want, "{x}");
        }
    }

    /// The table gives srgb_level's level for every float32 from LEVEL_LO to 2 LEVEL_HI (this also
    /// shows srgb_level monotone there, which the table assumes), and beyond, the constant levels the
    /// clamps give.
    #[test]
    fn the_level_table_equals_the_formula_on_every_float() {
        let levels = Levels::get();
        // Every float in release builds, every 61st in debug ones (30x slower).
        let step = if cfg!(debug_assertions) { 61 } else { 1 };
        let mismatches = (LEVEL_LO.to_bits()..=(2.0 * LEVEL_HI).to_bits())
            .step_by(step)
            .map(f32::from_bits)
            .filter(|&x| levels.level(x) != srgb_level(x))
            .count();
        assert_eq!(mismatches, 0);
        for x in [
            0.0,
            -0.0,
            1e-30,
            3.0e-4,
            -1.0,
            3.0,
            1e30,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
        ] {
            assert_eq!(levels.level(x), srgb_level(x), "{x}");
        }
        assert_eq!([srgb_level(LEVEL_LO), srgb_level(LEVEL_HI)], [0, 255]);
    }

    /// The vector level (computed, or from the table where that is unsure) equals the table's on
    /// every float32 from LEVEL_LO / 2 to 2 LEVEL_HI, and on values beyond.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_vector_levels_equal_the_table_on_every_float() {
        use std::arch::x86_64::*;
        if !bleep_core::cpu::cpu().avx512vbmi {
            return;
        }
        let (levels, scale) = (Levels::get(), avx512::level_scale());
        let step = if cfg!(debug_assertions) { 61 } else { 1 };
        let floats = ((LEVEL_LO / 2.0).to_bits()..=(2.0 * LEVEL_HI).to_bits()).step_by(step);
        let specials = [
            0.0,
            -0.0,
            -1.0,
            1e-40,
            0.0031308,
            3.0,
            1e30,
            f32::INFINITY,
            f32::NAN,
        ];
        let xs: Vec<f32> = floats.map(f32::from_bits).chain(specials).collect();
        let mut wrong = 0;
        for chunk in xs.chunks(16) {
            let mut x = [0f32; 16];
            x[..chunk.len()].copy_from_slice(chunk);
            let mut got = [0i32; 16];
            // SAFETY: the CPU has AVX-512; the arrays hold 16 values.
            unsafe {
                let v = avx512::levels(
                    _mm512_loadu_ps(x.as_ptr()),
                    _mm512_loadu_ps(scale.as_ptr()),
                    &levels.buckets,
                );
                _mm512_storeu_si512(got.as_mut_ptr().cast(), v);
            }
            wrong += x
                .iter()
                .zip(got)
                .filter(|&(&x, g)| g != i32::from(levels.level(x)))
                .count();
        }
        assert_eq!(wrong, 0);
    }

    #[test]
    fn a_uniform_patch_stays_uniform() {
        let (flat, mut out) = (vec![200u8; 8 * 8 * 3], vec![0u8; 8 * 8 * 3]);
        let target =
            reinhard_fit(&(0..192).map(|v| v as u8).collect::<Vec<_>>(), &[64, 3]).unwrap();
        let stats: Vec<f32> = target.iter().flatten().copied().collect();
        reinhard_transform(&flat, &[1, 8, 8, 3], Matrix::new(&stats, 3, 2), &mut out).unwrap();
        assert!(out.chunks_exact(3).all(|p| p == &out[..3]));
        let short = reinhard_transform(
            &flat,
            &[1, 8, 8, 3],
            Matrix::new(&stats, 3, 2),
            &mut out[1..],
        );
        assert!(short.unwrap_err().to_string().contains("out must hold"));
    }

    /// The vector passes give the portable passes' bytes, on every 8-bit colour and on LAB values far
    /// outside the gamut (clamped to 0 and 255).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_vector_passes_equal_the_portable_ones() {
        if !bleep_core::cpu::cpu().avx512vbmi {
            return;
        }
        let colour = Colour::new();
        // Colours spread over the cube by a multiplicative hash; not a multiple of 16 pixels.
        let n = 100_003;
        let pixels: Vec<u8> = (0..n as u32)
            .flat_map(|i| i.wrapping_mul(2_654_435_761).to_le_bytes()[..3].to_vec())
            .collect();
        let pixels = &pixels[..];
        let mut fast = [vec![0f32; n], vec![0f32; n], vec![0f32; n]];
        let mut slow = fast.clone();
        let [a, b, c] = &mut fast;
        // SAFETY: the CPU has VBMI.
        unsafe { lab_planes_avx512(pixels, &colour, [&mut a[..], &mut b[..], &mut c[..]]) };
        let [a, b, c] = &mut slow;
        lab_planes_portable(pixels, &colour, [&mut a[..], &mut b[..], &mut c[..]]);
        assert!(fast
            .iter()
            .zip(&slow)
            .all(|(f, s)| f.iter().zip(s).all(|(x, y)| x.to_bits() == y.to_bits())));
        for (gain, offset) in [
            ([1.0; 3], [0.0; 3]),
            ([3.0, 4.0, 4.0], [-120.0, 10.0, -30.0]),
        ] {
            let (mut fast_out, mut slow_out) = (vec![0u8; 3 * n], vec![0u8; 3 * n]);
            let planes = [&slow[0][..], &slow[1][..], &slow[2][..]];
            // SAFETY: the CPU has VBMI.
            unsafe { rgb_bytes_avx512(planes, gain, offset, &colour, &mut fast_out) };
            rgb_bytes_portable(planes, gain, offset, &colour, &mut slow_out);
            assert!(fast_out == slow_out);
        }
    }
}
