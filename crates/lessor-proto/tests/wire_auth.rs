//! Black-box tests of the access-control messages (namespaces, users, API keys, roles, role bindings): Querator's
//! protobuf field numbers, protojson names in both spellings, zero values left out, and round trips.

use lessor_proto::*;
use prost::Message;
use serde_json::{json, Value};

fn to_json<T: serde::Serialize>(m: &T) -> Value {
    serde_json::to_value(m).expect("serialize")
}

fn from_json<T: prost::Message + Default + serde::de::DeserializeOwned>(s: &str) -> Result<T, CodecError> {
    decode(Encoding::Json, s.as_bytes())
}

fn round_trip<T>(msg: &T)
where
    T: prost::Message
        + Default
        + serde::Serialize
        + serde::de::DeserializeOwned
        + PartialEq
        + std::fmt::Debug,
{
    for enc in [Encoding::Json, Encoding::Protobuf] {
        let bytes = encode(enc, msg);
        let back: T = decode(enc, &bytes).unwrap_or_else(|e| panic!("{enc:?}: {e}"));
        assert_eq!(&back, msg, "{enc:?} round trip");
    }
}

fn ts(s: i64) -> Option<Timestamp> {
    Some(Timestamp::new(s, 0))
}

#[test]
fn every_message_round_trips_in_both_encodings() {
    round_trip(&NamespaceInfo {
        name: "team-a".into(),
        description: "d".into(),
        created_at: Some(Timestamp::new(1_767_323_045, 123_456_000)),
        api_key_tag: "teama".into(),
    });
    round_trip(&NamespacesListRequest {
        pivot: "a".into(),
        limit: 7,
    });
    round_trip(&NamespacesListResponse {
        items: vec![NamespaceInfo {
            name: "x".into(),
            ..Default::default()
        }],
    });
    round_trip(&NamespacesDeleteRequest { name: "x".into() });
    round_trip(&User {
        id: "u".into(),
        username: "alice".into(),
        external_id: "e".into(),
        email: "a@example.com".into(),
        created_at: ts(1),
        updated_at: ts(2),
    });
    round_trip(&UserCreateRequest {
        username: "alice".into(),
        email: "a@example.com".into(),
        external_id: "e".into(),
    });
    round_trip(&UserCreateResponse { id: "u".into() });
    round_trip(&UsersListRequest {
        limit: 3,
        pivot: "p".into(),
    });
    round_trip(&UsersListResponse {
        items: vec![User::default(), User::default()],
    });
    round_trip(&UsersDeleteRequest { id: "u".into() });
    round_trip(&APIKeyMetadata {
        id: "k".into(),
        user_id: "u".into(),
        namespace_scope: "team-a".into(),
        name: "ci".into(),
        prefix: "qtr-live-abcdefgh".into(),
        expires_at: ts(3),
        last_used_at: ts(4),
        created_at: ts(5),
    });
    round_trip(&APIKeyCreateRequest {
        user_id: "u".into(),
        name: "ci".into(),
        namespace_scope: "team-a".into(),
        expires_at: ts(6),
        key_tag: "ci".into(),
    });
    round_trip(&APIKeyCreateResponse {
        id: "k".into(),
        key: "qtr-live-x".into(),
        prefix: "qtr-live-".into(),
    });
    round_trip(&APIKeysListRequest {
        user_id: "u".into(),
        limit: 2,
        pivot: "p".into(),
    });
    round_trip(&APIKeysListResponse {
        items: vec![APIKeyMetadata::default()],
    });
    round_trip(&APIKeysDeleteRequest { id: "k".into() });
    round_trip(&Role {
        id: "r".into(),
        namespace: "team-a".into(),
        name: "producer".into(),
        permissions: vec!["queue.produce".into(), "queue.stats".into()],
        created_at: ts(7),
    });
    let perms = vec!["queue.lease".to_string()];
    round_trip(&RoleCreateRequest {
        namespace: "n".into(),
        name: "r".into(),
        permissions: perms.clone(),
    });
    round_trip(&RoleCreateResponse { id: "r".into() });
    round_trip(&RoleUpdateRequest {
        namespace: "n".into(),
        name: "r".into(),
        permissions: perms,
    });
    round_trip(&RolesListRequest {
        namespace: "n".into(),
        limit: 1,
        pivot: "p".into(),
    });
    round_trip(&RolesListResponse {
        items: vec![Role::default()],
    });
    round_trip(&RolesDeleteRequest {
        namespace: "n".into(),
        name: "r".into(),
    });
    round_trip(&RoleBinding {
        id: "b".into(),
        namespace: "n".into(),
        user_id: "u".into(),
        role_id: "r".into(),
        created_at: ts(8),
    });
    round_trip(&RoleBindingCreateRequest {
        namespace: "n".into(),
        role_name: "r".into(),
        user_id: "u".into(),
    });
    round_trip(&RoleBindingCreateResponse { id: "b".into() });
    round_trip(&RoleBindingsListRequest {
        namespace: "n".into(),
        user_id_filter: "u".into(),
        limit: 4,
        pivot: "p".into(),
    });
    round_trip(&RoleBindingsListResponse {
        items: vec![RoleBinding::default()],
    });
    round_trip(&RoleBindingDeleteRequest {
        namespace: "n".into(),
        role_name: "r".into(),
        user_id: "u".into(),
    });
}

