//! How an offloaded or compressed payload is written into an item's payload bytes, and read back.
//!
//! A stored payload is either the user's bytes as they are (everything written before offload or compression was
//! turned on, and payloads that compression would not shrink), or a frame starting with [`MAGIC`] and a kind byte:
//!
//! ```text
//! raw      MAGIC 0x00 bytes...                         (user bytes that happen to start with MAGIC)
//! lz4      MAGIC 0x01 crc32(original) lz4-block-with-size
//! zstd     MAGIC 0x02 crc32(original) zstd-frame
//! object   MAGIC 0x03 codec len:u64 crc32(original) key-len:u16 key    (the bytes live in object storage)
//! ```
//!
//! Integers are little-endian. The CRC-32 of the original bytes is checked after every decompression and every
//! object fetch, so a damaged frame or object is reported as corrupt, never served as other bytes. Before that, a
//! codec's claimed size is checked against the length the reference records and [`MAX_PAYLOAD`], so a damaged or
//! forged size field is refused without allocating what it claims. Payloads that do
//! not start with [`MAGIC`] need no frame, so turning compression on costs nothing for data already stored and
//! turning it off again still reads every frame written meanwhile.

use bytes::{BufMut, Bytes, BytesMut};

pub use crate::registry::Compression;

/// The first bytes of a framed payload (not valid UTF-8, so no text payload starts with them).
pub const MAGIC: [u8; 4] = crate::tiers::FRAME_MAGIC;
const KIND_RAW: u8 = 0;
const KIND_LZ4: u8 = 1;
const KIND_ZSTD: u8 = 2;
/// Object references are recognised by every build (for the per-tier stats): the constant lives in `tiers`.
const KIND_OBJECT: u8 = crate::tiers::KIND_OBJECT;
/// Payloads shorter than this are never compressed (the frame and codec overhead eat the gain).
pub const MIN_COMPRESS: usize = 128;
/// zstd level: 3 is zstd's default, a good ratio at a few hundred MB/s.
const ZSTD_LEVEL: i32 = 3;
/// Largest payload a frame or object body may decode to. No produce body comes near it (the HTTP limits are a few
/// megabytes to tens of megabytes); a size field claiming more is damaged or forged, and is refused before the
/// decoder allocates what it claims.
pub const MAX_PAYLOAD: usize = 1 << 30;
/// An lz4 block cannot grow a byte into more than 255 (a match's length grows by at most 255 per length byte; a
/// literal is copied as it is): a block claiming more than this many times its own length is damaged or forged.
const LZ4_MAX_RATIO: usize = 255;

impl Compression {
    fn code(self) -> u8 {
        match self {
            Compression::None => KIND_RAW,
            Compression::Lz4 => KIND_LZ4,
            Compression::Zstd => KIND_ZSTD,
        }
    }

    fn from_code(c: u8) -> Option<Self> {
        match c {
            KIND_RAW => Some(Compression::None),
            KIND_LZ4 => Some(Compression::Lz4),
            KIND_ZSTD => Some(Compression::Zstd),
            _ => None,
        }
    }

    /// `data` compressed (the codec's own format, without a frame).
    pub fn compress(self, data: &[u8]) -> Vec<u8> {
        match self {
            Compression::None => data.to_vec(),
            Compression::Lz4 => lz4_flex::compress_prepend_size(data),
            // Writing into a Vec cannot fail; an error here would be a zstd bug, and storing the raw bytes
            // is always correct.
            Compression::Zstd => ZSTD_C
                .with(|c| match c.borrow_mut().as_mut() {
                    Some(c) => c.compress(data).ok(),
                    None => zstd::bulk::compress(data, ZSTD_LEVEL).ok(),
                })
                .unwrap_or_else(|| data.to_vec()),
        }
    }

