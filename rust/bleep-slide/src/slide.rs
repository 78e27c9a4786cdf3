//! Slides: a pyramid of levels read tile by tile (tiled TIFF / BigTIFF / OME-TIFF / SVS) or a plain image
//! (JPEG, PNG, stripped TIFF) decoded once. Regions are read in batches: the tiles a batch touches are
//! decoded once each, in parallel, kept while the next batch may reuse them, then dropped, so memory
//! stays bounded by a batch whatever the slide's size.
//!
//! Coordinates are level-0 pixels unless a function says otherwise; pixels outside the image read as
//! white (255), the colour of glass, so a patch that crosses the border is padded, never shifted.
//!
//! Every size is checked before it is allocated ([`bleep_core::memory`]): a region, a patch footprint
//! or a thumbnail the memory budget cannot hold is an error, and a thumbnail is read band by band (one
//! row of tiles or strips at a time), so its memory does not grow with the slide.

use crate::resample::{footprint, resample_into, Taps};
use crate::tiff::{decode_jpeg_into, Ifd, Tiff, MAX_EXPANSION};
use bleep_core::fork_safe::ForkSafeMutex;
use bleep_core::{memory, Error, Matrix, Result};
use rayon::prelude::*;
use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Positions beyond this many pixels from the origin are refused (no slide is that large, and the
/// arithmetic of a rectangle stays far from overflow).
const MAX_COORD: f64 = (1u64 << 48) as f64;
/// Source rows of a thumbnail band: at least this many (whole rows of tiles or strips), at most 4 x.
const BAND_ROWS: usize = 64;

/// Patches read together by [`Slide::patches_into`]: the tiles of a batch are held at once.
pub const BATCH: usize = 256;

/// The pixel sizes (micrometres per pixel) taken as plausible, from whatever source: a file's
/// resolution tags, Aperio's `MPP`, OME's `PhysicalSizeX`, or the caller. Scanners give 0.1 to 1
/// um/px at their highest magnification and thumbnails or low-resolution images reach tens of um/px;
/// a value outside 0.01 to 100 um/px is a damaged or meaningless field (a 72 dpi default, a zero
/// denominator, `MPP = 5000`), and taken as it would make a patch span a fraction of a pixel or more
/// pixels than any slide holds.
pub const UM_PER_PX_RANGE: (f64, f64) = (0.01, 100.0);

/// The one rule every pixel size passes: finite, positive and within [`UM_PER_PX_RANGE`]; else an
/// error naming `source` and the value. A file's value that fails it is dropped with a warning
/// ([`Slide::warnings`]); a value the caller gave is refused.
pub fn check_um_per_px(value: f64, source: &str) -> Result<f64> {
    let (lo, hi) = UM_PER_PX_RANGE;
    if value.is_finite() && (lo..=hi).contains(&value) {
        Ok(value)
    } else {
        Err(Error::invalid(format!(
            "{source} gives a pixel size of {value:e} um/px, outside the plausible {lo} to {hi} um/px \
             (scanners give about 0.25 to 1): check the value"
        )))
    }
}

/// How one field of view is read: its level, the scale within that level, whether it is a plain copy,
/// and the side of the level's pixels it reads.
#[derive(Clone, Copy)]
struct Plan {
    level: usize,
    ls: f64,
    exact: bool,
    extent: usize,
}

/// One resolution of the slide.
pub struct Level {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// Level-0 pixels per pixel of this level.
    pub downsample: f64,
    ifd: Option<Ifd>,
}

enum Pixels {
    Tiff(memmap2::Mmap),
    Raster(Vec<u8>),
}

/// A rectangle in a level's pixels (may extend past the level's edges).
#[derive(Clone, Copy, Debug)]
struct Rect {
    x: i64,
    y: i64,
    w: usize,
    h: usize,
}

/// A whole-slide image (a pyramid of levels) or a plain image, read on demand.
pub struct Slide {
    path: PathBuf,
    /// The levels, level 0 (full resolution) first.
    pub levels: Vec<Level>,
    pixels: Pixels,
    /// Micrometres per level-0 pixel and where the value came from, when the file says.
    pub um_per_px: Option<(f64, String)>,
    /// "tiff", "svs", "ome-tiff", "jpeg" or "png".
    pub format: &'static str,
    /// What the file says that was not believed (a pixel size outside [`UM_PER_PX_RANGE`] ...), for
    /// the caller to warn about.
    pub warnings: Vec<String>,
    cache: Cache,
}

/// The tile cache of a slide, shared by every thread reading it. Its lock is only ever held for a
/// few map operations, never while tiles are decoded or painted (that work runs in parallel, and a
/// pool thread waiting on the lock could be the one the parallel work needs: a deadlock); after a
/// `fork` it is never waited on ([`ForkSafeMutex`]): a read that finds it held goes without the cache.
type Cache = ForkSafeMutex<TileCache>;

/// The decoded tiles one batch reads, by (level, tile index).
type Tiles = HashMap<(usize, usize), Arc<Vec<u8>>>;

/// Decoded tiles kept between batches, and the buffers of evicted ones for reuse (fresh memory costs a
/// page fault and a clear per 4 KiB).
#[derive(Default)]
struct TileCache {
    tiles: Tiles,
    free: Vec<Vec<u8>>,
}

/// Maps `path`, which must be a regular file: a FIFO, a device or a directory is refused by name
/// (opening a FIFO would block until a writer came). The file is opened without blocking and checked
/// through the open handle, so nothing can be swapped in between.
fn read_file(path: &Path) -> Result<memmap2::Mmap> {
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        // Opening a FIFO then returns at once; no effect on a regular file.
        options.custom_flags(libc::O_NONBLOCK);
    }
    let file = options.open(path).map_err(|e| Error::io(path, e))?;
    let meta = file.metadata().map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(Error::format(
            path,
            format!(
                "not a regular file (a {}): give the path of an image file",
                kind_of(&meta.file_type())
            ),
        ));
    }
    // SAFETY: the map is read-only; a file truncated under us yields a SIGBUS, as for any mmap reader.
    unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))
}

