//! Heap tuning for a data path that streams through short-lived buffers.
//!
//! A bulk transfer keeps megabytes in flight (HTTP/2 windows, TLS records)
//! and frees them in bursts. By default glibc gives the free top of a heap
//! back to the kernel once it passes 128 KiB, so the next burst faults every
//! page in again: measured on a tunnel stream, one page fault per 4 KiB
//! carried and about a third of the throughput lost. Keeping up to
//! [`TRIM_THRESHOLD`] free per heap makes that memory reusable instead; the
//! cost is bounded (the threshold times the few heaps the worker threads
//! use) and only ever reached after a burst of that size.

/// Free memory a heap keeps instead of returning it to the kernel.
pub const TRIM_THRESHOLD: usize = 16 * 1024 * 1024;
/// Allocations this large or larger get their own mapping. Fixed, because
/// setting the trim threshold turns off glibc's adaptive choice.
pub const MMAP_THRESHOLD: usize = 4 * 1024 * 1024;

/// Applies the settings above once for the process (glibc only; other C
/// libraries keep their defaults). Idempotent.
#[allow(unsafe_code)]
pub fn tune() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            // SAFETY: mallopt only changes allocator parameters; both values
            // are in range for a C int.
            unsafe {
                nix::libc::mallopt(nix::libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD as i32);
                nix::libc::mallopt(nix::libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD as i32);
            }
        });
    }
}
