//! `/metrics` with many queues (`limits.metrics-max-queues`): black-box tests through the real server on port 0.
//! Every queue touched since start-up used to get its 19 per-queue series in every scrape, unloaded ones included:
//! 100,000 queues made a 95 MB scrape of 1.9 million series. Now per-queue series cover at most the bound's worth of
//! queues (loaded ones first, then the most recently active unloaded ones), a gauge says how many were left out,
//! and unlabelled `lessor_queues_*` totals cover every queue whatever the bound.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use lessor_client::{proto as pb, Client};
use lessor_core::engine::Engine;
use lessor_core::time::ManualClock;
use lessor_server::Config;

const QUEUES: usize = 7;

async fn server(bound: usize) -> (lessor_server::RunningServer, Client, ManualClock) {
    let yaml = format!(
        "queue-storage:\n  driver: memory\n\
         partition-storage:\n  - name: m\n    driver: memory\n    affinity: 1\n\
         limits:\n  metrics-max-queues: {bound}\n"
    );
    let config = Config::from_yaml(&yaml).expect("config");
    let clock = ManualClock::starting_now();
    let (srv, client) = lessor_testkit::server::start(&config, Some(Arc::new(clock.clone()))).await;
    (srv, client, clock)
}

fn name(i: usize) -> String {
    format!("q{i}")
}

async fn produce(c: &Client, q: &str, n: usize) {
    c.queue_produce(&pb::QueueProduceRequest {
        queue_name: q.into(),
        request_timeout: "1m".into(),
        items: (0..n)
            .map(|i| pb::QueueProduceItem {
                bytes: format!("{q}-{i}").into_bytes(),
                ..Default::default()
            })
            .collect(),
    })
    .await
    .unwrap_or_else(|e| panic!("produce to {q}: {e}"));
}

/// The samples of a scrape, by series (`name{labels}`).
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_string(), value.parse().ok()?))
        })
        .collect()
}

/// The queues that have per-queue series in a scrape, with how many series each has.
fn queues_with_series(s: &BTreeMap<String, f64>) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for series in s.keys() {
        if !series.starts_with("lessor_queue_") {
            continue;
        }
        if let Some(rest) = series.split_once("queue=\"").map(|(_, r)| r) {
            let q = rest.split('"').next().unwrap_or_default();
            *out.entry(q.to_string()).or_insert(0) += 1;
        }
    }
    out
}

fn value(s: &BTreeMap<String, f64>, series: &str) -> f64 {
    *s.get(series)
        .unwrap_or_else(|| panic!("no {series} in {:#?}", s.keys().collect::<Vec<_>>()))
}

async fn scrape(c: &Client) -> BTreeMap<String, f64> {
    samples(&c.metrics().await.expect("metrics"))
}

/// A scrape once `series` reads `want`: a queue's task publishes its figures after the pass that answered the
/// request, so a scrape right after a produce or a lease may still show the figures from before it.
async fn scrape_settled(c: &Client, series: &str, want: f64) -> BTreeMap<String, f64> {
    lessor_testkit::eventually(
        &format!("{series} reaches {want}"),
        Duration::from_secs(10),
        || async {
            let s = scrape(c).await;
            match value(&s, series) {
                v if v == want => Ok(s),
                v => Err(format!("{series} = {v}")),
            }
        },
    )
    .await
}

async fn wait_loaded(engine: &Engine, want: usize) {
    lessor_testkit::eventually("queues unload", Duration::from_secs(10), || async {
        match engine.loaded_queues().0 {
            n if n == want => Ok(()),
            n => Err(format!("{n} loaded, want {want}")),
        }
    })
    .await;
}

