//! Tissue detection on a thumbnail, as CLAM does it: HSV saturation, median blur, Otsu's threshold,
//! morphological closing; then the grid of tiles whose footprint holds enough tissue.

use rayon::prelude::*;

/// A binary tissue mask (1 = tissue) over a thumbnail of `width x height` px.
pub struct Mask {
    pub pixels: Vec<u8>,
    pub width: usize,
    pub height: usize,
    /// The saturation threshold Otsu's method chose.
    pub threshold: u8,
}

/// HSV saturation as OpenCV computes it for 8-bit RGB: `255 * (max - min) / max`, rounded.
pub fn saturation(rgb: &[u8]) -> Vec<u8> {
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
pub fn median_blur(img: &[u8], width: usize, height: usize, k: usize) -> Vec<u8> {
    let r = (k / 2) as i64;
    let at = |x: i64, y: i64| {
        img[y.clamp(0, height as i64 - 1) as usize * width + x.clamp(0, width as i64 - 1) as usize]
    };
    let half = (k * k / 2) as u32;
    let mut out = vec![0u8; width * height];
    out.par_chunks_mut(width.max(1))
        .enumerate()
        .for_each(|(y, row)| {
            let y = y as i64;
            let mut hist = [0u32; 256];
            for dy in -r..=r {
                for dx in -r..=r {
                    hist[at(dx, y + dy) as usize] += 1;
                }
            }
            for x in 0..width as i64 {
                if x > 0 {
                    for dy in -r..=r {
                        hist[at(x - r - 1, y + dy) as usize] -= 1;
                        hist[at(x + r, y + dy) as usize] += 1;
                    }
                }
                let (mut seen, mut v) = (0u32, 0usize);
                while seen + hist[v] <= half {
                    seen += hist[v];
                    v += 1;
                }
                row[x as usize] = v as u8;
            }
        });
    out
}

#[allow(clippy::needless_range_loop)] // t is both the level and the index
/// Otsu's threshold of an 8-bit image: the level that maximises the between-class variance (pixels
/// above it are foreground), as OpenCV's `THRESH_OTSU`.
pub fn otsu(img: &[u8]) -> u8 {
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

/// One pass of a `k x k` square max (dilate) or min (erode) filter, separably.
fn morph(img: &[u8], width: usize, height: usize, k: usize, dilate: bool) -> Vec<u8> {
    let pick = |a: u8, b: u8| if dilate { a.max(b) } else { a.min(b) };
    let (lo, hi) = ((k / 2) as i64, (k - 1 - k / 2) as i64);
    let pass = |src: &[u8], horizontal: bool| -> Vec<u8> {
        let mut out = vec![0u8; width * height];
        for y in 0..height as i64 {
            for x in 0..width as i64 {
                let mut v = if dilate { 0 } else { 1 };
                for d in -lo..=hi {
                    let (xx, yy) = if horizontal { (x + d, y) } else { (x, y + d) };
                    if xx >= 0 && yy >= 0 && xx < width as i64 && yy < height as i64 {
                        v = pick(v, src[yy as usize * width + xx as usize]);
                    }
                }
                out[y as usize * width + x as usize] = v;
            }
        }
        out
    };
    pass(&pass(img, true), false)
}

/// The tissue mask of an RGB thumbnail: saturation, `median` px median blur, Otsu, `close` px closing.
pub fn tissue_mask(rgb: &[u8], width: usize, height: usize, median: usize, close: usize) -> Mask {
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
    Mask {
        pixels,
        width,
        height,
        threshold,
    }
}

/// Top-left corners (level-0 px) of the tiles of a grid with step `tile` level-0 px over a
/// `width x height` slide whose mask covers at least `min_tissue` of the tile. `mask_scale`: level-0 px
/// per mask px. Row-major order.
pub fn grid(
    mask: &Mask,
    mask_scale: f64,
    width: usize,
    height: usize,
    tile: f64,
    min_tissue: f64,
) -> Vec<(f64, f64)> {
    let (mw, mh) = (mask.width, mask.height);
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
    let (cols, rows) = (
        (width as f64 / tile).ceil() as usize,
        (height as f64 / tile).ceil() as usize,
    );
    let mut out = Vec::new();
    for j in 0..rows {
        for i in 0..cols {
            let (x, y) = (i as f64 * tile, j as f64 * tile);
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
                out.push((x, y));
            }
        }
    }
    out
}
