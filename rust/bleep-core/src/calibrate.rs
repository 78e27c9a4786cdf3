//! The search kernel chosen by speed, not by CPU flags.
//!
//! Where the CPU has more than one kernel of its best vector width (AVX512-BF16 beside fp32 AVX-512), which
//! is faster depends on the core: on Zen 4 the bf16 filter wins, on Sapphire Rapids `vdpbf16ps` is no
//! faster than fp32 FMA and the bf16 path's rescoring makes it lose. So the first process on a CPU times
//! each candidate on a small search (a tenth to a fifth of a second in all) and keeps the fastest; the answer
//! is cached per CPU model and package version in `$BLEEP_RS_CACHE` (else `$XDG_CACHE_HOME/bleep-rs`,
//! else `~/.cache/bleep-rs`), so later processes read it back. `BLEEP_RS_KERNEL` still forces a kernel.

use crate::cpu::{cpu, Kernel, KERNEL_VAR};
use crate::search::{normalise_rows, PackedIndex};
use std::path::PathBuf;
use std::time::Instant;

/// How the kernel in use was chosen, for `bleep_rs.kernel_info()` and the benchmarks.
#[derive(Clone, Debug)]
pub struct Choice {
    /// The kernel in use.
    pub kernel: Kernel,
    /// Why: "BLEEP_RS_KERNEL", "measured", "measured (cached)" or "the only candidate".
    pub reason: String,
    /// Queries per second of each candidate on the calibration search (empty when none ran or was cached).
    pub rates: Vec<(Kernel, f64)>,
    /// A `BLEEP_RS_KERNEL` value that names no kernel of this CPU (it was ignored), for a warning.
    pub ignored_request: Option<String>,
}

/// Reference rows, queries and neighbours of the calibration search: big enough that the scan dominates
/// (as in real use), small enough to take a few tens of milliseconds per kernel.
const ROWS: usize = 32_768;
const QUERIES: usize = 128;
const DIM: usize = 256;
const K: usize = 50;
const ROUNDS: usize = 2;

/// The kernel to run: forced, cached, or measured now.
pub(crate) fn choose() -> Choice {
    let available = &cpu().available;
    let wanted = std::env::var(KERNEL_VAR).ok();
    if let Some(name) = wanted.as_deref() {
        if let Some(&k) = available.iter().find(|k| k.name() == name) {
            return Choice {
                kernel: k,
                reason: KERNEL_VAR.into(),
                rates: vec![],
                ignored_request: None,
            };
        }
    }
    let ignored_request = wanted;
    let candidates = candidates(available);
    if candidates.len() == 1 {
        return Choice {
            kernel: candidates[0],
            reason: "the only candidate".into(),
            rates: vec![],
            ignored_request,
        };
    }
    if let Some(k) = read_cache(&candidates) {
        return Choice {
            kernel: k,
            reason: "measured (cached)".into(),
            rates: vec![],
            ignored_request,
        };
    }
    let rates = measure(&candidates);
    let kernel = fastest(&rates);
    write_cache(kernel, &rates);
    Choice {
        kernel,
        reason: "measured".into(),
        rates,
        ignored_request,
    }
}

/// The kernels worth timing: those of the best vector width (a narrower one is never faster).
fn candidates(available: &[Kernel]) -> Vec<Kernel> {
    let best = available[0];
    available
        .iter()
        .copied()
        .filter(|k| k.has_avx512() == best.has_avx512() && (*k == best || k.has_avx512()))
        .collect()
}

/// The fastest of measured rates; ties go to the earlier (flag-preferred) kernel.
fn fastest(rates: &[(Kernel, f64)]) -> Kernel {
    let mut best = rates[0];
    for &r in &rates[1..] {
        if r.1 > best.1 {
            best = r;
        }
    }
    best.0
}

/// Queries per second of each kernel on the same search, best of a few interleaved rounds.
fn measure(kernels: &[Kernel]) -> Vec<(Kernel, f64)> {
    let (rows, queries) = calibration_data();
    let index = match PackedIndex::new(rows, ROWS, DIM) {
        Ok(i) => i,
        Err(_) => return kernels.iter().map(|&k| (k, 0.0)).collect(),
    };
    let mut best = vec![f64::INFINITY; kernels.len()];
    for round in 0..=ROUNDS {
        for (i, &k) in kernels.iter().enumerate() {
            let t = Instant::now();
            std::hint::black_box(index.search_with(k, &queries, QUERIES, K));
            // Round 0 packs each kernel's panels and warms the caches: not timed.
            if round > 0 {
                best[i] = best[i].min(t.elapsed().as_secs_f64());
            }
        }
    }
    kernels
        .iter()
        .zip(best)
        .map(|(&k, s)| (k, QUERIES as f64 / s.max(1e-9)))
        .collect()
}