/// Seven queues, bound 3: q0..q6 get 1..7 items and unload; q1 is then touched and unloads again (the most
/// recently active unloaded queue); q5 and q6 are touched last and stay loaded. The scrape carries the series of
/// exactly q1, q5 and q6 (19 each), says 4 were left out, and its totals are the sums over all seven.
#[tokio::test]
async fn per_queue_series_are_bounded_and_totals_cover_every_queue() {
    let (srv, c, clock) = server(3).await;
    let engine = srv.engine.clone();
    for i in 0..QUEUES {
        lessor_testkit::server::create_queue(&c, &name(i), |_| {}).await;
        produce(&c, &name(i), i + 1).await;
    }
    clock.advance(Duration::from_secs(301));
    wait_loaded(&engine, 0).await;
    produce(&c, "q1", 10).await;
    clock.advance(Duration::from_secs(301));
    wait_loaded(&engine, 0).await;
    produce(&c, "q5", 1).await;
    produce(&c, "q6", 1).await;
    assert_eq!(engine.loaded_queues().0, 2);

    // 1+2+..+7 at first, then 10 more in q1 and one each in q5 and q6.
    let produced = (1..=QUEUES).sum::<usize>() as f64 + 12.0;
    let s = scrape_settled(&c, "lessor_queues_ready_items", produced).await;
    let with = queues_with_series(&s);
    assert_eq!(
        with.keys().cloned().collect::<BTreeSet<_>>(),
        ["q1", "q5", "q6"].into_iter().map(String::from).collect(),
        "the loaded queues, then the most recently unloaded one"
    );
    assert!(with.values().all(|&n| n == 19), "{with:?}");
    assert_eq!(value(&s, "lessor_metrics_queues_omitted"), 4.0);
    assert_eq!(value(&s, "lessor_queues_produced_total"), produced);
    assert_eq!(value(&s, "lessor_queues_ready_items"), produced);
    assert_eq!(value(&s, "lessor_queues_leased_total"), 0.0);
    assert_eq!(value(&s, "lessor_queues_leased_items"), 0.0);
    assert_eq!(value(&s, "lessor_queues_tier_items{tier=\"memory\"}"), {
        // Tier figures are per queue as of its last refresh; their total is the sum of the per-queue ones reported
        // in the metrics, whatever they are.
        engine
            .queue_metrics()
            .iter()
            .map(|(_, m)| m.tier_items[0].load(std::sync::atomic::Ordering::Relaxed) as f64)
            .sum::<f64>()
    });
    // Output stays sorted by queue name.
    let order: Vec<_> = s
        .keys()
        .filter(|k| k.starts_with("lessor_queue_ready_items{"))
        .cloned()
        .collect();
    assert_eq!(
        order,
        ["q1", "q5", "q6"]
            .map(|q| format!("lessor_queue_ready_items{{queue=\"{q}\"}}"))
            .to_vec()
    );

    // Stable: the same choice scrape after scrape while nothing loads or unloads.
    let again = queues_with_series(&scrape(&c).await);
    assert_eq!(again.keys().collect::<Vec<_>>(), with.keys().collect::<Vec<_>>());
    srv.stop().await;
}

/// Bound 0: no per-queue series at all, only the totals and the omitted count.
#[tokio::test]
async fn bound_zero_leaves_only_the_totals() {
    let (srv, c, _clock) = server(0).await;
    for i in 0..QUEUES {
        lessor_testkit::server::create_queue(&c, &name(i), |_| {}).await;
        produce(&c, &name(i), 2).await;
    }
    let s = scrape_settled(&c, "lessor_queues_ready_items", 2.0 * QUEUES as f64).await;
    assert!(queues_with_series(&s).is_empty(), "{:?}", queues_with_series(&s));
    assert_eq!(value(&s, "lessor_metrics_queues_omitted"), QUEUES as f64);
    assert_eq!(value(&s, "lessor_queues_produced_total"), 2.0 * QUEUES as f64);
    assert_eq!(value(&s, "lessor_queues_ready_items"), 2.0 * QUEUES as f64);
    srv.stop().await;
}

