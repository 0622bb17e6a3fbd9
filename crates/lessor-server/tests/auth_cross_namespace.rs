//! Requests authorised in one namespace must not act on a queue of another. Each test sets up
//! `team-a` (the attacker, with a role in team-a only) and `team-b` (the victim, queue `b-q` with one item), and
//! asserts the behaviour docs/security.md promises. Each failed before the fixes of a security review (Dec 2026).

use lessor_client::{proto as pb, Client, ClientError};
use prost::Message;

struct Env {
    _srv: lessor_server::RunningServer,
    admin: Client,
    /// A key whose user holds the given permissions in team-a only.
    attacker: Client,
}

fn assert_denied<T>(r: Result<T, ClientError>, what: &str) {
    match r {
        Err(ClientError::Api { code, message, .. }) => {
            assert_eq!(
                code, 403,
                "{what}: expected 403 access denied, got {code} '{message}'"
            )
        }
        Err(e) => panic!("{what}: expected 403, got {e}"),
        Ok(_) => panic!("{what}: expected 403 access denied, the request succeeded"),
    }
}

fn queue(name: &str, ns: &str, dead: &str) -> pb::QueueInfo {
    pb::QueueInfo {
        queue_name: name.into(),
        namespace: ns.into(),
        dead_queue: dead.into(),
        lease_timeout: "1m".into(),
        expire_timeout: "1h".into(),
        requested_partitions: 1,
        ..Default::default()
    }
}

async fn setup(perms: &[&str]) -> Env {
    let (srv, c, admin) = lessor_testkit::server::with_auth(&["team-a", "team-b"]).await;
    // The victim's queue, holding one item.
    admin
        .queues_create(&queue("b-q", "team-b", ""))
        .await
        .expect("b-q");
    admin
        .queue_produce(&pb::QueueProduceRequest {
            queue_name: "b-q".into(),
            request_timeout: "5s".into(),
            items: vec![pb::QueueProduceItem {
                bytes: b"victim".to_vec(),
                ..Default::default()
            }],
        })
        .await
        .expect("produce into b-q");
    let attacker =
        lessor_testkit::server::user_with_role(&admin, &c, "mallory", "team-a", "owner", perms).await;
    // Sanity: the attacker cannot touch b-q directly.
    assert_denied(
        attacker
            .queue_produce(&pb::QueueProduceRequest {
                queue_name: "b-q".into(),
                request_timeout: "5s".into(),
                items: vec![pb::QueueProduceItem::default()],
            })
            .await,
        "direct produce into team-b's queue",
    );
    Env {
        _srv: srv,
        admin,
        attacker,
    }
}

/// Payloads of b-q's items, read by the admin.
async fn victim_payloads(admin: &Client) -> Vec<String> {
    admin
        .storage_items_list(&pb::StorageItemsListRequest {
            queue_name: "b-q".into(),
            partition: 0,
            ..Default::default()
        })
        .await
        .expect("list b-q")
        .items
        .into_iter()
        .map(|i| String::from_utf8_lossy(&i.payload).into_owned())
        .collect()
}

/// `storage.restore.begin` of a one-partition queue `name` into namespace `ns`, with `overwrite`.
async fn restore_over(
    client: &Client,
    name: &str,
    ns: &str,
) -> Result<pb::RestoreBeginResponse, ClientError> {
    let record = lessor_proto::backup::QueueRecord {
        name: name.into(),
        namespace: ns.into(),
        lease_timeout_ns: 60_000_000_000,
        expire_timeout_ns: 3_600_000_000_000,
        partitions: 1,
        ..Default::default()
    };
    client
        .call::<lessor_client::routes::StorageRestoreBegin>(&pb::RestoreBeginRequest {
            queue: record.encode_to_vec(),
            namespace: ns.into(),
            overwrite: true,
        })
        .await
}

/// `storage.restore.begin` is authorised in the namespace the request names, but with `overwrite` it deletes an
/// existing queue of that name whatever its namespace, and re-creates it in the caller's namespace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_begin_overwrite_cannot_take_another_namespaces_queue() {
    let env = setup(&["queue.create", "queue.produce"]).await;
    let r = restore_over(&env.attacker, "b-q", "team-a").await;
    let info = env
        .admin
        .queues_info(&pb::QueuesInfoRequest {
            queue_name: "b-q".into(),
        })
        .await
        .expect("b-q info");
    let payloads = victim_payloads(&env.admin).await;
    assert!(
        r.is_err() && info.namespace == "team-b" && payloads == ["victim"],
        "restore.begin by a team-a key answered {r:?}; b-q is now in namespace '{}' holding {payloads:?}",
        info.namespace
    );
}