/// What a file that is not a regular file is, in words.
fn kind_of(t: &std::fs::FileType) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if t.is_fifo() {
            return "FIFO";
        } else if t.is_socket() {
            return "socket";
        } else if t.is_block_device() || t.is_char_device() {
            return "device";
        }
    }
    if t.is_dir() {
        "directory"
    } else {
        "special file"
    }
}

impl Slide {
    /// Opens `path` (a regular file), recognising the format from its first bytes.
    pub fn open(path: &Path) -> Result<Slide> {
        let data = read_file(path)?;
        let head = &data[..data.len().min(8)];
        if head.starts_with(b"II") || head.starts_with(b"MM") {
            Self::open_tiff(path, data)
        } else if head.starts_with(&[0xFF, 0xD8]) {
            let mut rgb = Vec::new();
            let (w, h) = decode_jpeg_into(&data, false, &mut rgb, |_, _| Ok(()))
                .map_err(|e| Error::format(path, format!("bad JPEG ({e})")))?;
            Ok(Self::raster(path, rgb, w, h, "jpeg"))
        } else if head.starts_with(b"\x89PNG") {
            let (rgb, w, h) =
                decode_png(&data).map_err(|e| Error::format(path, format!("bad PNG ({e})")))?;
            Ok(Self::raster(path, rgb, w, h, "png"))
        } else {
            let ext = path
                .extension()
                .and_then(|e| e.to_str())
                .unwrap_or("")
                .to_lowercase();
            let hint = if ["ndpi", "mrxs", "vms", "scn", "bif", "jp2", "svslide", "czi"]
                .contains(&ext.as_str())
            {
                format!(".{ext} slides are read through OpenSlide: pip install 'bleep-rs[openslide]' and pass backend=\"openslide\"")
            } else {
                "expected a JPEG, PNG or TIFF (BigTIFF, OME-TIFF, SVS) image".to_string()
            };
            Err(Error::format(path, format!("unknown image format: {hint}")))
        }
    }

    fn raster(
        path: &Path,
        rgb: Vec<u8>,
        width: usize,
        height: usize,
        format: &'static str,
    ) -> Slide {
        Slide {
            path: path.to_path_buf(),
            levels: vec![Level {
                width,
                height,
                downsample: 1.0,
                ifd: None,
            }],
            pixels: Pixels::Raster(rgb),
            um_per_px: None,
            format,
            warnings: Vec::new(),
            cache: Cache::default(),
        }
    }

    fn open_tiff(path: &Path, data: memmap2::Mmap) -> Result<Slide> {
        let tiff = Tiff::parse(&data, path)?;
        let base = tiff
            .ifds
            .first()
            .ok_or_else(|| Error::format(path, "a TIFF without images"))?
            .clone();
        let (um_per_px, warnings) = physical_size(&base);
        let format = if base.description.starts_with("Aperio") {
            "svs"
        } else if base.description.contains("<OME") {
            "ome-tiff"
        } else {
            "tiff"
        };
        // Pyramid levels: the base, then every smaller image of the same kind and aspect ratio (this skips
        // an SVS file's stripped thumbnail, label and macro images).
        let aspect = base.width as f64 / base.height as f64;
        let mut ifds: Vec<Ifd> = tiff
            .ifds
            .into_iter()
            .skip(1)
            .filter(|i| {
                i.tiled == base.tiled
                    && i.width < base.width
                    && (i.width as f64 / i.height as f64 / aspect - 1.0).abs() < 0.02
            })
            .collect();
        ifds.sort_by_key(|i| std::cmp::Reverse(i.width));
        ifds.dedup_by_key(|i| i.width);
        let mut levels = vec![Level {
            width: base.width,
            height: base.height,
            downsample: 1.0,
            ifd: Some(base),
        }];
        for ifd in ifds {
            let (w0, h0) = (levels[0].width as f64, levels[0].height as f64);
            let downsample = (w0 / ifd.width as f64 + h0 / ifd.height as f64) / 2.0;
            levels.push(Level {
                width: ifd.width,
                height: ifd.height,
                downsample,
                ifd: Some(ifd),
            });
        }
        Ok(Slide {
            path: path.to_path_buf(),
            levels,
            pixels: Pixels::Tiff(data),
            um_per_px,
            format,
            warnings,
            cache: Cache::default(),
        })
    }