/// A deleted queue's series go, its depth leaves the total gauges, and the total counters keep what it counted:
/// a counter that went down when a queue is deleted would read to Prometheus as a reset.
#[tokio::test]
async fn deleting_a_queue_never_takes_a_total_counter_back() {
    let (srv, c, _clock) = server(3).await;
    for i in 0..QUEUES {
        lessor_testkit::server::create_queue(&c, &name(i), |_| {}).await;
        produce(&c, &name(i), 3).await;
    }
    let leased = lessor_testkit::server::lease(&c, "q0", 1, "worker")
        .await
        .expect("lease");
    assert_eq!(leased.items.len(), 1);
    let before = scrape_settled(&c, "lessor_queues_leased_items", 1.0).await;
    assert_eq!(value(&before, "lessor_queues_produced_total"), 21.0);
    assert_eq!(value(&before, "lessor_queues_leased_total"), 1.0);
    assert_eq!(value(&before, "lessor_queues_leased_items"), 1.0);
    for q in ["q0", "q3"] {
        c.queues_delete(&pb::QueuesDeleteRequest {
            queue_name: q.into(),
            force: true,
        })
        .await
        .expect("delete");
    }
    let after = scrape(&c).await;
    assert_eq!(value(&after, "lessor_queues_produced_total"), 21.0);
    assert_eq!(value(&after, "lessor_queues_leased_total"), 1.0);
    assert_eq!(value(&after, "lessor_queues_ready_items"), 15.0);
    assert_eq!(value(&after, "lessor_queues_leased_items"), 0.0);
    assert_eq!(value(&after, "lessor_metrics_queues_omitted"), 2.0);
    let with = queues_with_series(&after);
    // All loaded: the queues loaded longest (loaded in name order here) keep their series.
    assert_eq!(
        with.keys().map(String::as_str).collect::<Vec<_>>(),
        ["q1", "q2", "q4"]
    );
    srv.stop().await;
}

/// `/metrics?queue=NAME` (repeatable) gives the named queues' series whatever the bound, with the totals; more than
/// 100 names is refused.
#[tokio::test]
async fn named_queues_get_their_series_beyond_the_bound() {
    let (srv, c, _clock) = server(3).await;
    for i in 0..QUEUES {
        lessor_testkit::server::create_queue(&c, &name(i), |_| {}).await;
        produce(&c, &name(i), 1).await;
    }
    let base = srv.endpoint();
    let http = reqwest::Client::new();
    let get = |query: String| {
        let http = http.clone();
        let url = format!("{base}/metrics?{query}");
        async move {
            let r = http.get(url).send().await.expect("GET /metrics");
            (r.status().as_u16(), r.text().await.expect("body"))
        }
    };
    let (status, text) = get("queue=q6&queue=q5&queue=nothing&other=ignored".into()).await;
    assert_eq!(status, 200, "{text}");
    let s = samples(&text);
    assert_eq!(
        queues_with_series(&s).into_iter().collect::<Vec<_>>(),
        [("q5".to_string(), 19), ("q6".to_string(), 19)]
    );
    assert_eq!(value(&s, "lessor_queues_produced_total"), QUEUES as f64);
    assert_eq!(value(&s, "lessor_metrics_queues_omitted"), 5.0);
    assert!(
        text.contains("# TYPE lessor_queues_produced_total counter"),
        "{text}"
    );

    let many: Vec<String> = (0..101).map(|i| format!("queue=x{i}")).collect();
    let (status, text) = get(many.join("&")).await;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("at most 100"), "{text}");
    srv.stop().await;
}

