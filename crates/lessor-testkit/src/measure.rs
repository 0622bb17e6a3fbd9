//! What the resource tests read off the machine: a process's resident memory and the disk a directory occupies.

use std::path::Path;

/// `VmRSS` of process `pid` (`"self"` or a pid) from `/proc/<pid>/status`, in KiB; 0 when it cannot be read.
pub fn rss_kib(pid: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or(0)
}

/// Bytes the files under `path` occupy on disk (allocated blocks, so sparse and preallocated files count as the
/// file system charges them); 0 for a missing directory.
pub fn disk_usage(path: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(path) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => disk_usage(&e.path()),
            Ok(m) => std::os::unix::fs::MetadataExt::blocks(&m) * 512,
            Err(_) => 0,
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process_and_a_directory() {
        assert!(rss_kib("self") > 0);
        let dir = tempfile::tempdir().expect("tmp");
        std::fs::write(dir.path().join("f"), vec![1u8; 64 * 1024]).expect("write");
        std::fs::create_dir(dir.path().join("sub")).expect("mkdir");
        std::fs::write(dir.path().join("sub").join("g"), vec![1u8; 64 * 1024]).expect("write");
        let used = disk_usage(dir.path());
        assert!(used >= 128 * 1024, "{used}");
        assert_eq!(disk_usage(&dir.path().join("missing")), 0);
    }
}