    /// The file the slide was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The level to read for `scale` level-0 pixels per output pixel: the coarsest one that is not
    /// coarser than asked (as OpenSlide's `get_best_level_for_downsample`).
    pub fn best_level(&self, scale: f64) -> usize {
        self.levels
            .iter()
            .rposition(|l| l.downsample <= scale * (1.0 + 1e-6))
            .unwrap_or(0)
    }

    /// OpenSlide's `read_region`: `w x h` px of `level` whose top-left corner is `(x, y)` in level-0
    /// px (rounded to the level's grid), as RGB bytes (`w * h * 3`); outside the image is white.
    pub fn read_region(&self, x: i64, y: i64, level: usize, w: usize, h: usize) -> Result<Vec<u8>> {
        let lv = self.level(level)?;
        let at = |v: i64| -> Result<i64> {
            let v = (v as f64 / lv.downsample).round();
            if v.abs() > MAX_COORD {
                return Err(Error::invalid(format!(
                    "the region's corner ({x}, {y}) lies beyond any slide: check the location"
                )));
            }
            Ok(v as i64)
        };
        let rect = Rect {
            x: at(x)?,
            y: at(y)?,
            w,
            h,
        };
        Ok(self.read_regions(level, &[rect])?.pop().unwrap_or_default())
    }

    fn level(&self, level: usize) -> Result<&Level> {
        self.levels.get(level).ok_or_else(|| {
            Error::invalid(format!(
                "level {level} does not exist: the slide has {} levels",
                self.levels.len()
            ))
        })
    }

    /// Reads rectangles of one level as RGB bytes (`w * h * 3` each).
    fn read_regions(&self, level: usize, rects: &[Rect]) -> Result<Vec<Vec<u8>>> {
        self.level(level)?;
        let mut out = Vec::with_capacity(rects.len());
        for r in rects {
            let bytes = memory::bytes(
                &[r.w, r.h, 3],
                &format!("a {} x {} px region", r.w, r.h),
                "read it in smaller pieces",
            )?;
            out.push(memory::filled(bytes, 0u8, "a region")?);
        }
        let mut dsts: Vec<&mut [u8]> = out.iter_mut().map(|v| &mut v[..]).collect();
        let tiles = self.decode_tiles(&[(level, rects)])?;
        self.paint(
            level,
            rects,
            &mut dsts,
            &tiles,
            None::<fn(&mut [u8], &[u8])>,
        );
        Ok(out)
    }

    /// Paints each rectangle of `level` (its tiles already in `tiles`) and hands it to
    /// `finish(dst, region)` with its destination, in parallel; without `finish`, paints straight into
    /// the destination.
    fn paint<F>(
        &self,
        level: usize,
        rects: &[Rect],
        dsts: &mut [&mut [u8]],
        tiles: &Tiles,
        finish: Option<F>,
    ) where
        F: Fn(&mut [u8], &[u8]) + Sync,
    {
        let lv = &self.levels[level];
        match (&self.pixels, &lv.ifd) {
            (Pixels::Raster(rgb), _) => paint_all(
                lv,
                rects,
                dsts,
                &|_, _| Some((&rgb[..], 0, 0, lv.width)),
                finish.as_ref(),
            ),
            (Pixels::Tiff(_), Some(ifd)) => {
                let (tw, th, across) = (ifd.tile_width, ifd.tile_height, ifd.tiles_across());
                let locate = |x: usize, y: usize| {
                    let (tx, ty) = (x / tw, y / th);
                    tiles
                        .get(&(level, ty * across + tx))
                        .map(|px| (&px[..], tx * tw, ty * th, tw))
                };
                paint_all(lv, rects, dsts, &locate, finish.as_ref());
            }
            (Pixels::Tiff(_), None) => unreachable!("every TIFF level has its directory"),
        }
    }

