//! Allocations that fail with an error, never an abort.
//!
//! A size computed from a file or an argument is checked before anything is allocated: its arithmetic
//! cannot wrap ([`bytes`]), it must fit the memory budget (half of this machine's memory, [`budget`]),
//! and the allocation itself is fallible ([`filled`]). Large tables (the gene blocks of the expression)
//! live on 2 MiB pages where the kernel allows it ([`huge_zeroed`]): fewer page faults when they are
//! filled and fewer TLB misses when several blocks stream at once.
//!
//! Output buffers that outlive a call (patch arrays handed to Python) come from [`recycled`] and go
//! back through [`recycle`] when released: fresh memory costs a page fault and a clear by the kernel
//! for every page, which is a fifth of the time of reading patches, while a pipeline that reads batch
//! after batch can reuse the pages of the batch it has just let go.

use crate::error::{Error, Result};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

static BUDGET: AtomicUsize = AtomicUsize::new(0);

/// The most one request may allocate: what [`set_budget`] set, else half of the machine's physical
/// memory (16 GiB where it cannot be read).
pub fn budget() -> usize {
    static HALF_OF_MEMORY: OnceLock<usize> = OnceLock::new();
    match BUDGET.load(Ordering::Relaxed) {
        0 => *HALF_OF_MEMORY.get_or_init(|| physical_memory().map_or(16 << 30, |m| m / 2)),
        set => set,
    }
}

/// Set the budget of [`budget`] in bytes (0 restores the default).
pub fn set_budget(bytes: usize) {
    BUDGET.store(bytes, Ordering::Relaxed);
}

#[cfg(target_os = "linux")]
fn physical_memory() -> Option<usize> {
    // SAFETY: sysconf only reads system configuration.
    let (pages, size) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    (pages > 0 && size > 0).then(|| (pages as usize).saturating_mul(size as usize))
}

#[cfg(not(target_os = "linux"))]
fn physical_memory() -> Option<usize> {
    None
}

/// A size in bytes shown to people.
pub fn human(bytes: usize) -> String {
    let b = bytes as f64;
    if b >= (1u64 << 30) as f64 {
        format!("{:.1} GiB", b / (1u64 << 30) as f64)
    } else {
        format!("{:.1} MiB", b / (1u64 << 20) as f64)
    }
}

/// The product of `factors` (a size in bytes or elements), checked against overflow and against the
/// budget; `what` names the allocation and `hint` says what to do in the error.
pub fn bytes(factors: &[usize], what: &str, hint: &str) -> Result<usize> {
    let total = factors
        .iter()
        .try_fold(1usize, |acc, &f| acc.checked_mul(f))
        .ok_or_else(|| {
            Error::invalid(format!(
                "{what} ({}) is too large to address: {hint}",
                factors
                    .iter()
                    .map(usize::to_string)
                    .collect::<Vec<_>>()
                    .join(" x ")
            ))
        })?;
    if total > budget() {
        return Err(Error::invalid(format!(
            "{what} needs {}, more than the memory budget of {} (by default half of this machine's memory): {hint}",
            human(total),
            human(budget())
        )));
    }
    Ok(total)
}

/// `len` copies of `value`, allocated fallibly: an error naming `what` if memory is refused.
pub fn filled<T: Clone>(len: usize, value: T, what: &str) -> Result<Vec<T>> {
    let mut out: Vec<T> = Vec::new();
    out.try_reserve_exact(len)
        .map_err(|_| refused(what, len.saturating_mul(std::mem::size_of::<T>())))?;
    out.resize(len, value);
    Ok(out)
}

fn refused(what: &str, bytes: usize) -> Error {
    Error::invalid(format!(
        "{what} needs {}, which cannot be allocated: process less at a time",
        human(bytes)
    ))
}

/// `len` zeros on memory advised for transparent huge pages, or an error naming `what` when the
/// allocation is refused (instead of the abort an infallible allocation would be).
pub fn huge_zeroed<T: Copy + Default>(len: usize, what: &str) -> Result<Vec<T>> {
    let bytes = len.saturating_mul(std::mem::size_of::<T>());
    let mut out: Vec<T> = Vec::new();
    out.try_reserve_exact(len).map_err(|_| {
        Error::invalid(format!(
            "{what} needs {}, which cannot be allocated: process fewer queries or genes at a time",
            human(bytes)
        ))
    })?;
    advise_huge(out.as_mut_ptr() as *mut u8, bytes);
    out.resize(len, T::default());
    Ok(out)
}

/// Released buffers kept for reuse, oldest first, and the most they may hold in all. Fork-safe: a
/// forked child whose lock was held at the fork goes without (fresh memory, nothing kept).
static RECYCLED: crate::fork_safe::ForkSafeMutex<Vec<Vec<u8>>> =
    crate::fork_safe::ForkSafeMutex::new(Vec::new());
