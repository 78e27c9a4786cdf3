//! A reader for the TIFF family whole-slide images come in: classic TIFF and BigTIFF, either byte order,
//! tiled or stripped, uncompressed / LZW / deflate / JPEG (with shared `JPEGTables`), pyramids as a chain
//! of IFDs (pyvips, Aperio SVS) or as SubIFDs (OME-TIFF). Only the directory is parsed up front; pixels
//! are decoded one tile (or strip) at a time, on demand, from a memory map.

use bleep_core::memory;
use bleep_core::{Error, Result};
use std::path::Path;

/// The most bytes a compressed tile may expand to per byte of its data. Deflate reaches about 1032,
/// LZW about 2700 (4096 bytes from one 12-bit code) and JPEG 1536 (one bit per 8 x 8 block, 3 bytes
/// a pixel): a tile or image claiming more is damaged, and is refused before anything is allocated.
pub const MAX_EXPANSION: usize = 4096;

/// The most images (directories, in the IFD chain and as SubIFDs together) a TIFF may hold. Whole-slide
/// files hold a few dozen; a directory graph reaching more is damaged.
pub const MAX_IFDS: usize = 4096;

/// The most bytes of tag values all directories together may claim, as a multiple of the file's size
/// (plus [`VALUE_SLACK`]). An honest file stores each value once, so its directories claim less than
/// the file holds; a damaged one whose tags all point at the same bytes (one SubIFD listed 100,000
/// times, one offset array shared by every directory) would make the parser copy them again and
/// again. This bounds what parsing may allocate to a small multiple of the file's size.
const VALUE_BYTES_PER_FILE_BYTE: u64 = 4;
const VALUE_SLACK: u64 = 1 << 20;

const NEW_SUBFILE_TYPE: u16 = 254;
const IMAGE_WIDTH: u16 = 256;
const IMAGE_LENGTH: u16 = 257;
const BITS_PER_SAMPLE: u16 = 258;
const COMPRESSION: u16 = 259;
const PHOTOMETRIC: u16 = 262;
const IMAGE_DESCRIPTION: u16 = 270;
const STRIP_OFFSETS: u16 = 273;
const SAMPLES_PER_PIXEL: u16 = 277;
const ROWS_PER_STRIP: u16 = 278;
const STRIP_BYTE_COUNTS: u16 = 279;
const X_RESOLUTION: u16 = 282;
const PLANAR_CONFIG: u16 = 284;
const RESOLUTION_UNIT: u16 = 296;
const PREDICTOR: u16 = 317;
const TILE_WIDTH: u16 = 322;
const TILE_LENGTH: u16 = 323;
const TILE_OFFSETS: u16 = 324;
const TILE_BYTE_COUNTS: u16 = 325;
const SUB_IFDS: u16 = 330;
const JPEG_TABLES: u16 = 347;

/// How a tile's bytes are compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    None,
    Lzw,
    Deflate,
    Jpeg,
}

/// One image of the file (a pyramid level, a thumbnail, a label ...), as a grid of tiles. A stripped image
/// is a grid one tile wide whose tiles are the strips.
#[derive(Clone, Debug)]
pub struct Ifd {
    pub width: usize,
    pub height: usize,
    pub tile_width: usize,
    pub tile_height: usize,
    pub tiled: bool,
    pub reduced: bool,
    offsets: Vec<u64>,
    byte_counts: Vec<u64>,
    compression: Compression,
    samples: usize,
    rgb_jpeg: bool,
    /// PhotometricInterpretation 0 (MINISWHITE): grey levels are stored inverted.
    min_is_white: bool,
    predictor: bool,
    jpeg_tables: Option<Vec<u8>>,
    pub description: String,
    /// Micrometres per pixel as the resolution tags state it (unchecked: it may be zero, negative or
    /// not finite; [`crate::slide::check_um_per_px`] judges it), when they carry a physical unit.
    pub tag_um_per_px: Option<f64>,
}

impl Ifd {
    pub fn tiles_across(&self) -> usize {
        self.width.div_ceil(self.tile_width)
    }