    /// The tiles the rectangles touch (each group is one level's): those the cache holds are reused,
    /// the missing ones decoded in parallel, each once. The cache is locked twice, briefly: to take
    /// what it has (and recycle what this batch does not use), then to keep this batch's tiles for the
    /// next; never while decoding (see [`Cache`]).
    fn decode_tiles(&self, groups: &[(usize, &[Rect])]) -> Result<Tiles> {
        let Pixels::Tiff(data) = &self.pixels else {
            return Ok(Tiles::new());
        };
        let mut needed: Vec<(usize, usize)> = Vec::new();
        for &(level, rects) in groups {
            let lv = &self.levels[level];
            if let Some(ifd) = &lv.ifd {
                needed.extend(
                    rects
                        .iter()
                        .flat_map(|r| touched(lv, ifd, r).map(move |t| (level, t))),
                );
            }
        }
        needed.sort_unstable();
        needed.dedup();
        let mut tiles = Tiles::with_capacity(needed.len());
        let mut buffers = Vec::new();
        if let Some(mut cache) = self.cache.lock() {
            // Keep what this batch uses (the next batch of a row-major grid reuses its lower tiles);
            // recycle the rest, unless another thread's batch still holds it.
            let cache = &mut *cache;
            for key in &needed {
                if let Some(px) = cache.tiles.remove(key) {
                    tiles.insert(*key, px);
                }
            }
            for (_, px) in cache.tiles.drain() {
                if let Ok(buf) = Arc::try_unwrap(px) {
                    cache.free.push(buf);
                }
            }
            let missing = needed.len() - tiles.len();
            let from = cache.free.len().saturating_sub(missing);
            buffers = cache.free.split_off(from);
        }
        let missing: Vec<((usize, usize), Vec<u8>)> = needed
            .iter()
            .filter(|key| !tiles.contains_key(*key))
            .map(|&key| (key, buffers.pop().unwrap_or_default()))
            .collect();
        let decoded: Vec<((usize, usize), Vec<u8>)> = missing
            .into_par_iter()
            .map(|((level, t), buf)| {
                let ifd = self.levels[level].ifd.as_ref().expect("a TIFF level");
                ifd.decode_tile(data, t, &self.path, buf)
                    .map(|px| ((level, t), px))
            })
            .collect::<Result<_>>()?;
        tiles.extend(decoded.into_iter().map(|(key, px)| (key, Arc::new(px))));
        if let Some(mut cache) = self.cache.lock() {
            // What another thread left meanwhile is replaced by this batch: the cache holds one batch.
            let old = std::mem::replace(&mut cache.tiles, tiles.clone());
            for (_, px) in old {
                if let Ok(buf) = Arc::try_unwrap(px) {
                    cache.free.push(buf);
                }
            }
            cache.free.truncate(256);
        }
        Ok(tiles)
    }

    /// How patches of `size` px at `scale` level-0 px per px are read: from the best level, copied
    /// when its scale is 1 (within half a pixel across the patch), else resampled from a footprint.
    fn plan(&self, size: usize, scale: f64) -> Result<Plan> {
        if size == 0 || !(scale.is_finite() && scale > 0.0) {
            return Err(Error::invalid(format!(
                "patch size {size} px at {scale} level-0 px per px: both must be positive"
            )));
        }
        let level = self.best_level(scale);
        let lv = &self.levels[level];
        let ls = scale / lv.downsample;
        // A level whose downsample is off by a rounding of its size (an odd dimension halved) is read as
        // it is when the drift across the patch stays under half a pixel.
        let exact = (ls - 1.0).abs() * (size as f64) < 0.5;
        let ls = if exact { 1.0 } else { ls };
        let too_large = || {
            Error::invalid(format!(
                "a {size} px patch at {scale:.4} level-0 px per px spans more of level {level} than any \
                 slide holds: check um_per_px and the size"
            ))
        };
        let extent = footprint(size, ls).ok_or_else(too_large)?;
        // Each thread holds one footprint while it shrinks it.
        memory::bytes(
            &[extent, extent, 3, rayon::current_num_threads()],
            &format!(
                "{size} px patches at {scale:.4} level-0 px per px (each reads {extent} x {extent} px of level {level}, one per thread)"
            ),
            "check um_per_px and the size",
        )?;
        Ok(Plan {
            level,
            ls,
            exact,
            extent,
        })
    }

    /// Writes patches of `size x size` px, `scale` level-0 px per output px, with their top-left corners
    /// at `origins` (n x 2: x, y in level-0 px), into `out` (`n * size * size * 3` bytes). Read from the
    /// best level and resampled (area filter when shrinking); see [`Slide::fields_into`].
    pub fn patches_into(
        &self,
        origins: Matrix<'_, f64>,
        size: usize,
        scale: f64,
        out: &mut [u8],
    ) -> Result<()> {
        self.fields_into(origins, size, &[scale], BATCH, out)
    }

