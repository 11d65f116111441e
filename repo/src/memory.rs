//! Pack-sized buffers: each byte of a pack is written once into memory the kernel has
//! to fault in and zero, which, in 4 KiB pages, costs more than some of the copies.
//! [`PackBuffers`] keeps a few buffers of packs already uploaded or dropped from the pack
//! cache for the next packs built or downloaded, so a long backup or restore faults in
//! and zeroes its pack memory once instead of once per pack.

use std::sync::{Arc, Mutex};

use bytes::Bytes;

/// Free pack buffers kept for reuse: enough for the next pack to find one while the
/// previous ones are still uploading, few enough that an idle server holds little.
const KEPT_BUFFERS: usize = 2;

/// A bounded pool of pack buffers, shared by everything in one repository that builds
/// packs. Cloning shares the pool.
#[derive(Clone, Default)]
pub(crate) struct PackBuffers {
    free: Arc<Mutex<Vec<Vec<u8>>>>,
    /// Buffers handed out again.
    #[cfg(test)]
    reused: Arc<std::sync::atomic::AtomicUsize>,
}

impl PackBuffers {
    /// An empty buffer with room for at least `capacity` bytes: a kept one if it is
    /// large enough, else a new one backed by huge pages where the kernel allows.
    pub fn take(&self, capacity: usize) -> Vec<u8> {
        let kept = self.free.lock().ok().and_then(|mut free| free.pop());
        if let Some(mut buf) = kept.filter(|b| b.capacity() >= capacity) {
            #[cfg(test)]
            self.reused
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            buf.clear();
            return buf;
        }
        let buf = Vec::with_capacity(capacity);
        prefer_huge_pages(buf.as_ptr(), buf.capacity());
        buf
    }

    /// The finished pack's bytes; its buffer comes back to the pool once the last
    /// reference to them (the upload, a cache) is dropped.
    pub fn share(&self, buf: Vec<u8>) -> Bytes {
        Bytes::from_owner(Pooled {
            buf,
            pool: self.clone(),
        })
    }

    /// Frees the kept buffers (after a backup, so an idle server holds no pack memory).
    pub fn release(&self) {
        if let Ok(mut free) = self.free.lock() {
            free.clear();
        }
    }

    fn give_back(&self, buf: Vec<u8>) {
        if let Ok(mut free) = self.free.lock()
            && free.len() < KEPT_BUFFERS
        {
            free.push(buf);
        }
    }

    #[cfg(test)]
    pub(crate) fn kept(&self) -> usize {
        self.free.lock().map(|f| f.len()).unwrap_or(0)
    }

    #[cfg(test)]
    pub(crate) fn reused(&self) -> usize {
        self.reused.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// A pack's bytes on loan from a [`PackBuffers`] pool.
struct Pooled {
    buf: Vec<u8>,
    pool: PackBuffers,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        self.pool.give_back(std::mem::take(&mut self.buf));
    }
}

/// Empties `buf` and makes room for `len` bytes: its own memory if large enough, else a
/// new allocation of `len` backed by huge pages where the kernel allows.
pub(crate) fn make_room(buf: &mut Vec<u8>, len: usize) {
    buf.clear();
    if buf.capacity() < len {
        *buf = Vec::with_capacity(len);
        prefer_huge_pages(buf.as_ptr(), buf.capacity());
    }
}

/// Asks the kernel to back the whole pages of `[ptr, ptr + len)` with huge pages
/// (transparent huge pages in `madvise` mode): a pack then faults in a few 2 MiB pages
/// instead of thousands of small ones. Only a hint: the result does not matter.
pub(crate) fn prefer_huge_pages(ptr: *const u8, len: usize) {
    const PAGE: usize = 4096;
    let start = (ptr as usize).div_ceil(PAGE) * PAGE;
    let end = (ptr as usize).saturating_add(len) / PAGE * PAGE;
    if end > start {
        // SAFETY: the range lies inside memory the caller owns; MADV_HUGEPAGE changes
        // how it is backed, never its contents or validity.
        unsafe {
            libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
        }
    }
}

/// Gives the memory the allocator holds free back to the kernel, after work that
/// allocated and freed a lot (a rebuild of the local index reads and decodes gigabytes on
/// the blocking threads): glibc returns memory only from the top of its heaps (and the
/// server keeps 32 MiB there on purpose), so what lies free below memory still in use
/// stays resident, and the next phase would count on top of it (a cold start at 100
/// million chunks peaked at 297 MiB without this, 208 MiB with it).
pub(crate) fn return_free_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases free pages of the allocator's own heaps; it
    // touches no memory in use and is safe to call from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::PackBuffers;

    #[test]
    fn a_pack_buffer_is_reused_once_its_bytes_are_dropped() {
        let pool = PackBuffers::default();
        let mut buf = pool.take(1 << 20);
        buf.extend_from_slice(b"first pack");
        let at = buf.as_ptr();
        let bytes = pool.share(buf);
        let upload = bytes.clone();
        drop(bytes);
        assert_eq!(pool.kept(), 0, "still referenced by the upload");
        assert_eq!(&upload[..], b"first pack");
        drop(upload);
        assert_eq!(pool.kept(), 1);
        let again = pool.take(1 << 20);
        assert_eq!(again.as_ptr(), at, "the same memory, not a new allocation");
        assert!(again.is_empty() && again.capacity() >= 1 << 20);
        // A kept buffer too small for the request is not handed out.
        drop(pool.share(again));
        assert!(pool.take(2 << 20).capacity() >= 2 << 20);
    }

    #[test]
    fn the_pool_keeps_few_buffers_and_releases_them() {
        let pool = PackBuffers::default();
        let all: Vec<_> = (0..5).map(|_| pool.share(pool.take(4096))).collect();
        drop(all);
        assert_eq!(pool.kept(), super::KEPT_BUFFERS);
        pool.release();
        assert_eq!(pool.kept(), 0);
    }

    #[test]
    fn advice_keeps_contents() {
        let mut v = vec![7u8; 9 * 1024 * 1024];
        super::prefer_huge_pages(v.as_ptr(), v.capacity());
        v.extend_from_slice(&[1, 2, 3]);
        assert!(v[..9 * 1024 * 1024].iter().all(|&b| b == 7));
        super::prefer_huge_pages(v.as_ptr(), 0);
        super::prefer_huge_pages(std::ptr::null(), 100);
    }
}