/// Two servers over one PostgreSQL database: server B deletes two queues server A served, and creates one of them
/// again. A's tasks of both stop when they re-read the definitions; they must leave A's totals as a local delete
/// does: their depth gone from the total gauges, their counts kept in the total counters. A stopped task's handle
/// used to stay in A's table with its last figures (the depth of a queue that no longer exists, in the totals for
/// good), and the queue loaded again under the name started from fresh metrics that replaced the old handle's, so
/// its counts left the total counters (the collector's floor then held the counter flat until new counts made up
/// for them, instead of counting them).
#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queues_deleted_by_another_server_leave_the_totals_as_a_local_delete() {
    if lessor_testkit::database_or_skip().is_none() {
        return;
    }
    let db = lessor_testkit::TestDatabase::create("lessor_mb").await;
    let mut config = lessor_testkit::server::postgres_config(db.url());
    config.limits.shared_refresh = Some("100ms".into());
    let (a, ca) = lessor_testkit::server::start(&config, None).await;
    let (b, cb) = lessor_testkit::server::start(&config, None).await;
    for q in ["again", "gone"] {
        lessor_testkit::server::create_queue(&ca, q, |_| {}).await;
        produce(&ca, q, 5).await;
    }
    // A task publishes its depth after its pass, not before the produce is answered.
    lessor_testkit::eventually("A's totals", Duration::from_secs(10), || async {
        let s = scrape(&ca).await;
        match (
            value(&s, "lessor_queues_produced_total"),
            value(&s, "lessor_queues_ready_items"),
        ) {
            (p, r) if p == 10.0 && r == 10.0 => Ok(()),
            (p, r) => Err(format!("produced {p}, ready {r}")),
        }
    })
    .await;

    for q in ["again", "gone"] {
        cb.queues_delete(&pb::QueuesDeleteRequest {
            queue_name: q.into(),
            force: true,
        })
        .await
        .expect("delete on B");
    }
    lessor_testkit::server::create_queue(&cb, "again", |_| {}).await;
    // A's tasks re-read their definitions every 100 ms (shared-refresh) and stop: neither queue A knew holds
    // anything now.
    scrape_settled(&ca, "lessor_queues_ready_items", 0.0).await;
    produce(&ca, "again", 1).await;
    // As above, the depth is published after the pass that stored the item: wait for it (the counter must then be
    // the 10 the deleted queues counted and the new one, never less on the way).
    lessor_testkit::eventually(
        "A's totals after the produce",
        Duration::from_secs(10),
        || async {
            let s = scrape(&ca).await;
            match (
                value(&s, "lessor_queues_produced_total"),
                value(&s, "lessor_queues_ready_items"),
            ) {
                (p, r) if p == 11.0 && r == 1.0 => Ok(()),
                (p, r) => Err(format!("produced {p} (want 11), ready {r} (want 1)")),
            }
        },
    )
    .await;
    a.stop().await;
    b.stop().await;
}

/// `/metrics` took no parameters before `?queue=`, so any query string gave the full scrape; other parameters and
/// malformed ones still must (a scraper's `params` or a hand-typed URL is no reason to lose the target), and a
/// refused request (more than 100 names) answers the JSON envelope (`code`, `message`) every other refusal of this
/// server does, not bare text.
#[tokio::test]
async fn metrics_query_strings_keep_the_plain_scrape_and_refusals_the_envelope() {
    let (srv, c, _clock) = server(3).await;
    lessor_testkit::server::create_queue(&c, "q0", |_| {}).await;
    produce(&c, "q0", 1).await;
    let base = srv.endpoint();
    let http = reqwest::Client::new();
    for query in [
        "",
        "?",
        "?&&",
        "?=x",
        "?%",
        "?%zz=1",
        "?a=%FF%FE",
        "?name[]=1&name[]=2",
        "?module=http_2xx&target=x",
        "?queue%=q0",
    ] {
        let r = http
            .get(format!("{base}/metrics{query}"))
            .send()
            .await
            .expect("GET /metrics");
        let status = r.status().as_u16();
        let ct = r
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap_or_default().to_string());
        let text = r.text().await.expect("body");
        assert_eq!(status, 200, "{query}: {text}");
        assert_eq!(
            ct.as_deref(),
            Some("text/plain; version=0.0.4; charset=utf-8"),
            "{query}"
        );
        assert!(
            text.contains("lessor_queue_produced_total{queue=\"q0\"} 1"),
            "{query}: {text}"
        );
    }
    let many: Vec<String> = (0..101).map(|i| format!("queue=x{i}")).collect();
    let r = http
        .get(format!("{base}/metrics?{}", many.join("&")))
        .send()
        .await
        .expect("GET /metrics");
    assert_eq!(r.status().as_u16(), 400);
    let text = r.text().await.expect("body");
    let body: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    assert_eq!(body["code"], 400, "{body}");
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.contains("at most 100")),
        "{body}"
    );
    srv.stop().await;
}

