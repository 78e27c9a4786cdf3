//! Tissue detection on a thumbnail, as CLAM does it: HSV saturation, median blur, Otsu's threshold,
//! morphological closing; then the grid of tiles whose footprint holds enough tissue.

use crate::shape;
use bleep_core::{memory, Error, Result};
use rayon::prelude::*;

/// A binary tissue mask (1 = tissue) over a thumbnail of `width x height` px.
pub struct Mask {
    /// `height x width` values, 0 or 1, row-major.
    pub pixels: Vec<u8>,
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// The saturation threshold Otsu's method chose.
    pub threshold: u8,
}

impl Mask {
    /// A mask given as `(height, width)` values (any non-zero value is tissue).
    pub fn from_shape(pixels: &[u8], shape: &[usize]) -> Result<Mask> {
        match shape {
            [h, w] if h.checked_mul(*w) == Some(pixels.len()) => Ok(Mask {
                pixels: pixels.iter().map(|&v| u8::from(v != 0)).collect(),
                width: *w,
                height: *h,
                threshold: 0,
            }),
            _ => Err(Error::invalid(format!(
                "a tissue mask is an (h, w) array, got shape {shape:?} holding {} values",
                pixels.len()
            ))),
        }
    }
}

/// HSV saturation as OpenCV computes it for 8-bit RGB: `255 * (max - min) / max`, rounded.
fn saturation(rgb: &[u8]) -> Vec<u8> {
    rgb.par_chunks_exact(3)
        .map(|p| {
            let (hi, lo) = (
                p[0].max(p[1]).max(p[2]) as u32,
                p[0].min(p[1]).min(p[2]) as u32,
            );
            (255 * (hi - lo) + hi / 2).checked_div(hi).unwrap_or(0) as u8
        })
        .collect()
}

/// Median over a `k x k` window (k odd), edges replicated, by a running histogram along each row.
fn median_blur(img: &[u8], width: usize, height: usize, k: usize) -> Vec<u8> {
    let r = k / 2;
    let half = (k * k / 2) as u32;
    let mut out = vec![0u8; width * height];
    out.par_chunks_mut(width.max(1))
        .enumerate()
        .for_each(|(y, row)| {
            // The window's rows, edges replicated; columns are clamped once per step below.
            let lines: Vec<&[u8]> = (0..k)
                .map(|i| (y + i).saturating_sub(r).min(height - 1))
                .map(|yy| &img[yy * width..(yy + 1) * width])
                .collect();
            let column = |x: isize| x.clamp(0, width as isize - 1) as usize;
            let mut hist = [0u32; 256];
            for line in &lines {
                for dx in -(r as isize)..=r as isize {
                    hist[line[column(dx)] as usize] += 1;
                }
            }
            // The median m and the count of values below it, kept as the window slides (Huang's
            // method): each step moves m by as many levels as the values changed, not from level 0.
            let (mut m, mut below) = (0usize, 0u32);
            for (x, out) in row.iter_mut().enumerate() {
                if x > 0 {
                    let (gone, come) = (
                        column(x as isize - r as isize - 1),
                        column((x + r) as isize),
                    );
                    for line in &lines {
                        let (old, new) = (line[gone] as usize, line[come] as usize);
                        hist[old] -= 1;
                        hist[new] += 1;
                        below = below - u32::from(old < m) + u32::from(new < m);
                    }
                }
                // The smallest m with more than half of the window at or below it.
                while below > half {
                    m -= 1;
                    below -= hist[m];
                }
                while below + hist[m] <= half {
                    below += hist[m];
                    m += 1;
                }
                *out = m as u8;
            }
        });
    out
}

