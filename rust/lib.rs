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
//! * [`error`]: the one error type.
//!
//! The PyO3 glue lives in `python.rs`, compiled only with the `python` feature (maturin turns it on).

pub mod aggregate;
pub mod error;
pub mod kernel;
mod memory;
pub mod pool;
pub mod reference;
pub mod search;
mod topk;

#[cfg(feature = "python")]
mod python;

pub use error::{Error, Result};