    /// Several fields of view per location in one pass: field f of row i is a `size` px patch at
    /// `scales[f]` level-0 px per px whose top-left corner is `origins[i, 2f..2f + 2]` (n x 2F, level-0
    /// px), written to `out` as (n, F, size, size, 3). Each field is read from the best level for its
    /// scale, exactly as [`Slide::patches_into`] reads it alone.
    ///
    /// The locations are taken `batch` at a time in the order of the tiles they start in (not the
    /// order given), so that a batch touches few tiles whatever the order of the request; the tiles a
    /// batch touches, at every level its fields read, are decoded once each, in parallel, and kept
    /// while the next batch may reuse them.
    pub fn fields_into(
        &self,
        origins: Matrix<'_, f64>,
        size: usize,
        scales: &[f64],
        batch: usize,
        out: &mut [u8],
    ) -> Result<()> {
        let xy = origins.check("origins")?;
        let fields = scales.len();
        if fields == 0 || origins.cols != 2 * fields {
            return Err(Error::invalid(format!(
                "origins must be an (n, {}) array of (x, y) per field of view, not (n, {})",
                2 * fields.max(1),
                origins.cols
            )));
        }
        if let Some(p) = xy
            .iter()
            .position(|v| !v.is_finite() || v.abs() > MAX_COORD)
        {
            return Err(Error::invalid(format!(
                "origin row {} holds {}: every corner must be a finite position on the slide",
                p / origins.cols,
                xy[p]
            )));
        }
        let plans = scales
            .iter()
            .map(|&s| self.plan(size, s))
            .collect::<Result<Vec<Plan>>>()?;
        let patch = memory::bytes(
            &[size, size, 3],
            &format!("a {size} x {size} px patch"),
            "ask for smaller patches",
        )?;
        let n = origins.rows;
        if Some(out.len()) != n.checked_mul(fields).and_then(|v| v.checked_mul(patch)) {
            return Err(Error::invalid(format!(
                "the output holds {} bytes, {n} x {fields} patches need {}",
                out.len(),
                n.saturating_mul(fields).saturating_mul(patch)
            )));
        }
        let rect = |i: usize, f: usize| {
            let ds = self.levels[plans[f].level].downsample;
            let (x, y) = (xy[i * 2 * fields + 2 * f], xy[i * 2 * fields + 2 * f + 1]);
            Rect {
                x: (x / ds).round() as i64,
                y: (y / ds).round() as i64,
                w: plans[f].extent,
                h: plans[f].extent,
            }
        };
        // Locations in the order of the tile row, then column, of their first field.
        let band = self.levels[plans[0].level]
            .ifd
            .as_ref()
            .map_or(256, |ifd| ifd.tile_height) as i64;
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by_key(|&i| {
            let r = rect(i, 0);
            (r.y.div_euclid(band), r.x)
        });
        let mut slots: Vec<Option<&mut [u8]>> = out.chunks_mut(patch).map(Some).collect();
        for chunk in order.chunks(batch.max(1)) {
            let rects: Vec<Vec<Rect>> = (0..fields)
                .map(|f| chunk.iter().map(|&i| rect(i, f)).collect())
                .collect();
            let groups: Vec<(usize, &[Rect])> = plans
                .iter()
                .zip(&rects)
                .map(|(p, r)| (p.level, &r[..]))
                .collect();
            let tiles = self.decode_tiles(&groups)?;
            for (f, (plan, rects)) in plans.iter().zip(&rects).enumerate() {
                let mut dsts: Vec<&mut [u8]> = chunk
                    .iter()
                    .map(|&i| {
                        slots[i * fields + f]
                            .take()
                            .expect("each slot written once")
                    })
                    .collect();
                let Plan { ls, extent, .. } = *plan;
                if plan.exact {
                    self.paint(
                        plan.level,
                        rects,
                        &mut dsts,
                        &tiles,
                        None::<fn(&mut [u8], &[u8])>,
                    );
                } else {
                    let shrink = |dst: &mut [u8], region: &[u8]| {
                        resample_into(region, extent, extent, size, size, ls, ls, dst)
                    };
                    self.paint(plan.level, rects, &mut dsts, &tiles, Some(shrink));
                }
            }
        }
        Ok(())
    }

