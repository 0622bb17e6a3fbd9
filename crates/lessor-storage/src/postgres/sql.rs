//! The SQL text of one partition's statements, built once per opened partition.
//!
//! Every statement that decides which rows to touch locks them in the same statement (`FOR UPDATE`, with `SKIP
//! LOCKED` where any due row will do), so servers sharing a table never hand out or move one item twice. Each
//! predicate is spelled exactly like the partial index it should use (literal `0`, never a parameter), because the
//! planner only picks a partial index whose predicate it can prove from the query's text.
//!
//! Moves to the tail take fresh ids from the table's sequence. `nextval` order inside one statement is not
//! guaranteed, so the statements draw one fresh id per moved row, sort the fresh ids into an array, and hand them out
//! in the order the contract asks for (the n-th row by ordinal, deadline or schedule time takes the n-th element);
//! ids therefore grow in exactly that order.
//!
//! Plans must not depend on statistics: a queue table swings between empty and large faster than autovacuum
//! re-analyses it. So the table is always read through an index that the statement's text leaves as the only
//! sensible path (row sets are matched by `id = ANY(...)` on the primary key, never by a join the planner might turn
//! into a hash over the whole table), and row sets are never joined to each other by ordinal (a nested loop over
//! misestimated sets would be quadratic): where a row needs a value from another set (its fresh id, its schedule
//! time), the set is first folded into one `jsonb` object keyed by id, which each row reads in logarithmic time.

/// Item columns in [`super::partition`]'s decode order.
/// The rows of a lease's locked candidates `c` that it takes, `k`: in serving order, while their payload bytes add
/// up to at most the bound (parameter `$3`), and always the first.
const LEASE_TAKE: &str = "k AS MATERIALIZED (
                    SELECT id FROM (SELECT id, sum(len) OVER w AS run, row_number() OVER w AS rn FROM c
                                    WINDOW w AS (ORDER BY priority DESC, id)) x
                    WHERE rn = 1 OR run <= $3::int8)";
/// [`LEASE_TAKE`] with the bound in parameter `$5` (the lease from a position).
const LEASE_TAKE_AFTER: &str = "k AS MATERIALIZED (
                    SELECT id FROM (SELECT id, sum(len) OVER w AS run, row_number() OVER w AS rn FROM c
                                    WINDOW w AS (ORDER BY priority DESC, id)) x
                    WHERE rn = 1 OR run <= $5::int8)";

const COLS: &str =
    "t.id, t.source_id, t.is_leased, t.lease_deadline, t.expire_deadline, t.enqueue_at, t.created_at, \
                    t.attempts, t.max_attempts, t.reference, t.encoding, t.kind, t.payload, t.dead, t.priority";

/// The first `limit` rows matching `filter` in id order, cut before the row whose bytes would take their total over
/// `max_bytes` (the first row is always taken), with the number of candidate rows as the last column: more than the
/// rows returned means the bound cut the page. The candidates' sizes come from `octet_length`, which reads a stored
/// value's size from its header without fetching it, so the rows left out are never read. A row's bytes are its
/// payload and its strings, as `lessor_core::storage::item_bytes` counts them, so that a page is within the bound
/// by the same measure on every store.
fn bounded_page(t: &str, filter: &str, limit: &str, max_bytes: &str) -> String {
    format!(
        "WITH c AS MATERIALIZED (
            SELECT id, coalesce(octet_length(payload), 0) + coalesce(octet_length(source_id), 0)
                       + coalesce(octet_length(reference), 0) + coalesce(octet_length(encoding), 0)
                       + coalesce(octet_length(kind), 0) AS len
            FROM {t} WHERE {filter} ORDER BY id LIMIT {limit}),
         k AS (SELECT id FROM (SELECT id, sum(len) OVER w AS run, row_number() OVER w AS rn FROM c
                               WINDOW w AS (ORDER BY id)) x
               WHERE rn = 1 OR run <= {max_bytes})
         SELECT {COLS}, (SELECT count(*) FROM c) FROM {t} AS t WHERE t.id = ANY(ARRAY(SELECT id FROM k)) ORDER BY t.id"
    )
}

/// Predicates of the item states; the same text as the partial indexes of [`super::schema::partition_ddl`].
pub(crate) const READY: &str = "NOT is_leased AND enqueue_at = 0 AND NOT dead";
pub(crate) const LEASED: &str = "is_leased AND NOT dead";
pub(crate) const SCHEDULED: &str = "enqueue_at <> 0 AND NOT dead";
/// Ready or leased: what complete and retry may name, and what `expire_deadline` applies to.
pub(crate) const LIVE: &str = "enqueue_at = 0 AND NOT dead";

/// The `payload_len` stored with payload `p`: its length, or for an object reference (the claim check, see
/// [`crate::tiers`]) minus the length of the payload it stands for. Stats then tell inline payloads from offloaded
/// ones from the covering indexes alone, without reading a payload. The length is read from the reference's 7 low
/// bytes (payloads are far below 2^56 bytes).
fn payload_len(p: &str) -> String {
    let magic: String = crate::tiers::FRAME_MAGIC
        .iter()
        .chain(&[crate::tiers::KIND_OBJECT])
        .map(|b| format!("{b:02x}"))
        .collect();
    let len: Vec<String> = (0..7)
        .map(|i| format!("get_byte({p}, {})::int8 * {}", 6 + i, 1u64 << (8 * i)))
        .collect();
    format!(
        "CASE WHEN octet_length({p}) >= {hdr} AND substring({p} from 1 for 5) = '\\x{magic}'::bytea \
              THEN -({len}) ELSE octet_length({p}) END",
        hdr = crate::tiers::OBJECT_HEADER,
        len = len.join(" + "),
    )
}