/// A queue's `dead_queue` may name another namespace's queue; dead-lettering into it is a produce there that no
/// one checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_queue_cannot_point_into_another_namespace() {
    let env = setup(&["queue.create", "queue.produce", "queue.lease", "queue.retry"]).await;
    let created = env.attacker.queues_create(&queue("a-src", "team-a", "b-q")).await;
    if created.is_ok() {
        env.attacker
            .queue_produce(&pb::QueueProduceRequest {
                queue_name: "a-src".into(),
                request_timeout: "5s".into(),
                items: vec![pb::QueueProduceItem {
                    bytes: b"injected".to_vec(),
                    ..Default::default()
                }],
            })
            .await
            .expect("produce into a-src");
        let leased = lessor_testkit::server::lease(&env.attacker, "a-src", 1, "m")
            .await
            .expect("lease");
        env.attacker
            .queue_retry(&pb::QueueRetryRequest {
                queue_name: "a-src".into(),
                partition: leased.partition,
                items: vec![pb::QueueRetryItem {
                    id: leased.items[0].id.clone(),
                    dead: true,
                    ..Default::default()
                }],
            })
            .await
            .expect("retry dead");
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
    let payloads = victim_payloads(&env.admin).await;
    assert!(
        created.is_err() && payloads == ["victim"],
        "queues.create with a dead_queue in team-b answered {created:?}; b-q now holds {payloads:?}"
    );
}

/// A redrive without `target_queue` sends each item to the queue its `source_id` names; `source_id` is whatever
/// `storage/items.import` was given, so a team-a key can write into any queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redrive_does_not_follow_a_forged_source_id_into_another_namespace() {
    let env = setup(&["queue.create", "queue.update", "queue.produce", "queue.stats"]).await;
    env.attacker
        .queues_create(&queue("a-dlq", "team-a", ""))
        .await
        .expect("a-dlq");
    env.attacker
        .queues_create(&queue("a-src", "team-a", "a-dlq"))
        .await
        .expect("a-src");
    env.attacker
        .storage_items_import(&pb::StorageItemsImportRequest {
            queue_name: "a-dlq".into(),
            partition: 0,
            items: vec![pb::StorageItem {
                source_id: "b-q/0/0000000000000001".into(),
                payload: b"injected".to_vec(),
                ..Default::default()
            }],
        })
        .await
        .expect("import into a-dlq");
    let task = env
        .attacker
        .queue_redrive(&pb::QueueRedriveRequest {
            dead_queue: "a-dlq".into(),
            ..Default::default()
        })
        .await;
    if let Ok(task) = &task {
        for _ in 0..50 {
            let t = env
                .attacker
                .redrive_get(&pb::RedriveTaskRequest {
                    task_id: task.task_id.clone(),
                    dead_queue: "a-dlq".into(),
                })
                .await
                .expect("redrive.get");
            if t.status != "running" {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }
    let payloads = victim_payloads(&env.admin).await;
    assert_eq!(
        payloads,
        ["victim"],
        "a team-a redrive (answered {task:?}) wrote into team-b's queue"
    );
}

/// `storage.backup` looks the named queues up before authorising: a missing queue answers 400 `queue does not
/// exist` and another namespace's queue 403, the existence oracle docs/security.md says is closed. Even a request
/// without any key gets the 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_does_not_tell_which_queues_exist() {
    let env = setup(&["queue.stats"]).await;
    let code = |r: Result<lessor_client::BackupStream, ClientError>| match r {
        Err(ClientError::Api { code, message, .. }) => (code, message),
        Err(e) => panic!("{e}"),
        Ok(_) => (200, String::new()),
    };
    let req = |n: &str| pb::StorageBackupRequest {
        queue_names: vec![n.into()],
        ..Default::default()
    };
    let existing = code(env.attacker.storage_backup(&req("b-q")).await);
    let missing = code(env.attacker.storage_backup(&req("no-such-queue")).await);
    // Without any key (the door is closed).
    let anonymous = Client::new(&format!("http://{}", env._srv.addr)).expect("client");
    let anon_existing = code(anonymous.storage_backup(&req("b-q")).await);
    let anon_missing = code(anonymous.storage_backup(&req("no-such-queue")).await);
    assert_eq!(existing.0, 403, "{existing:?}");
    assert_eq!(
        (missing.0, anon_missing.0),
        (existing.0, anon_existing.0),
        "backup of a missing queue answers {missing:?} (no key: {anon_missing:?}), of another namespace's \
         {existing:?} (no key: {anon_existing:?})"
    );
}