    /// The whole slide shrunk so that its longer side is at most `max_side` px: (rgb, width, height).
    ///
    /// Read from the best level band by band (a row of tiles or strips at a time), each band resampled
    /// as it arrives: memory stays within a band and the thumbnail, whatever the size of the slide.
    pub fn thumbnail(&self, max_side: usize) -> Result<(Vec<u8>, usize, usize)> {
        if max_side == 0 {
            return Err(Error::invalid("max_side must be at least 1 px"));
        }
        let (w0, h0) = (self.levels[0].width as f64, self.levels[0].height as f64);
        let scale = (w0.max(h0) / max_side as f64).max(1.0);
        let (w, h) = (
            ((w0 / scale).round() as usize).max(1),
            ((h0 / scale).round() as usize).max(1),
        );
        let bytes = memory::bytes(&[w, h, 3], "the thumbnail", "ask for a smaller max_side")?;
        let mut out = memory::filled(bytes, 0u8, "the thumbnail")?;
        let level = self.best_level(scale);
        let lv = &self.levels[level];
        let (sw, sh) = (lv.width, lv.height);
        let (tx, ty) = (
            Taps::new(w, sw, sw as f64 / w as f64),
            Taps::new(h, sh, sh as f64 / h as f64),
        );
        // Whole rows of tiles or strips, at least BAND_ROWS rows and at most 4 x BAND_ROWS (a tall
        // strip stays decoded in the tile cache while the bands inside it are read).
        let band = match &lv.ifd {
            Some(ifd) => ifd.tile_height * BAND_ROWS.div_ceil(ifd.tile_height),
            None => usize::MAX,
        }
        .min(4 * BAND_ROWS);
        // The horizontal pass of source rows first..first + rows.len(), read a band at a time.
        let (mut rows, mut first, mut next) = (VecDeque::<Vec<f32>>::new(), 0, 0);
        for (y, line) in out.chunks_exact_mut(w * 3).enumerate() {
            let (need_from, need_to) = ty.span(y);
            while first + rows.len() <= need_to {
                let height = band.min(sh - next);
                let rect = Rect {
                    x: 0,
                    y: next as i64,
                    w: sw,
                    h: height,
                };
                let pixels = self.read_regions(level, &[rect])?.pop().unwrap_or_default();
                let mut passed: Vec<Vec<f32>> = (0..height).map(|_| vec![0f32; w * 3]).collect();
                passed
                    .par_iter_mut()
                    .zip(pixels.par_chunks_exact(sw * 3))
                    .for_each(|(dst, src)| tx.row(src, dst));
                rows.extend(passed);
                next += height;
            }
            while first < need_from {
                rows.pop_front();
                first += 1;
            }
            ty.column(y, |r| &rows[r - first], line);
        }
        Ok((out, w, h))
    }
}

/// The tiles (row-major indices) of a level that a rectangle touches.
fn touched(lv: &Level, ifd: &Ifd, r: &Rect) -> impl Iterator<Item = usize> {
    let (tw, th, across) = (ifd.tile_width, ifd.tile_height, ifd.tiles_across());
    let clip = |v: i64, len: usize| v.clamp(0, len as i64) as usize;
    let (x0, x1) = (clip(r.x, lv.width), clip(r.x + r.w as i64, lv.width));
    let (y0, y1) = (clip(r.y, lv.height), clip(r.y + r.h as i64, lv.height));
    let cols = if x1 > x0 {
        x0 / tw..x1.div_ceil(tw)
    } else {
        0..0
    };
    let rows = if y1 > y0 {
        y0 / th..y1.div_ceil(th)
    } else {
        0..0
    };
    rows.flat_map(move |ty| cols.clone().map(move |tx| ty * across + tx))
}

/// Where a level-0 pixel's bytes are: (buffer, its x and y origin, its row width), if anywhere.
type Locate<'a> = dyn Fn(usize, usize) -> Option<(&'a [u8], usize, usize, usize)> + Sync + 'a;

/// Paints every rectangle and hands it to `finish` with its destination; without `finish`, paints
/// straight into the destination.
fn paint_all<'a, F>(
    lv: &Level,
    rects: &[Rect],
    dsts: &mut [&mut [u8]],
    locate: &Locate<'a>,
    finish: Option<&F>,
) where
    F: Fn(&mut [u8], &[u8]) + Sync,
{
    rects
        .par_iter()
        .zip(dsts.par_iter_mut())
        .for_each_init(Vec::new, |region, (r, dst)| {
            let inside = r.x >= 0
                && r.y >= 0
                && r.x as usize + r.w <= lv.width
                && r.y as usize + r.h <= lv.height;
            match finish {
                None => {
                    if !inside {
                        dst.fill(255);
                    }
                    copy_region(r, lv.width, lv.height, dst, locate);
                }
                Some(finish) => {
                    region.clear();
                    region.resize(r.w * r.h * 3, 255);
                    copy_region(r, lv.width, lv.height, region, locate);
                    finish(dst, region);
                }
            }
        })
}

/// Assembles one rectangle into `out` (pre-filled with white) from the source buffers `locate(x, y)`
/// returns for a pixel: (buffer, its x and y origin, its row width). Pixels outside the level, or with
/// no buffer, stay white.
fn copy_region<'a>(r: &Rect, width: usize, height: usize, out: &mut [u8], locate: &Locate<'a>) {
    let (x0, x1) = (r.x.max(0), (r.x + r.w as i64).min(width as i64));
    for row in 0..r.h {
        let y = r.y + row as i64;
        if y < 0 || y >= height as i64 || x1 <= x0 {
            continue;
        }
        let mut x = x0;
        while x < x1 {
            let Some((buf, bx, by, bw)) = locate(x as usize, y as usize) else {
                break;
            };
            let run_end = ((bx + bw) as i64).min(x1);
            let src = ((y as usize - by) * bw + (x as usize - bx)) * 3;
            let dst = (row * r.w + (x - r.x) as usize) * 3;
            let len = (run_end - x) as usize * 3;
            out[dst..dst + len].copy_from_slice(&buf[src..src + len]);
            x = run_end;
        }
    }
}

