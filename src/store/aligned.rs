//! Page-aligned IO buffers and their pool: the only `unsafe` code in strait.
//!
//! O_DIRECT needs the buffer address, the length and the file offset aligned to the
//! device's logical block size (4096 is safe everywhere). `Vec<u8>` gives no alignment
//! guarantee, so this module allocates with an explicit [`Layout`]. The buffers implement
//! tokio-uring's `IoBuf`/`IoBufMut` so the kernel can read into and write from them while
//! a ring owns them.
//!
//! A buffer taken from a [`BufPool`] goes back to the pool when dropped — wherever that
//! happens (a uring thread, a tokio task, an error path) — so a lost buffer can never
//! shrink the pool and hang a writer.
#![allow(unsafe_code)]

use std::alloc::{self, Layout};
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

/// Alignment of every buffer: the largest logical block size in common use.
pub(crate) const ALIGN: usize = 4096;

/// Rounds `n` up to a multiple of [`ALIGN`].
pub(crate) fn round_up(n: usize) -> usize {
    n.div_ceil(ALIGN) * ALIGN
}

/// A heap buffer whose address is [`ALIGN`]-aligned and whose capacity is a multiple of
/// it. `len` bytes at the front are initialised.
pub(crate) struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    cap: usize,
    pool: Option<Arc<PoolInner>>,
}

