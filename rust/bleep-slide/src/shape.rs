//! The shapes of RGB pixel arrays as callers claim them, checked against their bytes.

use bleep_core::{Error, Result};

/// The number of RGB pixels of an array of shape `(..., 3)` holding `len` bytes.
pub fn rgb_pixels(shape: &[usize], len: usize, what: &str) -> Result<usize> {
    if shape.last() != Some(&3) {
        return Err(Error::invalid(format!(
            "{what} must have RGB channels last (shape (..., 3)), got shape {shape:?}"
        )));
    }
    let total = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    if total != Some(len) {
        return Err(Error::invalid(format!(
            "{what} of shape {shape:?} cannot hold {len} bytes"
        )));
    }
    Ok(len / 3)
}

/// `(height, width)` of an RGB image of shape `(h, w, 3)` holding `len` bytes, with at least one pixel.
pub fn image(shape: &[usize], len: usize, what: &str) -> Result<(usize, usize)> {
    rgb_pixels(shape, len, what)?;
    match shape {
        [h, w, 3] if h * w > 0 => Ok((*h, *w)),
        _ => Err(Error::invalid(format!(
            "{what} must be a non-empty (h, w, 3) array, got shape {shape:?}"
        ))),
    }
}

/// `(n, height, width)` of a batch of RGB patches of shape `(n, h, w, 3)` holding `len` bytes. An
/// empty batch is fine; patches without pixels are not.
pub fn patches(shape: &[usize], len: usize, what: &str) -> Result<(usize, usize, usize)> {
    rgb_pixels(shape, len, what)?;
    match shape {
        [n, h, w, 3] if *n == 0 || h * w > 0 => Ok((*n, *h, *w)),
        [_, h, w, 3] => Err(Error::invalid(format!(
            "{what} are {h} x {w} px: there are no pixels to work on (shape {shape:?})"
        ))),
        _ => Err(Error::invalid(format!(
            "{what} must be (n, h, w, 3), got shape {shape:?}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_are_checked_against_bytes() {
        assert_eq!(patches(&[2, 4, 5, 3], 120, "p").unwrap(), (2, 4, 5));
        assert_eq!(patches(&[0, 4, 5, 3], 0, "p").unwrap(), (0, 4, 5));
        assert!(patches(&[2, 0, 5, 3], 0, "p")
            .unwrap_err()
            .to_string()
            .contains("no pixels"));
        assert!(patches(&[2, 4, 5, 3], 119, "p").is_err());
        assert!(patches(&[4, 5, 3], 60, "p").is_err());
        assert!(image(&[0, 5, 3], 0, "t").is_err());
        assert!(rgb_pixels(&[usize::MAX, 2, 3], 6, "x").is_err());
    }
}
