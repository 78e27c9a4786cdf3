//! The named rayon pools that all native work runs on.
//!
//! Size: an explicit per-call argument wins, then [`set_default_threads`], then the environment variable
//! `BLEEP_RS_NUM_THREADS`, then the number of CPUs; at most [`MAX_THREADS`].
//!
//! Pools are bounded and reused: the [`CACHED_POOLS`] most recently used sizes keep their pool, and an
//! older one is dropped (its threads end once its last job returns), so calls with many different
//! thread counts never pile up threads. Pools belong to one process: a child made by `fork` (PyTorch
//! data loaders do this) has none of its parent's worker threads, so it builds its own pools instead of
//! waiting forever on the parent's; and a child whose registry was locked at the fork (by a parent's
//! thread, which the child does not have) never waits on it ([`ForkSafeMutex`]): it starts a pool for
//! the call. rayon's global pool is never used. [`run`] also turns a panic in the work into an error.

use crate::error::{Error, Result};
use crate::fork_safe::ForkSafeMutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// The environment variable that sets the default number of threads.
pub const ENV_VAR: &str = "BLEEP_RS_NUM_THREADS";
/// The most threads one pool may have.
pub const MAX_THREADS: usize = 1024;
/// How many pools (of different sizes) are kept for reuse.
pub const CACHED_POOLS: usize = 4;

static DEFAULT_THREADS: AtomicUsize = AtomicUsize::new(0);

/// The pools of one process (by id), most recently used first.
struct Pools {
    pid: u32,
    by_size: Vec<(usize, Arc<rayon::ThreadPool>)>,
}

static POOLS: ForkSafeMutex<Option<Pools>> = ForkSafeMutex::new(None);

/// Set the process-wide default number of threads (0 restores the automatic choice).
pub fn set_default_threads(n: usize) -> Result<()> {
    if n > MAX_THREADS {
        return Err(too_many(n, "set_num_threads"));
    }
    DEFAULT_THREADS.store(n, Ordering::Relaxed);
    Ok(())
}

/// The number of threads a call without an explicit count uses.
pub fn default_threads() -> Result<usize> {
    let set = DEFAULT_THREADS.load(Ordering::Relaxed);
    if set > 0 {
        return Ok(set);
    }
    match std::env::var(ENV_VAR) {
        Ok(v) => match v.trim().parse::<usize>() {
            Ok(n) if n > MAX_THREADS => Err(too_many(n, ENV_VAR)),
            Ok(n) if n > 0 => Ok(n),
            _ => Err(Error::invalid(format!(
                "{ENV_VAR}={v:?} is not a positive whole number of threads"
            ))),
        },
        Err(_) => Ok(std::thread::available_parallelism().map_or(1, |n| n.get())),
    }
}

fn too_many(n: usize, what: &str) -> Error {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    Error::invalid(format!(
        "{what}: {n} threads is more than the limit of {MAX_THREADS} (this machine has {cpus} CPUs): ask for at most {MAX_THREADS}"
    ))
}

/// The number of threads a call runs on: `threads` (None: the default), checked.
pub fn threads(threads: Option<usize>) -> Result<usize> {
    match threads {
        Some(0) => Err(Error::invalid("threads must be at least 1")),
        Some(n) if n > MAX_THREADS => Err(too_many(n, "threads")),
        Some(n) => Ok(n),
        None => default_threads(),
    }
}

/// Run `f` on the named pool of `threads` threads (None: the default).
pub fn install<R: Send>(threads: Option<usize>, f: impl FnOnce() -> R + Send) -> Result<R> {
    Ok(pool(self::threads(threads)?)?.install(f))
}

/// [`install`] for fallible work, with a panic anywhere inside it (on any of the pool's threads) caught
/// and returned as an error: a bug then fails one call, never the process that called it.
pub fn run<T: Send>(threads: Option<usize>, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    let work = std::panic::AssertUnwindSafe(|| install(threads, f));
    match std::panic::catch_unwind(work) {
        Ok(result) => result.and_then(|r| r),
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "no message".into());
            Err(Error::invalid(format!(
                "internal error in bleep-rs's native code ({what}): please report it with the call that caused it"
            )))
        }
    }
}

