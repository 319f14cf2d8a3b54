//! Keeping the allocator from handing big tensor buffers back to the kernel.
//!
//! A forward pass allocates and frees tensors of megabytes many times over. glibc serves large
//! requests with `mmap` and returns them with `munmap`, and trims the heap top eagerly, so every
//! forward pays page faults and page zeroing for memory it just freed: a quarter of a LoRA step's
//! time in a profile. [`tune`] raises both thresholds so freed buffers are reused instead.
//! Binaries call it once at start; a library never changes process-wide settings by itself.

/// Requests up to this size come from the heap (glibc's upper limit for the threshold).
const MMAP_THRESHOLD: i32 = 32 << 20;

/// Keeps up to this much free memory at the heap top instead of returning it.
const TRIM_THRESHOLD: i32 = i32::MAX;

/// Applies the settings (glibc on Linux; elsewhere a no-op). Returns whether they were applied.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn tune() -> bool {
    // SAFETY: mallopt only changes glibc's malloc parameters; it is thread-safe (it takes the
    // arena locks) and the values are within the documented ranges.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
            && libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    }
}

/// Applies the settings (glibc on Linux; elsewhere a no-op). Returns whether they were applied.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn tune() -> bool {
    false
}

#[cfg(test)]
mod tests {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn glibc_accepts_the_settings() {
        assert!(super::tune());
    }
}