    /// The inverse of [`Compression::compress`]; `expect` is the original length when known (a bound on what a
    /// damaged input may make the decoder allocate). Never decodes to more than [`MAX_PAYLOAD`] bytes.
    pub fn decompress(self, data: &[u8], expect: Option<usize>) -> Result<Vec<u8>, String> {
        match self {
            Compression::None => Ok(data.to_vec()),
            Compression::Lz4 => lz4_decompress(data, expect),
            Compression::Zstd => {
                let cap = expect.unwrap_or_else(|| {
                    zstd::zstd_safe::get_frame_content_size(data)
                        .ok()
                        .flatten()
                        .and_then(|n| usize::try_from(n).ok())
                        .unwrap_or(0)
                });
                // A frame claiming more than any payload is damaged (produce bodies are far smaller).
                if cap > MAX_PAYLOAD {
                    return Err(format!("zstd: frame claims {cap} bytes"));
                }
                ZSTD_D
                    .with(|d| match d.borrow_mut().as_mut() {
                        Some(d) => d.decompress(data, cap),
                        None => zstd::bulk::decompress(data, cap),
                    })
                    .map_err(|e| format!("zstd: {e}"))
            }
        }
    }
}

/// Decodes an lz4 block with its size prepended (`compress_prepend_size`), refusing before any allocation a block
/// whose claimed size is not `expect` (the length an object reference records), is above [`MAX_PAYLOAD`], or is
/// more than its bytes can decode to. lz4 allocates the claimed size up front and four bytes claim up to 4 GiB:
/// without these checks a damaged or forged payload of a few bytes makes every lease of its item allocate that.
fn lz4_decompress(data: &[u8], expect: Option<usize>) -> Result<Vec<u8>, String> {
    let (Some(size), Some(block)) = (data.get(..4), data.get(4..)) else {
        return Err(format!("lz4: {} bytes, shorter than the size field", data.len()));
    };
    let claim = u32::from_le_bytes([size[0], size[1], size[2], size[3]]) as usize;
    if let Some(n) = expect {
        if claim != n {
            return Err(format!(
                "lz4: block claims {claim} bytes where the payload has {n}"
            ));
        }
    }
    if claim > MAX_PAYLOAD {
        return Err(format!(
            "lz4: block claims {claim} bytes, more than any payload ({MAX_PAYLOAD})"
        ));
    }
    if claim > block.len().saturating_mul(LZ4_MAX_RATIO) {
        return Err(format!(
            "lz4: block of {} bytes claims {claim} bytes, more than lz4 can decode it to",
            block.len()
        ));
    }
    let mut out = vec![0u8; claim];
    let n = lz4_flex::block::decompress_into(block, &mut out).map_err(|e| format!("lz4: {e}"))?;
    if n != claim {
        return Err(format!("lz4: block claims {claim} bytes but holds {n}"));
    }
    Ok(out)
}

thread_local! {
    // A zstd context allocates about a megabyte of tables: building one per payload costs more than compressing a
    // few KB. One per thread, reused (`None` when it could not be built: the one-shot functions then).
    static ZSTD_C: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> =
        std::cell::RefCell::new(zstd::bulk::Compressor::new(ZSTD_LEVEL).ok());
    static ZSTD_D: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        std::cell::RefCell::new(zstd::bulk::Decompressor::new().ok());
}

/// What a stored payload holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Stored {
    /// The bytes themselves (already decompressed).
    Inline(Bytes),
    /// A reference to an object.
    Object(ObjectRef),
}

/// A payload kept in object storage: the key and what the bytes must be once fetched.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectRef {
    /// How the object's body is compressed.
    pub codec: Compression,
    /// Length of the original payload.
    pub len: u64,
    /// CRC-32 of the original payload.
    pub crc: u32,
    /// The object's key.
    pub key: String,
}

impl ObjectRef {
    /// The payload bytes stored in the item.
    pub fn encode(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(4 + 1 + 1 + 8 + 4 + 2 + self.key.len());
        b.put_slice(&MAGIC);
        b.put_u8(KIND_OBJECT);
        b.put_u8(self.codec.code());
        b.put_u64_le(self.len);
        b.put_u32_le(self.crc);
        b.put_u16_le(u16::try_from(self.key.len()).unwrap_or(u16::MAX));
        b.put_slice(self.key.as_bytes());
        b.freeze()
    }

    /// The original payload from the object's body, checked against the length and checksum.
    pub fn decode_body(&self, body: &[u8]) -> Result<Bytes, String> {
        let data = self
            .codec
            .decompress(body, usize::try_from(self.len).ok())
            .map_err(|e| format!("object body does not decompress ({e})"))?;
        if data.len() as u64 != self.len {
            return Err(format!(
                "object holds {} bytes where the item expects {}",
                data.len(),
                self.len
            ));
        }
        if crc32fast::hash(&data) != self.crc {
            return Err("object checksum mismatch".into());
        }
        Ok(Bytes::from(data))
    }
}