    pub fn tiles_down(&self) -> usize {
        self.height.div_ceil(self.tile_height)
    }

    /// Decodes tile `index` (row-major) into `tile_width * tile_height * 3` RGB bytes (a short last strip
    /// is padded with white), reusing `buf`'s memory.
    pub fn decode_tile(
        &self,
        data: &[u8],
        index: usize,
        path: &Path,
        mut buf: Vec<u8>,
    ) -> Result<Vec<u8>> {
        let bad = |why: String| Error::format(path, format!("tile {index}: {why}"));
        let (offset, count) = (
            usize::try_from(self.offsets[index]).unwrap_or(usize::MAX),
            usize::try_from(self.byte_counts[index]).unwrap_or(usize::MAX),
        );
        let raw = offset
            .checked_add(count)
            .and_then(|end| data.get(offset..end))
            .ok_or_else(|| bad("its bytes lie past the end of the file (truncated?)".into()))?;
        let (tw, th) = (self.tile_width, self.tile_height);
        // Rows actually stored: a stripped image's last strip may be short.
        let rows = if self.tiled {
            th
        } else {
            th.min(self.height - (index * th).min(self.height))
        };
        let pixels = tw * th * 3;
        if self.compression == Compression::Jpeg {
            let (w, h) = self
                .decode_jpeg(raw, (tw, rows), &mut buf)
                .map_err(|e| bad(format!("bad JPEG data ({e})")))?;
            if w != tw || h < rows {
                return Err(bad(format!(
                    "a {w} x {h} px JPEG in a {tw} x {rows} px tile"
                )));
            }
            resize(&mut buf, pixels, 255, path)?;
            buf[tw * rows * 3..].fill(255);
            if self.min_is_white {
                invert(&mut buf[..tw * rows * 3]);
            }
            return Ok(buf);
        }
        let samples = self.samples;
        let want = tw * rows * samples;
        if self.compression != Compression::None && want / MAX_EXPANSION > raw.len() {
            return Err(bad(format!(
                "{} bytes of data cannot hold a {tw} x {rows} px tile: the file is damaged",
                raw.len()
            )));
        }
        let mut bytes = match self.compression {
            Compression::None => raw.get(..want).map(<[u8]>::to_vec).unwrap_or_default(),
            Compression::Lzw => lzw(raw, want).map_err(|e| bad(format!("bad LZW data ({e})")))?,
            Compression::Deflate => {
                let mut out = memory::filled(0, 0u8, "a tile")?;
                out.try_reserve_exact(want)
                    .map_err(|_| bad("no memory for the tile".into()))?;
                // At most the bytes the tile needs: a damaged stream cannot expand without bound.
                let mut stream =
                    std::io::Read::take(flate2::read::ZlibDecoder::new(raw), want as u64);
                std::io::Read::read_to_end(&mut stream, &mut out)
                    .map_err(|e| bad(format!("bad deflate data ({e})")))?;
                out
            }
            Compression::Jpeg => unreachable!("decoded above"),
        };
        if bytes.len() < want {
            return Err(bad(format!(
                "{} bytes decoded, {want} expected (truncated?)",
                bytes.len()
            )));
        }
        if self.predictor {
            for row in bytes[..want].chunks_exact_mut(tw * samples) {
                for i in samples..row.len() {
                    row[i] = row[i].wrapping_add(row[i - samples]);
                }
            }
        }
        buf.clear();
        resize(&mut buf, pixels, 255, path)?;
        for (dst, src) in buf
            .chunks_exact_mut(3)
            .zip(bytes[..want].chunks_exact(samples))
        {
            if samples >= 3 {
                dst.copy_from_slice(&src[..3]);
            } else if self.min_is_white {
                dst.fill(255 - src[0]);
            } else {
                dst.fill(src[0]);
            }
        }
        Ok(buf)
    }