/// Clustered unit vectors (a fixed generator): the score distribution of real embeddings, where the
/// bf16 filter's margin matters, rather than the near-zero cosines of isotropic noise.
fn calibration_data() -> (Vec<f32>, Vec<f32>) {
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    let centres: Vec<f32> = (0..64 * DIM).map(|_| next()).collect();
    let mut make = |n: usize| {
        let mut v = Vec::with_capacity(n * DIM);
        for i in 0..n {
            let c = (i * 7919) % 64;
            v.extend((0..DIM).map(|j| centres[c * DIM + j] + 0.3 * next()));
        }
        normalise_rows(&mut v, DIM);
        v
    };
    let rows = make(ROWS);
    let queries = make(QUERIES);
    (rows, queries)
}

/// The cache file's key: what makes a measurement valid elsewhere.
fn cache_key() -> String {
    format!("{} | bleep-rs {}", cpu_model(), env!("CARGO_PKG_VERSION"))
}

fn cache_file() -> Option<PathBuf> {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    let dir = var("BLEEP_RS_CACHE")
        .or_else(|| var("XDG_CACHE_HOME").map(|d| d.join("bleep-rs")))
        .or_else(|| var("HOME").map(|h| h.join(".cache").join("bleep-rs")))?;
    Some(dir.join("search-kernel.json"))
}

fn read_cache(candidates: &[Kernel]) -> Option<Kernel> {
    let text = std::fs::read_to_string(cache_file()?).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    if v.get("key")?.as_str()? != cache_key() {
        return None;
    }
    let name = v.get("kernel")?.as_str()?;
    candidates.iter().copied().find(|k| k.name() == name)
}

/// Best effort: a cache that cannot be written only means the next process measures again.
fn write_cache(kernel: Kernel, rates: &[(Kernel, f64)]) {
    let Some(path) = cache_file() else { return };
    let rates: serde_json::Map<String, serde_json::Value> = rates
        .iter()
        .map(|(k, r)| {
            (
                k.name().to_string(),
                serde_json::json!((r * 10.0).round() / 10.0),
            )
        })
        .collect();
    let body = serde_json::json!({
        "key": cache_key(),
        "kernel": kernel.name(),
        "queries_per_second": rates,
    });
    let Some(dir) = path.parent() else { return };
    if std::fs::create_dir_all(dir).is_err() {
        return;
    }
    let tmp = dir.join(crate::memory::temporary_name("search-kernel.json"));
    if std::fs::write(&tmp, body.to_string()).is_ok() && std::fs::rename(&tmp, &path).is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
}

/// The CPU's model name (the brand string), as the benchmarks print it.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fastest_candidate_wins_and_ties_keep_the_first() {
        let r = [(Kernel::Avx512Bf16, 2952.0), (Kernel::Avx512, 4917.0)];
        assert_eq!(fastest(&r), Kernel::Avx512);
        let r = [(Kernel::Avx512Bf16, 5000.0), (Kernel::Avx512, 4917.0)];
        assert_eq!(fastest(&r), Kernel::Avx512Bf16);
        let r = [(Kernel::Avx512Bf16, 1.0), (Kernel::Avx512, 1.0)];
        assert_eq!(fastest(&r), Kernel::Avx512Bf16);
    }

    #[test]
    fn candidates_are_the_kernels_of_the_best_width() {
        use Kernel::*;
        assert_eq!(
            candidates(&[Avx512Bf16, Avx512, Avx2, Portable]),
            [Avx512Bf16, Avx512]
        );
        assert_eq!(candidates(&[Avx512, Avx2, Portable]), [Avx512]);
        assert_eq!(candidates(&[Avx2, Portable]), [Avx2]);
        assert_eq!(candidates(&[Portable]), [Portable]);
    }

    #[test]
    fn every_candidate_is_measured_with_a_positive_rate() {
        let c = candidates(&cpu().available);
        let rates = measure(&c);
        assert_eq!(rates.len(), c.len());
        assert!(rates.iter().all(|(_, r)| *r > 0.0), "{rates:?}");
    }
}