const RECYCLED_BUFFERS: usize = 4;

fn recycled_limit() -> usize {
    (1usize << 30).min(budget() / 4)
}

/// A buffer of `len` bytes with unspecified contents, for an output that is then written whole: the
/// memory of a released buffer of about that size ([`recycle`]) when there is one, else fresh memory
/// (zero pages the kernel maps on first write, 2 MiB pages where it allows). An error naming `what`
/// when memory is refused.
pub fn recycled(len: usize, what: &str) -> Result<Vec<u8>> {
    if let Some(mut pool) = RECYCLED.lock() {
        // The smallest buffer that holds `len` without wasting more than half of itself.
        let best = (0..pool.len())
            .filter(|&i| pool[i].capacity() >= len && pool[i].capacity() / 2 <= len)
            .min_by_key(|&i| pool[i].capacity());
        if let Some(i) = best {
            let mut buf = pool.remove(i);
            // Bytes past the length it was released with are cleared (warm pages: a plain memset).
            buf.resize(len, 0);
            return Ok(buf);
        }
    }
    if len == 0 {
        return Ok(Vec::new());
    }
    let layout = std::alloc::Layout::array::<u8>(len).map_err(|_| refused(what, len))?;
    // SAFETY: the layout has a non-zero size; a null result is handled below.
    let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
    if ptr.is_null() {
        return Err(refused(what, len));
    }
    advise_huge(ptr, len);
    // SAFETY: `ptr` holds `len` zeroed bytes allocated by the global allocator with u8's layout.
    Ok(unsafe { Vec::from_raw_parts(ptr, len, len) })
}

/// Gives a buffer from [`recycled`] back for reuse once nothing reads it any more. Only buffers of at
/// least 1 MiB are kept, at most four and 1 GiB (a quarter of the budget) in all, the oldest dropped
/// first.
pub fn recycle(buf: Vec<u8>) {
    if buf.capacity() < 1 << 20 || buf.capacity() > recycled_limit() {
        return;
    }
    let Some(mut pool) = RECYCLED.lock() else {
        return;
    };
    pool.push(buf);
    while pool.len() > RECYCLED_BUFFERS
        || pool.iter().map(Vec::capacity).sum::<usize>() > recycled_limit()
    {
        pool.remove(0);
    }
}

#[cfg(target_os = "linux")]
fn advise_huge(ptr: *mut u8, bytes: usize) {
    const HUGE: usize = 2 << 20;
    let start = (ptr as usize).next_multiple_of(HUGE);
    let end = (ptr as usize + bytes) / HUGE * HUGE;
    if end > start {
        // SAFETY: advice only, on whole pages inside our own allocation; failure changes nothing.
        unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
    }
}

#[cfg(not(target_os = "linux"))]
fn advise_huge(_ptr: *mut u8, _bytes: usize) {}

/// `.NAME.PID-SEQ-NANOS.tmp`: the name of a writer's temporary file beside `NAME`, never shared by two
/// writers (processes, or threads of one: a counter), in the shape bleep-rs's Python side recognises as
/// a leftover to clean up once its process is gone.
pub fn temporary_name(name: &str) -> String {
    static SEQ: AtomicUsize = AtomicUsize::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!(
        ".{name}.{}-{:x}-{nanos:x}.tmp",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_that_wrap_or_exceed_the_budget_are_errors() {
        let wrap = bytes(&[1 << 62, 4, 3], "a region", "read less").unwrap_err();
        assert!(wrap.to_string().contains("too large to address"), "{wrap}");
        let big = bytes(&[1 << 20, 1 << 20, 3], "a region", "read less").unwrap_err();
        assert!(big.to_string().contains("memory budget"), "{big}");
        assert_eq!(bytes(&[10, 10, 3], "a region", "").unwrap(), 300);
        assert!(huge_zeroed::<f32>(usize::MAX / 8, "x").is_err());
        assert_eq!(filled(3, 7u8, "x").unwrap(), vec![7, 7, 7]);
    }

    #[test]
    fn released_buffers_are_reused_by_size() {
        let fresh = recycled(3 << 20, "x").unwrap();
        assert!(fresh.len() == 3 << 20 && fresh.iter().all(|&v| v == 0));
        let at = fresh.as_ptr();
        recycle(fresh);
        // Too small a request for it (it would waste more than half): fresh memory.
        let small = recycled(1 << 20, "x").unwrap();
        assert_ne!(small.as_ptr(), at);
        let again = recycled(2 << 20, "x").unwrap();
        assert_eq!((again.as_ptr(), again.len()), (at, 2 << 20));
        assert!(recycled(usize::MAX / 2, "x").is_err());
    }
}
