//! bleep-core: the retrieval core of bleep-rs, with no image or Python dependency.
//!
//! A [`Reference`] holds reference spots' embeddings and expression; [`Reference::search`] finds each
//! query's exact top-k cosine neighbours and [`Reference::impute`] predicts its expression from them.
//! References are saved to and loaded from one safetensors file ([`Reference::save`], [`Reference::load`]).
//! Every argument is validated here: bad input is an [`Error`] that says what to fix, never a panic.
//!
//! Inside:
//! * `search`: exact top-k cosine search over a packed reference, blocked and fused with the top-k filter
//!   ([`PackedIndex`]).
//! * `kernel`: the score micro-kernels (AVX512-BF16 / AVX-512 / AVX2, portable fallback), the panel
//!   packing and the bf16 error bound; `topk`: the bounded selection of the best k.
//! * `aggregate`: neighbour weights and the fused gather-and-weighted-sum of expression ([`Expression`]).
//! * `reference`: the reference and its file format.
//! * `sparse`: the expression as compressed sparse rows, and its kernels; `buf`: numbers owned or borrowed
//!   from a memory-mapped reference file.
//! * [`cpu`]: the one place that asks the CPU which vector extensions it has.
//! * [`pool`]: the named rayon pools all native work runs on (bounded, reused, safe after `fork`).
//! * [`memory`]: allocations checked against a memory budget, failing with an error instead of an abort.
//! * [`fork_safe`]: the lock over caches that a forked child never waits on forever.
//!
//! Threading: the functions here run on the rayon pool of their caller. Run them inside
//! [`pool::install`] so that they use a named, fork-safe pool rather than rayon's global one.
#![deny(missing_docs)]

mod aggregate;
mod buf;
pub mod calibrate;
pub mod cpu;
mod error;
pub mod fork_safe;
mod kernel;
mod matrix;
pub mod memory;
#[cfg(test)]
mod mutation;
pub mod pool;
mod reference;
mod search;
mod sparse;
mod topk;

pub use aggregate::{
    weights as neighbour_weights, Dtype, Expression, Format, Method, Table, Write,
};
pub use cpu::Kernel;
pub use error::{Error, Result};
pub use matrix::Matrix;
pub use reference::{Imputation, Labels, Reference, FORMAT, FORMAT_VERSION};
pub use search::{normalise_rows, Neighbours, PackedIndex};
