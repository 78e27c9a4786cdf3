//! Test files made in memory: a small classic-TIFF writer (tiled or stripped; uncompressed, LZW,
//! deflate or JPEG tiles; grey or RGB; a chain of images), and the real JPEG of the shared data.

use std::path::{Path, PathBuf};

/// One image of a test TIFF.
#[derive(Clone)]
pub struct Image {
    pub width: usize,
    pub height: usize,
    /// 1 (grey) or 3 (RGB).
    pub samples: usize,
    /// Some((tile width, tile height)) for a tiled image, None for strips of `rows_per_strip` rows.
    pub tile: Option<(usize, usize)>,
    pub rows_per_strip: usize,
    /// 1 none, 5 LZW, 8 deflate, 7 JPEG (then `jpeg` holds each tile's stream).
    pub compression: u16,
    pub photometric: u16,
    /// `height x width x samples` values.
    pub pixels: Vec<u8>,
    pub jpeg: Vec<Vec<u8>>,
    /// More tags: (tag, type, values); a RATIONAL (5) or SRATIONAL (10) as numerator, denominator
    /// pairs, ASCII (2) and BYTE (1) as one value per byte.
    pub extra: Vec<(u16, u16, Vec<u32>)>,
    /// The images of the file (indices) this one lists as SubIFDs (written as their offsets).
    pub sub_ifds: Vec<usize>,
    /// Whether the chain of next directories links this image (else only SubIFDs reach it).
    pub chained: bool,
    /// The image this one's next-directory pointer names instead of the next chained one.
    pub next: Option<usize>,
}

impl Image {
    /// A `width x height` image whose values follow a pattern that compresses a little.
    pub fn pattern(width: usize, height: usize, samples: usize) -> Image {
        let pixels = (0..width * height * samples)
            .map(|i| {
                ((i / samples % width) * 7 + (i / samples / width) * 3 + i % samples * 50) as u8
            })
            .collect();
        Image {
            width,
            height,
            samples,
            tile: None,
            rows_per_strip: height,
            compression: 1,
            photometric: if samples == 1 { 1 } else { 2 },
            pixels,
            jpeg: Vec::new(),
            extra: Vec::new(),
            sub_ifds: Vec::new(),
            chained: true,
            next: None,
        }
    }

    /// The stored chunks (tiles row-major, or strips), compressed.
    fn chunks(&self) -> Vec<Vec<u8>> {
        if !self.jpeg.is_empty() {
            return self.jpeg.clone();
        }
        let s = self.samples;
        let raw: Vec<Vec<u8>> = match self.tile {
            Some((tw, th)) => {
                let mut out = Vec::new();
                for ty in 0..self.height.div_ceil(th) {
                    for tx in 0..self.width.div_ceil(tw) {
                        let mut tile = vec![0u8; tw * th * s];
                        for y in 0..th.min(self.height - ty * th) {
                            for x in 0..tw.min(self.width - tx * tw) {
                                let src = ((ty * th + y) * self.width + tx * tw + x) * s;
                                tile[(y * tw + x) * s..][..s]
                                    .copy_from_slice(&self.pixels[src..src + s]);
                            }
                        }
                        out.push(tile);
                    }
                }
                out
            }
            None => self
                .pixels
                .chunks(self.rows_per_strip * self.width * s)
                .map(<[u8]>::to_vec)
                .collect(),
        };
        raw.into_iter().map(|c| self.compress(&c)).collect()
    }

    fn compress(&self, data: &[u8]) -> Vec<u8> {
        match self.compression {
            5 => weezl::encode::Encoder::with_tiff_size_switch(weezl::BitOrder::Msb, 8)
                .encode(data)
                .unwrap(),
            8 => {
                use std::io::Write;
                let mut e = flate2::write::ZlibEncoder::new(Vec::new(), Default::default());
                e.write_all(data).unwrap();
                e.finish().unwrap()
            }
            _ => data.to_vec(),
        }
    }
}