#[allow(clippy::needless_range_loop)] // t is both the level and the index
/// Otsu's threshold of an 8-bit image: the level that maximises the between-class variance (pixels
/// above it are foreground), as OpenCV's `THRESH_OTSU`.
fn otsu(img: &[u8]) -> u8 {
    let mut hist = [0f64; 256];
    for &v in img {
        hist[v as usize] += 1.0;
    }
    let total = img.len() as f64;
    let sum: f64 = hist.iter().enumerate().map(|(i, &h)| i as f64 * h).sum();
    let (mut w0, mut sum0, mut best, mut best_var) = (0.0, 0.0, 0u8, -1.0);
    for t in 0..256 {
        w0 += hist[t];
        sum0 += t as f64 * hist[t];
        let w1 = total - w0;
        if w0 == 0.0 || w1 == 0.0 {
            continue;
        }
        let (m0, m1) = (sum0 / w0, (sum - sum0) / w1);
        let var = w0 * w1 * (m0 - m1) * (m0 - m1);
        if var > best_var {
            best_var = var;
            best = t as u8;
        }
    }
    best
}

/// A `k x k` square dilation (max) or erosion (min) of a binary (0/1) image, separably; pixels outside
/// the image are left out of the window. Each line pass counts the window's ones (dilation) or zeros
/// (erosion) from prefix sums: linear time whatever `k`, and a window wider than the image simply
/// covers all of it.
fn morph(img: &[u8], width: usize, height: usize, k: usize, dilate: bool) -> Vec<u8> {
    let (lo, hi) = (k / 2, k - 1 - k / 2);
    // Output line `out` from input line `line` (both `len` values `step` apart).
    let pass_line = |get: &dyn Fn(usize) -> u8, len: usize, put: &mut dyn FnMut(usize, u8)| {
        let mut prefix = vec![0u32; len + 1];
        for i in 0..len {
            let hit = u32::from((get(i) == 1) == dilate);
            prefix[i + 1] = prefix[i] + hit;
        }
        for i in 0..len {
            let (a, b) = (i.saturating_sub(lo), i.saturating_add(hi).min(len - 1));
            let any = prefix[b + 1] > prefix[a];
            put(i, u8::from(any == dilate));
        }
    };
    let mut rows = vec![0u8; width * height];
    rows.par_chunks_mut(width).enumerate().for_each(|(y, out)| {
        let line = &img[y * width..(y + 1) * width];
        pass_line(&|x| line[x], width, &mut |x, v| out[x] = v);
    });
    let mut cols = vec![0u8; width * height];
    let mut column = Vec::new();
    for x in 0..width {
        column.clear();
        pass_line(&|y| rows[y * width + x], height, &mut |_, v| column.push(v));
        for (y, &v) in column.iter().enumerate() {
            cols[y * width + x] = v;
        }
    }
    cols
}

/// The tissue mask of an RGB thumbnail of shape `(h, w, 3)`: saturation, `median` px median blur,
/// Otsu, `close` px closing.
///
/// `median` may be at most the thumbnail's shorter side (a larger window is not a blur of this image,
/// and its cost grows with the window); `close` may be any size (a window wider than the thumbnail
/// covers all of it).
pub fn tissue_mask(rgb: &[u8], shape: &[usize], median: usize, close: usize) -> Result<Mask> {
    let (height, width) = shape::image(shape, rgb.len(), "the thumbnail")?;
    if median > 1 && median > width.min(height) {
        return Err(Error::invalid(format!(
            "median={median} px is larger than the thumbnail ({width} x {height} px): use a window of at \
             most {} px (CLAM uses 7)",
            width.min(height)
        )));
    }
    let sat = saturation(rgb);
    let blurred = if median > 1 {
        median_blur(&sat, width, height, median | 1)
    } else {
        sat
    };
    let threshold = otsu(&blurred);
    let mut pixels: Vec<u8> = blurred.iter().map(|&v| u8::from(v > threshold)).collect();
    if close > 1 {
        pixels = morph(
            &morph(&pixels, width, height, close, true),
            width,
            height,
            close,
            false,
        );
    }
    Ok(Mask {
        pixels,
        width,
        height,
        threshold,
    })
}

