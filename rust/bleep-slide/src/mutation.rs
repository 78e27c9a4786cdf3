//! Damaged files: byte flips and truncations of real files, read through every entry point. Each case
//! must be an error or a valid result, never a panic (proptest fails on one), an abort or a hang.
//!
//! TIFF: four files made by `testing::tiff` (a tiled LZW pyramid, deflate strips of grey, uncompressed
//! tiles, and one JPEG tile holding the real JPEG), 2,400 cases. JPEG: the real JPEG of the shared data,
//! 800 cases. Flips land anywhere, or in the first KiB where the headers are.
//!
//! Directory graphs: SubIFD lists and next-directory pointers drawn among a pyramid's directories
//! (cycles, repeats, loops), SubIFD lists of huge counts, more directories than the bound. Pixel sizes:
//! resolution tags with zero denominators, negative SRATIONALs, huge and tiny values in every unit, and
//! Aperio `MPP` values of any size, each checked against a transcription of the one rule.

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

/// A base image and two reduced ones (tiled LZW), the reduced ones reached only as SubIFDs of the base
/// (as OME-TIFF stores a pyramid) unless the test links them otherwise.
fn sub_ifd_pyramid(subs: Vec<usize>) -> Vec<Image> {
    let level = |w: usize, h: usize, chained: bool| Image {
        tile: Some((16, 16)),
        compression: 5,
        chained,
        ..Image::pattern(w, h, 3)
    };
    vec![
        Image {
            sub_ifds: subs,
            ..level(64, 48, true)
        },
        level(32, 24, false),
        level(16, 12, false),
    ]
}

/// Whether walking the directory graph of `images` (from image 0: the chain of next directories, and
/// the SubIFDs each chained directory lists) reaches some directory twice, as the reader walks it.
fn reaches_one_twice(images: &[Image]) -> bool {
    let next_of = |i: usize| {
        images[i].next.or_else(|| {
            images[i]
                .chained
                .then(|| (i + 1..images.len()).find(|&j| images[j].chained))
                .flatten()
        })
    };
    let mut seen = std::collections::HashSet::new();
    let mut at = Some(0);
    while let Some(i) = at {
        if !seen.insert(i) {
            return true;
        }
        for &s in &images[i].sub_ifds {
            if !seen.insert(s) {
                return true;
            }
        }
        at = next_of(i);
    }
    false
}

#[test]
fn a_sub_ifd_pyramid_reads_as_its_levels() {
    let file = TempFile::new("ome.tif", &tiff(&sub_ifd_pyramid(vec![1, 2])));
    let slide = Slide::open(&file.path).unwrap();
    let sizes: Vec<usize> = slide.levels.iter().map(|l| l.width).collect();
    assert_eq!(sizes, [64, 32, 16]);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, failure_persistence: None, ..ProptestConfig::default() })]
    /// SubIFD lists and next-directory pointers drawn at random among the file's three directories:
    /// cycles (a directory listing itself or the base), repeats (one listed many times), a chain that
    /// loops. A graph that reaches a directory twice is refused with an error that says so; any
    /// other opens, and every entry point runs without a panic.
    #[test]
    fn sub_ifd_graphs_that_loop_or_repeat_are_errors(
        subs in prop::collection::vec(0usize..3, 0..40),
        nexts in prop::collection::vec(prop::option::of(0usize..3), 3),
        chained in prop::collection::vec(any::<bool>(), 2),
    ) {
        let mut images = sub_ifd_pyramid(subs);
        for (img, next) in images.iter_mut().zip(nexts) {
            img.next = next;
        }
        images[1].chained = chained[0];
        images[2].chained = chained[1];
        let bytes = tiff(&images);
        let file = TempFile::new("graph.tif", &bytes);
        let opened = Slide::open(&file.path);
        if reaches_one_twice(&images) {
            let e = opened.err().expect("a graph reaching a directory twice is refused").to_string();
            prop_assert!(e.contains("is reached twice") && e.contains("loops or repeats"), "{}", e);
        } else {
            prop_assert!(opened.is_ok(), "{:?}", opened.err());
        }
        exercise("graph.tif", &bytes);
    }
}

#[test]
fn huge_and_repeated_sub_ifd_lists_are_refused_before_allocating() {
    memory::set_budget(TEST_BUDGET);
    // One directory listed 100,000 times: refused at its second listing.
    let images = sub_ifd_pyramid(vec![1; 100_000]);
    let file = TempFile::new("repeat.tif", &tiff(&images));
    let e = Slide::open(&file.path).err().unwrap().to_string();
    assert!(e.contains("is reached twice (as a SubIFD)"), "{e}");
    // A SubIFDs entry claiming 2^31 offsets, and one claiming more than the file and its slack.
    let mut bytes = tiff(&sub_ifd_pyramid(vec![1, 2]));
    let entry = (0..u16::from_le_bytes([bytes[8], bytes[9]]) as usize)
        .map(|e| 10 + 12 * e)
        .find(|&at| u16::from_le_bytes([bytes[at], bytes[at + 1]]) == 330)
        .unwrap();
    for (count, want) in [
        (1u32 << 31, "claims more values than the file has bytes"),
        (bytes.len() as u32 - 100, "reached twice"),
    ] {
        bytes[entry + 4..entry + 8].copy_from_slice(&count.to_le_bytes());
        let file = TempFile::new("count.tif", &bytes);
        let e = Slide::open(&file.path).err().unwrap().to_string();
        assert!(
            e.contains(want) || e.contains("past the end"),
            "{count}: {e}"
        );
    }
    // More directories than MAX_IFDS, each distinct: refused by the bound.
    let many: Vec<Image> = (0..crate::tiff::MAX_IFDS + 1)
        .map(|_| Image::pattern(2, 2, 1))
        .collect();
    let file = TempFile::new("many.tif", &tiff(&many));
    let e = Slide::open(&file.path).err().unwrap().to_string();
    assert!(e.contains("more than 4096 images"), "{e}");
}

