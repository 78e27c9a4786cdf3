//! Large tables (the gene blocks of the expression) live on 2 MiB pages where the kernel allows it:
//! fewer page faults when they are filled and fewer TLB misses when several blocks stream at once.

use crate::error::{Error, Result};

/// `len` zeros on memory advised for transparent huge pages, or an error naming `what` when the
/// allocation is refused (instead of the abort an infallible allocation would be).
pub fn huge_zeroed<T: Copy + Default>(len: usize, what: &str) -> Result<Vec<T>> {
    let bytes = len.saturating_mul(std::mem::size_of::<T>());
    let mut out: Vec<T> = Vec::new();
    out.try_reserve_exact(len).map_err(|_| {
        Error::invalid(format!(
            "{what} needs {:.1} GiB, which cannot be allocated: process fewer queries or genes at a time",
            bytes as f64 / (1u64 << 30) as f64
        ))
    })?;
    advise_huge(out.as_mut_ptr() as *mut u8, bytes);
    out.resize(len, T::default());
    Ok(out)
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
