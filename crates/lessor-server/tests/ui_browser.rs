//! The dashboard in a real browser: headless Chromium driven over WebDriver (`chromedriver`, Debian's
//! `chromium-driver`) against a real server on port 0, with a small WebDriver client written here over `reqwest`
//! (the protocol is a handful of JSON calls; no extra dependency).
//!
//! The tests skip with a printed message when `chromium` or `chromedriver` is missing, unless
//! `LESSOR_REQUIRE_BROWSER` is set (as `scripts/test.sh` does), in which case they fail. Screenshots of each page in
//! light and dark mode go to the folder printed at the start (`target/tmp/ui-screenshots`).

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lessor_client::routes::{
    ApiKeysCreate, NamespacesCreate, QueueLease, QueueRetry, RoleBindingsCreate, RolesCreate, UsersCreate,
};
use lessor_client::{proto as pb, Client};
use lessor_server::{Config, RunningServer};
use serde_json::{json, Value};

/// How long a page may take to show what a test waits for. Generous: the five browser tests run at once beside the
/// rest of the suite on two cores, and a wait ran out at 15 s once with all five running (the page was right, late).
const WAIT: Duration = Duration::from_secs(30);

/// Whether the browser tests can run; prints why not, and fails when they are required.
fn browser_available() -> bool {
    let found = |bin: &str| {
        Command::new("sh")
            .args(["-c", &format!("command -v {bin}")])
            .stdout(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    };
    if found("chromium") && found("chromedriver") {
        return true;
    }
    assert!(
        std::env::var_os("LESSOR_REQUIRE_BROWSER").is_none(),
        "LESSOR_REQUIRE_BROWSER is set but chromium or chromedriver is missing (apt-get install chromium chromium-driver)"
    );
    println!("SKIPPED: chromium or chromedriver is not installed (apt-get install chromium chromium-driver); set LESSOR_REQUIRE_BROWSER=1 to make this a failure");
    false
}

/// Where screenshots go (printed once per test).
fn shots_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("ui-screenshots");
    std::fs::create_dir_all(&dir).expect("screenshot dir");
    println!("screenshots: {}", dir.display());
    dir
}

/// A chromedriver process and one headless Chromium session on it.
struct Browser {
    driver: Child,
    http: reqwest::Client,
    session: String,
    base: String,
}