/// Checks an exposition the way a strict scraper reads it: every sample belongs to the family whose `# TYPE` line
/// came last (its name, or the suffixes its type allows), no family is declared twice, each family's HELP (if any)
/// comes right before its TYPE, a sample's series appears once, and OpenMetrics ends with `# EOF` (0.0.4 has none).
/// Returns the families with their types.
fn check_exposition(text: &str, openmetrics: bool) -> BTreeMap<String, String> {
    let mut families: BTreeMap<String, String> = BTreeMap::new();
    let mut series = BTreeSet::new();
    let mut current: Option<(String, String)> = None;
    let mut help: Option<String> = None;
    let lines: Vec<&str> = text.lines().collect();
    if openmetrics {
        assert_eq!(lines.last(), Some(&"# EOF"), "OpenMetrics ends with # EOF");
    } else {
        assert!(!text.contains("# EOF"), "0.0.4 has no # EOF");
    }
    for line in lines {
        if line == "# EOF" {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            assert!(help.is_none(), "two HELP lines in a row: {line}");
            help = Some(rest.split(' ').next().unwrap_or_default().to_string());
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
            if let Some(h) = help.take() {
                assert_eq!(h, name, "HELP and TYPE name the same family");
            }
            assert!(
                families.insert(name.to_string(), kind.to_string()).is_none(),
                "family {name} declared twice"
            );
            if !openmetrics && kind == "counter" {
                assert!(name.ends_with("_total"), "0.0.4 counter family {name}");
            }
            current = Some((name.to_string(), kind.to_string()));
            continue;
        }
        assert!(!line.starts_with('#'), "unknown comment: {line}");
        assert!(help.is_none(), "HELP without TYPE before {line}");
        let (s, value) = line.rsplit_once(' ').expect("sample and value");
        assert!(value.parse::<f64>().is_ok(), "value of {line}");
        let name = s.split('{').next().unwrap_or_default();
        let (family, kind) = current
            .as_ref()
            .unwrap_or_else(|| panic!("{line} outside any family"));
        let ok = match kind.as_str() {
            "counter" if openmetrics => {
                name == format!("{family}_total") || name == format!("{family}_created")
            }
            "histogram" => ["_bucket", "_sum", "_count", "_created"]
                .iter()
                .any(|x| name == format!("{family}{x}")),
            _ => name == family,
        };
        assert!(ok, "{line} in family {family} ({kind})");
        assert!(series.insert(s.to_string()), "series {s} twice");
    }
    families
}

/// The queue families (per queue, totals, omitted) are a valid exposition in both formats, on a plain scrape and on
/// a `?queue=` one, each family once with one TYPE line, counters named `_total` where each format wants it.
#[tokio::test]
async fn the_queue_families_are_a_valid_exposition_in_both_formats() {
    let (srv, c, _clock) = server(2).await;
    for i in 0..QUEUES {
        lessor_testkit::server::create_queue(&c, &name(i), |_| {}).await;
        produce(&c, &name(i), 1).await;
    }
    let base = srv.endpoint();
    let http = reqwest::Client::new();
    for query in ["", "?queue=q1&queue=q6"] {
        for openmetrics in [false, true] {
            let mut req = http.get(format!("{base}/metrics{query}"));
            if openmetrics {
                req = req.header("accept", "application/openmetrics-text; version=1.0.0");
            }
            let text = req.send().await.expect("GET").text().await.expect("body");
            let families = check_exposition(&text, openmetrics);
            let counter = |n: &str| {
                if openmetrics {
                    n.to_string()
                } else {
                    format!("{n}_total")
                }
            };
            for (family, kind) in [
                (counter("lessor_queues_produced"), "counter"),
                (counter("lessor_queue_produced"), "counter"),
                ("lessor_queues_ready_items".to_string(), "gauge"),
                ("lessor_queues_tier_items".to_string(), "gauge"),
                ("lessor_metrics_queues_omitted".to_string(), "gauge"),
            ] {
                assert_eq!(
                    families.get(&family).map(String::as_str),
                    Some(kind),
                    "{query} openmetrics={openmetrics}: {family}"
                );
            }
        }
    }
    srv.stop().await;
}

