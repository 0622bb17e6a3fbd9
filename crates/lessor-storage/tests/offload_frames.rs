//! Damaged or forged lz4 frames and object bodies: a stored payload whose lz4 block claims a decompressed size it
//! cannot have (up to 4 GiB in four bytes) must be refused as corrupt, naming the item, before the decoder
//! allocates what it claims.
//!
//! The binary counts allocated bytes through an instrumented global allocator: a test reads how much was allocated
//! while it decoded, to show that no buffer of the claimed size was ever asked for.
#![cfg(feature = "s3")]
#![allow(clippy::unwrap_used)]

use std::alloc::System;
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use lessor_core::error::StorageErrorKind;
use lessor_core::storage::PartitionStore;
use lessor_core::time::Ts;
use lessor_core::types::NewItem;
use lessor_storage::memory::MemoryStore;
use lessor_storage::offload::frame::{self, Compression, ObjectRef, MAGIC};
use lessor_storage::offload::{OffloadSettings, OffloadStore};
use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};

#[global_allocator]
static ALLOC: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// Far above anything these tests allocate legitimately, far below what the forged frames claim.
const BIG: usize = 64 << 20;

/// Runs `f` and checks that the whole process allocated less than [`BIG`] bytes meanwhile (other tests of the
/// binary running at the same time allocate a few kilobytes).
fn without_big_allocation<T>(what: &str, f: impl FnOnce() -> T) -> T {
    let region = Region::new(ALLOC);
    let out = f();
    let allocated = region.change().bytes_allocated;
    assert!(
        allocated < BIG,
        "{what}: {allocated} bytes allocated for a frame of a few bytes"
    );
    out
}

/// An lz4 block of 100 bytes of text with the size prefix lz4 writes replaced by `claim`.
fn lz4_claiming(claim: u32) -> (Bytes, Vec<u8>) {
    let original = Bytes::from("lz4 forged frame ".repeat(6));
    let mut block = Compression::Lz4.compress(&original);
    block[..4].copy_from_slice(&claim.to_le_bytes());
    (original, block)
}

/// An inline lz4 frame (`MAGIC 0x01 crc32 block`) over `block`.
fn inline_frame(original: &[u8], block: &[u8]) -> Bytes {
    let mut b = BytesMut::new();
    b.put_slice(&MAGIC);
    b.put_u8(1);
    b.put_u32_le(crc32fast::hash(original));
    b.put_slice(block);
    b.freeze()
}

#[test]
fn an_inline_lz4_frame_claiming_4_gib_is_refused_before_allocating() {
    let (original, block) = lz4_claiming(u32::MAX);
    let stored = inline_frame(&original, &block);
    assert!(stored.len() < 200, "a small frame: {} bytes", stored.len());
    let e = without_big_allocation("inline frame", || frame::decode(&stored))
        .expect_err("a frame claiming 4 GiB is refused");
    assert!(e.contains("claims"), "the error says what the frame claims: {e}");
}

#[test]
fn an_object_body_claiming_another_length_than_its_reference_is_refused_before_allocating() {
    let (original, block) = lz4_claiming(u32::MAX);
    let r = ObjectRef {
        codec: Compression::Lz4,
        len: original.len() as u64,
        crc: crc32fast::hash(&original),
        key: "pre/q/0/k".into(),
    };
    let e = without_big_allocation("object body", || r.decode_body(&block))
        .expect_err("the body claims 4 GiB, the reference 102 bytes");
    assert!(e.contains("claims"), "{e}");
    // A claim one byte off the reference's length is refused as well, whatever the block decodes to.
    let (_, off_by_one) = lz4_claiming(original.len() as u32 + 1);
    assert!(r.decode_body(&off_by_one).is_err());
    // The untouched body still decodes.
    assert_eq!(
        r.decode_body(&Compression::Lz4.compress(&original)).unwrap(),
        original
    );
}

/// Through the store: an item whose stored payload is a forged frame is reported corrupt by id when leased, and
/// stays in the queue.
#[tokio::test]
async fn a_lease_of_an_item_with_a_forged_lz4_frame_fails_corrupt_naming_it() {
    const T0: Ts = Ts(1_800_000_000_000_000);
    let inner: Arc<dyn PartitionStore> = Arc::new(MemoryStore::new());
    let store = OffloadStore::new(
        inner.clone(),
        "ram-0",
        OffloadSettings {
            compression: Compression::Lz4,
            ..Default::default()
        },
    )
    .unwrap();
    let (original, block) = lz4_claiming(u32::MAX);
    // Written below the wrapper, as damaged storage (or a forged restore) would leave it.
    let ids = inner
        .open("q", 0)
        .await
        .unwrap()
        .produce(vec![NewItem {
            expire_deadline: T0.add(Duration::from_secs(86_400)),
            created_at: T0,
            payload: inline_frame(&original, &block),
            ..Default::default()
        }])
        .await
        .unwrap();
    let p = store.open("q", 0).await.unwrap();
    let region = Region::new(ALLOC);
    let e = p
        .lease(1, T0.add(Duration::from_secs(60)))
        .await
        .expect_err("the forged payload is never served");
    let allocated = region.change().bytes_allocated;
    assert!(allocated < BIG, "lease: {allocated} bytes allocated");
    assert_eq!(e.kind, StorageErrorKind::Corrupt, "{e}");
    assert!(e.message.contains(&format!("item '{}'", ids[0])), "{e}");
    assert_eq!(p.counts().await.unwrap().ready, 1, "the item stays queued");
}