/// Action codes of the retry statement.
pub(crate) const RETRY_REQUEUE: i32 = 0;
pub(crate) const RETRY_SCHEDULE: i32 = 1;
pub(crate) const RETRY_KEEP_DEAD: i32 = 2;
pub(crate) const RETRY_DELETE: i32 = 3;
pub(crate) const RETRY_RELEASE: i32 = 4;

/// One partition's statements.
#[derive(Debug)]
pub(crate) struct Sql {
    pub produce: String,
    pub produce_dedup: String,
    pub produce_dedup_fresh: String,
    pub source_ids: String,
    pub dedup_lookup: String,
    pub prune_dedup: String,
    pub lease: String,
    pub lease_after: String,
    pub complete_all: String,
    pub extend_all: String,
    pub lock_expired: String,
    pub lock_live: String,
    pub delete_ids: String,
    pub retry_apply: String,
    pub expire_leases: String,
    pub enqueue_due: String,
    pub expire_items: String,
    pub dead_items: String,
    pub remove_dead: String,
    pub next_deadline: String,
    pub counts: String,
    pub stats: String,
    pub list_live: String,
    pub list_scheduled: String,
    pub list_live_within: String,
    pub list_scheduled_within: String,
    pub dead_items_within: String,
    pub dead_count: String,
    pub snapshot_page: String,
    pub import: String,
    table: String,
}

/// The `created_at` of the head of each priority's ready queue, as `LEAST`'s arguments (NULLs are skipped; all NULL
/// when nothing is ready): one probe of the `_ready_p` index per priority. Each priority is a constant, in the
/// index's own order: with the priority as a parameter (`generate_series`) the planner walked the primary key and
/// filtered, reading the whole table for a priority that has no ready item.
fn oldest_heads(t: &str) -> String {
    (0..=lessor_core::types::MAX_PRIORITY)
        .map(|p| {
            format!("(SELECT created_at FROM {t} WHERE {READY} AND priority = {p} ORDER BY priority DESC, id LIMIT 1)")
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// CTE `fresh(ids)`: one row holding one fresh id per row of `source`, in increasing order; the row numbered `rn`
/// (from 1, in the wanted order) takes [`new_id`]`(rn)`.
fn fresh_ids(table: &str, source: &str) -> String {
    format!(
        "fresh AS MATERIALIZED (
            SELECT array_agg(x ORDER BY x) AS ids FROM (SELECT nextval('{table}_id_seq') AS x FROM {source}) f)"
    )
}

/// The fresh id of the row numbered `rn` (see [`fresh_ids`]).
fn new_id(rn: &str) -> String {
    format!("(SELECT ids[{rn}] FROM fresh)")
}

/// CTEs `moves(m)` and `name`: moves the rows of `source` (columns `id`, `rn`; `fresh` defined over it) to the tail,
/// with new ids, ready.
///
/// The rows are found by `id = ANY(...)` on the primary key (a prepared statement's generic plan cannot know how
/// many rows `LIMIT $n` lets through, and a join could become a hash over the whole table), and each reads its new
/// id from the `moves` object rather than through a join (see the module comment).
fn move_to_tail(table: &str, name: &str, source: &str) -> String {
    move_to_tail_setting(table, name, source, "")
}

/// [`move_to_tail`], also setting `set` (`, column = value...`, or empty) on the moved rows.
fn move_to_tail_setting(table: &str, name: &str, source: &str, set: &str) -> String {
    format!(
        "moves AS MATERIALIZED (
            SELECT jsonb_object_agg({source}.id::text, {new}) AS m FROM {source}),
         {name} AS (
            UPDATE {table} AS t
            SET id = ((SELECT m FROM moves) ->> t.id::text)::int8, is_leased = false, lease_deadline = 0,
                enqueue_at = 0{set}
            WHERE t.id = ANY(ARRAY(SELECT id FROM {source}))
            RETURNING 1)",
        new = new_id(&format!("{source}.rn")),
    )
}

/// Data-modifying CTEs `kept` and `deleted` that kill items: those `keep_ids` (a query of ids) names are kept for
/// the dead-letter queue, those `delete_ids` names are deleted. Primary key lookups, as in [`move_to_tail`].
fn kill(table: &str, keep_ids: &str, delete_ids: &str) -> String {
    format!(
        "kept AS (
            UPDATE {table} AS t SET dead = true, is_leased = false, lease_deadline = 0
            WHERE t.id = ANY(ARRAY({keep_ids})) RETURNING 1),
         deleted AS (
            DELETE FROM {table} AS t WHERE t.id = ANY(ARRAY({delete_ids})) RETURNING 1)"
    )
}

