//! A lock that a process made by `fork` never waits on forever.
//!
//! `fork` copies a process with only the thread that called it: a lock another thread held at that
//! moment stays held in the child, by a thread that does not exist there, and the child's first wait
//! on it never ends (PyTorch data loaders fork while a reader thread works). [`ForkSafeMutex`] guards
//! state that is only a cache (tiles, reusable buffers): in the process that first locked it, it waits
//! as a plain mutex; in a forked child it only tries, and a caller that finds it held goes without the
//! cache. Never hold one across parallel work (a pool thread waiting on it may be the one that work
//! needs).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard, TryLockError};

/// A mutex over a cache, safe after `fork` (see the module).
pub struct ForkSafeMutex<T> {
    inner: Mutex<T>,
    /// The process that first locked it (0: none yet).
    owner: AtomicU32,
}

impl<T> ForkSafeMutex<T> {
    /// A new lock over `value`.
    pub const fn new(value: T) -> Self {
        ForkSafeMutex {
            inner: Mutex::new(value),
            owner: AtomicU32::new(0),
        }
    }

    /// The guarded value: waited for in the process that first locked it; in a forked child, None
    /// when the lock is held (perhaps by a parent's thread that does not exist here). A poisoned lock
    /// is taken as it is (a cache holds no invariant a panic could break).
    pub fn lock(&self) -> Option<MutexGuard<'_, T>> {
        let pid = std::process::id();
        let owner = match self
            .owner
            .compare_exchange(0, pid, Ordering::Relaxed, Ordering::Relaxed)
        {
            Ok(_) => pid,
            Err(owner) => owner,
        };
        if owner == pid {
            return Some(self.inner.lock().unwrap_or_else(|p| p.into_inner()));
        }
        match self.inner.try_lock() {
            Ok(guard) => Some(guard),
            Err(TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        }
    }
}

impl<T: Default> Default for ForkSafeMutex<T> {
    fn default() -> Self {
        ForkSafeMutex::new(T::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_in_its_process_and_only_tries_in_another() {
        let m = ForkSafeMutex::new(1);
        *m.lock().unwrap() += 1;
        assert_eq!(*m.lock().unwrap(), 2);
        // As a forked child sees it: another process first locked it.
        m.owner
            .store(std::process::id().wrapping_add(1), Ordering::Relaxed);
        let held = m.inner.lock().unwrap();
        assert!(m.lock().is_none(), "a child never waits on a held lock");
        drop(held);
        assert_eq!(*m.lock().unwrap(), 2);
    }
}