/// Whether resolution tags `(numerator, denominator)` of `kind` (5 RATIONAL, 10 SRATIONAL) in `unit`
/// (1 none, 2 inch, 3 cm) claim a pixel size at all (no unit, or a 72 dpi default, claims none), and
/// the size the one rule takes from them: a transcription of the rule.
fn expected_um(kind: u16, num: u32, den: u32, unit: u32) -> (bool, Option<f64>) {
    let per_unit = if kind == 10 {
        num as i32 as f64 / den as i32 as f64
    } else {
        num as f64 / den as f64
    };
    let um = match unit {
        2 if ![72.0, 96.0, 150.0, 300.0, 600.0].contains(&per_unit) => 25_400.0 / per_unit,
        3 => 10_000.0 / per_unit,
        _ => return (false, None),
    };
    (
        true,
        (um.is_finite() && (0.01..=100.0).contains(&um)).then_some(um),
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, failure_persistence: None, ..ProptestConfig::default() })]
    /// Resolution tags of every kind of damage: zero denominators (0/0 too), negative SRATIONALs, huge
    /// and tiny values, in inches, centimetres or no unit. The slide's pixel size is the value when the
    /// rule takes it, else absent with a warning naming the tags; never a size outside the range.
    #[test]
    fn resolution_tags_pass_the_one_rule(
        kind in prop::sample::select(vec![5u16, 10]),
        num in prop_oneof![Just(0u32), Just(1), Just(20_000), Just(u32::MAX), any::<u32>(), (1u32..200_000)],
        den in prop_oneof![Just(0u32), Just(1), Just(2), Just(u32::MAX), any::<u32>()],
        unit in 1u32..4,
    ) {
        let img = Image {
            extra: vec![(282, kind, vec![num, den]), (283, kind, vec![num, den]), (296, 3, vec![unit])],
            ..Image::pattern(8, 6, 3)
        };
        let file = TempFile::new("res.tif", &tiff(&[img]));
        let slide = Slide::open(&file.path).unwrap();
        let (claimed, want) = expected_um(kind, num, den, unit);
        let got = slide.um_per_px.as_ref().map(|(v, _)| *v);
        prop_assert_eq!(got, want);
        if let Some(v) = got {
            prop_assert!((0.01..=100.0).contains(&v));
        }
        if claimed && want.is_none() {
            prop_assert_eq!(slide.warnings.len(), 1);
            let w = &slide.warnings[0];
            prop_assert!(w.contains("TIFF resolution tags gives a pixel size of") && w.contains("outside the plausible"), "{}", w);
        } else {
            prop_assert!(slide.warnings.is_empty(), "{:?}", slide.warnings);
        }
    }

    /// Aperio's `MPP = ` holding any number (1e-300, 5000, negative, NaN's text ...): taken when the
    /// rule takes it, else absent with a warning naming it.
    #[test]
    fn aperio_mpp_passes_the_one_rule(mpp in prop_oneof![
        Just(1e-300f64), Just(5000.0), Just(2500.0), Just(-0.5), Just(0.0), Just(0.2527), Just(100.0),
        Just(0.01), any::<f64>(), 0.001f64..200.0,
    ]) {
        let text = format!("Aperio Image Library v12\r\n8 x 6 (240x240) JPEG/RGB Q=70|AppMag = 20|MPP = {mpp:e}|Left = 1\0");
        let img = Image {
            extra: vec![(270, 2, text.bytes().map(u32::from).collect())],
            ..Image::pattern(8, 6, 3)
        };
        let file = TempFile::new("mpp.svs", &tiff(&[img]));
        let slide = Slide::open(&file.path).unwrap();
        prop_assert_eq!(slide.format, "svs");
        let plausible = mpp.is_finite() && (0.01..=100.0).contains(&mpp);
        prop_assert_eq!(slide.um_per_px.as_ref().map(|(v, _)| *v), plausible.then_some(mpp));
        // NaN's and infinity's text ("NaN", "inf") is no number: no claim, no warning.
        let claimed = !(mpp.is_nan() || mpp.is_infinite());
        prop_assert_eq!(slide.warnings.len(), usize::from(claimed && !plausible), "{:?}", slide.warnings);
    }
}