/// The pool of `n` threads of this process: a cached one, or a new one that evicts the least recently
/// used beyond [`CACHED_POOLS`].
fn pool(n: usize) -> Result<Arc<rayon::ThreadPool>> {
    if let Some(p) = cached(n) {
        return Ok(p);
    }
    // Threads are started outside the lock, so that other calls (and a fork) never wait on them.
    let built = rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .thread_name(|i| format!("bleep-rs-{i}"))
        .build()
        .map_err(|e| Error::invalid(format!("cannot start {n} threads: {e}")))?;
    let built = Arc::new(built);
    let Some(mut guard) = lock() else {
        // A forked child whose registry was locked at the fork: this pool serves this call only.
        return Ok(built);
    };
    let pools = &mut guard.as_mut().expect("made by lock()").by_size;
    if let Some(at) = pools.iter().position(|(size, _)| *size == n) {
        // Another call built one meanwhile: use it, drop ours.
        let p = pools.remove(at);
        pools.insert(0, p);
    } else {
        pools.insert(0, (n, built));
        pools.truncate(CACHED_POOLS);
    }
    Ok(pools[0].1.clone())
}

fn cached(n: usize) -> Option<Arc<rayon::ThreadPool>> {
    let mut guard = lock()?;
    let pools = &mut guard.as_mut().expect("made by lock()").by_size;
    let at = pools.iter().position(|(size, _)| *size == n)?;
    let p = pools.remove(at);
    pools.insert(0, p);
    Some(pools[0].1.clone())
}

/// The pool registry of this process (a forked child's starts empty), or None in a forked child
/// whose registry was locked at the fork.
fn lock() -> Option<std::sync::MutexGuard<'static, Option<Pools>>> {
    let pid = std::process::id();
    let mut guard = POOLS.lock()?;
    if guard.as_ref().is_some_and(|p| p.pid != pid) {
        // Forked child: the parent's pools have no threads here. Never drop them (their workers are gone).
        std::mem::forget(guard.take());
    }
    guard.get_or_insert_with(|| Pools {
        pid,
        by_size: Vec::new(),
    });
    Some(guard)
}

/// Pools currently kept (for tests).
#[cfg(test)]
fn kept() -> Vec<usize> {
    lock()
        .expect("not a forked child")
        .as_ref()
        .map(|p| p.by_size.iter().map(|(n, _)| *n).collect())
        .unwrap_or_default()
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
        let e = install(Some(100_000), || ()).unwrap_err().to_string();
        assert!(e.contains("limit of 1024"), "{e}");
        assert!(set_default_threads(MAX_THREADS + 1).is_err());
    }

    #[test]
    fn a_panic_in_the_work_is_an_error() {
        use rayon::prelude::*;
        let e = run(Some(2), || -> Result<()> { panic!("boom") }).unwrap_err();
        assert!(e.to_string().contains("internal error") && e.to_string().contains("boom"));
        // On a worker thread of the pool, too.
        let e = run(Some(2), || -> Result<u32> {
            Ok((0..1000u32)
                .into_par_iter()
                .map(|i| if i == 777 { panic!("at {i}") } else { i })
                .sum())
        })
        .unwrap_err();
        assert!(e.to_string().contains("at 777"), "{e}");
        assert_eq!(run(Some(2), || Ok(3)).unwrap(), 3);
    }

    #[test]
    fn pools_are_bounded_and_reused() {
        for n in 1..=12 {
            assert_eq!(install(Some(n), rayon::current_num_threads).unwrap(), n);
        }
        let kept = kept();
        assert!(kept.len() <= CACHED_POOLS, "{kept:?}");
        // The most recent size is reused, not rebuilt.
        let first = pool(12).unwrap();
        assert!(Arc::ptr_eq(&first, &pool(12).unwrap()));
    }
}