    fn decode_jpeg(
        &self,
        raw: &[u8],
        (tw, rows): (usize, usize),
        out: &mut Vec<u8>,
    ) -> std::result::Result<(usize, usize), String> {
        // An abbreviated stream: splice the shared tables (without their EOI) before the tile's data
        // (without its SOI).
        let joined;
        let stream = match &self.jpeg_tables {
            Some(tables) if tables.len() >= 4 && raw.len() >= 2 => {
                joined = [&tables[..tables.len() - 2], &raw[2..]].concat();
                &joined[..]
            }
            _ => raw,
        };
        let fits = |w: usize, h: usize| {
            if w == tw && h >= rows && h <= self.tile_height.max(rows) {
                Ok(())
            } else {
                Err(format!("a {w} x {h} px JPEG in a {tw} x {rows} px tile"))
            }
        };
        decode_jpeg_into(stream, self.rgb_jpeg, out, fits)
    }
}

/// `buf` resized to `len` bytes (new ones `value`), or an error if memory is refused.
fn resize(buf: &mut Vec<u8>, len: usize, value: u8, path: &Path) -> Result<()> {
    buf.try_reserve(len.saturating_sub(buf.len()))
        .map_err(|_| Error::format(path, format!("no memory for a tile of {len} bytes")))?;
    buf.resize(len, value);
    Ok(())
}

/// MINISWHITE grey levels to ordinary ones.
fn invert(rgb: &mut [u8]) {
    rgb.iter_mut().for_each(|v| *v = 255 - *v);
}

/// Decodes at most `want` bytes of a TIFF LZW stream (a stream may end without its end code once the
/// tile is full, as libtiff allows).
fn lzw(raw: &[u8], want: usize) -> std::result::Result<Vec<u8>, String> {
    let mut out = memory::filled(want, 0u8, "a tile").map_err(|e| e.to_string())?;
    let mut decoder = weezl::decode::Decoder::with_tiff_size_switch(weezl::BitOrder::Msb, 8);
    let (mut read, mut written) = (0, 0);
    while written < want {
        let step = decoder.decode_bytes(&raw[read..], &mut out[written..]);
        read += step.consumed_in;
        written += step.consumed_out;
        match step.status.map_err(|e| e.to_string())? {
            weezl::LzwStatus::Done | weezl::LzwStatus::NoProgress => break,
            weezl::LzwStatus::Ok => {}
        }
    }
    out.truncate(written);
    Ok(out)
}

/// Decodes a JPEG stream into RGB in `out` (resized to fit), returning (width, height). `raw_rgb`: the
/// components are R, G, B already (Aperio's tiles), so the YCbCr conversion is skipped. `fits(w, h)`
/// may refuse the size the header claims before anything is decoded.
///
/// A damaged stream is an error, never an image with grey rows: the decoder runs in strict mode (a
/// stream that ends early is refused), and a size the data cannot hold (at least one bit per 8 x 8
/// block) or the memory budget cannot is refused before the output is allocated.
pub fn decode_jpeg_into(
    stream: &[u8],
    raw_rgb: bool,
    out: &mut Vec<u8>,
    fits: impl Fn(usize, usize) -> std::result::Result<(), String>,
) -> std::result::Result<(usize, usize), String> {
    use zune_jpeg::zune_core::{
        bytestream::ZCursor, colorspace::ColorSpace, options::DecoderOptions,
    };
    let options = DecoderOptions::default()
        .jpeg_set_out_colorspace(ColorSpace::RGB)
        .set_strict_mode(true)
        .set_max_width(1 << 20)
        .set_max_height(1 << 20);
    let mut decoder = zune_jpeg::JpegDecoder::new_with_options(ZCursor::new(stream), options);
    decoder.decode_headers().map_err(|e| e.to_string())?;
    let info = decoder.info().ok_or("no JPEG header")?;
    let (w, h) = (info.width as usize, info.height as usize);
    if w == 0 || h == 0 {
        return Err(format!("a JPEG of {w} x {h} px"));
    }
    fits(w, h)?;
    let blocks = w.div_ceil(8) * h.div_ceil(8);
    if blocks / 8 > stream.len() {
        return Err(format!(
            "the header claims {w} x {h} px but the stream has only {} bytes (truncated or damaged)",
            stream.len()
        ));
    }
    let need = memory::bytes(
        &[w, h, 3],
        &format!("a {w} x {h} px JPEG"),
        "it is too large to decode in memory",
    )
    .map_err(|e| e.to_string())?;
    if decoder.input_colorspace() == Some(ColorSpace::Luma) {
        let mut gray = memory::filled(w * h, 0u8, "a JPEG").map_err(|e| e.to_string())?;
        decoder.set_options(options.jpeg_set_out_colorspace(ColorSpace::Luma));
        decoder.decode_into(&mut gray).map_err(|e| e.to_string())?;
        out.clear();
        out.try_reserve(need)
            .map_err(|_| format!("a {w} x {h} px JPEG is too large to decode in memory"))?;
        out.extend(gray.iter().flat_map(|&v| [v, v, v]));
        return Ok((w, h));
    }
    // A stream without colour markers is taken as YCbCr; where the TIFF says RGB, keep the components
    // as they are (libtiff does the same).
    if raw_rgb && decoder.input_colorspace() == Some(ColorSpace::YCbCr) {
        decoder.set_options(options.jpeg_set_out_colorspace(ColorSpace::YCbCr));
    }
    // Every byte is written by the decoder: reused memory needs no clearing.
    out.try_reserve(need.saturating_sub(out.len()))
        .map_err(|_| format!("a {w} x {h} px JPEG is too large to decode in memory"))?;
    out.resize(need, 0);
    decoder.decode_into(out).map_err(|e| e.to_string())?;
    Ok((w, h))
}

