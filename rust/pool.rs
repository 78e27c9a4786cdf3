//! The named rayon pools that all native work runs on.
//!
//! Size: an explicit per-call argument wins, then [`set_default_threads`], then the environment variable
//! `BLEEP_RS_NUM_THREADS`, then the number of CPUs. Pools are cached per size and per process: a child
//! made by `fork` (PyTorch data loaders do this) has none of its parent's worker threads, so it builds
//! its own pools instead of waiting forever on the parent's.

use crate::error::{Error, Result};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

pub const ENV_VAR: &str = "BLEEP_RS_NUM_THREADS";

static DEFAULT_THREADS: AtomicUsize = AtomicUsize::new(0);
/// The pools of one process (by id): a forked child finds its parent's id here and starts afresh.
type Pools = (u32, HashMap<usize, Arc<rayon::ThreadPool>>);
static POOLS: Mutex<Option<Pools>> = Mutex::new(None);

/// Set the process-wide default number of threads (0 restores the automatic choice).
pub fn set_default_threads(n: usize) {
    DEFAULT_THREADS.store(n, Ordering::Relaxed);
}

/// The number of threads a call without an explicit count uses.
pub fn default_threads() -> Result<usize> {
    let set = DEFAULT_THREADS.load(Ordering::Relaxed);
    if set > 0 {
        return Ok(set);
    }
    match std::env::var(ENV_VAR) {
        Ok(v) => match v.trim().parse::<usize>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(Error::invalid(format!(
                "{ENV_VAR}={v:?} is not a positive whole number of threads"
            ))),
        },
        Err(_) => Ok(std::thread::available_parallelism().map_or(1, |n| n.get())),
    }
}

/// Run `f` on the pool of `threads` threads (None: the default).
pub fn install<R: Send>(threads: Option<usize>, f: impl FnOnce() -> R + Send) -> Result<R> {
    let n = match threads {
        Some(0) => return Err(Error::invalid("threads must be at least 1")),
        Some(n) => n,
        None => default_threads()?,
    };
    Ok(pool(n)?.install(f))
}

fn pool(n: usize) -> Result<Arc<rayon::ThreadPool>> {
    let pid = std::process::id();
    let mut guard = POOLS.lock().unwrap_or_else(|e| e.into_inner());
    if guard.as_ref().is_some_and(|(owner, _)| *owner != pid) {
        // Forked child: the parent's pools have no threads here. Never drop them (their workers are gone).
        std::mem::forget(guard.take());
    }
    let (_, pools) = guard.get_or_insert_with(|| (pid, HashMap::new()));
    if let Some(p) = pools.get(&n) {
        return Ok(p.clone());
    }
    let p = rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .thread_name(|i| format!("bleep-rs-{i}"))
        .build()
        .map_err(|e| Error::invalid(format!("cannot start {n} threads: {e}")))?;
    let p = Arc::new(p);
    pools.insert(n, p.clone());
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explicit_size_is_used_and_named() {
        let (n, name) = install(Some(3), || {
            let name = rayon::broadcast(|_| std::thread::current().name().map(str::to_owned));
            (rayon::current_num_threads(), name[0].clone())
        })
        .unwrap();
        assert_eq!(n, 3);
        assert!(name.unwrap().starts_with("bleep-rs-"));
        assert!(install(Some(0), || ()).is_err());
    }
}