/// The physical pixel size the file states, from the first source whose value passes the one rule
/// ([`check_um_per_px`]): Aperio's `MPP = ` in the description, OME-XML's `PhysicalSizeX`
/// (micrometres), then the TIFF resolution tags with a physical unit. Each value that fails it is
/// dropped, with a warning naming it.
fn physical_size(base: &Ifd) -> (Option<(f64, String)>, Vec<String>) {
    let d = &base.description;
    let number_after = |key: &str| -> Option<f64> {
        let rest = &d[d.find(key)? + key.len()..];
        let rest = rest.trim_start_matches(['"', ' ', '=']);
        let end = rest
            .find(|c: char| !(c.is_ascii_digit() || matches!(c, '.' | 'e' | 'E' | '-' | '+')))
            .unwrap_or(rest.len());
        rest[..end].parse().ok()
    };
    let mut stated: Vec<(f64, &str)> = Vec::new();
    if d.starts_with("Aperio") {
        if let Some(v) = number_after("MPP") {
            stated.push((v, "Aperio ImageDescription (MPP)"));
        }
    }
    if d.contains("<OME") {
        if let Some(v) = number_after("PhysicalSizeX=") {
            let unit_ok = !d.contains("PhysicalSizeXUnit")
                || d.contains("PhysicalSizeXUnit=\"µm\"")
                || d.contains("PhysicalSizeXUnit=\"um\"");
            if unit_ok {
                stated.push((v, "OME-XML PhysicalSizeX"));
            }
        }
    }
    if let Some(v) = base.tag_um_per_px {
        stated.push((v, "TIFF resolution tags"));
    }
    let mut warnings = Vec::new();
    for (value, source) in stated {
        match check_um_per_px(value, source) {
            Ok(v) => return (Some((v, source.to_string())), warnings),
            Err(e) => warnings.push(format!("{e}; the file's value is ignored")),
        }
    }
    (None, warnings)
}