#[test]
fn protobuf_field_numbers_match_querator() {
    // namespaces.proto: NamespaceInfo {name 1, description 2, createdAt 3, api_key_tag 4}.
    let ns = NamespaceInfo {
        name: "n".into(),
        description: "d".into(),
        created_at: Some(Timestamp::new(1, 2)),
        api_key_tag: "t".into(),
    };
    assert_eq!(
        ns.encode_to_vec(),
        vec![0x0a, 1, b'n', 0x12, 1, b'd', 0x1a, 4, 0x08, 1, 0x10, 2, 0x22, 1, b't']
    );
    // NamespacesListRequest {pivot 1, limit 2}.
    let nl = NamespacesListRequest {
        pivot: "p".into(),
        limit: 5,
    };
    assert_eq!(nl.encode_to_vec(), vec![0x0a, 1, b'p', 0x10, 5]);

    // users.proto: User {id 1, username 2, external_id 3, email 4, created_at 5, updated_at 6}.
    let u = User {
        id: "i".into(),
        username: "u".into(),
        external_id: "x".into(),
        email: "e".into(),
        created_at: Some(Timestamp::new(1, 0)),
        updated_at: Some(Timestamp::new(2, 0)),
    };
    assert_eq!(
        u.encode_to_vec(),
        vec![0x0a, 1, b'i', 0x12, 1, b'u', 0x1a, 1, b'x', 0x22, 1, b'e', 0x2a, 2, 0x08, 1, 0x32, 2, 0x08, 2]
    );
    // UsersListRequest {limit 1, pivot 2}: the reverse of the namespaces' order.
    let ul = UsersListRequest {
        limit: 5,
        pivot: "p".into(),
    };
    assert_eq!(ul.encode_to_vec(), vec![0x08, 5, 0x12, 1, b'p']);
    let uc = UserCreateRequest {
        username: "u".into(),
        email: "e".into(),
        external_id: "x".into(),
    };
    assert_eq!(
        uc.encode_to_vec(),
        vec![0x0a, 1, b'u', 0x12, 1, b'e', 0x1a, 1, b'x']
    );

    // apikeys.proto: APIKeyCreateRequest {user_id 1, name 2, namespace_scope 3, expires_at 4, key_tag 5}.
    let kc = APIKeyCreateRequest {
        user_id: "u".into(),
        name: "n".into(),
        namespace_scope: "s".into(),
        expires_at: Some(Timestamp::new(3, 0)),
        key_tag: "t".into(),
    };
    assert_eq!(
        kc.encode_to_vec(),
        vec![0x0a, 1, b'u', 0x12, 1, b'n', 0x1a, 1, b's', 0x22, 2, 0x08, 3, 0x2a, 1, b't']
    );
    // APIKeyMetadata: prefix 5, expires_at 6, last_used_at 7, created_at 8.
    let km = APIKeyMetadata {
        prefix: "p".into(),
        expires_at: Some(Timestamp::new(1, 0)),
        last_used_at: Some(Timestamp::new(2, 0)),
        created_at: Some(Timestamp::new(3, 0)),
        ..Default::default()
    };
    assert_eq!(
        km.encode_to_vec(),
        vec![0x2a, 1, b'p', 0x32, 2, 0x08, 1, 0x3a, 2, 0x08, 2, 0x42, 2, 0x08, 3]
    );
    // APIKeyCreateResponse {id 1, key 2, prefix 3}; APIKeysListRequest {user_id 1, limit 2, pivot 3}.
    let kr = APIKeyCreateResponse {
        id: "i".into(),
        key: "k".into(),
        prefix: "p".into(),
    };
    assert_eq!(
        kr.encode_to_vec(),
        vec![0x0a, 1, b'i', 0x12, 1, b'k', 0x1a, 1, b'p']
    );
    let kl = APIKeysListRequest {
        user_id: "u".into(),
        limit: 1,
        pivot: "p".into(),
    };
    assert_eq!(kl.encode_to_vec(), vec![0x0a, 1, b'u', 0x10, 1, 0x1a, 1, b'p']);

    // roles.proto: Role {id 1, namespace 2, name 3, permissions 4, created_at 5}.
    let r = Role {
        id: "i".into(),
        namespace: "n".into(),
        name: "r".into(),
        permissions: vec!["a".into(), "b".into()],
        created_at: Some(Timestamp::new(1, 0)),
    };
    assert_eq!(
        r.encode_to_vec(),
        vec![0x0a, 1, b'i', 0x12, 1, b'n', 0x1a, 1, b'r', 0x22, 1, b'a', 0x22, 1, b'b', 0x2a, 2, 0x08, 1]
    );
    // RoleBindingsListRequest {namespace 1, user_id_filter 2, limit 3, pivot 4}.
    let bl = RoleBindingsListRequest {
        namespace: "n".into(),
        user_id_filter: "u".into(),
        limit: 2,
        pivot: "p".into(),
    };
    assert_eq!(
        bl.encode_to_vec(),
        vec![0x0a, 1, b'n', 0x12, 1, b'u', 0x18, 2, 0x22, 1, b'p']
    );
    // RoleBinding {id 1, namespace 2, user_id 3, role_id 4, created_at 5}.
    let b = RoleBinding {
        id: "i".into(),
        namespace: "n".into(),
        user_id: "u".into(),
        role_id: "r".into(),
        created_at: Some(Timestamp::new(1, 0)),
    };
    assert_eq!(
        b.encode_to_vec(),
        vec![0x0a, 1, b'i', 0x12, 1, b'n', 0x1a, 1, b'u', 0x22, 1, b'r', 0x2a, 2, 0x08, 1]
    );
    // RoleBindingDeleteRequest {namespace 1, role_name 2, user_id 3}; RolesListRequest {namespace 1, limit 2,
    // pivot 3}.
    let bd = RoleBindingDeleteRequest {
        namespace: "n".into(),
        role_name: "r".into(),
        user_id: "u".into(),
    };
    assert_eq!(
        bd.encode_to_vec(),
        vec![0x0a, 1, b'n', 0x12, 1, b'r', 0x1a, 1, b'u']
    );
    let rl = RolesListRequest {
        namespace: "n".into(),
        limit: 1,
        pivot: "p".into(),
    };
    assert_eq!(rl.encode_to_vec(), vec![0x0a, 1, b'n', 0x10, 1, 0x1a, 1, b'p']);
}