/// A parsed TIFF: the memory-mapped bytes and every image in it.
pub struct Tiff {
    pub ifds: Vec<Ifd>,
}

struct Reader<'a> {
    data: &'a [u8],
    little: bool,
    big: bool,
    path: &'a Path,
    /// Bytes of tag values the directories may still claim (see [`VALUE_BYTES_PER_FILE_BYTE`]).
    values_left: std::cell::Cell<u64>,
}

impl Reader<'_> {
    fn bytes(&self, at: u64, len: usize) -> Result<&[u8]> {
        let start = usize::try_from(at).unwrap_or(usize::MAX);
        start
            .checked_add(len)
            .and_then(|end| self.data.get(start..end))
            .ok_or_else(|| {
                Error::format(
                    self.path,
                    "the TIFF directory points past the end of the file (truncated?)",
                )
            })
    }

    fn uint(&self, at: u64, size: usize) -> Result<u64> {
        let b = self.bytes(at, size)?;
        let mut v = 0u64;
        for i in 0..size {
            let byte = if self.little { b[size - 1 - i] } else { b[i] };
            v = (v << 8) | byte as u64;
        }
        Ok(v)
    }

    /// One directory entry: (tag, type, value size in bytes, where the values are, how many).
    fn entry(&self, entry: u64) -> Result<(u16, u16, usize, u64, u64)> {
        let tag = self.uint(entry, 2)? as u16;
        let kind = self.uint(entry.saturating_add(2), 2)? as u16;
        let count = self.uint(entry.saturating_add(4), if self.big { 8 } else { 4 })?;
        let size = match kind {
            1 | 2 | 6 | 7 => 1,
            3 | 8 => 2,
            4 | 9 | 11 | 13 => 4,
            5 | 10 | 12 | 16 | 17 | 18 => 8,
            _ => 0,
        };
        let inline = if self.big { 8 } else { 4 };
        let value_at = entry.saturating_add(if self.big { 12 } else { 8 });
        let total = (size as u64).saturating_mul(count);
        let at = if total <= inline {
            value_at
        } else {
            self.uint(value_at, inline as usize)?
        };
        Ok((tag, kind, size, at, count))
    }

    /// Charges `count` values of `size` bytes to the directories' allowance, before they are copied:
    /// a tag claiming more values than the file has bytes, or directories claiming in all more than
    /// a few times the file, are damaged.
    fn claim(&self, size: usize, count: u64) -> Result<()> {
        let bytes = count.saturating_mul(size.max(1) as u64);
        if count > self.data.len() as u64 {
            return Err(Error::format(
                self.path,
                "a TIFF tag claims more values than the file has bytes",
            ));
        }
        let left = self.values_left.get();
        if bytes > left {
            return Err(Error::format(
                self.path,
                format!(
                    "the TIFF directories claim more than {} values in all, {VALUE_BYTES_PER_FILE_BYTE} x the \
                     {} bytes of the file: the same values are listed again and again, the file is damaged",
                    memory::human(self.allowance() as usize),
                    self.data.len()
                ),
            ));
        }
        self.values_left.set(left - bytes);
        Ok(())
    }

    fn allowance(&self) -> u64 {
        (self.data.len() as u64)
            .saturating_mul(VALUE_BYTES_PER_FILE_BYTE)
            .saturating_add(VALUE_SLACK)
    }

    /// The values of an entry as integers (a rational as its numerator and denominator).
    fn ints(&self, kind: u16, size: usize, at: u64, count: u64) -> Result<Vec<u64>> {
        self.claim(size, count)?;
        let rational = kind == 5 || kind == 10;
        let size = if rational { 4 } else { size };
        let n = if rational { count * 2 } else { count };
        (0..n)
            .map(|i| self.uint(at.saturating_add(i * size as u64), size))
            .collect()
    }

    /// Pixels per resolution unit from an XResolution entry: a RATIONAL or SRATIONAL (signed) pair,
    /// a FLOAT / DOUBLE, or an integer. Unchecked: a zero denominator gives an infinity or NaN, a
    /// negative SRATIONAL a negative value; the one rule on pixel sizes refuses them.
    fn resolution(&self, kind: u16, at: u64) -> Result<Option<f64>> {
        let signed = |v: u64| v as u32 as i32 as f64;
        Ok(match kind {
            5 => Some(self.uint(at, 4)? as f64 / self.uint(at.saturating_add(4), 4)? as f64),
            10 => Some(signed(self.uint(at, 4)?) / signed(self.uint(at.saturating_add(4), 4)?)),
            11 => Some(f32::from_bits(self.uint(at, 4)? as u32) as f64),
            12 => Some(f64::from_bits(self.uint(at, 8)?)),
            3 => Some(self.uint(at, 2)? as f64),
            4 => Some(self.uint(at, 4)? as f64),
            _ => None,
        })
    }

    fn ifd(&self, offset: u64) -> Result<(Ifd, Vec<u64>, u64)> {
        let (count_size, entry_size) = if self.big { (8, 20) } else { (2, 12) };
        let n = self.uint(offset, count_size)?;
        if n == 0 || n > 4096 {
            return Err(Error::format(
                self.path,
                format!("a TIFF directory with {n} entries: the file is damaged"),
            ));
        }
        let mut tags: std::collections::HashMap<u16, Vec<u64>> = Default::default();
        let mut text: std::collections::HashMap<u16, Vec<u8>> = Default::default();
        let mut resolution = None;
        for i in 0..n {
            let (tag, kind, size, at, count) =
                self.entry(offset.saturating_add(count_size as u64 + i * entry_size))?;
            if tag == IMAGE_DESCRIPTION || tag == JPEG_TABLES {
                self.claim(1, count)?;
                let count = usize::try_from(count).unwrap_or(usize::MAX);
                text.insert(tag, self.bytes(at, count)?.to_vec());
            } else if tag == X_RESOLUTION {
                resolution = if count >= 1 {
                    self.resolution(kind, at)?
                } else {
                    None
                };
            } else if size > 0 && kind != 11 && kind != 12 {
                tags.insert(tag, self.ints(kind, size, at, count)?);
            }
        }
        let next = self.uint(
            offset.saturating_add(count_size as u64 + n * entry_size),
            if self.big { 8 } else { 4 },
        )?;
        let sub_ifds = tags.get(&SUB_IFDS).cloned().unwrap_or_default();
        Ok((self.build(&tags, &mut text, resolution)?, sub_ifds, next))
    }

    fn build(
        &self,
        tags: &std::collections::HashMap<u16, Vec<u64>>,
        text: &mut std::collections::HashMap<u16, Vec<u8>>,
        resolution: Option<f64>,
    ) -> Result<Ifd> {
        let get = |tag: u16| tags.get(&tag).and_then(|v| v.first().copied());
        let missing =
            |what: &str| Error::format(self.path, format!("a TIFF image without the {what} tag"));
        let width = get(IMAGE_WIDTH).ok_or_else(|| missing("ImageWidth"))? as usize;
        let height = get(IMAGE_LENGTH).ok_or_else(|| missing("ImageLength"))? as usize;
        let samples = get(SAMPLES_PER_PIXEL).unwrap_or(1) as usize;
        let bits = tags.get(&BITS_PER_SAMPLE).cloned().unwrap_or(vec![1]);
        let compression = match get(COMPRESSION).unwrap_or(1) {
            1 => Compression::None,
            5 => Compression::Lzw,
            8 | 32946 => Compression::Deflate,
            7 => Compression::Jpeg,
            33003 | 33005 | 34712 => {
                return Err(Error::format(
                    self.path,
                    "JPEG 2000 tiles are not read by the built-in reader: install the OpenSlide extra \
                     (pip install 'bleep-rs[openslide]') and open the slide with backend=\"openslide\"",
                ))
            }
            other => return Err(Error::format(self.path, format!("TIFF compression {other} is not supported (supported: none, LZW, deflate, JPEG); convert the slide, or use backend=\"openslide\""))),
        };
        let photometric = get(PHOTOMETRIC).unwrap_or(2);
        let tiled = tags.contains_key(&TILE_OFFSETS);
        let (tile_width, tile_height, offsets, byte_counts) = if tiled {
            (
                get(TILE_WIDTH).ok_or_else(|| missing("TileWidth"))? as usize,
                get(TILE_LENGTH).ok_or_else(|| missing("TileLength"))? as usize,
                tags[&TILE_OFFSETS].clone(),
                tags.get(&TILE_BYTE_COUNTS)
                    .cloned()
                    .ok_or_else(|| missing("TileByteCounts"))?,
            )
        } else {
            let rows = get(ROWS_PER_STRIP)
                .unwrap_or(height as u64)
                .min(height as u64) as usize;
            (
                width,
                rows.max(1),
                tags.get(&STRIP_OFFSETS)
                    .cloned()
                    .ok_or_else(|| missing("StripOffsets"))?,
                tags.get(&STRIP_BYTE_COUNTS)
                    .cloned()
                    .ok_or_else(|| missing("StripByteCounts"))?,
            )
        };
        if width == 0 || height == 0 || tile_width == 0 || tile_height == 0 {
            return Err(Error::format(
                self.path,
                format!(
                    "a TIFF image of {width} x {height} px in {} of {tile_width} x {tile_height} px: \
                     a size is zero, the file is damaged",
                    if tiled { "tiles" } else { "strips" }
                ),
            ));
        }
        let reduced = get(NEW_SUBFILE_TYPE).unwrap_or(0) & 1 == 1;
        let unit = get(RESOLUTION_UNIT).unwrap_or(2);
        // Unchecked here: the one rule on pixel sizes (slide.rs) judges it with every other source.
        let tag_um_per_px = resolution.and_then(|per_unit| {
            // A screen or print default (72 dpi ...) is not a scan resolution, and no claim at all.
            let dpi_default = unit == 2 && [72.0, 96.0, 150.0, 300.0, 600.0].contains(&per_unit);
            match unit {
                2 if !dpi_default => Some(25_400.0 / per_unit),
                3 => Some(10_000.0 / per_unit),
                _ => None,
            }
        });
        let ifd = Ifd {
            width,
            height,
            tile_width,
            tile_height,
            tiled,
            reduced,
            offsets,
            byte_counts,
            compression,
            samples,
            rgb_jpeg: photometric == 2,
            min_is_white: photometric == 0,
            predictor: get(PREDICTOR) == Some(2),
            jpeg_tables: text.remove(&JPEG_TABLES),
            description: String::from_utf8_lossy(
                &text.remove(&IMAGE_DESCRIPTION).unwrap_or_default(),
            )
            .into_owned(),
            tag_um_per_px,
        };
        let pixel_format_ok = bits.iter().all(|&b| b == 8)
            && get(PLANAR_CONFIG).unwrap_or(1) == 1
            && (samples == 1 || samples == 3 || samples == 4)
            && (photometric == 2
                || photometric <= 1
                || (photometric == 6 && compression == Compression::Jpeg));
        if !pixel_format_ok {
            return Err(Error::format(
                self.path,
                format!(
                    "a TIFF image with {samples} samples of {bits:?} bits, photometric {photometric}, planar \
                     configuration {}: only 8-bit grey or RGB(A), interleaved, is supported",
                    get(PLANAR_CONFIG).unwrap_or(1)
                ),
            ));
        }
        let tiles = ifd.tiles_across().checked_mul(ifd.tiles_down());
        let Some(tiles) = tiles.filter(|&t| ifd.offsets.len() >= t && ifd.byte_counts.len() >= t)
        else {
            return Err(Error::format(
                self.path,
                format!("a TIFF image of {width} x {height} px lists fewer tiles than it needs"),
            ));
        };
        self.data_can_hold(&ifd, tiles)?;
        // One decoded tile (at most 4 samples a pixel) must fit the memory budget.
        memory::bytes(
            &[tile_width, tile_height, 4],
            &format!("a tile of {tile_width} x {tile_height} px"),
            "the file is damaged, or convert it to a tiled TIFF",
        )
        .map_err(|e| Error::format(self.path, e.to_string()))?;
        Ok(ifd)
    }
}