fn decode_png(data: &[u8]) -> std::result::Result<(Vec<u8>, usize, usize), String> {
    let limits = png::Limits {
        bytes: memory::budget(),
    };
    let mut decoder = png::Decoder::new_with_limits(std::io::Cursor::new(data), limits);
    decoder.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
    let mut reader = decoder.read_info().map_err(|e| e.to_string())?;
    let size = reader.output_buffer_size().ok_or("image too large")?;
    if size / MAX_EXPANSION > data.len() {
        return Err(format!(
            "the header claims {size} bytes of pixels from a {} byte file (truncated or damaged)",
            data.len()
        ));
    }
    let mut buf = memory::filled(size, 0u8, "a PNG").map_err(|e| e.to_string())?;
    let info = reader.next_frame(&mut buf).map_err(|e| e.to_string())?;
    let (w, h) = (info.width as usize, info.height as usize);
    if w == 0 || h == 0 {
        return Err(format!("a PNG of {w} x {h} px"));
    }
    let channels = info.color_type.samples();
    let rgb = buf[..w * h * channels]
        .chunks_exact(channels)
        .flat_map(|p| {
            if channels >= 3 {
                [p[0], p[1], p[2]]
            } else {
                [p[0]; 3]
            }
        })
        .collect();
    Ok((rgb, w, h))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{tiff, Image, TempFile};

    /// The thumbnail read band by band equals the whole level resampled at once.
    #[test]
    fn thumbnails_by_band_equal_the_whole_image_resampled() {
        for (tile, rows) in [(Some((16, 16)), 0), (None, 3), (None, 50)] {
            let img = Image {
                tile,
                rows_per_strip: rows.max(1),
                ..Image::pattern(150, 110, 3)
            };
            let file = TempFile::new("t.tif", &tiff(std::slice::from_ref(&img)));
            let slide = Slide::open(&file.path).unwrap();
            for max_side in [7, 64, 97, 150, 400] {
                let (got, w, h) = slide.thumbnail(max_side).unwrap();
                let mut want = vec![0u8; w * h * 3];
                let (sx, sy) = (150.0 / w as f64, 110.0 / h as f64);
                resample_into(&img.pixels, 150, 110, w, h, sx, sy, &mut want);
                assert_eq!(got, want, "{tile:?} {rows} {max_side}");
            }
        }
    }

    /// A three-level tiled pyramid (LZW), the source of the field tests.
    fn pyramid() -> (TempFile, Slide) {
        let levels: Vec<Image> = [(300, 240), (150, 120), (75, 60)]
            .into_iter()
            .map(|(w, h)| Image {
                tile: Some((32, 32)),
                compression: 5,
                ..Image::pattern(w, h, 3)
            })
            .collect();
        let file = TempFile::new("p.tif", &tiff(&levels));
        let slide = Slide::open(&file.path).unwrap();
        assert_eq!(slide.levels.len(), 3);
        (file, slide)
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(40))]
        /// All fields in one pass equal each field read alone, whatever the order of the locations and
        /// the batch size (the reader reorders its work, never its output).
        #[test]
        fn fields_in_one_pass_equal_each_field_alone(
            spots in proptest::collection::vec((-20.0f64..320.0, -20.0f64..260.0), 1..24),
            size in 1usize..40,
            base in proptest::sample::select(vec![0.6, 1.0, 1.3, 2.0]),
            fields in proptest::sample::subsequence(vec![1.0, 1.5, 2.0, 3.0, 4.5], 1..5),
            batch in 1usize..9,
        ) {
            let (_file, slide) = pyramid();
            let scales: Vec<f64> = fields.iter().map(|f| f * base).collect();
            let (n, nf, patch) = (spots.len(), scales.len(), size * size * 3);
            let origins: Vec<f64> = spots
                .iter()
                .flat_map(|&(x, y)| scales.iter().flat_map(move |s| [x - size as f64 * s / 2.0, y - size as f64 * s / 2.0]))
                .collect();
            let mut together = vec![0u8; n * nf * patch];
            slide.fields_into(Matrix::new(&origins, n, 2 * nf), size, &scales, batch, &mut together).unwrap();
            for (f, &scale) in scales.iter().enumerate() {
                let alone_xy: Vec<f64> = (0..n).flat_map(|i| [origins[i * 2 * nf + 2 * f], origins[i * 2 * nf + 2 * f + 1]]).collect();
                let mut alone = vec![0u8; n * patch];
                slide.patches_into(Matrix::new(&alone_xy, n, 2), size, scale, &mut alone).unwrap();
                for i in 0..n {
                    let got = &together[(i * nf + f) * patch..][..patch];
                    proptest::prop_assert_eq!(got, &alone[i * patch..][..patch], "spot {} field {}", i, f);
                }
                // One at a time, in reverse order: the same patches.
                for i in (0..n).rev() {
                    let mut one = vec![0u8; patch];
                    slide.patches_into(Matrix::new(&alone_xy[2 * i..2 * i + 2], 1, 2), size, scale, &mut one).unwrap();
                    proptest::prop_assert_eq!(&one[..], &alone[i * patch..][..patch]);
                }
            }
        }
    }

    #[test]
    fn absurd_regions_and_patches_are_errors() {
        let file = TempFile::new("t.tif", &tiff(&[Image::pattern(40, 30, 3)]));
        let slide = Slide::open(&file.path).unwrap();
        let message = |r: Result<Vec<u8>>| r.unwrap_err().to_string();
        assert!(message(slide.read_region(0, 0, 0, 1 << 62, 4)).contains("too large to address"));
        assert!(message(slide.read_region(0, 0, 0, 1 << 20, 1 << 20)).contains("memory budget"));
        assert!(message(slide.read_region(i64::MAX, 0, 0, 4, 4)).contains("beyond any slide"));
        assert!(message(slide.read_region(0, 0, 3, 4, 4)).contains("level 3 does not exist"));
        let mut out = vec![0u8; 2 * 8 * 8 * 3];
        let patches = |origins: &[f64], scale: f64, out: &mut [u8]| {
            slide
                .patches_into(Matrix::new(origins, 2, 2), 8, scale, out)
                .unwrap_err()
                .to_string()
        };
        assert!(patches(&[0.0, 0.0, f64::NAN, 1.0], 1.0, &mut out).contains("origin row 1"));
        assert!(patches(&[0.0; 4], 1e12, &mut out).contains("check um_per_px"));
        assert!(patches(&[0.0; 4], 0.0, &mut out).contains("must be positive"));
        assert!(patches(&[0.0; 4], 1.0, &mut out[1..]).contains("the output holds"));
        let fields = |cols: usize, scales: &[f64]| {
            let mut out = vec![0u8; 4 * 8 * 8 * 3];
            slide
                .fields_into(
                    Matrix::new(&[0.0; 8], 8 / cols, cols),
                    8,
                    scales,
                    4,
                    &mut out,
                )
                .unwrap_err()
                .to_string()
        };
        assert!(fields(4, &[1.0]).contains("(n, 2) array"));
        assert!(fields(2, &[]).contains("(n, 2) array"));
        assert!(fields(4, &[1.0, f64::INFINITY]).contains("must be positive"));
        assert!(slide.thumbnail(0).is_err());
    }
}