/// With the door closed, a request without a key is refused only after its whole body has been read and decoded
/// (the authorisation needs the queue name inside it): an unauthenticated client makes the server buffer and parse
/// up to a route's limit, 64 MB for `storage/items.import` and `storage.restore.import`, per request. A client
/// announcing such a body with `Expect: 100-continue` is told `100 Continue` instead of 401.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_without_a_key_is_refused_before_its_body_is_read() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let env = setup(&["queue.stats"]).await;
    let mut tcp = tokio::net::TcpStream::connect(env._srv.addr)
        .await
        .expect("connect");
    tcp.write_all(
        b"POST /v1/storage/items.import HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
          Content-Length: 60000000\r\nExpect: 100-continue\r\n\r\n",
    )
    .await
    .expect("write");
    let mut buf = vec![0u8; 256];
    let n = tokio::time::timeout(std::time::Duration::from_secs(5), tcp.read(&mut buf))
        .await
        .expect("an answer within 5 s")
        .expect("read");
    let head = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(
        head.starts_with("HTTP/1.1 401"),
        "a 60 MB import without a key was answered '{}'",
        head.lines().next().unwrap_or_default()
    );
}

/// `storage.restore.begin` with `overwrite` deletes the queue it replaces and its items: in the caller's own
/// namespace too, that takes `queue.delete`, as `queues.delete` does (create and produce alone were enough).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_begin_overwrite_takes_the_delete_permission() {
    let env = setup(&["queue.create", "queue.produce"]).await;
    env.admin
        .queues_create(&queue("a-q", "team-a", ""))
        .await
        .expect("a-q");
    env.admin
        .queue_produce(&pb::QueueProduceRequest {
            queue_name: "a-q".into(),
            request_timeout: "5s".into(),
            items: vec![pb::QueueProduceItem {
                bytes: b"kept".to_vec(),
                ..Default::default()
            }],
        })
        .await
        .expect("produce into a-q");
    let r = restore_over(&env.attacker, "a-q", "team-a").await;
    assert_denied(r, "restore.begin with overwrite, without queue.delete");
    let stats = env
        .admin
        .queue_stats(&pb::QueueStatsRequest {
            queue_name: "a-q".into(),
            ..Default::default()
        })
        .await
        .expect("a-q stats");
    let total: i32 = stats.logical_queues[0].partitions.iter().map(|p| p.total).sum();
    assert_eq!(total, 1, "a-q's item is still there");
}

/// A dead-letter queue in use restored with `overwrite` into another namespace would take the dead letters of the
/// queues naming it there, which their owners never allowed: refused, as deleting it is without `force`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_begin_overwrite_cannot_move_a_dead_letter_queue_in_use() {
    let env = setup(&["queue.create", "queue.produce", "queue.delete", "queue.lease"]).await;
    // team-b's queue dead-letters into team-a's `a-dlq`; the attacker has rights in team-a only.
    env.admin
        .queues_create(&queue("a-dlq", "team-a", ""))
        .await
        .expect("a-dlq");
    env.admin
        .queues_create(&queue("b-src", "team-b", "a-dlq"))
        .await
        .expect("b-src");
    // As the admin (every right everywhere): the rule is about where the dead letters go, not who asks.
    let r = restore_over(&env.admin, "a-dlq", "team-b").await;
    match r {
        Err(ClientError::Api { code, message, .. }) => {
            assert_eq!(code, 400, "{message}");
            assert!(
                message.starts_with("queue is invalid;")
                    && message.contains("dead_queue of another queue")
                    && message.contains("in its namespace 'team-a' only"),
                "{message}"
            );
        }
        other => panic!("restore.begin moving a dead-letter queue in use answered {other:?}"),
    }
    let info = env
        .admin
        .queues_info(&pb::QueuesInfoRequest {
            queue_name: "a-dlq".into(),
        })
        .await
        .expect("a-dlq info");
    assert_eq!(info.namespace, "team-a");
    // In its own namespace the restore may replace it (the dead letters keep flowing where they were allowed).
    restore_over(&env.attacker, "a-dlq", "team-a")
        .await
        .expect("replaced in its own namespace");
}