impl Reader<'_> {
    /// Refuses an image larger than its stored bytes can hold (at most [`MAX_EXPANSION`] bytes of
    /// pixels per byte compressed, one per byte uncompressed), before anything is allocated for it: a
    /// header claiming 600,000,000 x 2 px over a few bytes is damaged, whatever the memory budget.
    fn data_can_hold(&self, ifd: &Ifd, tiles: usize) -> Result<()> {
        let stored = ifd.byte_counts[..tiles].iter().fold(0u64, |sum, &c| {
            sum.saturating_add(c.min(self.data.len() as u64))
        });
        let factor = if ifd.compression == Compression::None {
            1
        } else {
            MAX_EXPANSION as u64
        };
        // Grey or RGB bytes of the image (an alpha channel is not counted: a lower bound).
        let pixels = (ifd.width as u64)
            .saturating_mul(ifd.height as u64)
            .saturating_mul(ifd.samples.min(3) as u64);
        if pixels / factor > stored {
            return Err(Error::format(
                self.path,
                format!(
                    "a TIFF image of {} x {} px ({} of pixels) stored in {stored} bytes: the file is \
                     damaged or truncated",
                    ifd.width,
                    ifd.height,
                    memory::human(pixels as usize)
                ),
            ));
        }
        Ok(())
    }
}