// SAFETY: AlignedBuf owns its allocation exclusively (like Vec<u8>); nothing else holds
// the pointer, so moving it to another thread or sharing `&AlignedBuf` is sound.
unsafe impl Send for AlignedBuf {}
// SAFETY: as above; `&AlignedBuf` only gives out `&[u8]`.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zero-filled buffer of `cap` bytes (rounded up to [`ALIGN`]), with `len == 0`.
    pub(crate) fn new(cap: usize) -> Self {
        let cap = round_up(cap.max(1));
        let layout = Layout::from_size_align(cap, ALIGN).expect("buffer size overflows isize");
        // SAFETY: layout has non-zero size (cap >= ALIGN). alloc_zeroed returns either a
        // valid, aligned pointer to `cap` zeroed bytes or null, which we check.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| alloc::handle_alloc_error(layout));
        AlignedBuf {
            ptr,
            len: 0,
            cap,
            pool: None,
        }
    }

    /// Total bytes available.
    pub(crate) fn capacity(&self) -> usize {
        self.cap
    }

    /// Sets the initialised length. The bytes up to `cap` are always initialised (the
    /// allocation is zeroed and only ever written with initialised data), so any
    /// `len <= cap` is valid.
    pub(crate) fn set_len(&mut self, len: usize) {
        assert!(len <= self.cap, "length {len} beyond capacity {}", self.cap);
        self.len = len;
    }

    /// Copies `data` to the front, zero-pads up to the next [`ALIGN`] boundary and sets the
    /// length to that padded size. Returns the padded length.
    pub(crate) fn fill_padded(&mut self, data: &[u8]) -> usize {
        let padded = round_up(data.len());
        assert!(
            padded <= self.cap,
            "data of {} bytes does not fit",
            data.len()
        );
        self.set_len(padded);
        self[..data.len()].copy_from_slice(data);
        self[data.len()..padded].fill(0);
        padded
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid for `cap` initialised bytes and `len <= cap`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`, and `&mut self` guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl AsRef<[u8]> for AlignedBuf {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if let Some(pool) = self.pool.take()
            && pool.cap == self.cap
        {
            let mut free = pool.free.lock().unwrap_or_else(|e| e.into_inner());
            if free.len() < pool.max_free {
                free.push(RawBuf(self.ptr));
                return;
            }
        }
        // SAFETY: the pointer came from alloc_zeroed with exactly this layout and has not
        // been freed (a pooled pointer is either pushed back above or freed here, once).
        unsafe {
            alloc::dealloc(
                self.ptr.as_ptr(),
                Layout::from_size_align_unchecked(self.cap, ALIGN),
            )
        }
    }
}

#[cfg(target_os = "linux")]
// SAFETY: the allocation is heap memory owned by the buffer; its address does not change
// when the AlignedBuf value moves, and it lives until the buffer is dropped, which cannot
// happen while the ring owns the value.
unsafe impl tokio_uring::buf::IoBuf for AlignedBuf {
    fn stable_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }
    fn bytes_init(&self) -> usize {
        self.len
    }
    fn bytes_total(&self) -> usize {
        self.cap
    }
}

#[cfg(target_os = "linux")]
// SAFETY: same stable heap allocation as for IoBuf. `set_init` may only raise `len` to a
// value the kernel reported as written, and every byte up to `cap` is initialised anyway.
unsafe impl tokio_uring::buf::IoBufMut for AlignedBuf {
    fn stable_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
    unsafe fn set_init(&mut self, pos: usize) {
        if pos > self.len {
            self.len = pos.min(self.cap);
        }
    }
}

struct RawBuf(NonNull<u8>);
// SAFETY: a RawBuf is an unowned-by-anyone allocation parked in the pool; only the pool
// hands it out again, to one owner at a time.
unsafe impl Send for RawBuf {}

struct PoolInner {
    cap: usize,
    max_free: usize,
    free: Mutex<Vec<RawBuf>>,
}

impl Drop for PoolInner {
    fn drop(&mut self) {
        let free = self.free.get_mut().unwrap_or_else(|e| e.into_inner());
        for RawBuf(ptr) in free.drain(..) {
            // SAFETY: every pooled pointer was allocated with (cap, ALIGN) and is owned by
            // the pool alone once parked.
            unsafe {
                alloc::dealloc(
                    ptr.as_ptr(),
                    Layout::from_size_align_unchecked(self.cap, ALIGN),
                )
            }
        }
    }
}

/// A pool of equally-sized [`AlignedBuf`]s. Keeps at most `max_free` idle buffers;
/// `get` never blocks (it allocates when the pool is empty), so the pool bounds idle
/// memory, and the callers' windows bound the memory in use.
#[derive(Clone)]
pub(crate) struct BufPool {
    inner: Arc<PoolInner>,
}

impl BufPool {
    /// A pool of buffers of `cap` bytes (rounded up to [`ALIGN`]).
    pub(crate) fn new(cap: usize, max_free: usize) -> Self {
        BufPool {
            inner: Arc::new(PoolInner {
                cap: round_up(cap.max(1)),
                max_free,
                free: Mutex::new(Vec::new()),
            }),
        }
    }

    /// A buffer with `len == 0`, from the pool or freshly allocated. Contents of a reused
    /// buffer are stale; callers fill or overwrite before use.
    pub(crate) fn get(&self) -> AlignedBuf {
        let reused = self
            .inner
            .free
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop();
        let mut buf = match reused {
            Some(RawBuf(ptr)) => AlignedBuf {
                ptr,
                len: 0,
                cap: self.inner.cap,
                pool: None,
            },
            None => AlignedBuf::new(self.inner.cap),
        };
        buf.pool = Some(self.inner.clone());
        buf
    }

    /// A buffer of at least `size` bytes: pooled when it fits, else a one-off allocation.
    pub(crate) fn get_at_least(&self, size: usize) -> AlignedBuf {
        if size <= self.inner.cap {
            self.get()
        } else {
            AlignedBuf::new(size)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_and_padded() {
        let mut b = AlignedBuf::new(5000);
        assert_eq!(b.capacity(), 8192);
        assert_eq!(b.as_ptr() as usize % ALIGN, 0);
        assert_eq!(b.fill_padded(b"hello"), 4096);
        assert_eq!(&b[..5], b"hello");
        assert!(b[5..].iter().all(|&x| x == 0));
    }

    #[test]
    fn pool_reuses_and_bounds() {
        let pool = BufPool::new(4096, 2);
        let a = pool.get();
        let pa = a.as_ptr();
        drop(a);
        let b = pool.get();
        assert_eq!(b.as_ptr(), pa, "buffer was reused");
        let c = pool.get();
        let d = pool.get();
        drop((b, c, d));
        assert_eq!(
            pool.inner.free.lock().unwrap().len(),
            2,
            "at most max_free kept"
        );
        let big = pool.get_at_least(10_000);
        assert!(big.capacity() >= 10_000);
    }
}