/// Top-left corners (level-0 px) of the tiles of a grid with step `tile` level-0 px over a
/// `width x height` slide whose mask covers at least `min_tissue` of the tile. `mask_scale`: level-0 px
/// per mask px. Row-major order.
///
/// A tile smaller than one level-0 pixel is refused: it comes from a pixel size or a tile (bin) size
/// off by orders of magnitude, and its grid would hold billions of tiles.
pub fn tissue_grid(
    mask: &Mask,
    mask_scale: f64,
    width: usize,
    height: usize,
    tile: f64,
    min_tissue: f64,
) -> Result<Vec<(f64, f64)>> {
    if !(tile.is_finite() && tile > 0.0) {
        return Err(Error::invalid(format!(
            "the tile size must be a positive number of level-0 px, not {tile}"
        )));
    }
    if tile < 1.0 {
        return Err(Error::invalid(format!(
            "a grid tile of {tile:.3e} level-0 px is smaller than one pixel of the slide: check the \
             slide's um_per_px and the tile (or bin) size and its um_per_px"
        )));
    }
    if !(mask_scale.is_finite() && mask_scale > 0.0 && min_tissue.is_finite()) {
        return Err(Error::invalid(format!(
            "mask_scale ({mask_scale}) must be positive and min_tissue ({min_tissue}) a number"
        )));
    }
    // Saturating: an absurd count fails the size check below.
    let count_of = |extent: usize| (extent as f64 / tile).ceil() as usize;
    let (cols, rows) = (count_of(width), count_of(height));
    memory::bytes(
        &[cols, rows, 16],
        &format!("a grid of {cols} x {rows} tiles"),
        "use larger tiles",
    )?;
    let (mw, mh) = (mask.width, mask.height);
    if mw.checked_mul(mh) != Some(mask.pixels.len()) {
        return Err(Error::invalid("the mask's pixels do not match its size"));
    }
    // Integral image: tissue pixels in any rectangle in O(1).
    let mut integral = vec![0u32; (mw + 1) * (mh + 1)];
    for y in 0..mh {
        let mut row = 0u32;
        for x in 0..mw {
            row += mask.pixels[y * mw + x] as u32;
            integral[(y + 1) * (mw + 1) + x + 1] = integral[y * (mw + 1) + x + 1] + row;
        }
    }
    let count = |x0: usize, y0: usize, x1: usize, y1: usize| {
        integral[y1 * (mw + 1) + x1] + integral[y0 * (mw + 1) + x0]
            - integral[y0 * (mw + 1) + x1]
            - integral[y1 * (mw + 1) + x0]
    };
    let mut out = Vec::new();
    for j in 0..rows {
        for i in 0..cols {
            let (x, y) = (i as f64 * tile, j as f64 * tile);
            // A tile is the patch centred on it: its centre must lie on the slide (with a low
            // min_tissue an edge tile mostly past the edge would otherwise qualify).
            if x + tile / 2.0 >= width as f64 || y + tile / 2.0 >= height as f64 {
                continue;
            }
            let to_mask = |v: f64, limit: usize| ((v / mask_scale).round() as usize).min(limit);
            let (x0, y0) = (to_mask(x, mw), to_mask(y, mh));
            let (x1, y1) = (
                to_mask(x + tile, mw).max(x0 + 1).min(mw),
                to_mask(y + tile, mh).max(y0 + 1).min(mh),
            );
            if x1 <= x0 || y1 <= y0 {
                continue;
            }
            // The part of the footprint past the slide's edge counts as background.
            let footprint = ((tile / mask_scale).powi(2)).max(1.0);
            if count(x0, y0, x1, y1) as f64 >= min_tissue * footprint {
                // Grown fallibly: the count was checked against the budget, not the doubling.
                out.try_reserve(1).map_err(|_| {
                    Error::invalid(format!(
                        "a grid of {cols} x {rows} tiles cannot be allocated: use larger tiles"
                    ))
                })?;
                out.push((x, y));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The textbook filter: the max (or min) over the in-image part of each window.
    fn naive_morph(img: &[u8], width: usize, height: usize, k: usize, dilate: bool) -> Vec<u8> {
        let (lo, hi) = ((k / 2) as i64, (k - 1 - k / 2) as i64);
        let pass = |src: &[u8], horizontal: bool| -> Vec<u8> {
            let mut out = vec![0u8; width * height];
            for y in 0..height as i64 {
                for x in 0..width as i64 {
                    let mut v = u8::from(!dilate);
                    for d in -lo..=hi {
                        let (xx, yy) = if horizontal { (x + d, y) } else { (x, y + d) };
                        if xx >= 0 && yy >= 0 && xx < width as i64 && yy < height as i64 {
                            let s = src[yy as usize * width + xx as usize];
                            v = if dilate { v.max(s) } else { v.min(s) };
                        }
                    }
                    out[y as usize * width + x as usize] = v;
                }
            }
            out
        };
        pass(&pass(img, true), false)
    }

    /// The textbook median: the window's values (edges replicated) sorted, the middle one.
    fn naive_median(img: &[u8], width: usize, height: usize, k: usize) -> Vec<u8> {
        let r = (k / 2) as i64;
        let at = |x: i64, y: i64| {
            img[y.clamp(0, height as i64 - 1) as usize * width
                + x.clamp(0, width as i64 - 1) as usize]
        };
        (0..height as i64)
            .flat_map(|y| (0..width as i64).map(move |x| (x, y)))
            .map(|(x, y)| {
                let mut w: Vec<u8> = (-r..=r)
                    .flat_map(|dy| (-r..=r).map(move |dx| (dx, dy)))
                    .map(|(dx, dy)| at(x + dx, y + dy))
                    .collect();
                w.sort_unstable();
                w[w.len() / 2]
            })
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn median_blur_matches_the_textbook_median(
            width in 1usize..40, height in 1usize..12, half in 0usize..5, levels in 1u64..256, seed in any::<u64>(),
        ) {
            // Few levels give ties; many give medians that jump far as the window slides.
            let mut s = seed;
            let img: Vec<u8> = (0..width * height)
                .map(|_| { s = s.wrapping_mul(6364136223846793005).wrapping_add(1); ((s >> 33) % levels) as u8 })
                .collect();
            let k = 2 * half + 1;
            prop_assert_eq!(median_blur(&img, width, height, k), naive_median(&img, width, height, k));
        }

        #[test]
        fn morphology_matches_the_textbook_filter(
            width in 1usize..30, height in 1usize..30, k in 1usize..70, seed in any::<u64>(), dilate in any::<bool>(),
        ) {
            let mut s = seed;
            let img: Vec<u8> = (0..width * height)
                .map(|_| { s = s.wrapping_mul(6364136223846793005).wrapping_add(1); ((s >> 40) & 1) as u8 })
                .collect();
            prop_assert_eq!(morph(&img, width, height, k, dilate), naive_morph(&img, width, height, k, dilate));
        }
    }

    #[test]
    fn bad_parameters_are_errors() {
        let rgb = vec![100u8; 20 * 10 * 3];
        let e = tissue_mask(&rgb, &[10, 20, 3], 11, 4)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("median=11 px is larger than the thumbnail"),
            "{e}"
        );
        assert!(tissue_mask(&rgb, &[10, 20, 3], 7, 1_000_000_000).is_ok());
        assert!(tissue_mask(&rgb, &[0, 20, 3], 7, 4).is_err());
        let mask = Mask::from_shape(&[1; 100], &[10, 10]).unwrap();
        for tile in [0.0, -1.0, f64::NAN, 1e-300] {
            assert!(
                tissue_grid(&mask, 1.0, 100, 100, tile, 0.5).is_err(),
                "{tile}"
            );
        }
        assert_eq!(
            tissue_grid(&mask, 10.0, 100, 100, 50.0, 0.5).unwrap().len(),
            4
        );
    }
}
