//! What the memory measurements of the fjall backend share (`fjall_retry_memory.rs`, `fjall_clear_memory.rs`):
//! the process's resident and peak resident sizes, and a reset of the peak, from `/proc` (Linux only: a test that
//! gets `None` or `false` skips). Each file runs one test at a time, so that no other test's allocations meet its peak.
#![allow(dead_code)]

/// A field of `/proc/self/status`, in bytes.
pub fn status_bytes(field: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with(field))?;
    let kb: u64 = line[field.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// Resets the process's peak resident size (`VmHWM`) to its current one.
pub fn reset_peak() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}
