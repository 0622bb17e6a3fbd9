//! Payload compression on realistic payloads: JSON order documents of about 1-4 KB (customer, address, 1-20 line
//! items, timestamps, ids), each different, framed as the offload wrapper stores them (`frame::encode_inline`,
//! CRC-32 included) and read back (`frame::decode`, checksum checked). Prints ratio and CPU cost per codec.
//!
//! With `--features fjall` too, it then stores the same documents in a fjall partition (`durability: none`,
//! batches of 100) through the wrapper with each codec, and reports the data directory's size once the store is
//! closed (fjall compresses its own blocks with LZ4 already).
//!
//! ```text
//! cargo run --release -p lessor-storage --features s3,fjall --example compression
//! ```

use std::time::Instant;

use bytes::Bytes;
use lessor_storage::offload::frame::{decode, encode_inline, Stored};
use lessor_storage::offload::Compression;

const ITEMS: usize = 20_000;
#[cfg(feature = "fjall")]
const FJALL_ITEMS: usize = 200_000;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn pick<'a>(&mut self, xs: &[&'a str]) -> &'a str {
        xs[self.below(xs.len() as u64) as usize]
    }
}

fn order(rng: &mut Rng) -> Bytes {
    let first = [
        "Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald", "Leslie", "Frances", "John", "Radia",
    ];
    let last = [
        "Lovelace", "Hopper", "Turing", "Dijkstra", "Liskov", "Knuth", "Lamport", "Allen", "Backus",
    ];
    let streets = [
        "Market St",
        "Main Street",
        "Rue de Rivoli",
        "Baker Street",
        "Unter den Linden",
        "Broadway",
    ];
    let cities = [
        "San Francisco",
        "Paris",
        "London",
        "Berlin",
        "New York",
        "Lisbon",
        "Osaka",
    ];
    let products = [
        "USB-C cable 2m",
        "Mechanical keyboard (brown switches)",
        "27\" monitor",
        "Noise-cancelling headphones",
        "Laptop stand, aluminium",
        "Ergonomic mouse",
        "Webcam 1080p",
        "Desk lamp LED",
    ];
    let status = ["pending", "paid", "packed", "shipped", "delivered"];
    let lines: Vec<String> = (0..1 + rng.below(20))
        .map(|i| {
            format!(
                "{{\"line\":{i},\"sku\":\"SKU-{:06}\",\"name\":\"{}\",\"quantity\":{},\"unit_price\":{{\"amount\":\"{}.{:02}\",\"currency\":\"EUR\"}},\"tax_rate\":\"0.{}\",\"warehouse\":\"WH-{}\"}}",
                rng.below(1_000_000),
                rng.pick(&products),
                1 + rng.below(5),
                1 + rng.below(900),
                rng.below(100),
                rng.below(25),
                rng.below(12)
            )
        })
        .collect();
    let doc = format!(
        "{{\"order_id\":\"ord_{:016x}\",\"created_at\":\"2026-0{}-{:02}T{:02}:{:02}:{:02}.{:03}Z\",\"status\":\"{}\",\
         \"customer\":{{\"id\":\"cus_{:012x}\",\"name\":\"{} {}\",\"email\":\"{}.{}@example.com\",\"phone\":\"+33 6 {:02} {:02} {:02} {:02}\"}},\
         \"shipping_address\":{{\"line1\":\"{} {}\",\"city\":\"{}\",\"postal_code\":\"{:05}\",\"country\":\"FR\"}},\
         \"billing_address\":{{\"line1\":\"{} {}\",\"city\":\"{}\",\"postal_code\":\"{:05}\",\"country\":\"FR\"}},\
         \"lines\":[{}],\"payment\":{{\"method\":\"card\",\"brand\":\"visa\",\"last4\":\"{:04}\",\"captured\":true}},\
         \"metadata\":{{\"channel\":\"web\",\"campaign\":\"spring-{}\",\"request_id\":\"{:032x}\"}}}}",
        rng.next(),
        1 + rng.below(9),
        1 + rng.below(28),
        rng.below(24),
        rng.below(60),
        rng.below(60),
        rng.below(1000),
        rng.pick(&status),
        rng.next() & 0xffff_ffff_ffff,
        rng.pick(&first),
        rng.pick(&last),
        rng.pick(&first).to_lowercase(),
        rng.pick(&last).to_lowercase(),
        rng.below(100),
        rng.below(100),
        rng.below(100),
        rng.below(100),
        1 + rng.below(200),
        rng.pick(&streets),
        rng.pick(&cities),
        rng.below(100_000),
        1 + rng.below(200),
        rng.pick(&streets),
        rng.pick(&cities),
        rng.below(100_000),
        lines.join(","),
        rng.below(10_000),
        rng.below(100),
        (u128::from(rng.next()) << 64) | u128::from(rng.next()),
    );
    Bytes::from(doc)
}