impl Tiff {
    /// Parses the header and every directory of `data`: the IFD chain and the SubIFDs each lists,
    /// walked as a graph with a visited set (a directory reached twice, by a loop or a repeat, is an
    /// error) and at most [`MAX_IFDS`] directories.
    pub fn parse(data: &[u8], path: &Path) -> Result<Tiff> {
        let not_tiff = || Error::format(path, "not a TIFF file (bad header)");
        let little = match data.get(..2) {
            Some(b"II") => true,
            Some(b"MM") => false,
            _ => return Err(not_tiff()),
        };
        let mut r = Reader {
            data,
            little,
            big: false,
            path,
            values_left: Default::default(),
        };
        r.values_left.set(r.allowance());
        let mut offset = match r.uint(2, 2)? {
            42 => r.uint(4, 4)?,
            43 => {
                r.big = true;
                r.uint(8, 8)?
            }
            _ => return Err(not_tiff()),
        };
        let mut ifds = Vec::new();
        let mut seen = std::collections::HashSet::new();
        // Every directory, reached from the chain or a SubIFDs list, is visited once.
        let mut visit = |at: u64, how: &str| -> Result<()> {
            if !seen.insert(at) {
                return Err(Error::format(
                    path,
                    format!(
                        "the TIFF directory at byte {at} is reached twice ({how}): the directory graph \
                         loops or repeats itself, the file is damaged"
                    ),
                ));
            }
            if seen.len() > MAX_IFDS {
                return Err(Error::format(
                    path,
                    format!("the TIFF holds more than {MAX_IFDS} images: the file is damaged"),
                ));
            }
            Ok(())
        };
        while offset != 0 {
            visit(offset, "by the chain of next directories")?;
            let (ifd, subs, next) = r.ifd(offset)?;
            ifds.push(ifd);
            for sub in subs {
                visit(sub, "as a SubIFD")?;
                let (mut ifd, _, _) = r.ifd(sub)?;
                ifd.reduced = true;
                ifds.push(ifd);
            }
            offset = next;
        }
        Ok(Tiff { ifds })
    }
}

