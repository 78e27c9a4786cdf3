//! Native core of bleep-rs.
//!
//! * [`search`]: exact top-k cosine search over a packed reference, blocked and fused with the top-k filter.
//! * [`kernel`]: the score micro-kernels (AVX512-BF16 / AVX-512 / AVX2 at run time, portable fallback),
//!   the panel packing and the bf16 error bound.
//! * `topk`: the bounded selection of the best k (with a margin for approximate scores).
//! * `memory`: huge-page allocations that fail with an error rather than an abort.
//! * [`aggregate`]: neighbour weights and the fused gather-and-weighted-sum of expression.
//! * [`mod@reference`]: the reference (embeddings + expression + metadata) and its safetensors file.
//! * [`pool`]: the named rayon pool, sized by argument or `BLEEP_RS_NUM_THREADS`, safe after `fork`.
//! * [`slide`]: slides read tile by tile (with [`tiff`], the TIFF/BigTIFF/SVS/OME-TIFF reader) or whole
//!   (JPEG, PNG), patches at any pixel size (with `resample`), thumbnails.
//! * [`tissue`]: the CLAM-style tissue mask and the grid of tissue tiles.
//! * [`stain`]: Macenko and Reinhard stain normalisation and the mean/std tensor conversion.
//! * [`error`]: the one error type.
//!
//! The PyO3 glue lives in `python.rs`, compiled only with the `python` feature (maturin turns it on).

pub mod aggregate;
pub mod error;
pub mod kernel;
mod memory;
pub mod pool;
pub mod reference;
mod resample;
pub mod search;
mod simd;
pub mod slide;
pub mod stain;
pub mod tiff;
pub mod tissue;
mod topk;

#[cfg(feature = "python")]
mod python;

pub use error::{Error, Result};