/// The stored form of `payload` for inline storage: compressed when that shrinks it, framed only when needed.
pub fn encode_inline(payload: &Bytes, compression: Compression) -> Bytes {
    if compression != Compression::None && payload.len() >= MIN_COMPRESS {
        let packed = compression.compress(payload);
        if packed.len() + 9 < payload.len() {
            let mut b = BytesMut::with_capacity(packed.len() + 9);
            b.put_slice(&MAGIC);
            b.put_u8(compression.code());
            b.put_u32_le(crc32fast::hash(payload));
            b.put_slice(&packed);
            return b.freeze();
        }
    }
    if payload.starts_with(&MAGIC) {
        let mut b = BytesMut::with_capacity(payload.len() + 5);
        b.put_slice(&MAGIC);
        b.put_u8(KIND_RAW);
        b.put_slice(payload);
        return b.freeze();
    }
    payload.clone()
}

/// Reads a stored payload: the bytes (decompressed and checked) or the object reference.
///
/// # Errors
/// A frame that is truncated, of an unknown kind, or whose bytes do not match their checksum.
pub fn decode(stored: &Bytes) -> Result<Stored, String> {
    if !stored.starts_with(&MAGIC) || stored.len() < 5 {
        return Ok(Stored::Inline(stored.clone()));
    }
    let kind = stored[4];
    let rest = &stored[5..];
    match kind {
        KIND_RAW => Ok(Stored::Inline(stored.slice(5..))),
        KIND_LZ4 | KIND_ZSTD => {
            let codec = Compression::from_code(kind).unwrap_or_default();
            let crc = u32::from_le_bytes(
                rest.get(..4)
                    .and_then(|s| s.try_into().ok())
                    .ok_or("truncated compressed frame")?,
            );
            let data = codec.decompress(&rest[4..], None)?;
            if crc32fast::hash(&data) != crc {
                return Err("compressed payload checksum mismatch".into());
            }
            Ok(Stored::Inline(Bytes::from(data)))
        }
        KIND_OBJECT => {
            let truncated = || "truncated object reference".to_string();
            let codec = Compression::from_code(*rest.first().ok_or_else(truncated)?)
                .ok_or("object reference with an unknown codec")?;
            let len = u64::from_le_bytes(
                rest.get(1..9)
                    .ok_or_else(truncated)?
                    .try_into()
                    .map_err(|_| truncated())?,
            );
            let crc = u32::from_le_bytes(
                rest.get(9..13)
                    .ok_or_else(truncated)?
                    .try_into()
                    .map_err(|_| truncated())?,
            );
            let klen = u16::from_le_bytes(
                rest.get(13..15)
                    .ok_or_else(truncated)?
                    .try_into()
                    .map_err(|_| truncated())?,
            );
            let key = rest.get(15..15 + usize::from(klen)).ok_or_else(truncated)?;
            let key = String::from_utf8(key.to_vec()).map_err(|_| "object key is not UTF-8".to_string())?;
            Ok(Stored::Object(ObjectRef { codec, len, crc, key }))
        }
        other => Err(format!("unknown payload frame kind {other}")),
    }
}

/// Whether a stored payload is a frame (anything else is the payload as produced).
pub fn is_framed(stored: &[u8]) -> bool {
    stored.starts_with(&MAGIC)
}

/// The length of the payload a stored object reference stands for, if `stored` is one (cheap: no decompression,
/// no fetch), so that a byte bound can be applied before the object is fetched.
pub fn object_len(stored: &Bytes) -> Option<u64> {
    if stored.len() > 5 && stored.starts_with(&MAGIC) && stored[4] == KIND_OBJECT {
        match decode(stored) {
            Ok(Stored::Object(r)) => Some(r.len),
            _ => None,
        }
    } else {
        None
    }
}

