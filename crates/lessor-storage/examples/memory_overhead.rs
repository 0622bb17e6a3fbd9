//! Measures the memory backend's bytes per queued item beyond the payload: produces N items of P bytes into one
//! partition and compares the process's resident memory before and after.
//!
//! `cargo run --release -p lessor-storage --example memory_overhead -- 1000000 100 [PRIORITIES] [KEY_LEN]`
//!
//! With PRIORITIES above 1 the items are spread evenly over priorities 0..PRIORITIES (items above priority 0 cost
//! an entry in their priority's FIFO); with KEY_LEN above 0 every item carries a distinct dedup key of that many
//! bytes, so the difference from a run without keys is the cost of a dedup record.

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
    let priorities: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(1).clamp(1, 10);
    let key_len: usize = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(0);
    let store = MemoryStore::new();
    let p = store.open("q", 0).await.expect("open");
    let before = rss_bytes();
    let start = std::time::Instant::now();
    let now = Ts(1_800_000_000_000_000);
    for chunk in 0..n.div_ceil(1000) {
        let items = (0..1000.min(n - chunk * 1000))
            .map(|i| {
                let k = chunk * 1000 + i;
                NewItem {
                    // One deadline per batch, as the engine gives them (created_at + expire_timeout): a single
                    // deadline shared by a million items would make each call re-check the whole first entry.
                    expire_deadline: now.add(
                        std::time::Duration::from_secs(3600) + std::time::Duration::from_micros(chunk as u64),
                    ),
                    created_at: now,
                    payload: Bytes::from(vec![b'x'; size]),
                    priority: (k % priorities) as u8,
                    dedup_id: if key_len == 0 {
                        String::new()
                    } else {
                        format!("{k:0key_len$}")
                    },
                    dedup_until: now.add(std::time::Duration::from_secs(300)),
                    ..Default::default()
                }
            })
            .collect();
        p.produce(items).await.expect("produce");
    }
    let took = start.elapsed();
    let after = rss_bytes();
    let per_item = (after - before) as f64 / n as f64;
    println!(
        "items {n}, payload {size} B, {priorities} priorities, dedup key {key_len} B: {:.1} B/item resident, {:.1} \
         B/item beyond the payload; produced at {:.0} items/s (items built included)",
        per_item,
        per_item - size as f64,
        n as f64 / took.as_secs_f64()
    );
}
