//! Pack-sized buffers: each byte of a pack is written once into memory the kernel has
//! to fault in and zero, which, in 4 KiB pages, costs more than some of the copies.

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

#[cfg(test)]
mod tests {
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
