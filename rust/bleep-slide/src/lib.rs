//! bleep-slide: the images of bleep-rs.
//!
//! * [`Slide`]: a whole-slide image read tile by tile (tiled or stripped TIFF, BigTIFF, OME-TIFF, Aperio
//!   SVS; with `tiff`, the TIFF reader) or a plain image decoded once (JPEG, PNG); regions, patches at any
//!   pixel size (with `resample`), thumbnails read band by band in bounded memory.
//! * [`tissue_mask`] and [`tissue_grid`]: CLAM's tissue detection on a thumbnail, and the grid of tiles
//!   that hold tissue.
//! * [`macenko_fit`] / [`macenko_transform`] (or [`macenko_transform_into`]), [`reinhard_fit`] /
//!   [`reinhard_transform`]: stain normalisation as torchstain does it; [`to_tensor`]: uint8 patches to
//!   normalised float32 tensors.
//! * `simd`: loops compiled for AVX-512, AVX2 and the baseline, picked at run time from
//!   [`bleep_core::cpu`].
//!
//! Every input is checked here, and every size computed from a file or an argument is checked against
//! [`bleep_core::memory::budget`] before anything is allocated: a damaged file or an absurd argument is
//! an [`Error`], never a panic, an abort or a hang. A TIFF's directories are walked as a graph with a
//! visited set and a bound, and an image its data cannot hold is refused when the file is opened. Every
//! pixel size, from a file or a caller, passes one rule: [`check_um_per_px`]. Functions run on their
//! caller's rayon pool: run them inside [`bleep_core::pool::install`]. A [`Slide`] may be read by many
//! threads at once, and in a child forked while another thread read it (its tile cache is a
//! [`bleep_core::fork_safe::ForkSafeMutex`], never held while tiles are decoded).
#![deny(missing_docs)]

#[cfg(test)]
mod mutation;
mod resample;
mod shape;
mod simd;
mod slide;
mod stain;
#[cfg(test)]
mod testing;
mod tiff;
mod tissue;

pub use bleep_core::{Error, Result};
pub use slide::{check_um_per_px, Level, Slide, BATCH, UM_PER_PX_RANGE};
pub use stain::{
    macenko_fit, macenko_transform, macenko_transform_into, reinhard_fit, reinhard_transform,
    to_tensor, LabStats, MacenkoParams, Stains,
};
pub use tissue::{tissue_grid, tissue_mask, Mask};