/// A little-endian classic TIFF holding `images` as a chain of IFDs (those `chained`; each may list
/// others as SubIFDs), the directories first (so that the first KiB of the file is mostly structure)
/// and the pixel data after them.
pub fn tiff(images: &[Image]) -> Vec<u8> {
    // Tag, type (3 SHORT, 4 LONG ...), values: written in order of tag.
    type Entry = (u16, u16, Vec<u32>);
    let chunks: Vec<Vec<Vec<u8>>> = images.iter().map(Image::chunks).collect();
    let entries =
        |img: &Image, offsets: Vec<u32>, counts: Vec<u32>, subs: Vec<u32>| -> Vec<Entry> {
            let mut e: Vec<Entry> = vec![
                (256, 4, vec![img.width as u32]),
                (257, 4, vec![img.height as u32]),
                (258, 3, vec![8; img.samples]),
                (259, 3, vec![img.compression as u32]),
                (262, 3, vec![img.photometric as u32]),
                (277, 3, vec![img.samples as u32]),
            ];
            match img.tile {
                Some((tw, th)) => e.extend([
                    (322, 4, vec![tw as u32]),
                    (323, 4, vec![th as u32]),
                    (324, 4, offsets),
                    (325, 4, counts),
                ]),
                None => e.extend([
                    (273, 4, offsets),
                    (278, 4, vec![img.rows_per_strip as u32]),
                    (279, 4, counts),
                ]),
            }
            e.extend(img.extra.iter().cloned());
            if !img.sub_ifds.is_empty() {
                e.push((330, 4, subs));
            }
            e.sort_by_key(|x| x.0);
            e
        };
    // Sizes first: each IFD is 2 + 12 n + 4 bytes, then its out-of-line arrays.
    let ifd_size = |e: &[Entry]| {
        let outside: usize = e
            .iter()
            .map(|(_, t, v)| {
                if v.len() * width(*t) > 4 {
                    v.len() * width(*t)
                } else {
                    0
                }
            })
            .sum();
        2 + 12 * e.len() + 4 + outside
    };
    let placeholder: Vec<Vec<Entry>> = images
        .iter()
        .zip(&chunks)
        .map(|(img, c)| {
            let subs = vec![0; img.sub_ifds.len()];
            entries(img, vec![0; c.len()], vec![0; c.len()], subs)
        })
        .collect();
    // Where each directory starts.
    let ifd_offsets: Vec<usize> = placeholder
        .iter()
        .scan(8, |at, e| {
            let here = *at;
            *at += ifd_size(e);
            Some(here)
        })
        .collect();
    let mut data_at = 8 + placeholder.iter().map(|e| ifd_size(e)).sum::<usize>();
    let mut out = vec![b'I', b'I', 42, 0, 8, 0, 0, 0];
    let mut blobs = Vec::new();
    let mut ifd_at = 8;
    for (i, (img, c)) in images.iter().zip(&chunks).enumerate() {
        let offsets = c
            .iter()
            .map(|b| {
                let at = data_at as u32;
                data_at += b.len();
                at
            })
            .collect();
        let counts = c.iter().map(|b| b.len() as u32).collect();
        blobs.extend(c.iter().cloned());
        let subs = img
            .sub_ifds
            .iter()
            .map(|&j| ifd_offsets[j] as u32)
            .collect();
        let e = entries(img, offsets, counts, subs);
        let size = ifd_size(&e);
        let mut extra_at = ifd_at + 2 + 12 * e.len() + 4;
        let mut extra = Vec::new();
        out.extend((e.len() as u16).to_le_bytes());
        for (tag, kind, values) in &e {
            let count = if matches!(kind, 5 | 10) {
                values.len() / 2
            } else {
                values.len()
            };
            out.extend(tag.to_le_bytes());
            out.extend(kind.to_le_bytes());
            out.extend((count as u32).to_le_bytes());
            let bytes: Vec<u8> = values
                .iter()
                .flat_map(|&v| match width(*kind) {
                    1 => vec![v as u8],
                    2 => (v as u16).to_le_bytes().to_vec(),
                    _ => v.to_le_bytes().to_vec(),
                })
                .collect();
            if bytes.len() <= 4 {
                let mut inline = bytes;
                inline.resize(4, 0);
                out.extend(inline);
            } else {
                out.extend((extra_at as u32).to_le_bytes());
                extra_at += bytes.len();
                extra.extend(bytes);
            }
        }
        let following = (i + 1..images.len()).find(|&j| images[j].chained);
        let next = match (img.next, img.chained) {
            (Some(j), _) => ifd_offsets[j],
            (None, true) => following.map_or(0, |j| ifd_offsets[j]),
            (None, false) => 0,
        };
        debug_assert_eq!(ifd_offsets[i], ifd_at);
        out.extend((next as u32).to_le_bytes());
        out.extend(extra);
        ifd_at += size;
    }
    for b in blobs {
        out.extend(b);
    }
    out
}

fn width(kind: u16) -> usize {
    match kind {
        1 | 2 | 6 | 7 => 1,
        3 | 8 => 2,
        _ => 4,
    }
}

/// The real H&E JPEG of the shared data (about 750 x 750 px), read at test time, never copied.
pub fn real_jpeg() -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/tiny/C2/image.jpg");
    std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (the shared data lives beside the repository)",
            path.display()
        )
    })
}

/// A file in a fresh temporary folder holding `bytes`; the folder goes when the guard drops.
pub struct TempFile {
    pub path: PathBuf,
}

impl TempFile {
    pub fn new(name: &str, bytes: &[u8]) -> TempFile {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "bleep-slide-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        TempFile { path }
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(dir) = self.path.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// `bytes` (a TIFF from [`tiff`]) with the first IFD's entry for `tag` given the value `value`.
pub fn set_tag(mut bytes: Vec<u8>, tag: u16, value: u32) -> Vec<u8> {
    let n = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    for e in 0..n {
        let at = 10 + 12 * e;
        if u16::from_le_bytes([bytes[at], bytes[at + 1]]) == tag {
            let kind = u16::from_le_bytes([bytes[at + 2], bytes[at + 3]]);
            let v = if kind == 3 {
                [(value as u16).to_le_bytes(), [0, 0]].concat()
            } else {
                value.to_le_bytes().to_vec()
            };
            bytes[at + 8..at + 12].copy_from_slice(&v);
            return bytes;
        }
    }
    panic!("no tag {tag}");
}
