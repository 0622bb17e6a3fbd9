//! Property tests: decoding arbitrary bytes or JSON-ish text never panics, and valid messages survive a
//! round trip through either encoding.

use lessor_proto::*;
use proptest::prelude::*;

fn decode_all(enc: Encoding, body: &[u8]) {
    let _ = decode::<QueueProduceRequest>(enc, body);
    let _ = decode::<QueueLeaseRequest>(enc, body);
    let _ = decode::<QueueLeaseResponse>(enc, body);
    let _ = decode::<QueueCompleteRequest>(enc, body);
    let _ = decode::<QueueRetryRequest>(enc, body);
    let _ = decode::<QueueStatsResponse>(enc, body);
    let _ = decode::<QueueInfo>(enc, body);
    let _ = decode::<QueuesListRequest>(enc, body);
    let _ = decode::<StorageItemsImportRequest>(enc, body);
    let _ = decode::<Reply>(enc, body);
    let _ = decode::<NamespaceInfo>(enc, body);
    let _ = decode::<UsersListResponse>(enc, body);
    let _ = decode::<APIKeyCreateRequest>(enc, body);
    let _ = decode::<APIKeysListResponse>(enc, body);
    let _ = decode::<RoleCreateRequest>(enc, body);
    let _ = decode::<RoleBindingsListResponse>(enc, body);
    // Lessor's extension messages.
    let _ = decode::<QueueExtendRequest>(enc, body);
    let _ = decode::<QueueBrowseRequest>(enc, body);
    let _ = decode::<QueueBrowseResponse>(enc, body);
    let _ = decode::<QueueRedriveRequest>(enc, body);
    let _ = decode::<RedriveListResponse>(enc, body);
    let _ = decode::<RetryBackoff>(enc, body);
}

/// Text built from JSON tokens, field names and timestamp/base64 fragments, so the fuzzer reaches deep
/// into the field decoders instead of failing at the first byte.
fn jsonish() -> impl Strategy<Value = String> {
    let token = prop_oneof![
        Just("{".to_string()),
        Just("}".to_string()),
        Just("[".to_string()),
        Just("]".to_string()),
        Just(":".to_string()),
        Just(",".to_string()),
        Just("null".to_string()),
        Just("true".to_string()),
        Just("\"queue_name\"".to_string()),
        Just("\"queueName\"".to_string()),
        Just("\"items\"".to_string()),
        Just("\"bytes\"".to_string()),
        Just("\"enqueue_at\"".to_string()),
        Just("\"retry_at\"".to_string()),
        Just("\"batch_size\"".to_string()),
        Just("\"partition\"".to_string()),
        Just("\"logicalQueues\"".to_string()),
        Just("\"details\"".to_string()),
        Just("\"code\"".to_string()),
        Just("\"priority\"".to_string()),
        Just("\"retry_backoff\"".to_string()),
        Just("\"factor\"".to_string()),
        Just("\"max_items\"".to_string()),
        Just("\"NaN\"".to_string()),
        Just("\"2026-01-02T03:04:05.123Z\"".to_string()),
        Just("\"9999-12-31T23:59:59+23:59\"".to_string()),
        Just("\"aGk=\"".to_string()),
        "-?[0-9]{1,25}(\\.[0-9]{0,5})?(e[+-]?[0-9]{1,3})?",
        "\"[ -~\u{00b5}\u{10000}]{0,12}\"",
    ];
    prop::collection::vec(token, 0..40).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(body in prop::collection::vec(any::<u8>(), 0..256)) {
        decode_all(Encoding::Protobuf, &body);
        decode_all(Encoding::Json, &body);
    }

    #[test]
    fn jsonish_text_never_panics(text in jsonish()) {
        decode_all(Encoding::Json, text.as_bytes());
        decode_all(Encoding::Protobuf, text.as_bytes());
    }

    #[test]
    fn arbitrary_timestamp_text_never_panics(text in "[0-9T:.Z+\\-]{0,40}") {
        let _ = Timestamp::parse_rfc3339(&text);
    }

    #[test]
    fn arbitrary_duration_text_never_panics(text in "[0-9.+\\-a-z\u{00b5}\u{03bc}]{0,30}") {
        let _ = duration::parse_go_duration(&text);
    }

    #[test]
    fn headers_never_panic(text in "\\PC{0,40}") {
        let _ = request_encoding(Some(&text));
        let _ = response_encoding(Some(&text));
    }

    #[test]
    fn timestamps_round_trip(seconds in timestamp::MIN_SECONDS..=timestamp::MAX_SECONDS,
                             nanos in 0i32..1_000_000_000) {
        let ts = Timestamp::new(seconds, nanos);
        prop_assert_eq!(Timestamp::parse_rfc3339(&ts.to_rfc3339()), Ok(ts));
    }

    #[test]
    fn durations_round_trip(nanos in 0u64..=i64::MAX as u64) {
        let d = std::time::Duration::from_nanos(nanos);
        prop_assert_eq!(duration::parse_go_duration(&duration::format_go_duration(d)), Ok(d));
    }

    #[test]
    fn produce_requests_round_trip(
        queue_name in "\\PC{0,20}",
        timeout in "[0-9]{1,3}(ms|s|m|h)",
        payloads in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..64), 0..5),
        seconds in proptest::option::of(timestamp::MIN_SECONDS..=timestamp::MAX_SECONDS),
    ) {
        let msg = QueueProduceRequest {
            queue_name,
            request_timeout: timeout,
            items: payloads
                .into_iter()
                .map(|bytes| QueueProduceItem {
                    bytes,
                    enqueue_at: seconds.map(|s| Timestamp::new(s, 0)),
                    ..Default::default()
                })
                .collect(),
        };
        for enc in [Encoding::Json, Encoding::Protobuf] {
            let back: QueueProduceRequest = decode(enc, &encode(enc, &msg)).expect("decode");
            prop_assert_eq!(&back, &msg);
        }
    }
}
