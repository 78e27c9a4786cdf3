//! Numbers that live either in memory or in a memory-mapped reference file, seen the same way.
//!
//! A loaded reference borrows its tensors from the map of its file ([`Buf::mapped`]) instead of copying
//! them: loading then costs the header, and the operating system pages in (and may drop again) only the
//! rows a search or an aggregation reads. The map stays alive as long as any buffer borrows from it
//! (an `Arc`). A tensor whose bytes are not aligned for its type is copied instead (safetensors files
//! written by bleep-rs are aligned; other writers need not be).
//!
//! A mapped file must not be modified in place while it is mapped (the operating system would show the
//! change, or fault on a truncation); bleep-rs itself never does that: it writes a temporary file and
//! renames it over the old one, which leaves the mapped file as it was.

use half::{bf16, f16};
use memmap2::Mmap;
use std::ops::Deref;
use std::sync::Arc;

/// Plain numbers for which every bit pattern is a valid value (so any file bytes can be viewed as them).
pub trait Pod: Copy + Send + Sync + 'static {}
impl Pod for u8 {}
impl Pod for u16 {}
impl Pod for f32 {}
impl Pod for f64 {}
impl Pod for f16 {}
impl Pod for bf16 {}
impl Pod for u32 {}
impl Pod for i64 {}

/// A read-only run of numbers, owned or borrowed from a memory-mapped file.
pub struct Buf<T: Pod> {
    inner: Inner<T>,
}

enum Inner<T> {
    Owned(Vec<T>),
    Mapped {
        map: Arc<Mmap>,
        offset: usize,
        len: usize,
    },
}

impl<T: Pod> Buf<T> {
    /// The numbers of `bytes`, a part of `map` (little-endian): borrowed when aligned for T, else copied.
    /// `bytes.len()` must be a multiple of T's size (the rest is ignored).
    #[cfg(target_endian = "little")]
    pub fn mapped(map: &Arc<Mmap>, bytes: &[u8]) -> Buf<T> {
        let size = std::mem::size_of::<T>();
        let len = bytes.len() / size;
        let base = map.as_ptr() as usize;
        let at = bytes.as_ptr() as usize;
        let inside = at >= base && at + len * size <= base + map.len();
        if inside && at.is_multiple_of(std::mem::align_of::<T>()) {
            return Buf {
                inner: Inner::Mapped {
                    map: Arc::clone(map),
                    offset: at - base,
                    len,
                },
            };
        }
        // Misaligned (or not from this map): copy, byte by byte into aligned storage.
        let mut v: Vec<T> = Vec::with_capacity(len);
        // SAFETY: T is Pod (any bit pattern is valid) and the destination has room for len values.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), v.as_mut_ptr() as *mut u8, len * size);
            v.set_len(len);
        }
        Buf::from(v)
    }

    /// Whether the numbers are read from a mapped file (not copied into memory).
    pub fn is_mapped(&self) -> bool {
        matches!(self.inner, Inner::Mapped { .. })
    }

    /// The numbers as little-endian bytes (what a file stores).
    #[cfg(target_endian = "little")]
    pub fn as_bytes(&self) -> &[u8] {
        let v: &[T] = self;
        // SAFETY: plain numbers without padding, viewed as their bytes.
        unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
    }
}

impl<T: Pod> From<Vec<T>> for Buf<T> {
    fn from(v: Vec<T>) -> Self {
        Buf {
            inner: Inner::Owned(v),
        }
    }
}

impl<T: Pod> Deref for Buf<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        match &self.inner {
            Inner::Owned(v) => v,
            Inner::Mapped { map, offset, len } => {
                // SAFETY: `mapped` checked that the range lies inside the map and is aligned for T; T is
                // Pod; the map is read-only and lives as long as this buffer (its Arc).
                unsafe { std::slice::from_raw_parts(map.as_ptr().add(*offset) as *const T, *len) }
            }
        }
    }
}

impl<T: Pod> Clone for Buf<T> {
    fn clone(&self) -> Self {
        match &self.inner {
            Inner::Owned(v) => Buf::from(v.clone()),
            Inner::Mapped { map, offset, len } => Buf {
                inner: Inner::Mapped {
                    map: Arc::clone(map),
                    offset: *offset,
                    len: *len,
                },
            },
        }
    }
}

impl<T: Pod> std::fmt::Debug for Buf<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let how = if self.is_mapped() { "mapped" } else { "owned" };
        write!(f, "Buf({} values, {how})", self.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapped_buffers_borrow_when_aligned_and_copy_when_not() {
        let path = std::env::temp_dir().join(format!("bleep-rs-buf-{}", std::process::id()));
        let values: Vec<f32> = (0..64).map(|i| i as f32 * 0.5).collect();
        let le: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        // The values at offset 1 (misaligned for f32), then at offset 260 (aligned).
        let mut bytes = vec![0u8];
        bytes.extend_from_slice(&le);
        bytes.extend_from_slice(&[0u8; 3]);
        bytes.extend_from_slice(&le);
        std::fs::write(&path, &bytes).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        let map = Arc::new(unsafe { Mmap::map(&file).unwrap() });
        let odd = Buf::<f32>::mapped(&map, &map[1..257]);
        assert!(!odd.is_mapped());
        assert_eq!(&odd[..], &values[..]);
        let even = Buf::<f32>::mapped(&map, &map[260..]);
        assert!(even.is_mapped());
        assert_eq!(&even[..], &values[..]);
        drop(map);
        // The buffer keeps the map alive.
        assert_eq!(even.clone()[1], 0.5);
        std::fs::remove_file(&path).unwrap();
    }
}