/// The produce statement, with or without dedup records.
///
/// Both: $1..$9 arrays of the new items' fields. Returns one row: the fresh id of each input row (in input order),
/// the ids actually inserted (rows with a source id already stored are skipped), and for skipped rows the input
/// ordinals and ids of the stored copies visible to the statement (a copy inserted concurrently by another server
/// is not: the caller looks those up afterwards).
///
/// With dedup: $10 and $11 each row's key hash (`super::dedup`; NULL for none; distinct), $12 each row's record end,
/// $13 the queue's id, $14 the partition. Each keyed row first claims its key in `lessor_dedup_keys`: a new key is
/// inserted, an expired record (`until` <= the row's `created_at`) is replaced, a live one is left alone; only rows
/// whose claim succeeded (or that have no key) are inserted, in the same statement, hence the same transaction.
/// Two servers claiming one key serialise on the record's unique index: the second waits for the first to commit,
/// then sees a live record and stores nothing. Claims are made in hash order, so two producers whose batches share
/// several keys cannot deadlock. A row whose source id is already stored claims nothing (it is a repeated
/// dead-letter move, skipped anyway). A claimed record holds its row's fresh id, so the rows to insert are those
/// whose fresh id a claim returned (an integer set); the row also returns those ids, and the caller looks up the
/// items of the other keys (duplicates) afterwards, so the common case (no duplicate) probes each key's index entry
/// once.
///
/// `dedup` is `None` without dedup records; `Some(true)` claims with `ON CONFLICT ... DO UPDATE` as above;
/// `Some(false)` claims with a plain `INSERT`, which fails with a unique violation on the record's index when any
/// key has a record (live or expired) or is being claimed by another uncommitted producer (after waiting for it),
/// and then changes nothing. The caller sends that cheaper form while no key of the partition met a record lately,
/// and the upsert form after a failure: a speculative insertion costs an index probe before the insert and a
/// confirmation record in the WAL per row (docs/benchmarks.md, 6 Dec 2026).
fn produce(t: &str, dedup: Option<bool>) -> String {
    let upsert = dedup == Some(true);
    let on_conflict = if upsert {
        "ON CONFLICT (h1, h2) DO UPDATE
                    SET queue_id = EXCLUDED.queue_id, item_id = EXCLUDED.item_id, partition = EXCLUDED.partition,
                        created_at = EXCLUDED.created_at, until = EXCLUDED.until
                    WHERE d.until <= EXCLUDED.created_at"
    } else {
        ""
    };
    let dedup = dedup.is_some();
    // The keyed rows whose source id the statement's snapshot does not hold: the rows that claim a key.
    let no_stored_source =
        format!("(b.source_id IS NULL OR NOT EXISTS (SELECT 1 FROM {t} e WHERE e.source_id = b.source_id))");
    let (claim, filter, extra) = if dedup {
        (
            format!(
                "claim AS (
                    INSERT INTO lessor_dedup_keys AS d (h1, h2, queue_id, item_id, partition, created_at, until)
                    SELECT b.h1, b.h2, $13::int8, {new}, $14::int8, b.created_at, b.dedup_until FROM b
                    WHERE b.h1 IS NOT NULL AND {no_stored_source}
                    ORDER BY b.h1, b.h2
                    {on_conflict}
                    RETURNING d.item_id),",
                new = new_id("b.rn"),
            ),
            // A plain claim claims every key it tries or fails as a whole, so the rows to insert are those without
            // a key and those it tried, by the same test on the same snapshot. Not "no filter, the insert's
            // `ON CONFLICT` skips the others": a stored copy that the snapshot holds but that a complete deletes
            // before the insert checks the source index (the check waits for the deleting transaction) no longer
            // conflicts, and the row would be stored without its key claimed while the key's record is live.
            //
            // Either way the claim runs to its end before the first item is inserted (the first condition refers
            // to no row: PostgreSQL checks it once, before the insert reads any): keys first, then source ids. A
            // statement that inserted a source id and then waited for a key (the plain form, whose insert did not
            // read the claim, ran before it) deadlocked with one that held the key and waited for the source id,
            // until the lock timeout failed one of them (two servers producing one redrive copy).
            format!(
                "WHERE (SELECT count(*) FROM claim) >= 0 AND (b.h1 IS NULL OR {kept})",
                kept = if upsert {
                    format!("{new} IN (SELECT item_id FROM claim)", new = new_id("b.rn"))
                } else {
                    no_stored_source.clone()
                }
            ),
            ", (SELECT array_agg(item_id) FROM claim)",
        )
    } else {
        (String::new(), String::new(), "")
    };
    let (dedup_args, dedup_cols) = if dedup {
        (", $10::int8[], $11::int8[], $12::int8[]", ", h1, h2, dedup_until")
    } else {
        ("", "")
    };
    format!(
        "WITH b AS (
            SELECT * FROM unnest($1::text[], $2::int8[], $3::int8[], $4::int8[], $5::text[], $6::text[],
                                 $7::text[], $8::bytea[], $9::int2[]{dedup_args})
            WITH ORDINALITY AS u(source_id, enqueue_at, expire_deadline, created_at, reference, encoding,
                                 kind, payload, priority{dedup_cols}, rn)),
         {fresh},
         {claim}
         ins AS (
            INSERT INTO {t} AS t (id, source_id, enqueue_at, expire_deadline, created_at, reference,
                                  encoding, kind, payload, payload_len, priority)
            SELECT {new}, b.source_id, b.enqueue_at, b.expire_deadline, b.created_at, b.reference,
                   b.encoding, b.kind, b.payload, {len}, b.priority
            FROM b
            {filter}
            ON CONFLICT (source_id) WHERE source_id IS NOT NULL DO NOTHING
            RETURNING t.id),
         dup AS (
            SELECT b.rn, e.id FROM b JOIN {t} e ON e.source_id = b.source_id
            WHERE e.source_id = ANY($1::text[]))
         SELECT (SELECT ids FROM fresh), (SELECT array_agg(id) FROM ins),
                (SELECT array_agg(rn) FROM dup), (SELECT array_agg(id) FROM dup){extra}",
        fresh = fresh_ids(t, "b"),
        new = new_id("b.rn"),
        len = payload_len("b.payload"),
    )
}

