//! Resampling of RGB images between pixel sizes. Shrinking uses the area filter (each output pixel is
//! the average of the source area it covers, with exact fractional overlaps, as OpenCV's `INTER_AREA`);
//! enlarging uses bilinear interpolation between pixel centres. Both are separable: a horizontal pass
//! over each source row ([`Taps::row`]), then a vertical pass over those rows ([`Taps::column`]), so a
//! large source can be resampled band by band ([`crate::Slide::thumbnail`]).

use rayon::prelude::*;

/// For each output pixel along one axis: the first source pixel and its weights.
pub struct Taps {
    first: Vec<usize>,
    weights: Vec<Vec<f32>>,
    src: usize,
}

impl Taps {
    /// Taps for `out` pixels taken from `src` (at least 1) source pixels, `scale` source pixels per
    /// output pixel.
    pub fn new(out: usize, src: usize, scale: f64) -> Taps {
        assert!(src > 0, "resampling needs a source pixel");
        let mut first = Vec::with_capacity(out);
        let mut weights = Vec::with_capacity(out);
        for i in 0..out {
            if scale >= 1.0 {
                let (lo, hi) = (i as f64 * scale, (i + 1) as f64 * scale);
                let j0 = lo.floor() as usize;
                let j1 = (hi.ceil() as usize).min(src).max(j0 + 1);
                let w = (j0..j1)
                    .map(|j| ((hi.min(j as f64 + 1.0) - lo.max(j as f64)).max(0.0) / scale) as f32)
                    .collect();
                first.push(j0.min(src - 1));
                weights.push(w);
            } else {
                let centre = ((i as f64 + 0.5) * scale - 0.5).max(0.0);
                let j0 = (centre.floor() as usize).min(src - 1);
                let f = (centre - j0 as f64) as f32;
                if j0 + 1 < src {
                    weights.push(vec![1.0 - f, f]);
                } else {
                    weights.push(vec![1.0]);
                }
                first.push(j0);
            }
        }
        Taps {
            first,
            weights,
            src,
        }
    }

    /// The source pixels output pixel `i` reads: `(first, last)`, inclusive.
    pub fn span(&self, i: usize) -> (usize, usize) {
        let last = self.first[i] + self.weights[i].len() - 1;
        (self.first[i].min(self.src - 1), last.min(self.src - 1))
    }

    /// The horizontal pass of one source row (`src * 3` bytes) into `out` (`outputs * 3` floats).
    pub fn row(&self, line: &[u8], out: &mut [f32]) {
        let sw = self.src;
        for (x, o) in out.chunks_exact_mut(3).enumerate() {
            let mut acc = [0f32; 3];
            for (t, &w) in self.weights[x].iter().enumerate() {
                let p = &line[(self.first[x] + t).min(sw - 1) * 3..][..3];
                for c in 0..3 {
                    acc[c] += w * p[c] as f32;
                }
            }
            o.copy_from_slice(&acc);
        }
    }

    /// The vertical pass for output row `y`: `rows(r)` gives the horizontal pass of source row r.
    pub fn column<'a>(&self, y: usize, rows: impl Fn(usize) -> &'a [f32], out: &mut [u8]) {
        let mut acc = vec![0f32; out.len()];
        for (t, &w) in self.weights[y].iter().enumerate() {
            let row = rows((self.first[y] + t).min(self.src - 1));
            for (a, &v) in acc.iter_mut().zip(row) {
                *a += w * v;
            }
        }
        for (o, a) in out.iter_mut().zip(acc) {
            *o = a.round().clamp(0.0, 255.0) as u8;
        }
    }
}

/// Resamples an RGB image of `sw x sh` into `dw x dh` (`dst`, `dw * dh * 3` bytes), mapping `scale_x` /
/// `scale_y` source pixels onto one output pixel (from the top-left corner). The source must cover the
/// output's footprint.
#[allow(clippy::too_many_arguments)]
pub fn resample_into(
    src: &[u8],
    sw: usize,
    sh: usize,
    dw: usize,
    dh: usize,
    scale_x: f64,
    scale_y: f64,
    dst: &mut [u8],
) {
    if sw == dw && sh == dh && scale_x == 1.0 && scale_y == 1.0 {
        dst.copy_from_slice(src);
        return;
    }
    let (tx, ty) = (Taps::new(dw, sw, scale_x), Taps::new(dh, sh, scale_y));
    // Rows in parallel (a patch is small and runs on one thread of a batch).
    let mut rows = vec![0f32; sh * dw * 3];
    rows.par_chunks_mut(dw * 3)
        .enumerate()
        .with_min_len(16)
        .for_each(|(y, out)| tx.row(&src[y * sw * 3..(y + 1) * sw * 3], out));
    let rows = &rows;
    dst.par_chunks_mut(dw * 3)
        .enumerate()
        .with_min_len(16)
        .for_each(|(y, out)| ty.column(y, |r| &rows[r * dw * 3..(r + 1) * dw * 3], out));
}

/// How many source pixels an output of `out` pixels at `scale` reads (bilinear needs one more), or
/// None when that is beyond any image.
pub fn footprint(out: usize, scale: f64) -> Option<usize> {
    let base = (out as f64 * scale - 1e-9).ceil();
    if base.is_nan() || base >= (1u64 << 52) as f64 {
        return None;
    }
    let base = base as usize;
    Some(if scale < 1.0 { base + 1 } else { base.max(1) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resample(src: &[u8], sw: usize, sh: usize, dw: usize, dh: usize, s: f64) -> Vec<u8> {
        let mut dst = vec![0u8; dh * dw * 3];
        resample_into(src, sw, sh, dw, dh, s, s, &mut dst);
        dst
    }

    #[test]
    fn identity_is_a_copy_and_halving_averages_pairs() {
        let src: Vec<u8> = (0..4 * 4 * 3).map(|v| v as u8).collect();
        assert_eq!(resample(&src, 4, 4, 4, 4, 1.0), src);
        let half = resample(&src, 4, 4, 2, 2, 2.0);
        // Output (0, 0) red = mean of source (0,0), (1,0), (0,1), (1,1) red = (0 + 3 + 12 + 15) / 4.
        assert_eq!(half[0], 8);
        let constant = vec![77u8; 10 * 10 * 3];
        assert!(resample(&constant, 10, 10, 7, 7, 10.0 / 7.0)
            .iter()
            .all(|&v| v == 77));
        assert!(resample(&constant, 10, 10, 23, 23, 0.4)
            .iter()
            .all(|&v| v == 77));
        assert_eq!(footprint(224, 1e300), None);
        assert_eq!(footprint(224, 2.0), Some(448));
    }
}
