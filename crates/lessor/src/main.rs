//! The `lessor` binary: a thin shell over the libraries.
//!
//! `lessor server` runs the queue server; the other commands are a client of a running server (`--endpoint`,
//! `LESSOR_ENDPOINT`); `lessor bench` drives a server with load.

mod bench;
mod cli;

use clap::Parser;

/// A queue server allocates and frees many small buffers per request (bodies, items, index entries); glibc's
/// allocator spent a third of the server's CPU on them in profiles, mimalloc a fraction of that.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Turns transparent huge pages off for this process, unless `MIMALLOC_ALLOW_THP` says otherwise.
///
/// mimalloc advises the kernel to back its arenas with 2 MB pages. Where THP is in `madvise` mode (Debian's and
/// many distributions' default), a page fault in such an arena may then compact memory synchronously or zero a
/// whole 2 MB page, and the thread that faulted (a request's, or the storage writer's) stops for milliseconds.
/// Measured on fjall with fsync, paced at 10,000 items/s: produce p99 7.7-10.8 ms with huge pages and 3.4-4.1 ms
/// without; on memory, flat out, produce p99 5.7-6.1 ms against 0.9-1.4 ms (docs/benchmarks.md). The price is
/// more TLB misses: up to 15 % more CPU per item in the paced runs, none beyond the noise flat out. Anyone who prefers huge pages sets `MIMALLOC_ALLOW_THP=1`; the
/// setting is inherited by child processes.
fn no_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_none() {
        // Failure (a kernel before 3.15, or a seccomp filter) leaves the kernel's default: nothing to do about it.
        let _ = nix::sys::prctl::set_thp_disable(true);
    }
}

fn main() {
    // Before any thread exists, so that every thread's allocations see it.
    no_transparent_huge_pages();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("the tokio runtime starts");
    runtime.block_on(run());
}

async fn run() {
    let args = cli::Cli::parse();
    if let Err(e) = cli::run(args).await {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
