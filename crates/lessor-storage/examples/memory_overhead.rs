//! Measures the memory backend's bytes per queued item beyond the payload: produces N items of P bytes into one
//! partition and compares the process's resident memory before and after.
//!
//! `cargo run --release -p lessor-storage --example memory_overhead -- 1000000 100`

use bytes::Bytes;
use lessor_core::storage::PartitionStore;
use lessor_core::time::Ts;
use lessor_core::types::NewItem;
use lessor_storage::memory::MemoryStore;

fn rss_bytes() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let n: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(1_000_000);
    let size: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(100);
    let store = MemoryStore::new();
    let p = store.open("q", 0).await.expect("open");
    let before = rss_bytes();
    let now = Ts(1_800_000_000_000_000);
    for chunk in 0..n.div_ceil(1000) {
        let items = (0..1000.min(n - chunk * 1000))
            .map(|_| NewItem {
                expire_deadline: now.add(std::time::Duration::from_secs(3600)),
                created_at: now,
                payload: Bytes::from(vec![b'x'; size]),
                ..Default::default()
            })
            .collect();
        p.produce(items).await.expect("produce");
    }
    let after = rss_bytes();
    let per_item = (after - before) as f64 / n as f64;
    println!(
        "items {n}, payload {size} B: {:.1} B/item resident, {:.1} B/item beyond the payload",
        per_item,
        per_item - size as f64
    );
}