/// Two servers sharing one PostgreSQL store, A on a manual clock, and a queue of 3 items created through A and
/// then unloaded there for being idle: what the tests of a queue changed by B while unloaded on A start from.
#[cfg(feature = "postgres")]
struct UnloadedOnA {
    /// Kept until the test ends: dropping it drops the database under both servers.
    _db: lessor_testkit::TestDatabase,
    a: lessor_server::RunningServer,
    ca: Client,
    b: lessor_server::RunningServer,
    cb: Client,
    /// A's clock.
    clock: ManualClock,
}

#[cfg(feature = "postgres")]
async fn unloaded_on_a(queue: &str) -> UnloadedOnA {
    let db = lessor_testkit::TestDatabase::create("lessor_mb").await;
    let config = lessor_testkit::server::postgres_config(db.url());
    let clock = ManualClock::starting_now();
    let (a, ca) = lessor_testkit::server::start(&config, Some(Arc::new(clock.clone()))).await;
    let (b, cb) = lessor_testkit::server::start(&config, None).await;
    lessor_testkit::server::create_queue(&ca, queue, |_| {}).await;
    produce(&ca, queue, 3).await;
    // The task publishes its figures after the pass that answered the produce: the figures the queue unloads with
    // (and the tests then expect in A's totals) must be the 3 items'.
    scrape_settled(&ca, "lessor_queues_ready_items", 3.0).await;
    clock.advance(Duration::from_secs(301));
    wait_loaded(&a.engine, 0).await;
    UnloadedOnA {
        _db: db,
        a,
        ca,
        b,
        cb,
        clock,
    }
}

/// A queue unloaded here (idle) and then deleted by another server sharing the store has no task here to notice:
/// its last figures stay in the unloaded table. The next time this server looks the name up and finds no definition
/// (a request for it, or its expiry deadline), it must count the queue as deleted: its depth out of the total gauges,
/// its counts kept in the total counters. The lookup used to answer "no such queue" and leave the entry, so the
/// depth of a queue that no longer exists stayed in the totals for as long as the process ran.
#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unloaded_queue_deleted_by_another_server_leaves_the_totals_once_looked_up() {
    if lessor_testkit::database_or_skip().is_none() {
        return;
    }
    let UnloadedOnA {
        _db, a, ca, b, cb, ..
    } = unloaded_on_a("idle").await;
    let s = scrape(&ca).await;
    assert_eq!(value(&s, "lessor_queues_ready_items"), 3.0);
    cb.queues_delete(&pb::QueuesDeleteRequest {
        queue_name: "idle".into(),
        force: true,
    })
    .await
    .expect("delete on B");
    let err = ca
        .queue_stats(&pb::QueueStatsRequest {
            queue_name: "idle".into(),
            ..Default::default()
        })
        .await
        .expect_err("deleted");
    assert!(err.to_string().contains("does not exist"), "{err}");
    let s = scrape(&ca).await;
    assert_eq!(value(&s, "lessor_queues_ready_items"), 0.0, "the queue is gone");
    assert_eq!(value(&s, "lessor_queues_produced_total"), 3.0);
    assert!(queues_with_series(&s).is_empty(), "{:?}", queues_with_series(&s));
    a.stop().await;
    b.stop().await;
}