#[test]
fn hand_encoded_protobuf_decodes_field_by_field() {
    // A Querator client's APIKeyCreateRequest with key_tag (5) before user_id (1): order must not matter.
    let body = [0x2a, 2, b'c', b'i', 0x0a, 2, b'u', b'1', 0x22, 2, 0x08, 9];
    let req: APIKeyCreateRequest = decode(Encoding::Protobuf, &body).expect("decode");
    assert_eq!(req.key_tag, "ci");
    assert_eq!(req.user_id, "u1");
    assert_eq!(req.expires_at, Some(Timestamp::new(9, 0)));
    // NamespaceInfo's created_at (3) is a Timestamp message.
    let body = [0x0a, 1, b'n', 0x1a, 2, 0x08, 7];
    let ns: NamespaceInfo = decode(Encoding::Protobuf, &body).expect("decode");
    assert_eq!(ns.created_at, Some(Timestamp::new(7, 0)));
}

#[test]
fn json_output_uses_json_names_and_omits_zero_values() {
    let ns = NamespaceInfo {
        name: "team-a".into(),
        description: String::new(),
        created_at: Some(Timestamp::new(1_767_323_045, 0)),
        api_key_tag: "teama".into(),
    };
    assert_eq!(
        to_json(&ns),
        json!({"name": "team-a", "created_at": "2026-01-02T03:04:05Z", "api_key_tag": "teama"})
    );
    assert_eq!(to_json(&NamespaceInfo::default()), json!({}));
    let key = APIKeyMetadata {
        id: "k".into(),
        user_id: "u".into(),
        prefix: "qtr-live-abcdefgh".into(),
        created_at: ts(0).map(|_| Timestamp::new(1, 0)),
        ..Default::default()
    };
    assert_eq!(
        to_json(&key),
        json!({"id": "k", "user_id": "u", "prefix": "qtr-live-abcdefgh", "created_at": "1970-01-01T00:00:01Z"})
    );
    let b = RoleBindingsListRequest {
        user_id_filter: "u".into(),
        ..Default::default()
    };
    assert_eq!(to_json(&b), json!({"user_id_filter": "u"}));
    let r = Role {
        name: "r".into(),
        permissions: vec!["queue.produce".into()],
        ..Default::default()
    };
    assert_eq!(
        to_json(&r),
        json!({"name": "r", "permissions": ["queue.produce"]})
    );
    assert_eq!(to_json(&RolesListResponse::default()), json!({}));
    let kc = APIKeyCreateRequest {
        key_tag: "ci".into(),
        ..Default::default()
    };
    assert_eq!(to_json(&kc), json!({"key_tag": "ci"}));
}