#[cfg(test)]
mod tests {
    use crate::testing::{set_tag, tiff, Image, TempFile};
    use crate::Slide;

    fn open(bytes: &[u8]) -> bleep_core::Result<(Slide, TempFile)> {
        let file = TempFile::new("t.tif", bytes);
        Ok((Slide::open(&file.path)?, file))
    }

    #[test]
    fn zero_sizes_are_errors() {
        let tiled = tiff(&[Image {
            tile: Some((16, 16)),
            ..Image::pattern(40, 30, 3)
        }]);
        let stripped = tiff(&[Image::pattern(40, 30, 3)]);
        for (bytes, tag) in [
            (&tiled, 256),
            (&tiled, 257),
            (&tiled, 322),
            (&tiled, 323),
            (&stripped, 256),
            (&stripped, 257),
        ] {
            let e = open(&set_tag(bytes.clone(), tag, 0))
                .err()
                .unwrap()
                .to_string();
            assert!(e.contains("a size is zero"), "tag {tag}: {e}");
        }
        assert!(open(&tiled).is_ok() && open(&stripped).is_ok());
    }

    #[test]
    fn miniswhite_grey_is_read_inverted_back() {
        for compression in [1, 5, 8] {
            let img = Image {
                photometric: 0,
                compression,
                rows_per_strip: 4,
                ..Image::pattern(20, 10, 1)
            };
            let (slide, _file) = open(&tiff(std::slice::from_ref(&img))).unwrap();
            let rgb = slide.read_region(0, 0, 0, 20, 10).unwrap();
            for (px, &stored) in rgb.chunks_exact(3).zip(&img.pixels) {
                assert_eq!(px, [255 - stored; 3]);
            }
        }
    }

    #[test]
    fn a_tile_claiming_more_than_its_bytes_can_hold_is_refused_before_decoding() {
        let img = Image {
            tile: Some((16, 16)),
            compression: 8,
            ..Image::pattern(32, 32, 3)
        };
        // A tile of 4,000 px square (48 MB) from a few hundred bytes of deflate data, in an image of
        // 32 px square (which the data can hold).
        let bytes = set_tag(set_tag(tiff(&[img]), 322, 4000), 323, 4000);
        let (slide, _file) = open(&bytes).unwrap();
        let e = slide.read_region(0, 0, 0, 8, 8).unwrap_err().to_string();
        assert!(e.contains("cannot hold"), "{e}");
        // The image itself 4,000 px square: refused when the file is opened.
        let e = open(&set_tag(set_tag(bytes, 256, 4000), 257, 4000))
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("a TIFF image of 4000 x 4000 px (45.8 MiB of pixels) stored in"),
            "{e}"
        );
    }
}