impl Drop for Browser {
    fn drop(&mut self) {
        // The session is ended first, so that chromedriver quits its Chromium: killing chromedriver alone left every
        // test's browser running. Plain blocking HTTP: a drop cannot await, and chromedriver is its own process.
        if let Some(addr) = self.base.strip_prefix("http://") {
            if !self.session.is_empty() {
                if let Ok(mut s) = std::net::TcpStream::connect(addr) {
                    let _ = s.set_read_timeout(Some(Duration::from_secs(15)));
                    let _ = write!(
                        s,
                        "DELETE /session/{} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
                        self.session
                    );
                    let mut answer = Vec::new();
                    let _ = s.read_to_end(&mut answer);
                }
            }
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

impl Browser {
    async fn start() -> Browser {
        let port = free_port();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let http = reqwest::Client::new();
        let base = format!("http://127.0.0.1:{port}");
        let started = Instant::now();
        while http.get(format!("{base}/status")).send().await.is_err() {
            assert!(started.elapsed() < WAIT, "chromedriver did not listen");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut b = Browser {
            driver,
            http,
            session: String::new(),
            base,
        };
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "unhandledPromptBehavior": "ignore",
            "goog:loggingPrefs": {"browser": "ALL"},
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--window-size=1100,800", "--hide-scrollbars"]
            }
        }}});
        let r = b.call("POST", "/session", caps).await;
        b.session = r["sessionId"].as_str().expect("session id").to_string();
        b
    }

    async fn call(&self, method: &str, path: &str, body: Value) -> Value {
        let path = if path == "/session" {
            path.to_string()
        } else {
            format!("/session/{}{path}", self.session)
        };
        let url = format!("{}{path}", self.base);
        let req = match method {
            "GET" => self.http.get(url),
            "DELETE" => self.http.delete(url),
            _ => self
                .http
                .post(url)
                .header("content-type", "application/json")
                .body(body.to_string()),
        };
        let bytes = req
            .send()
            .await
            .expect("webdriver")
            .bytes()
            .await
            .expect("webdriver body");
        let r: Value = serde_json::from_slice(&bytes).expect("webdriver json");
        r["value"].clone()
    }

    async fn try_call(&self, path: &str, body: Value) -> Result<Value, String> {
        let v = self.call("POST", path, body).await;
        match v.get("error") {
            Some(e) => Err(format!("{e}: {}", v["message"])),
            None => Ok(v),
        }
    }

    async fn goto(&self, url: &str) {
        self.call("POST", "/url", json!({"url": url})).await;
    }

    async fn js(&self, script: &str, args: Value) -> Value {
        self.try_call("/execute/sync", json!({"script": script, "args": args}))
            .await
            .unwrap_or_else(|e| panic!("script failed: {e}"))
    }

    /// Waits until `script` (a function body) returns something truthy, and returns it.
    async fn wait_for(&self, what: &str, script: &str, args: Value) -> Value {
        let started = Instant::now();
        loop {
            if let Ok(v) = self
                .try_call("/execute/sync", json!({"script": script, "args": args.clone()}))
                .await
            {
                if !(v.is_null() || v == json!(false) || v == json!("") || v == json!(0)) {
                    return v;
                }
            }
            if started.elapsed() > WAIT {
                let page = self.js("return document.body.innerText", json!([])).await;
                panic!("timed out waiting for {what}; page:\n{page}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn text(&self, selector: &str) -> String {
        let v = self
            .wait_for(
                selector,
                "const e = document.querySelector(arguments[0]); return e ? e.textContent || ' ' : null;",
                json!([selector]),
            )
            .await;
        v.as_str().unwrap_or("").trim().to_string()
    }

    async fn element(&self, selector: &str) -> String {
        let started = Instant::now();
        loop {
            if let Ok(v) = self
                .try_call("/element", json!({"using": "css selector", "value": selector}))
                .await
            {
                if let Some(id) = v
                    .as_object()
                    .and_then(|o| o.values().next())
                    .and_then(Value::as_str)
                {
                    return id.to_string();
                }
            }
            assert!(started.elapsed() < WAIT, "no element {selector}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Calls `/element/{id}/{action}` on the element `selector` finds. The page re-renders on its refresh timer,
    /// which can replace the element between the find and the call ("stale element reference"), and a window just
    /// resized may not have laid it out again yet ("element not interactable", seen once in CI right after the
    /// tour's phone-width screenshots): it is then found again, until [`WAIT`] has passed.
    async fn on_element(&self, selector: &str, action: &str, body: Value) {
        let started = Instant::now();
        loop {
            let id = self.element(selector).await;
            match self
                .try_call(&format!("/element/{id}/{action}"), body.clone())
                .await
            {
                Ok(_) => return,
                Err(e)
                    if (e.contains("stale element") || e.contains("not interactable"))
                        && started.elapsed() < WAIT =>
                {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("{action} on {selector}: {e}"),
            }
        }
    }

    async fn click(&self, selector: &str) {
        self.on_element(selector, "click", json!({})).await;
    }

    /// Clicks something that asks `confirm()`, and accepts the question.
    async fn click_confirm(&self, selector: &str) {
        self.click(selector).await;
        let started = Instant::now();
        while self.try_call("/alert/accept", json!({})).await.is_err() {
            assert!(
                started.elapsed() < WAIT,
                "no confirmation after clicking {selector}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn type_into(&self, selector: &str, text: &str) {
        self.on_element(selector, "clear", json!({})).await;
        self.on_element(selector, "value", json!({"text": text})).await;
    }

    /// Browser console messages at warning level or worse since the last call (failed requests show here too).
    async fn console_errors(&self) -> Vec<String> {
        let v = self.call("POST", "/se/log", json!({"type": "browser"})).await;
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter(|e| matches!(e["level"].as_str(), Some("SEVERE") | Some("WARNING")))
                    .map(|e| e["message"].to_string())
                    .collect()
            })
            .unwrap_or_default()
    }

    async fn assert_clean_console(&self, page: &str) {
        let errors = self.console_errors().await;
        assert!(errors.is_empty(), "console errors on {page}: {errors:?}");
    }

    async fn color_scheme(&self, dark: bool) {
        let value = if dark { "dark" } else { "light" };
        self.try_call(
            "/goog/cdp/execute",
            json!({"cmd": "Emulation.setEmulatedMedia",
                   "params": {"features": [{"name": "prefers-color-scheme", "value": value}]}}),
        )
        .await
        .expect("emulate color scheme");
    }

    /// Saves `name-light.png` and `name-dark.png` of the current page.
    async fn screenshots(&self, dir: &std::path::Path, name: &str) {
        use base64::Engine as _;
        for dark in [false, true] {
            self.color_scheme(dark).await;
            tokio::time::sleep(Duration::from_millis(150)).await;
            // The page follows the scheme: a dark background with light text, or the reverse.
            let rgb = self
                .js(
                    "const c = (p) => getComputedStyle(document.body)[p].match(/\\d+/g).slice(0, 3).map(Number).reduce((a, b) => a + b, 0);
                     return [c('backgroundColor'), c('color')];",
                    json!([]),
                )
                .await;
            let (bg, fg) = (rgb[0].as_u64().unwrap_or(0), rgb[1].as_u64().unwrap_or(0));
            assert_eq!(bg < fg, dark, "{name}: background {bg}, text {fg}, dark {dark}");
            let png = self.call("GET", "/screenshot", json!({})).await;
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(png.as_str().expect("screenshot"))
                .expect("png");
            let file = dir.join(format!("{name}-{}.png", if dark { "dark" } else { "light" }));
            std::fs::write(&file, bytes).expect("write screenshot");
        }
        self.color_scheme(false).await;
    }
}

fn produce(queue: &str, payloads: &[&str]) -> pb::QueueProduceRequest {
    pb::QueueProduceRequest {
        queue_name: queue.into(),
        request_timeout: "5s".into(),
        items: payloads
            .iter()
            .map(|p| pb::QueueProduceItem {
                utf8: (*p).into(),
                encoding: "application/json".into(),
                kind: "demo".into(),
                ..Default::default()
            })
            .collect(),
    }
}

async fn lease(c: &Client, queue: &str, n: i32) -> pb::QueueLeaseResponse {
    c.call::<QueueLease>(&pb::QueueLeaseRequest {
        queue_name: queue.into(),
        batch_size: n,
        client_id: "ui-test-worker".into(),
        request_timeout: "5s".into(),
    })
    .await
    .expect("lease")
}

/// The number shown in column `col` of `queue`'s row on the overview, once it equals `want`.
async fn wait_depth(b: &Browser, queue: &str, col: &str, want: u64) {
    b.wait_for(
        &format!("{queue} {col} = {want}"),
        "const td = document.querySelector(`tr[data-queue='${arguments[0]}'] td[data-col='${arguments[1]}']`);
         return td && td.textContent.replace(/,/g, '') === String(arguments[2]);",
        json!([queue, col, want]),
    )
    .await;
}

/// The storage tiers, in the order the dashboard shows them.
const TIERS: [&str; 3] = ["memory", "disk", "object"];

/// Items and bytes per tier of a `tiers` object of the JSON API (int64 as strings, zero figures omitted).
fn api_tiers(t: &Value) -> [(u64, u64); 3] {
    let field = |k: String| match &t[&k] {
        Value::String(v) => v.parse::<u64>().expect("int64 string"),
        Value::Number(v) => v.as_u64().expect("count"),
        _ => 0,
    };
    TIERS.map(|k| (field(format!("{k}_items")), field(format!("{k}_bytes"))))
}

/// POSTs `body` to `/v1/{route}` as JSON, the way the dashboard calls the API.
async fn post(srv: &RunningServer, route: &str, body: Value) -> Value {
    let bytes = reqwest::Client::new()
        .post(format!("{}/v1/{route}", srv.endpoint()))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .expect(route)
        .bytes()
        .await
        .expect("reply body");
    serde_json::from_slice(&bytes).expect("JSON reply")
}

/// Waits until the tiers `read_page` shows equal the ones `read_api` answers (read back to back: the figures of a
/// queue being refreshed can change between two reads), and returns them.
async fn tiers_match<P, A, PF, AF>(what: &str, read_page: P, read_api: A) -> [(u64, u64); 3]
where
    P: Fn() -> PF,
    A: Fn() -> AF,
    PF: std::future::Future<Output = [(u64, u64); 3]>,
    AF: std::future::Future<Output = [(u64, u64); 3]>,
{
    let start = Instant::now();
    loop {
        let api = read_api().await;
        let page = read_page().await;
        if api == page {
            return api;
        }
        assert!(
            start.elapsed() < WAIT,
            "{what}: the page shows {page:?}, the API answers {api:?} (memory, disk, object: items, bytes)"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// The tiers the overview shows for `queue` (a tier without a figure is not shown: zero), checking that the visible
/// item count is the one in the element's data.
async fn overview_tiers(b: &Browser, queue: &str) -> [(u64, u64); 3] {
    let v = b
        .js(
            "const td = document.querySelector(`tr[data-queue='${arguments[0]}'] td[data-col='tiers']`);
             if (!td) return null;
             return ['memory', 'disk', 'object'].map((k) => {
               const e = td.querySelector(`[data-tier='${k}']`);
               return e ? [Number(e.dataset.items), Number(e.dataset.bytes), e.querySelector('.items').textContent] : [0, 0, '0'];
             });",
            json!([queue]),
        )
        .await;
    let Some(rows) = v.as_array() else {
        return [(u64::MAX, u64::MAX); 3];
    };
    let mut out = [(0, 0); 3];
    for (i, r) in rows.iter().enumerate() {
        let items = r[0].as_u64().expect("items");
        // Small counts are shown in full (larger ones shortened, as 1.2k).
        assert_eq!(
            r[2].as_str().expect("text"),
            items.to_string(),
            "{queue} {}",
            TIERS[i]
        );
        out[i] = (items, r[1].as_u64().expect("bytes"));
    }
    out
}

/// Requests the server answered on `route` so far (any code), from `/metrics`.
async fn answered(srv: &RunningServer, route: &str) -> u64 {
    let text = reqwest::get(format!("{}/metrics", srv.endpoint()))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text");
    let label = format!("route=\"{route}\"");
    text.lines()
        .filter(|l| l.starts_with("lessor_http_requests_total{") && l.contains(&label))
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum::<f64>() as u64
}

/// The whole tour on one server: overview and live depths, an item browsed, retried and completed, a queue
/// created and deleted, a dead-letter queue redriven, the server page; screenshots of each page, and no console
/// errors on any of them.
async fn tour(config: Config, shots: bool, backend: &str) {
    if !browser_available() {
        return;
    }
    let dir = shots_dir();
    let (srv, c): (RunningServer, Client) = lessor_testkit::server::start(&config, None).await;
    lessor_testkit::server::create_queue(&c, "orders-dead", |_| {}).await;
    lessor_testkit::server::create_queue(&c, "orders", |q| {
        q.dead_queue = "orders-dead".into();
        q.max_attempts = 5;
    })
    .await;
    lessor_testkit::server::create_queue(&c, "emails", |_| {}).await;
    c.queue_produce(&produce("emails", &[r#"{"to":"a@example.com"}"#]))
        .await
        .expect("produce");
    let b = Browser::start().await;
    let ui = format!("{}/ui/", srv.endpoint());

    // Overview: the queues are listed, and depths follow produce and lease without a reload.
    b.goto(&ui).await;
    wait_depth(&b, "emails", "ready", 1).await;
    wait_depth(&b, "orders", "ready", 0).await;
    c.queue_produce(&produce(
        "orders",
        &[r#"{"id":1,"sku":"A-1"}"#, r#"{"id":2}"#, r#"{"id":3}"#],
    ))
    .await
    .expect("produce");
    wait_depth(&b, "orders", "ready", 3).await;
    let leased = lease(&c, "orders", 1).await;
    let item = leased.items[0].id.clone();
    wait_depth(&b, "orders", "leased", 1).await;
    wait_depth(&b, "orders", "ready", 2).await;
    // The oldest waiting item's age is shown (a duration), and "-" for a queue with nothing waiting.
    let oldest = b
        .wait_for(
            "oldest age",
            "const td = document.querySelector(\"tr[data-queue='orders'] td[data-col='age']\");
             return td && /^[\\d.]+(ms|s|m|h|µs|us)/.test(td.textContent) ? td.textContent : null;",
            json!([]),
        )
        .await;
    assert!(oldest.is_string(), "{oldest}");
    // Storage tiers: the overview shows, per queue, what queues.overview answers; and where the 3 items of
    // `orders` are depends on the store: memory holds them in memory, fjall and PostgreSQL on disk.
    let shown = tiers_match(
        "overview tiers of orders",
        || overview_tiers(&b, "orders"),
        || async {
            let o = post(&srv, "queues.overview", json!({})).await;
            let row = o["items"]
                .as_array()
                .expect("items")
                .iter()
                .find(|q| q["queue_name"] == "orders")
                .expect("orders in the overview")
                .clone();
            assert!(row["tiers"].is_object(), "queues.overview gives tiers: {row}");
            api_tiers(&row["tiers"])
        },
    )
    .await;
    let [memory, disk, object] = shown;
    match backend {
        "memory" => assert_eq!((memory.0, disk.0), (3, 0), "memory store: {shown:?}"),
        "fjall" => assert_eq!(disk.0, 3, "fjall: all items on disk: {shown:?}"),
        "postgres" => assert_eq!((memory.0, disk.0), (0, 3), "PostgreSQL: {shown:?}"),
        other => panic!("unknown backend {other}"),
    }
    assert_eq!(object, (0, 0), "no object storage configured: {shown:?}");
    assert!(memory.1 + disk.1 > 0, "payload bytes are counted: {shown:?}");
    // A queue with nothing in it shows no tier.
    assert_eq!(
        b.text("tr[data-queue='orders-dead'] td[data-col='tiers']").await,
        "-"
    );
    assert_eq!(
        b.text("tr[data-queue='orders-dead'] td[data-col='age']").await,
        "-"
    );
    // One request per refresh: the overview polls queues.overview every 2 s, and nothing per queue.
    let per_queue = ["/v1/queue.stats", "/v1/queue.history", "/v1/queues.list"];
    let mut before = Vec::new();
    for route in per_queue {
        before.push(answered(&srv, route).await);
    }
    let overviews = answered(&srv, "/v1/queues.overview").await;
    tokio::time::sleep(Duration::from_millis(4500)).await;
    let refreshes = answered(&srv, "/v1/queues.overview").await - overviews;
    assert!(
        (1..=3).contains(&refreshes),
        "about one queues.overview per 2 s refresh, got {refreshes} in 4.5 s"
    );
    for (route, was) in per_queue.iter().zip(before) {
        assert_eq!(
            answered(&srv, route).await,
            was,
            "{route}: the overview makes no per-queue request"
        );
    }
    // Filtering hides the other queues.
    b.type_into("#filter", "ema").await;
    b.wait_for(
        "filter",
        "return !document.querySelector(\"tr[data-queue='orders']\") && !!document.querySelector(\"tr[data-queue='emails']\")",
        json!([]),
    )
    .await;
    // (WebDriver's clear fires no input event; the page listens to input.)
    b.js(
        "const f = document.querySelector('#filter'); f.value = ''; f.dispatchEvent(new Event('input'));",
        json!([]),
    )
    .await;
    wait_depth(&b, "orders", "leased", 1).await;
    // Sorting from the keyboard: Enter on a focused column heading sorts by it, twice reverses.
    for want in ["ascending", "descending"] {
        b.on_element("th[data-key='ready']", "value", json!({"text": "\u{E007}"}))
            .await;
        b.wait_for(
            want,
            "return document.querySelector(\"th[data-key='ready']\").getAttribute('aria-sort') === arguments[0]",
            json!([want]),
        )
        .await;
    }
    let first = b.text("#queue-rows tr:first-child").await;
    assert!(first.starts_with("orders"), "most ready first: {first}");
    if shots {
        b.screenshots(&dir, "overview").await;
        b.try_call("/window/rect", json!({"width": 390, "height": 800}))
            .await
            .expect("phone width");
        wait_depth(&b, "orders", "leased", 1).await;
        b.screenshots(&dir, "overview-phone").await;
        b.try_call("/window/rect", json!({"width": 1100, "height": 800}))
            .await
            .expect("laptop width");
    }
    b.assert_clean_console("overview").await;

    // One queue: cards, partitions, charts; reached from the overview with the keyboard (Enter on the focused link).
    b.on_element("tr[data-queue='orders'] a", "value", json!({"text": "\u{E007}"}))
        .await;
    b.wait_for(
        "queue page from the keyboard",
        "return location.hash === '#/queue/orders'",
        json!([]),
    )
    .await;
    b.wait_for(
        "cards",
        "const e = document.querySelector('#card-leased .v'); return e && e.textContent === '1';",
        json!([]),
    )
    .await;
    b.wait_for(
        "chart",
        "return document.querySelectorAll('svg.chart polyline').length >= 5 && !!document.querySelector('svg.chart polyline.latency')",
        json!([]),
    )
    .await;
    assert_eq!(b.text("#partitions tr td").await, "0");
    // The per-partition tier table shows what queue.stats with `with_tiers` answers.
    tiers_match(
        "queue page tiers of orders",
        || async {
            let v = b
                .js(
                    "const tr = document.querySelector(\"#tiers tr[data-partition='0']\");
                     if (!tr) return null;
                     return ['memory', 'disk', 'object'].map((k) => ['items', 'bytes'].map((f) => {
                       const td = tr.querySelector(`td[data-tier='${k}'][data-field='${f}']`);
                       return f === 'items' ? Number(td.textContent.replace(/,/g, '')) : Number(td.title.replace(/[^0-9]/g, ''));
                     }));",
                    json!([]),
                )
                .await;
            match v.as_array() {
                Some(rows) => {
                    let mut out = [(0, 0); 3];
                    for (i, r) in rows.iter().enumerate() {
                        out[i] = (r[0].as_u64().expect("items"), r[1].as_u64().expect("bytes"));
                    }
                    out
                }
                None => [(u64::MAX, u64::MAX); 3],
            }
        },
        || async {
            let st = post(&srv, "queue.stats", json!({"queue_name": "orders", "with_tiers": true})).await;
            let p = &st["logicalQueues"][0]["partitions"][0];
            assert!(p["tiers"].is_object(), "queue.stats with_tiers gives tiers: {st}");
            api_tiers(&p["tiers"])
        },
    )
    .await;
    // The dead-lettered items are one click away: the dead-letter queue's items.
    assert_eq!(
        b.js(
            "return document.querySelector('#dead-link').getAttribute('href')",
            json!([])
        )
        .await,
        json!("#/items/orders-dead")
    );
    let card = b.text("#card-oldest .v").await;
    assert!(
        card != "-" && !card.is_empty(),
        "oldest ready item on the queue page: {card}"
    );
    // Settings edit goes through queues.update.
    b.type_into("#set-max_attempts", "7").await;
    b.click_confirm("#save-settings").await;
    b.wait_for(
        "saved",
        "const s = document.querySelector('#status-msg'); return s && s.textContent.includes('saved')",
        json!([]),
    )
    .await;
    let info = c
        .call::<lessor_client::routes::QueuesInfo>(&pb::QueuesInfoRequest {
            queue_name: "orders".into(),
        })
        .await
        .expect("info");
    assert_eq!(info.max_attempts, 7);
    // A cleared field cannot be saved as cleared (an empty value means "unchanged"): the page says so, and shows
    // what is stored, instead of "Settings saved.".
    b.js(
        "document.querySelector('#set-dead_queue').value = ''; return null",
        json!([]),
    )
    .await;
    b.click_confirm("#save-settings").await;
    b.wait_for(
        "cleared field reported",
        "const s = document.querySelector('#status-msg'); return s && s.textContent.includes('dead_queue kept the stored value')",
        json!([]),
    )
    .await;
    assert_eq!(
        b.js(
            "return document.querySelector('#set-dead_queue').value",
            json!([])
        )
        .await,
        json!("orders-dead")
    );
    if shots {
        b.screenshots(&dir, "queue").await;
    }
    // Pause, then resume, through the buttons.
    let paused = |c: Client| async move {
        c.call::<lessor_client::routes::QueuesInfo>(&pb::QueuesInfoRequest {
            queue_name: "orders".into(),
        })
        .await
        .expect("info")
        .paused
    };
    b.click_confirm("#pause").await;
    b.element("#resume").await;
    assert!(paused(c.clone()).await, "paused from the UI");
    b.click_confirm("#resume").await;
    b.element("#pause").await;
    assert!(!paused(c.clone()).await, "resumed from the UI");
    b.assert_clean_console("queue").await;

    // Items: the leased item shows its holder and payload; retry puts it back, complete removes it.
    b.goto(&format!("{ui}#/items/orders/leased")).await;
    let row = format!("tr[data-id='{item}']");
    assert!(b
        .text(&format!("{row} td:nth-child(4)"))
        .await
        .contains("ui-test-worker"));
    b.click(&format!("{row} td button")).await;
    b.wait_for(
        "payload",
        "return document.querySelector('#payload').textContent.includes('sku')",
        json!([]),
    )
    .await;
    b.js(
        "const m = document.querySelector('#mode'); m.value = 'json'; m.dispatchEvent(new Event('change'));",
        json!([]),
    )
    .await;
    b.wait_for(
        "json preview",
        "return document.querySelector('#payload').textContent.includes('\\n  \"sku\"')",
        json!([]),
    )
    .await;
    if shots {
        b.screenshots(&dir, "items").await;
    }
    // Hex: offsets and bytes (`{"` is 7b 22).
    b.js(
        "const m = document.querySelector('#mode'); m.value = 'hex'; m.dispatchEvent(new Event('change'));",
        json!([]),
    )
    .await;
    b.wait_for(
        "hex preview",
        "return document.querySelector('#payload').textContent.startsWith('000000  7b 22')",
        json!([]),
    )
    .await;
    b.click_confirm(&format!("{row} button.retry")).await;
    b.wait_for(
        "retried",
        "return !document.querySelector(arguments[0])",
        json!([row]),
    )
    .await;
    let again = lease(&c, "orders", 3).await;
    // A retried item comes back under a new id with one more attempt.
    let retried = again
        .items
        .iter()
        .find(|i| i.attempts == 2 && String::from_utf8_lossy(&i.bytes).contains("sku"))
        .unwrap_or_else(|| panic!("the retried item is ready again: {again:?}"))
        .id
        .clone();
    b.click("#reload-items").await;
    let row = format!("tr[data-id='{retried}']");
    b.click_confirm(&format!("{row} button.complete")).await;
    b.wait_for(
        "completed",
        "return !document.querySelector(arguments[0])",
        json!([row]),
    )
    .await;
    b.assert_clean_console("items").await;

    // Dead-letter the other two through the API, then redrive them from the UI.
    let ids: Vec<pb::QueueRetryItem> = again
        .items
        .iter()
        .filter(|i| i.attempts == 1)
        .map(|i| pb::QueueRetryItem {
            id: i.id.clone(),
            dead: true,
            ..Default::default()
        })
        .collect();
    c.call::<QueueRetry>(&pb::QueueRetryRequest {
        queue_name: "orders".into(),
        partition: again.partition,
        items: ids,
    })
    .await
    .expect("dead-letter");
    b.goto(&ui).await;
    wait_depth(&b, "orders-dead", "ready", 2).await;
    b.goto(&format!("{ui}#/queue/orders-dead")).await;
    b.click_confirm("#redrive").await;
    // (Leaving the page before the answer could cancel the request.)
    b.wait_for(
        "redrive started",
        "const s = document.querySelector('#status-msg'); return s && s.textContent.includes('done')",
        json!([]),
    )
    .await;
    b.goto(&ui).await;
    wait_depth(&b, "orders", "ready", 2).await;
    wait_depth(&b, "orders-dead", "ready", 0).await;
    b.assert_clean_console("redrive").await;

    // Create a queue, then delete it.
    b.goto(&format!("{ui}#/create")).await;
    b.type_into("#new-name", "made-in-ui").await;
    if shots {
        b.screenshots(&dir, "create").await;
    }
    b.click_confirm("#create-submit").await;
    b.wait_for(
        "created",
        "return location.hash === '#/queue/made-in-ui'",
        json!([]),
    )
    .await;
    c.call::<lessor_client::routes::QueuesInfo>(&pb::QueuesInfoRequest {
        queue_name: "made-in-ui".into(),
    })
    .await
    .expect("created through the UI");
    b.click_confirm("#delete").await;
    b.wait_for("deleted", "return !document.querySelector(\"tr[data-queue='made-in-ui']\") && !!document.querySelector(\"tr[data-queue='orders']\")", json!([])).await;
    assert!(c
        .call::<lessor_client::routes::QueuesInfo>(&pb::QueuesInfoRequest {
            queue_name: "made-in-ui".into(),
        })
        .await
        .is_err());
    b.assert_clean_console("create/delete").await;

    // Clear removes the ready items.
    b.goto(&format!("{ui}#/queue/emails")).await;
    b.click_confirm("#clear").await;
    b.wait_for(
        "cleared",
        "const s = document.querySelector('#status-msg'); return s && s.textContent.includes('done')",
        json!([]),
    )
    .await;
    b.goto(&ui).await;
    wait_depth(&b, "emails", "ready", 0).await;

    // Items are paged: 50 at a time, "Next page" appends the rest.
    lessor_testkit::server::create_queue(&c, "bulk", |_| {}).await;
    let many: Vec<String> = (0..60).map(|i| format!("item-{i}")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    c.queue_produce(&produce("bulk", &many))
        .await
        .expect("produce 60");
    b.goto(&format!("{ui}#/items/bulk/ready")).await;
    b.wait_for(
        "first page",
        "return document.querySelectorAll('#items tr[data-id]').length === 50 && !document.querySelector('#next-page').hidden",
        json!([]),
    )
    .await;
    b.click("#next-page").await;
    b.wait_for(
        "second page",
        "return document.querySelectorAll('#items tr[data-id]').length === 60",
        json!([]),
    )
    .await;
    b.assert_clean_console("items paging").await;

    // Server page.
    b.goto(&format!("{ui}#/server")).await;
    b.wait_for("server info", "return document.querySelector('#server-info') && document.querySelector('#server-info').textContent.includes('pass') && document.querySelector('#server-info').textContent.includes('Partition storage')", json!([])).await;
    // The server page sums the visible queues' tiers.
    assert!(b.text("#server-tiers").await.contains("Memory:"));
    tiers_match(
        "server page tier totals",
        || async {
            let v = b
                .js(
                    "return ['memory', 'disk', 'object'].map((k) => {
                       const e = document.querySelector(`#server-tiers [data-tier='${k}']`);
                       return [Number(e.dataset.items), Number(e.dataset.bytes)];
                     });",
                    json!([]),
                )
                .await;
            let r = v.as_array().expect("three tiers");
            [0, 1, 2].map(|i| (r[i][0].as_u64().expect("items"), r[i][1].as_u64().expect("bytes")))
        },
        || async {
            let o = post(&srv, "queues.overview", json!({})).await;
            let mut sum = [(0, 0); 3];
            for q in o["items"].as_array().expect("items") {
                for (s, t) in sum.iter_mut().zip(api_tiers(&q["tiers"])) {
                    *s = (s.0 + t.0, s.1 + t.1);
                }
            }
            sum
        },
    )
    .await;
    if shots {
        b.screenshots(&dir, "server").await;
    }
    b.assert_clean_console("server").await;

    // Every control has an accessible name.
    let unnamed = b
        .js(
            "return [...document.querySelectorAll('button, input, select, a')].filter(e =>
               !(e.getAttribute('aria-label') || e.textContent.trim() || (e.labels && e.labels.length))).length",
            json!([]),
        )
        .await;
    assert_eq!(unnamed, json!(0));
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_tour_on_memory() {
    tour(Config::memory(), true, "memory").await;
}

#[cfg(feature = "fjall")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_tour_on_fjall() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().to_str().expect("utf-8 path").to_string();
    tour(Config::default_persistent(&path), false, "fjall").await;
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_tour_on_postgres() {
    if lessor_testkit::database_or_skip().is_none() {
        return;
    }
    let db = lessor_testkit::TestDatabase::create("lessor_ui").await;
    tour(
        lessor_testkit::server::postgres_config(db.url()),
        false,
        "postgres",
    )
    .await;
}

/// With auth on: a key scoped to namespace A shows A's queues without anyone typing a namespace (the page asks
/// `auth.whoami`), and never B's; a bad key shows an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_shows_only_what_the_key_may_see() {
    if !browser_available() {
        return;
    }
    let dir = shots_dir();
    let yaml = "queue-storage:\n  driver: memory\n\
                partition-storage:\n  - name: m\n    driver: memory\n    affinity: 1\n\
                auth-backend:\n  driver: internal\n";
    let (srv, admin) = lessor_testkit::server::start(&Config::from_yaml(yaml).expect("config"), None).await;
    for name in ["team-a", "team-b"] {
        admin
            .call::<NamespacesCreate>(&pb::NamespaceInfo {
                name: name.into(),
                ..Default::default()
            })
            .await
            .expect("namespace");
    }
    lessor_testkit::server::create_queue(&admin, "a-jobs", |q| q.namespace = "team-a".into()).await;
    lessor_testkit::server::create_queue(&admin, "b-secret", |q| q.namespace = "team-b".into()).await;
    admin
        .call::<RolesCreate>(&pb::RoleCreateRequest {
            namespace: "team-a".into(),
            name: "operator".into(),
            permissions: ["queue.list", "queue.stats"]
                .iter()
                .map(|p| (*p).to_string())
                .collect(),
        })
        .await
        .expect("role");
    let user = admin
        .call::<UsersCreate>(&pb::UserCreateRequest {
            username: "alice".into(),
            ..Default::default()
        })
        .await
        .expect("user")
        .id;
    admin
        .call::<RoleBindingsCreate>(&pb::RoleBindingCreateRequest {
            namespace: "team-a".into(),
            role_name: "operator".into(),
            user_id: user.clone(),
        })
        .await
        .expect("binding");
    let key = admin
        .call::<ApiKeysCreate>(&pb::APIKeyCreateRequest {
            user_id: user.clone(),
            namespace_scope: "team-a".into(),
            ..Default::default()
        })
        .await
        .expect("key")
        .key;
    // The same user's key without a scope: its only binding is in team-a, so the page picks team-a too.
    let unscoped = admin
        .call::<ApiKeysCreate>(&pb::APIKeyCreateRequest {
            user_id: user,
            ..Default::default()
        })
        .await
        .expect("unscoped key")
        .key;
    let b = Browser::start().await;
    let ui = format!("{}/ui/", srv.endpoint());

    // A bad key: an error is shown, no queue is.
    b.goto(&format!("{ui}#/key")).await;
    b.type_into("#api-key", "lessor-not-a-real-key").await;
    b.click("#key-submit").await;
    let msg = b.text("#status-msg.error").await;
    assert!(
        msg.contains("401") || msg.to_lowercase().contains("not authorised"),
        "{msg}"
    );
    if true {
        b.screenshots(&dir, "bad-key").await;
    }
    b.console_errors().await; // the refused requests are expected here

    // Namespace A's scoped key, and no namespace typed: the overview shows team-a, only A's queue, ever.
    b.goto(&format!("{ui}#/key")).await;
    b.type_into("#api-key", &key).await;
    b.click("#key-submit").await;
    wait_depth(&b, "a-jobs", "ready", 0).await;
    assert_eq!(
        b.js("return document.querySelector('#namespace').value", json!([]))
            .await,
        json!("team-a")
    );
    for _ in 0..3 {
        let body = b.js("return document.body.innerText", json!([])).await;
        assert!(
            !body.to_string().contains("b-secret"),
            "namespace B leaked: {body}"
        );
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    b.assert_clean_console("overview with a namespace key").await;
    // Asking for B's namespace with A's key shows an error, not B's queues.
    b.type_into("#namespace", "team-b").await;
    b.click("form.toolbar button[type=submit]").await;
    b.text("#status-msg.error").await;
    let body = b.js("return document.body.innerText", json!([])).await;
    assert!(
        !body.to_string().contains("b-secret"),
        "namespace B leaked: {body}"
    );
    b.console_errors().await; // the refused request is expected here

    // An unscoped key whose user is bound in team-a only: team-a is picked as well.
    b.goto(&format!("{ui}#/key")).await;
    b.type_into("#api-key", &unscoped).await;
    b.click("#key-submit").await;
    wait_depth(&b, "a-jobs", "ready", 0).await;
    assert_eq!(
        b.js("return document.querySelector('#namespace').value", json!([]))
            .await,
        json!("team-a")
    );
    b.assert_clean_console("overview with an unscoped key").await;
    srv.stop().await;
}

/// A server that reports no storage tiers (one from before them, or a reply without the field): the pages say so
/// ("n/a", "does not report") instead of showing zeros, and nothing breaks. The older server is played by the page
/// itself: its `fetch` drops every `tiers` field from the API's replies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_without_tiers_says_not_reported() {
    if !browser_available() {
        return;
    }
    let (srv, c): (RunningServer, Client) = lessor_testkit::server::start(&Config::memory(), None).await;
    lessor_testkit::server::create_queue(&c, "jobs", |_| {}).await;
    c.queue_produce(&produce("jobs", &["a", "b"]))
        .await
        .expect("produce");
    let b = Browser::start().await;
    b.goto(&format!("{}/ui/#/", srv.endpoint())).await;
    wait_depth(&b, "jobs", "ready", 2).await;
    assert_eq!(overview_tiers(&b, "jobs").await[0].0, 2, "tiers shown first");
    b.js(
        "const orig = window.fetch;
         const strip = (o) => { if (o && typeof o === 'object') { delete o.tiers; Object.values(o).forEach(strip); } };
         window.fetch = async (url, init) => {
           const r = await orig(url, init);
           if (!String(url).startsWith('/v1/')) return r;
           const j = JSON.parse((await r.text()) || '{}');
           strip(j);
           return new Response(JSON.stringify(j), { status: r.status, headers: r.headers });
         };",
        json!([]),
    )
    .await;
    b.wait_for(
        "overview: n/a",
        "const td = document.querySelector(\"tr[data-queue='jobs'] td[data-col='tiers']\"); return td && td.textContent === 'n/a';",
        json!([]),
    )
    .await;
    wait_depth(&b, "jobs", "ready", 2).await;
    // Hash changes keep the page (and its fetch) loaded.
    b.js("location.hash = '#/queue/jobs'", json!([])).await;
    b.wait_for(
        "queue page: not reported",
        "const t = document.querySelector('#tiers'); return !!t && t.textContent.includes('does not report storage tiers') && document.querySelector('#partitions').textContent.startsWith('0');",
        json!([]),
    )
    .await;
    b.js("location.hash = '#/server'", json!([])).await;
    b.wait_for(
        "server page: not reported",
        "const t = document.querySelector('#server-info'); return !!t && t.textContent.includes('not reported by this server');",
        json!([]),
    )
    .await;
    b.assert_clean_console("pages without tiers").await;
    srv.stop().await;
}