#[test]
fn json_accepts_json_name_and_proto_name() {
    // NamespaceInfo field 3: json_name `created_at`, proto name `createdAt`.
    let a: NamespaceInfo =
        from_json(r#"{"name":"n","created_at":"1970-01-01T00:00:01Z"}"#).expect("json_name");
    let b: NamespaceInfo =
        from_json(r#"{"name":"n","createdAt":"1970-01-01T00:00:01Z"}"#).expect("proto name");
    assert_eq!(a, b);
    assert_eq!(a.created_at, ts(1));
    let a: NamespaceInfo = from_json(r#"{"api_key_tag":"t"}"#).expect("snake");
    let b: NamespaceInfo = from_json(r#"{"apiKeyTag":"t"}"#).expect("camel");
    assert_eq!(a, b);

    let snake: APIKeyCreateRequest = from_json(
        r#"{"user_id":"u","namespace_scope":"s","expires_at":"2030-01-01T00:00:00Z","key_tag":"t"}"#,
    )
    .expect("snake");
    let camel: APIKeyCreateRequest =
        from_json(r#"{"userId":"u","namespaceScope":"s","expiresAt":"2030-01-01T00:00:00Z","keyTag":"t"}"#)
            .expect("camel");
    assert_eq!(snake, camel);
    assert_eq!(snake.key_tag, "t");

    let snake: RoleBindingsListRequest =
        from_json(r#"{"namespace":"n","user_id_filter":"u","limit":"3"}"#).expect("snake");
    let camel: RoleBindingsListRequest =
        from_json(r#"{"namespace":"n","userIdFilter":"u","limit":3}"#).expect("camel");
    assert_eq!(snake, camel);
    assert_eq!(snake.limit, 3);

    let snake: RoleBindingCreateRequest = from_json(r#"{"role_name":"r","user_id":"u"}"#).expect("snake");
    let camel: RoleBindingCreateRequest = from_json(r#"{"roleName":"r","userId":"u"}"#).expect("camel");
    assert_eq!(snake, camel);

    let snake: User = from_json(r#"{"external_id":"x","updated_at":"1970-01-01T00:00:02Z"}"#).expect("snake");
    let camel: User = from_json(r#"{"externalId":"x","updatedAt":"1970-01-01T00:00:02Z"}"#).expect("camel");
    assert_eq!(snake, camel);
}

#[test]
fn json_rejects_unknown_fields_and_bad_values() {
    let err = from_json::<UserCreateRequest>(r#"{"username":"u","password":"p"}"#).expect_err("unknown");
    assert!(err.to_string().contains("unknown field 'password'"), "{err}");
    let err = from_json::<RoleCreateRequest>(r#"{"permissions":"queue.produce"}"#).expect_err("not a list");
    assert!(err.to_string().contains("invalid JSON"), "{err}");
    let err = from_json::<APIKeyCreateRequest>(r#"{"expires_at":"tomorrow"}"#).expect_err("bad time");
    assert!(err.to_string().contains("invalid timestamp"), "{err}");
    // The secret is never part of the metadata a listing returns.
    let err = from_json::<APIKeyMetadata>(r#"{"key":"qtr-live-x"}"#).expect_err("no key field");
    assert!(err.to_string().contains("unknown field 'key'"), "{err}");
}
