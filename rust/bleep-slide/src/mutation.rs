//! Damaged files: byte flips and truncations of real files, read through every entry point. Each case
//! must be an error or a valid result, never a panic (proptest fails on one), an abort or a hang.
//!
//! TIFF: four files made by `testing::tiff` (a tiled LZW pyramid, deflate strips of grey, uncompressed
//! tiles, and one JPEG tile holding the real JPEG), 2,400 cases. JPEG: the real JPEG of the shared data,
//! 800 cases. Flips land anywhere, or in the first KiB where the headers are.

use crate::testing::{real_jpeg, tiff, Image, TempFile};
use crate::{tissue_mask, Slide};
use bleep_core::{memory, pool, Matrix};
use proptest::prelude::*;
use proptest::sample::Index;
use std::sync::OnceLock;

/// A budget far below the machine's, so that damaged sizes the budget admits stay cheap.
const TEST_BUDGET: usize = 256 << 20;

fn tiffs() -> &'static [Vec<u8>] {
    static FILES: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    FILES.get_or_init(|| {
        let pyramid = |w: usize, h: usize| Image {
            tile: Some((16, 16)),
            compression: 5,
            ..Image::pattern(w, h, 3)
        };
        let grey = Image {
            rows_per_strip: 5,
            compression: 8,
            ..Image::pattern(37, 29, 1)
        };
        let plain = Image {
            tile: Some((32, 16)),
            ..Image::pattern(50, 40, 3)
        };
        let jpeg = real_jpeg();
        let (w, h) = jpeg_size(&jpeg);
        let jpeg_tile = Image {
            tile: Some((w, h)),
            compression: 7,
            photometric: 6,
            jpeg: vec![jpeg],
            ..Image::pattern(w, h, 3)
        };
        vec![
            tiff(&[pyramid(64, 48), pyramid(32, 24)]),
            tiff(&[grey]),
            tiff(&[plain]),
            tiff(&[jpeg_tile]),
        ]
    })
}

fn jpeg_size(data: &[u8]) -> (usize, usize) {
    let mut rgb = Vec::new();
    crate::tiff::decode_jpeg_into(data, false, &mut rgb, |_, _| Ok(())).unwrap()
}

/// `base` with `flips` (position, xor mask) applied, the positions within the first `span` bytes, then
/// cut to `keep` of its length.
fn mutate(base: &[u8], flips: &[(Index, u8)], span: usize, keep: Option<Index>) -> Vec<u8> {
    let mut bytes = base.to_vec();
    let span = span.min(bytes.len());
    for (at, mask) in flips {
        bytes[at.index(span)] ^= (*mask).max(1);
    }
    if let Some(k) = keep {
        bytes.truncate(k.index(bytes.len()));
    }
    bytes
}

/// Everything a user can do with a slide; errors are fine, panics are not.
fn exercise(name: &str, bytes: &[u8]) {
    memory::set_budget(TEST_BUDGET);
    let file = TempFile::new(name, bytes);
    let result = pool::install(Some(2), || {
        let Ok(slide) = Slide::open(&file.path) else {
            return;
        };
        for level in 0..slide.levels.len() {
            let _ = slide.read_region(-5, 3, level, 40, 30);
        }
        if let Ok((thumb, w, h)) = slide.thumbnail(48) {
            let _ = tissue_mask(&thumb, &[h, w, 3], 3, 4);
        }
        let origins = [0.0, 0.0, 20.5, 11.0, -8.0, 30.0];
        let mut out = vec![0u8; 3 * 24 * 24 * 3];
        let _ = slide.patches_into(Matrix::new(&origins, 3, 2), 24, 1.7, &mut out);
    });
    result.unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2400, failure_persistence: None, ..ProptestConfig::default() })]
    #[test]
    fn damaged_tiffs_are_errors_or_images(
        which in 0usize..4,
        flips in prop::collection::vec((any::<Index>(), any::<u8>()), 0..6),
        headers_only in any::<bool>(),
        keep in prop::option::weighted(0.3, any::<Index>()),
    ) {
        let base = &tiffs()[which];
        let span = if headers_only { 1024 } else { base.len() };
        exercise("slide.tif", &mutate(base, &flips, span, keep));
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 800, failure_persistence: None, ..ProptestConfig::default() })]
    #[test]
    fn damaged_jpegs_are_errors_or_images(
        flips in prop::collection::vec((any::<Index>(), any::<u8>()), 0..6),
        headers_only in any::<bool>(),
        keep in prop::option::weighted(0.3, any::<Index>()),
    ) {
        static JPEG: OnceLock<Vec<u8>> = OnceLock::new();
        let base = JPEG.get_or_init(real_jpeg);
        let span = if headers_only { 1024 } else { base.len() };
        exercise("slide.jpg", &mutate(base, &flips, span, keep));
    }
}

#[test]
fn the_unmutated_files_read_back() {
    for (i, bytes) in tiffs().iter().enumerate() {
        let file = TempFile::new("ok.tif", bytes);
        let slide = Slide::open(&file.path).unwrap_or_else(|e| panic!("file {i}: {e}"));
        let region = slide.read_region(0, 0, 0, 8, 8).unwrap();
        assert_eq!(region.len(), 8 * 8 * 3, "file {i}");
        slide.thumbnail(48).unwrap();
    }
}