/// The same queue, never asked for here again: the sweep that runs every idle-unload time on a server sharing its
/// store finds its definition gone and forgets it, its depth out of the totals and its counts kept. Before the
/// sweep, a queue with nothing due (here 3 items expiring in a day) stayed in the table and in `/metrics` for as
/// long as the process ran, unless a request or a deadline happened to look it up.
#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unloaded_queue_deleted_by_another_server_is_forgotten_by_the_next_sweep() {
    if lessor_testkit::database_or_skip().is_none() {
        return;
    }
    let UnloadedOnA {
        _db,
        a,
        ca,
        b,
        cb,
        clock,
    } = unloaded_on_a("swept").await;
    cb.queues_delete(&pb::QueuesDeleteRequest {
        queue_name: "swept".into(),
        force: true,
    })
    .await
    .expect("delete on B");
    assert_eq!(
        value(&scrape(&ca).await, "lessor_queues_ready_items"),
        3.0,
        "no sweep yet"
    );
    clock.advance(Duration::from_secs(301));
    let s = scrape_settled(&ca, "lessor_queues_ready_items", 0.0).await;
    assert_eq!(value(&s, "lessor_queues_produced_total"), 3.0);
    assert!(queues_with_series(&s).is_empty(), "{:?}", queues_with_series(&s));
    assert_eq!(a.engine.wake_tasks(), 0, "the queue's expiry task went with it");
    a.stop().await;
    b.stop().await;
}

/// A queue unloaded here (idle), then deleted and created again under its name by another server sharing the
/// store: loaded here again, it is a new queue. Its per-queue counters start from 0, and the old queue's counts
/// stay in the total counters as a deleted queue's. They used to go on from the old queue's (3 produced before, 1
/// after: 4), as if the queue had never been deleted.
#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_created_again_by_another_server_while_unloaded_here_counts_from_zero() {
    if lessor_testkit::database_or_skip().is_none() {
        return;
    }
    let UnloadedOnA {
        _db, a, ca, b, cb, ..
    } = unloaded_on_a("again").await;
    cb.queues_delete(&pb::QueuesDeleteRequest {
        queue_name: "again".into(),
        force: true,
    })
    .await
    .expect("delete on B");
    lessor_testkit::server::create_queue(&cb, "again", |_| {}).await;
    produce(&ca, "again", 1).await;
    let s = scrape_settled(&ca, "lessor_queues_ready_items", 1.0).await;
    assert_eq!(
        value(&s, "lessor_queue_produced_total{queue=\"again\"}"),
        1.0,
        "the new queue counts from 0"
    );
    assert_eq!(
        value(&s, "lessor_queues_produced_total"),
        4.0,
        "the old queue's counts stay in the total"
    );
    a.stop().await;
    b.stop().await;
}

/// Queues deleted while scrapes run: no scrape sees a total counter go back or count a queue twice (above what was
/// produced), and once the deletes are done the gauges are 0 and the counters hold everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletes_racing_scrapes_never_move_a_total_back_or_count_twice() {
    const N: usize = 24;
    let (srv, c, _clock) = server(5).await;
    for i in 0..N {
        lessor_testkit::server::create_queue(&c, &name(i), |_| {}).await;
        produce(&c, &name(i), 2).await;
    }
    let all = 2.0 * N as f64;
    let scraper = {
        let c = c.clone();
        tokio::spawn(async move {
            let mut seen = Vec::new();
            for _ in 0..200 {
                seen.push(value(&scrape(&c).await, "lessor_queues_produced_total"));
                tokio::task::yield_now().await;
            }
            seen
        })
    };
    let deletes = (0..N).map(|i| {
        let c = c.clone();
        tokio::spawn(async move {
            c.queues_delete(&pb::QueuesDeleteRequest {
                queue_name: name(i),
                force: true,
            })
            .await
            .expect("delete");
        })
    });
    for d in futures::future::join_all(deletes).await {
        d.expect("delete task");
    }
    let seen = scraper.await.expect("scraper");
    assert!(seen.windows(2).all(|w| w[0] <= w[1]), "{seen:?}");
    assert!(seen.iter().all(|&v| v <= all), "{seen:?}");
    let s = scrape(&c).await;
    assert_eq!(value(&s, "lessor_queues_produced_total"), all);
    assert_eq!(value(&s, "lessor_queues_ready_items"), 0.0);
    assert_eq!(value(&s, "lessor_metrics_queues_omitted"), 0.0);
    srv.stop().await;
}