impl Sql {
    pub(crate) fn new(t: &str) -> Sql {
        Sql {
            produce: produce(t, None),
            produce_dedup: produce(t, Some(true)),
            produce_dedup_fresh: produce(t, Some(false)),
            source_ids: format!("SELECT source_id, id FROM {t} WHERE source_id = ANY($1::text[])"),
            // $1, $2 key hashes: the records as committed now (after a produce that could not see them). The pairs
            // are matched in a join on the primary key, keys first (a few rows, the duplicates of one call).
            dedup_lookup: "SELECT k.h1, k.h2, d.item_id
                 FROM unnest($1::int8[], $2::int8[]) AS k(h1, h2)
                 JOIN lessor_dedup_keys d ON d.h1 = k.h1 AND d.h2 = k.h2"
                .to_string(),
            // $1 queue id, $2 now, $3 limit: drops expired dedup records of the queue, oldest first. A statement of
            // its own (never inside produce's): it only takes rows no one holds, so it never waits and cannot join
            // a deadlock with the claims of concurrent producers.
            // The locked rows are deleted by `ctid`: a row locked by this transaction cannot move meanwhile, and a
            // TID scan reads no index.
            prune_dedup: "WITH x AS MATERIALIZED (
                    SELECT ctid FROM lessor_dedup_keys WHERE queue_id = $1::int8 AND until <= $2::int8
                    ORDER BY until LIMIT $3::int8 FOR UPDATE SKIP LOCKED),
                 gone AS (
                    DELETE FROM lessor_dedup_keys d WHERE d.ctid = ANY(ARRAY(SELECT ctid FROM x)) RETURNING 1)
                 SELECT count(*) FROM gone"
                .to_string(),
            // $1 limit, $2 lease deadline, $3 most payload bytes (the first row is taken whatever its size). The
            // rows locked but not taken are let go at commit; the last column, the number locked, tells the caller
            // whether the byte bound left ready rows behind. `octet_length` reads a stored value's size from its
            // header without fetching it.
            lease: format!(
                "WITH c AS MATERIALIZED (
                    SELECT id, priority, coalesce(octet_length(payload), 0) AS len FROM {t} WHERE {READY}
                    ORDER BY priority DESC, id LIMIT $1::int8
                    FOR UPDATE SKIP LOCKED),
                 {LEASE_TAKE}
                 UPDATE {t} AS t SET is_leased = true, lease_deadline = $2::int8, attempts = t.attempts + 1
                 WHERE t.id = ANY(ARRAY(SELECT id FROM k))
                 RETURNING {COLS}, (SELECT count(*) FROM c)"
            ),
            // $1 limit, $2 lease deadline, $3 a priority p, $4 an id c, $5 most payload bytes: the same lease, with
            // the ready index read
            // from (p, c) on within level p. The levels above and below p are read from their start. An index
            // condition on `id` lets the scan skip, without visiting the heap, the entries that the earlier leases
            // left dead in front of the ready rows (their tuples are dead until vacuum, and every plain lease walks
            // them). Each branch locks only the rows it returns, and the outer LIMIT stops the later branches as
            // soon as enough rows are locked. See `PgPartition::lease` for when (p, c) may be used.
            lease_after: format!(
                "WITH c AS MATERIALIZED (
                    (SELECT * FROM (SELECT id, priority, coalesce(octet_length(payload), 0) AS len
                                     FROM {t} WHERE {READY} AND priority > $3::int2
                                     ORDER BY priority DESC, id LIMIT $1::int8 FOR UPDATE SKIP LOCKED) a)
                    UNION ALL
                    (SELECT * FROM (SELECT id, priority, coalesce(octet_length(payload), 0) AS len
                                     FROM {t} WHERE {READY} AND priority = $3::int2 AND id > $4::int8
                                     ORDER BY priority DESC, id LIMIT $1::int8 FOR UPDATE SKIP LOCKED) b)
                    UNION ALL
                    (SELECT * FROM (SELECT id, priority, coalesce(octet_length(payload), 0) AS len
                                     FROM {t} WHERE {READY} AND priority < $3::int2
                                     ORDER BY priority DESC, id LIMIT $1::int8 FOR UPDATE SKIP LOCKED) c)
                    LIMIT $1::int8),
                 {LEASE_TAKE_AFTER}
                 UPDATE {t} AS t SET is_leased = true, lease_deadline = $2::int8, attempts = t.attempts + 1
                 WHERE t.id = ANY(ARRAY(SELECT id FROM k))
                 RETURNING {COLS}, (SELECT count(*) FROM c)"
            ),
            // $1 ids (distinct). Deletes them all when every one is live and leased, otherwise nothing; returns
            // how many it deleted. Locks in id order, like every blocking lock here, so two callers cannot
            // deadlock. The state is tested after the primary key lookup rather than in the WHERE clause, where it
            // would let the planner walk the `_expire` index (same predicate) instead.
            complete_all: format!(
                "WITH c AS MATERIALIZED (
                    SELECT id, is_leased AND {LIVE} AS ok FROM {t} WHERE id = ANY($1::int8[]) ORDER BY id FOR UPDATE),
                 ok AS (SELECT count(*) = cardinality($1::int8[]) AND bool_and(ok) IS TRUE AS ok FROM c),
                 d AS (DELETE FROM {t} AS t WHERE t.id = ANY(ARRAY(SELECT id FROM c)) AND (SELECT ok FROM ok)
                       RETURNING 1)
                 SELECT count(*) FROM d"
            ),
            // $1 ids (distinct), $2 the new lease deadline of each. Sets them all when every one is live and
            // leased, otherwise none (as `complete_all`); returns how many it set.
            extend_all: format!(
                "WITH c AS MATERIALIZED (
                    SELECT id, is_leased AND {LIVE} AS ok FROM {t} WHERE id = ANY($1::int8[]) ORDER BY id FOR UPDATE),
                 ok AS (SELECT count(*) = cardinality($1::int8[]) AND bool_and(ok) IS TRUE AS ok FROM c),
                 dl AS MATERIALIZED (
                    SELECT jsonb_object_agg(id::text, at) AS m FROM unnest($1::int8[], $2::int8[]) AS u(id, at)),
                 u AS (UPDATE {t} AS t SET lease_deadline = ((SELECT m FROM dl) ->> t.id::text)::int8
                       WHERE t.id = ANY(ARRAY(SELECT id FROM c)) AND (SELECT ok FROM ok)
                       RETURNING 1)
                 SELECT count(*) FROM u"
            ),
            // $1 now, $2 limit: locks the expired leases, for a lifecycle under a backoff policy, whose schedule
            // times depend on each item's id and attempts (computed by the caller, then applied by `retry_apply`).
            lock_expired: format!(
                "SELECT id, attempts FROM {t} WHERE {LEASED} AND lease_deadline <= $1::int8
                 ORDER BY lease_deadline, id LIMIT $2::int8 FOR UPDATE SKIP LOCKED"
            ),
            // $1 ids. Locks them (waiting for a concurrent move to finish: a moved row then no longer matches and
            // reads as missing) and says which are live, i.e. nameable by complete and retry (see `complete_all`
            // for why that is not a WHERE condition).
            lock_live: format!(
                "SELECT id, is_leased, attempts, {LIVE} FROM {t} WHERE id = ANY($1::int8[]) ORDER BY id FOR UPDATE"
            ),
            delete_ids: format!("DELETE FROM {t} WHERE id = ANY($1::int8[])"),
            // $1 ids, $2 action codes, $3 schedule times, in request order; every row already locked.
            retry_apply: format!(
                "WITH op AS (
                    SELECT * FROM unnest($1::int8[], $2::int4[], $3::int8[]) WITH ORDINALITY AS u(id, action, at, ord)),
                 rq AS MATERIALIZED (
                    SELECT id, row_number() OVER (ORDER BY ord) AS rn FROM op
                    WHERE action IN ({RETRY_REQUEUE}, {RETRY_RELEASE})),
                 {fresh},
                 {requeued},
                 times AS MATERIALIZED (
                    SELECT jsonb_object_agg(id::text, at) AS m FROM op WHERE action = {RETRY_SCHEDULE}),
                 scheduled AS (
                    UPDATE {t} AS t
                    SET is_leased = false, lease_deadline = 0, enqueue_at = ((SELECT m FROM times) ->> t.id::text)::int8
                    WHERE t.id = ANY(ARRAY(SELECT id FROM op WHERE action = {RETRY_SCHEDULE}))
                    RETURNING 1),
                 dying AS MATERIALIZED (
                    SELECT id, action = {RETRY_KEEP_DEAD} AS keep FROM op
                    WHERE action IN ({RETRY_KEEP_DEAD}, {RETRY_DELETE})),
                 {kill}
                 SELECT (SELECT count(*) FROM requeued), (SELECT count(*) FROM scheduled),
                        (SELECT count(*) FROM kept) + (SELECT count(*) FROM deleted)",
                fresh = fresh_ids(t, "rq"),
                // A release goes to the tail like a requeue (the lease cursor of `lease_after` would skip an item
                // put back at its old place), without the attempt its lease counted.
                requeued = move_to_tail_setting(
                    t,
                    "requeued",
                    "rq",
                    &format!(
                        ", attempts = CASE WHEN t.id = ANY(ARRAY(SELECT id FROM op WHERE action = {RETRY_RELEASE}))
                                      THEN greatest(t.attempts - 1, 0) ELSE t.attempts END"
                    ),
                ),
                kill = kill(t, "SELECT id FROM dying WHERE keep", "SELECT id FROM dying WHERE NOT keep"),
            ),
            // $1 now, $2 limit, $3 max attempts (0 = unlimited), $4 keep dead items. Expired leases go to the
            // tail in (deadline, id) order, or die when their attempts are used up.
            expire_leases: format!(
                "WITH due AS MATERIALIZED (
                    SELECT id, attempts, lease_deadline FROM {t} WHERE {LEASED} AND lease_deadline <= $1::int8
                    ORDER BY lease_deadline, id LIMIT $2::int8 FOR UPDATE SKIP LOCKED),
                 rq AS MATERIALIZED (
                    SELECT id, row_number() OVER (ORDER BY lease_deadline, id) AS rn FROM due
                    WHERE $3::int8 = 0 OR attempts < $3::int8),
                 dying AS MATERIALIZED (SELECT id FROM due WHERE $3::int8 <> 0 AND attempts >= $3::int8),
                 {fresh},
                 {requeued},
                 {kill}
                 SELECT (SELECT count(*) FROM requeued), (SELECT count(*) FROM kept) + (SELECT count(*) FROM deleted)",
                fresh = fresh_ids(t, "rq"),
                requeued = move_to_tail(t, "requeued", "rq"),
                kill = kill(t, "SELECT id FROM dying WHERE $4::bool", "SELECT id FROM dying WHERE NOT $4::bool"),
            ),
            // $1 now, $2 limit. Due scheduled items join the tail in (enqueue_at, id) order.
            enqueue_due: format!(
                "WITH due AS MATERIALIZED (
                    SELECT id, enqueue_at FROM {t} WHERE {SCHEDULED} AND enqueue_at <= $1::int8
                    ORDER BY enqueue_at, id LIMIT $2::int8 FOR UPDATE SKIP LOCKED),
                 rq AS MATERIALIZED (SELECT id, row_number() OVER (ORDER BY enqueue_at, id) AS rn FROM due),
                 {fresh},
                 {moved}
                 SELECT count(*) FROM moved",
                fresh = fresh_ids(t, "rq"),
                moved = move_to_tail(t, "moved", "rq"),
            ),
            // $1 now, $2 limit, $3 keep dead items. Live items past their expire deadline die; returns how many,
            // and how many of them were ready (the others were leased), for the caller's counts.
            expire_items: format!(
                "WITH due AS MATERIALIZED (
                    SELECT id, is_leased FROM {t} WHERE {LIVE} AND expire_deadline <= $1::int8
                    ORDER BY expire_deadline, id LIMIT $2::int8 FOR UPDATE SKIP LOCKED),
                 {kill}
                 SELECT (SELECT count(*) FROM kept) + (SELECT count(*) FROM deleted),
                        (SELECT count(*) FROM due WHERE NOT is_leased)",
                kill = kill(t, "SELECT id FROM due WHERE $3::bool", "SELECT id FROM due WHERE NOT $3::bool"),
            ),
            dead_items: format!("SELECT {COLS} FROM {t} AS t WHERE dead ORDER BY id LIMIT $1::int8"),
            // $1 limit, $2 most payload bytes: `dead_items` bounded in bytes (see `bounded_page`).
            dead_items_within: bounded_page(t, "dead", "$1::int8", "$2::int8"),
            dead_count: format!("SELECT count(*) FROM {t} WHERE dead"),
            remove_dead: format!("DELETE FROM {t} WHERE id = ANY($1::int8[]) AND dead"),
            // Each MIN reads the head of its partial index.
            next_deadline: format!(
                "SELECT EXISTS (SELECT 1 FROM {t} WHERE dead),
                        (SELECT min(lease_deadline) FROM {t} WHERE {LEASED}),
                        (SELECT min(enqueue_at) FROM {t} WHERE {SCHEDULED}),
                        (SELECT min(expire_deadline) FROM {t} WHERE {LIVE})"
            ),
            counts: format!(
                "SELECT (SELECT count(*) FROM {t} WHERE {READY}),
                        (SELECT count(*) FROM {t} WHERE {LEASED}),
                        (SELECT count(*) FROM {t} WHERE {SCHEDULED})"
            ),
            // Sums over the covering partial indexes (created_at, lease_deadline and payload_len are in them), so
            // no payload is read; the means are exact integer divisions, truncated like the memory backend's. A
            // negative payload_len marks an offloaded payload (see `payload_len`): counted apart, as the object tier.
            stats: format!(
                "WITH r AS (SELECT count(*) AS n, sum(created_at) AS created, {bytes}
                            FROM {t} WHERE {READY}),
                      l AS (SELECT count(*) AS n, sum(created_at) AS created, sum(lease_deadline) AS deadline,
                                   {bytes}
                            FROM {t} WHERE {LEASED}),
                      s AS (SELECT count(*) AS n, {bytes} FROM {t} WHERE {SCHEDULED})
                 SELECT r.n, l.n, s.n,
                        CASE WHEN r.n + l.n > 0
                             THEN div(coalesce(r.created, 0) + coalesce(l.created, 0), r.n + l.n)::int8 END,
                        CASE WHEN l.n > 0 THEN div(l.deadline, l.n)::int8 END,
                        (coalesce(r.bytes, 0) + coalesce(l.bytes, 0) + coalesce(s.bytes, 0))::int8,
                        LEAST({heads})::int8,
                        (r.objects + l.objects + s.objects)::int8,
                        (coalesce(r.object_bytes, 0) + coalesce(l.object_bytes, 0)
                         + coalesce(s.object_bytes, 0))::int8
                 FROM r, l, s",
                heads = oldest_heads(t),
                bytes = "sum(payload_len) FILTER (WHERE payload_len >= 0) AS bytes, \
                         count(*) FILTER (WHERE payload_len < 0) AS objects, \
                         -sum(payload_len) FILTER (WHERE payload_len < 0) AS object_bytes",
            ),
            // Pages walk the primary key in id order. The state test is wrapped in `IS TRUE` so the planner cannot
            // match it to the `_expire` or `_sched` partial index, which would read every live (or scheduled) item
            // and sort them to return one page.
            list_live: format!(
                "SELECT {COLS} FROM {t} AS t WHERE id >= $1::int8 AND ({LIVE}) IS TRUE ORDER BY id LIMIT $2::int8"
            ),
            // Every item in id order from $1 (inclusive), at most $2 of them and $3 payload bytes (see `bounded_page`):
            // the pages of a snapshot, read inside its transaction; a page of large payloads is cut unread.
            snapshot_page: bounded_page(t, "id >= $1::int8", "$2::int8", "$3::int8"),
            list_scheduled: format!(
                "SELECT {COLS} FROM {t} AS t WHERE id >= $1::int8 AND ({SCHEDULED}) IS TRUE ORDER BY id LIMIT $2::int8"
            ),
            // $1 pivot, $2 limit, $3 most payload bytes: the lists bounded in bytes (see `bounded_page`).
            list_live_within: bounded_page(t, &format!("id >= $1::int8 AND ({LIVE}) IS TRUE"), "$2::int8", "$3::int8"),
            list_scheduled_within: bounded_page(
                t,
                &format!("id >= $1::int8 AND ({SCHEDULED}) IS TRUE"),
                "$2::int8",
                "$3::int8",
            ),
            // $1..$14: arrays of the imported items' fields; returns the rows stored.
            import: format!(
                "WITH b AS (
                    SELECT * FROM unnest($1::text[], $2::bool[], $3::int8[], $4::int8[], $5::int8[], $6::int8[],
                                         $7::int8[], $8::int8[], $9::text[], $10::text[], $11::text[], $12::bytea[],
                                         $13::int2[], $14::bool[])
                    WITH ORDINALITY AS u(source_id, is_leased, lease_deadline, expire_deadline, enqueue_at,
                                         created_at, attempts, max_attempts, reference, encoding, kind, payload,
                                         priority, dead, rn)),
                 {fresh}
                 INSERT INTO {t} AS t (id, source_id, is_leased, lease_deadline, expire_deadline, enqueue_at,
                                       created_at, attempts, max_attempts, reference, encoding, kind, payload,
                                       payload_len, priority, dead)
                 SELECT {new}, b.source_id, b.is_leased, b.lease_deadline, b.expire_deadline, b.enqueue_at,
                        b.created_at, b.attempts, b.max_attempts, b.reference, b.encoding, b.kind, b.payload,
                        {len}, b.priority, b.dead
                 FROM b
                 ON CONFLICT (source_id) WHERE source_id IS NOT NULL DO NOTHING
                 RETURNING {COLS}",
                fresh = fresh_ids(t, "b"),
                new = new_id("b.rn"),
                len = payload_len("b.payload"),
            ),
            table: t.to_string(),
        }
    }

    /// The DELETE of a clear request (four variants, each prepared on first use); `None` when it removes nothing.
    pub(crate) fn clear(&self, queue: bool, destructive: bool, scheduled: bool) -> Option<String> {
        let mut conds = Vec::new();
        if queue {
            conds.push(if destructive { LIVE } else { READY });
        }
        if scheduled {
            conds.push(SCHEDULED);
        }
        if conds.is_empty() {
            return None;
        }
        let cond = conds
            .iter()
            .map(|c| format!("({c})"))
            .collect::<Vec<_>>()
            .join(" OR ");
        Some(format!("DELETE FROM {} WHERE {cond}", self.table))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::postgres::{PgConfig, PgStore};
    use lessor_core::storage::PartitionStore;

    /// Generic plans (what a cached prepared statement runs) of every statement that reads items or dedup records,
    /// by name.
    async fn plans(
        client: &tokio_postgres::Client,
        s: &Sql,
        queue_id: i64,
        round: &str,
    ) -> Vec<(&'static str, String)> {
        let produce_args = format!(
            "(ARRAY[NULL, 'src-1'], ARRAY[0, 0]::int8[], ARRAY[2000000, 2000000]::int8[], ARRAY[600, 600]::int8[],
              ARRAY['', ''], ARRAY['', ''], ARRAY['', ''], ARRAY['\\x00', '\\x01']::bytea[], ARRAY[3, 0]::int2[],
              ARRAY[17, 99999999]::int8[], ARRAY[-17, 5]::int8[], ARRAY[900, 900]::int8[], {queue_id}, 0)"
        );
        let prune_args = format!("({queue_id}, 500, 100)");
        let lookup_args = "(ARRAY[17, 18]::int8[], ARRAY[17, 18]::int8[])".to_string();
        let cases: Vec<(&str, &str, &str)> = vec![
            ("lease", &s.lease, "(100, 5, 1000000)"),
            ("lease_after", &s.lease_after, "(100, 5, 3, 5000, 1000000)"),
            ("complete_all", &s.complete_all, "('{1,11,21}')"),
            ("extend_all", &s.extend_all, "('{1,11,21}', '{7,7,7}')"),
            ("lock_expired", &s.lock_expired, "(500, 100)"),
            ("produce_dedup", &s.produce_dedup, &produce_args),
            ("produce_dedup_fresh", &s.produce_dedup_fresh, &produce_args),
            ("prune_dedup", &s.prune_dedup, &prune_args),
            ("dedup_lookup", &s.dedup_lookup, &lookup_args),
            ("lock_live", &s.lock_live, "('{1,11,21}')"),
            ("delete_ids", &s.delete_ids, "('{1,11,21}')"),
            ("retry_apply", &s.retry_apply, "('{1,11}', '{0,1}', '{0,5}')"),
            ("expire_leases", &s.expire_leases, "(500, 100, 3, true)"),
            ("enqueue_due", &s.enqueue_due, "(500, 100)"),
            ("expire_items", &s.expire_items, "(1000500, 100, true)"),
            ("dead_items", &s.dead_items, "(100)"),
            ("remove_dead", &s.remove_dead, "('{3,53}')"),
            ("next_deadline", &s.next_deadline, ""),
            ("list_live", &s.list_live, "(5000, 100)"),
            ("list_scheduled", &s.list_scheduled, "(5000, 100)"),
            ("list_live_within", &s.list_live_within, "(5000, 100, 1000000)"),
            (
                "list_scheduled_within",
                &s.list_scheduled_within,
                "(5000, 100, 1000000)",
            ),
            ("dead_items_within", &s.dead_items_within, "(100, 1000000)"),
            ("dead_count", &s.dead_count, ""),
            ("counts", &s.counts, ""),
            ("stats", &s.stats, ""),
        ];
        client
            .batch_execute("SET plan_cache_mode = force_generic_plan; DEALLOCATE ALL")
            .await
            .expect("set");
        let mut out = Vec::new();
        for (name, sql, args) in cases {
            client
                .batch_execute(&format!("PREPARE plan_{name} AS {sql}"))
                .await
                .unwrap_or_else(|e| panic!("{name}: {e:?}"));
            let plan: Vec<String> = client
                .simple_query(&format!("EXPLAIN EXECUTE plan_{name} {args}"))
                .await
                .expect("explain")
                .into_iter()
                .filter_map(|m| match m {
                    tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
                    _ => None,
                })
                .collect();
            let plan = plan.join("\n");
            eprintln!("--- {round}: {name}\n{plan}");
            out.push((name, plan));
        }
        out
    }

    /// Each statement reads the head of an index, never the whole table, checked on generic plans over a table
    /// with items in every state: once with fresh statistics (the planner's own choice), once with statistics that
    /// say the table is empty (a queue filled since autovacuum last looked), where the pool's `enable_seqscan=off`
    /// must still lead every id-set statement through the primary key. Needs `LESSOR_TEST_DATABASE_URL`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn hot_statements_use_their_indexes() {
        let Some(url) = lessor_testkit::database_or_skip() else {
            return;
        };
        let queue = crate::testsuite::unique_queue("pg-plans");
        let store = PgStore::new(&PgConfig::new(format!("{url}?application_name=plans"))).expect("store");
        store.open(&queue, 0).await.expect("open");
        let t = crate::postgres::table_name(&queue, 0);
        let shared = crate::postgres::pool::acquire(&PgConfig::new(format!("{url}?application_name=plans")))
            .expect("pool");
        let queue_id = crate::postgres::schema::dedup_secret(&shared)
            .await
            .expect("secret")
            .queue(&queue)
            .id;
        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .expect("connect");
        tokio::spawn(conn);
        // Statistics of the empty table, frozen there.
        client
            .batch_execute(&format!(
                "ALTER TABLE {t} SET (autovacuum_enabled = false); ANALYZE {t}"
            ))
            .await
            .expect("analyze empty");
        // 100k items: mostly ready, some leased, scheduled and dead, with kilobyte payloads and mixed priorities;
        // and 100k dedup records of the queue, a tenth of them expired. Committed synchronously (the test cluster
        // commits asynchronously): VACUUM marks pages all-visible only once the inserting commit is flushed, and
        // without that the planner prices index-only scans (counts, stats) as random heap reads.
        client
            .batch_execute(&format!(
                "SET synchronous_commit = on;
                 INSERT INTO {t} (id, is_leased, lease_deadline, expire_deadline, enqueue_at, created_at, payload,
                                  payload_len, dead, priority)
                 SELECT g, g % 10 = 1, CASE WHEN g % 10 = 1 THEN g ELSE 0 END, g + 1000000,
                        CASE WHEN g % 10 = 2 THEN g + 500 ELSE 0 END, g, convert_to(repeat('x', 1000), 'UTF8'),
                        1000, g % 50 = 3, (g / 7) % 10
                 FROM generate_series(1, 100000) g;
                 INSERT INTO lessor_dedup_keys (h1, h2, queue_id, item_id, partition, created_at, until)
                 SELECT g, g, {queue_id}, g, 0, g, CASE WHEN g % 10 = 0 THEN g ELSE g + 10000000 END
                 FROM generate_series(1, 100000) g ON CONFLICT DO NOTHING"
            ))
            .await
            .expect("fill");
        let s = Sql::new(&t);
        let seq = format!("Seq Scan on {t}");
        let seq_dedup = "Seq Scan on lessor_dedup_keys";
        let mut bad = Vec::new();

        client
            .batch_execute("SET enable_seqscan = off")
            .await
            .expect("set");
        for (name, plan) in plans(&client, &s, queue_id, "stale statistics").await {
            let by_id = [
                "complete_all",
                "extend_all",
                "lock_live",
                "delete_ids",
                "retry_apply",
                "remove_dead",
                "list_live",
                "list_scheduled",
            ];
            let other_index = ["_ready", "_leased", "_sched", "_expire"]
                .iter()
                .any(|i| plan.contains(&format!("{t}{i}")));
            if plan.contains(&seq) || plan.contains(seq_dedup) || (by_id.contains(&name) && other_index) {
                bad.push(format!("stale/{name}"));
            }
            if name.starts_with("lease") && !plan.contains(&format!("{t}_ready_p")) {
                bad.push(format!("stale/{name} (not by the priority index)"));
            }
        }

        client.batch_execute("RESET enable_seqscan").await.expect("reset");
        client
            .batch_execute(&format!("VACUUM ANALYZE {t}"))
            .await
            .expect("vacuum");
        client
            .batch_execute("ANALYZE lessor_dedup_keys")
            .await
            .expect("analyze");
        for (name, plan) in plans(&client, &s, queue_id, "fresh statistics").await {
            if plan.contains(&seq) || plan.contains(seq_dedup) {
                bad.push(format!("fresh/{name}"));
            }
            if name.starts_with("lease") && !plan.contains(&format!("{t}_ready_p")) {
                bad.push(format!("fresh/{name} (not by the priority index)"));
            }
        }
        assert!(
            bad.is_empty(),
            "statements that scan the table or walk the wrong index: {bad:?}"
        );
        store.destroy(&queue, 0).await.expect("destroy");
    }
}
