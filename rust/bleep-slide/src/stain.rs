//! Colour normalisation of RGB patches: Macenko and Reinhard stain normalisation, transcribed from
//! torchstain's torch backend (float32, the same percentile and rounding rules), and the per-channel
//! mean/std conversion of uint8 HWC patches into the float32 CHW tensors encoders take.
//!
//! Patches are `n` contiguous `h x w x 3` uint8 images; every function works on a batch in parallel.

mod macenko;
mod reinhard;

use crate::shape;
use bleep_core::{Error, Result};
use rayon::prelude::*;

pub use macenko::{macenko_fit, macenko_transform, macenko_transform_into, MacenkoParams, Stains};
pub use reinhard::{reinhard_fit, reinhard_transform, LabStats};

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
    use bleep_core::Matrix;

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
