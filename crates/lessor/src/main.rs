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

#[tokio::main]
async fn main() {
    let args = cli::Cli::parse();
    if let Err(e) = cli::run(args).await {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