#[cfg(feature = "fjall")]
fn dir_size(p: &std::path::Path) -> u64 {
    let mut n = 0;
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            let Ok(m) = e.metadata() else { continue };
            n += if m.is_dir() { dir_size(&e.path()) } else { m.len() };
        }
    }
    n
}

#[cfg(feature = "fjall")]
fn on_fjall(docs: &[Bytes]) {
    use std::sync::Arc;

    use lessor_core::storage::PartitionStore;
    use lessor_core::time::Ts;
    use lessor_core::types::NewItem;
    use lessor_storage::fjall::{Durability, FjallStore};
    use lessor_storage::offload::{OffloadSettings, OffloadStore};

    let rt = tokio::runtime::Runtime::new().expect("runtime");
    println!("fjall data directory after storing them (durability none, closed):");
    for c in [Compression::None, Compression::Lz4, Compression::Zstd] {
        let dir = tempfile::tempdir().expect("temp dir");
        rt.block_on(async {
            let inner = FjallStore::open(dir.path(), Durability::None).expect("open");
            let store = OffloadStore::new(
                Arc::new(inner),
                "disk-0",
                OffloadSettings {
                    compression: c,
                    ..Default::default()
                },
            )
            .expect("wrap");
            let p = store.open("q", 0).await.expect("partition");
            let t = Instant::now();
            for chunk in docs.chunks(100) {
                let items = chunk
                    .iter()
                    .map(|d| NewItem {
                        expire_deadline: Ts(i64::MAX / 2),
                        payload: d.clone(),
                        ..Default::default()
                    })
                    .collect();
                p.produce(items).await.expect("produce");
            }
            let took = t.elapsed();
            p.close().await;
            store.close().await;
            drop(p);
            drop(store);
            println!(
                "{c:?} | {:.1} MB on disk | produce {:.0} items/s",
                dir_size(dir.path()) as f64 / 1e6,
                docs.len() as f64 / took.as_secs_f64()
            );
        });
    }
}

fn main() {
    let mut rng = Rng(0x2545_F491_4F6C_DD1D);
    let docs: Vec<Bytes> = (0..ITEMS).map(|_| order(&mut rng)).collect();
    let raw: usize = docs.iter().map(Bytes::len).sum();
    let (min, max) = (
        docs.iter().map(Bytes::len).min().unwrap_or(0),
        docs.iter().map(Bytes::len).max().unwrap_or(0),
    );
    println!(
        "{ITEMS} JSON orders, {min}..{max} bytes, mean {} bytes, {:.1} MB in all",
        raw / ITEMS,
        raw as f64 / 1e6
    );
    println!("codec | stored bytes | ratio | compress µs/item | compress MB/s | decompress µs/item | decompress MB/s");
    for c in [Compression::None, Compression::Lz4, Compression::Zstd] {
        // One warm-up pass, then the best of three.
        let mut best = (f64::MAX, f64::MAX);
        let mut stored_bytes = 0;
        for _ in 0..4 {
            let t = Instant::now();
            let stored: Vec<Bytes> = docs.iter().map(|d| encode_inline(d, c)).collect();
            let enc = t.elapsed().as_secs_f64();
            let t = Instant::now();
            for (s, d) in stored.iter().zip(&docs) {
                match decode(s) {
                    Ok(Stored::Inline(b)) => assert_eq!(b.len(), d.len()),
                    other => panic!("decode: {other:?}"),
                }
            }
            let dec = t.elapsed().as_secs_f64();
            stored_bytes = stored.iter().map(Bytes::len).sum::<usize>();
            best = (best.0.min(enc), best.1.min(dec));
        }
        println!(
            "{c:?} | {stored_bytes} | {:.2} | {:.2} | {:.0} | {:.2} | {:.0}",
            raw as f64 / stored_bytes as f64,
            best.0 * 1e6 / ITEMS as f64,
            raw as f64 / best.0 / 1e6,
            best.1 * 1e6 / ITEMS as f64,
            raw as f64 / best.1 / 1e6,
        );
    }
    #[cfg(feature = "fjall")]
    {
        // Enough to pass fjall's memtable and journal sizes several times over, so the directory holds tables.
        let more: Vec<Bytes> = (0..FJALL_ITEMS).map(|_| order(&mut rng)).collect();
        println!(
            "{FJALL_ITEMS} more orders, {:.1} MB:",
            more.iter().map(Bytes::len).sum::<usize>() as f64 / 1e6
        );
        on_fjall(&more);
    }
}