/// The object key a stored payload references, if any (cheap: no decompression).
pub fn object_key(stored: &Bytes) -> Option<String> {
    if stored.len() > 5 && stored.starts_with(&MAGIC) && stored[4] == KIND_OBJECT {
        match decode(stored) {
            Ok(Stored::Object(r)) => Some(r.key),
            _ => None,
        }
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(n: usize) -> Bytes {
        let mut s = String::from("[");
        for i in 0..n {
            s.push_str(&format!(
                "{{\"order\":{i},\"sku\":\"ABC-{i}\",\"qty\":3,\"status\":\"paid\"}},"
            ));
        }
        s.push(']');
        Bytes::from(s)
    }

    #[test]
    fn inline_round_trips_every_codec() {
        for c in [Compression::None, Compression::Lz4, Compression::Zstd] {
            for p in [
                Bytes::new(),
                Bytes::from_static(b"hi"),
                json(50),
                Bytes::from(vec![7u8; 1000]),
            ] {
                let s = encode_inline(&p, c);
                if c != Compression::None && p.len() >= MIN_COMPRESS {
                    assert!(s.len() < p.len(), "{c:?} did not shrink");
                }
                assert_eq!(decode(&s).expect("decode"), Stored::Inline(p.clone()), "{c:?}");
            }
        }
    }

    #[test]
    fn old_unframed_data_and_magic_lookalikes_read_back() {
        let old = Bytes::from_static(b"{\"legacy\":true}");
        assert_eq!(decode(&old).expect("old"), Stored::Inline(old.clone()));
        let mut tricky = MAGIC.to_vec();
        tricky.extend_from_slice(&[KIND_OBJECT, 0, 1, 2]);
        let tricky = Bytes::from(tricky);
        let s = encode_inline(&tricky, Compression::None);
        assert_eq!(decode(&s).expect("framed raw"), Stored::Inline(tricky));
    }

    #[test]
    fn damage_is_detected_never_served() {
        let p = json(50);
        let mut s = encode_inline(&p, Compression::Zstd).to_vec();
        s[5] ^= 0xFF; // the checksum
        assert!(decode(&Bytes::from(s)).is_err());
        let r = ObjectRef {
            codec: Compression::Lz4,
            len: p.len() as u64,
            crc: crc32fast::hash(&p),
            key: "pre/k1".into(),
        };
        let enc = r.encode();
        assert_eq!(decode(&enc).expect("ref"), Stored::Object(r.clone()));
        assert_eq!(object_key(&enc).as_deref(), Some("pre/k1"));
        // The per-tier stats of every backend tell references from inline frames by the same bytes.
        assert_eq!(crate::tiers::offloaded_len(&enc), Some(p.len() as u64));
        assert_eq!(
            crate::tiers::offloaded_len(&encode_inline(&p, Compression::Zstd)),
            None
        );
        let body = Compression::Lz4.compress(&p);
        assert_eq!(r.decode_body(&body).expect("body"), p);
        assert!(r.decode_body(&Compression::Lz4.compress(b"other bytes")).is_err());
        assert!(decode(&enc.slice(..10)).is_err());
    }

    #[test]
    fn lz4_claims_are_checked_before_decoding() {
        let p = json(50);
        let good = Compression::Lz4.compress(&p);
        assert_eq!(
            Compression::Lz4.decompress(&good, Some(p.len())).expect("good"),
            p
        );
        assert_eq!(
            Compression::Lz4.decompress(&good, None).expect("no length known"),
            p
        );
        let claiming = |n: u32| {
            let mut b = good.clone();
            b[..4].copy_from_slice(&n.to_le_bytes());
            b
        };
        for (claim, expect, says) in [
            (p.len() as u32 + 1, Some(p.len()), "where the payload has"),
            (p.len() as u32 - 1, Some(p.len()), "where the payload has"),
            (u32::MAX, None, "more than any payload"),
            // Within the cap, but more than a block this short can decode to.
            ((MAX_PAYLOAD / 2) as u32, None, "more than lz4 can decode it to"),
            // Plausible, but not what the block holds.
            (p.len() as u32 + 1, None, "but holds"),
        ] {
            let e = Compression::Lz4
                .decompress(&claiming(claim), expect)
                .expect_err("refused");
            assert!(e.contains(says), "claim {claim}: {e}");
        }
        // A claim below what the block holds is an error, never a panic.
        assert!(Compression::Lz4.decompress(&claiming(3), None).is_err());
        assert!(Compression::Lz4.decompress(&good[..3], None).is_err());
        // Empty payloads round-trip.
        let empty = Compression::Lz4.compress(b"");
        assert!(Compression::Lz4
            .decompress(&empty, Some(0))
            .expect("empty")
            .is_empty());
    }
}
