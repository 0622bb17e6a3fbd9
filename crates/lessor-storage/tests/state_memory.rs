//! Memory figures of the in-memory partition state (memory backend, and fjall's index): resident bytes per ready
//! item by priority mix, and per dedup record. Ignored by default (it allocates about 600 MiB); run it with
//!
//! ```text
//! cargo test -p lessor-storage --test state_memory -- --ignored --nocapture
//! ```
//!
//! Each phase fills a new state while the earlier ones stay alive, so every phase's growth of the resident set is
//! fresh memory (nothing freed is reused), and the figures include the allocator's overhead.

use bytes::Bytes;
use lessor_core::time::Ts;
use lessor_core::types::NewItem;
use lessor_storage::state::PartitionState;
use lessor_testkit::measure::rss_kib;

const N: usize = 1_000_000;
const BATCH: usize = 1_000;
const PAYLOAD: usize = 100;

fn fill(priority: impl Fn(usize) -> u8, dedup: bool) -> PartitionState {
    let payload = Bytes::from(vec![b'x'; PAYLOAD]);
    let mut s = PartitionState::new(1).without_changes();
    for b in 0..N / BATCH {
        let batch = (0..BATCH)
            .map(|i| {
                let n = b * BATCH + i;
                NewItem {
                    // One deadline per batch, as the engine gives them (created_at + expire_timeout).
                    expire_deadline: Ts(1_000_000 + b as i64),
                    created_at: Ts(1),
                    payload: payload.clone(),
                    priority: priority(n),
                    // A UUID-sized key, the common case.
                    dedup_id: if dedup {
                        format!("{n:036}")
                    } else {
                        String::new()
                    },
                    dedup_until: Ts(1_000_000_000),
                    ..Default::default()
                }
            })
            .collect();
        s.produce(batch);
    }
    assert_eq!(s.counts().ready, N as u64);
    s
}

/// Grows the resident set by filling a state; returns the state and bytes per item.
fn measure(priority: impl Fn(usize) -> u8, dedup: bool) -> (PartitionState, f64) {
    let before = rss_kib("self");
    let s = fill(priority, dedup);
    let after = rss_kib("self");
    (s, (after.saturating_sub(before) * 1024) as f64 / N as f64)
}

/// Resident bytes per ready item at priority 0 (the cursor, no index) and spread over the ten priorities (one FIFO
/// entry each above 0), and per dedup record (36-byte keys) beyond its item.
#[test]
#[ignore = "allocates about 600 MiB; run with --ignored --nocapture"]
fn bytes_per_ready_item_and_per_dedup_record() {
    let (_plain, plain) = measure(|_| 0, false);
    let (_mixed, mixed) = measure(|n| (n % 10) as u8, false);
    let (keyed_state, keyed) = measure(|_| 0, true);
    assert_eq!(keyed_state.dedup_len(), N);
    println!("{N} ready items with {PAYLOAD}-byte payloads, resident bytes per item:");
    println!("  priority 0:                {plain:.1}");
    println!("  priorities 0-9 evenly:     {mixed:.1} ({:+.1})", mixed - plain);
    println!("  priority 0, 36-byte dedup key each: {keyed:.1} (dedup record: {:+.1})", keyed - plain);
}
