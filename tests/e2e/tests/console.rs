//! Issue 10: the web console, driven in real headless Chromium (Debian's `chromium` and
//! `chromedriver`, installed by `scripts/setup-browser`) over WebDriver, against the real
//! components in the test host with the Apple simulator. Each page is also saved as a 1280 px
//! screenshot under `docs/screenshots/`.

#[path = "support/webdriver.rs"]
mod webdriver;

use e2e::{seed_location, workspace_root, Env, ADMIN_KEY, READER_KEY};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use webdriver::Session;

/// WebDriver key codes.
const ARROW_DOWN: &str = "\u{E015}";
const ESCAPE: &str = "\u{E00C}";

/// Browser tests share two cores with everything else: one browser at a time.
static ONE_BROWSER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

struct Browser {
    client: Session,
    driver: Child,
    _profile: TempDir,
    downloads: PathBuf,
}

struct TempDir(PathBuf);
impl TempDir {
    fn new(name: &str) -> TempDir {
        let p = workspace_root().join("target/e2e").join(format!(
            "{name}-{}-{}",
            std::process::id(),
            nanos()
        ));
        std::fs::create_dir_all(&p).expect("temp dir");
        TempDir(p)
    }
}
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port()
}

/// Debian ships the real binary under /usr/lib/chromium; /usr/bin/chromium is a wrapper.
fn chromium_binary() -> String {
    for p in ["/usr/lib/chromium/chromium", "/usr/bin/chromium"] {
        if Path::new(p).exists() {
            return p.to_string();
        }
    }
    panic!("chromium is not installed: run bash scripts/setup-browser");
}

/// Whatever happens in a test, the browser and its driver end with it.
impl Drop for Browser {
    fn drop(&mut self) {
        self.client.close_blocking();
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

impl Browser {
    async fn start() -> Browser {
        let port = free_port();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver is not installed: run bash scripts/setup-browser");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let profile = TempDir::new("chromium-profile");
        let downloads = profile.0.join("downloads");
        std::fs::create_dir_all(&downloads).expect("downloads dir");
        let caps = json!({
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium_binary(),
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync",
                    "--disable-dev-shm-usage", "--hide-scrollbars",
                    "--window-size=1280,900",
                    format!("--user-data-dir={}", profile.0.join("data").display()),
                ],
                "prefs": {
                    "download.default_directory": downloads.display().to_string(),
                    "download.prompt_for_download": false,
                },
            },
        });
        let client = Session::new(port, caps)
            .await
            .unwrap_or_else(|e| panic!("WebDriver session with chromium: {e}"));
        client.set_window_size(1280, 900).await.expect("size");
        Browser {
            client,
            driver,
            _profile: profile,
            downloads,
        }
    }

    async fn stop(self) {
        let _ = self.client.close().await;
    }

    async fn js(&self, script: &str) -> Value {
        self.client
            .execute(script)
            .await
            .unwrap_or_else(|e| panic!("script failed: {e}\n{script}"))
    }

    /// Wait until `expr` (a JS expression) is truthy; returns its value.
    async fn until(&self, expr: &str, what: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let v = self
                .js(&format!(
                    "try {{ return ({expr}); }} catch (e) {{ return null; }}"
                ))
                .await;
            let truthy = match &v {
                Value::Null => false,
                Value::Bool(b) => *b,
                Value::Number(n) => n.as_f64() != Some(0.0),
                Value::String(s) => !s.is_empty(),
                _ => true,
            };
            if truthy {
                return v;
            }
            if Instant::now() > deadline {
                let body = self.js("return document.body.innerText").await;
                panic!("timed out waiting for {what} ({expr}); page:\n{body}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn click(&self, css: &str) {
        self.until(
            &format!(
                "document.querySelector({css:?}) && !document.querySelector({css:?}).disabled"
            ),
            &format!("{css} to be clickable"),
        )
        .await;
        self.client
            .find_css(css)
            .await
            .unwrap_or_else(|e| panic!("{css}: {e}"))
            .click()
            .await
            .unwrap_or_else(|e| panic!("click {css}: {e}"));
    }

    async fn click_xpath(&self, xpath: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(e) = self.client.find_xpath(xpath).await {
                if e.is_enabled().await.unwrap_or(false) {
                    e.click()
                        .await
                        .unwrap_or_else(|e| panic!("click {xpath}: {e}"));
                    return;
                }
            }
            assert!(Instant::now() < deadline, "{xpath} never clickable");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn type_into(&self, css: &str, text: &str) {
        self.until(&format!("document.querySelector({css:?})"), css)
            .await;
        let e = self.client.find_css(css).await.expect(css);
        e.clear().await.expect("clear");
        e.send_keys(text).await.expect("type");
    }

    async fn text(&self, css: &str) -> String {
        self.js(&format!(
            "const e = document.querySelector({css:?}); return e ? e.innerText : null;"
        ))
        .await
        .as_str()
        .unwrap_or("")
        .to_string()
    }

    async fn page(&self, hash: &str, ready: &str) {
        self.js(&format!("location.hash = {hash:?};")).await;
        self.until(ready, &format!("page {hash}")).await;
    }

    /// A 1280 px screenshot of the current page, committed under docs/screenshots/.
    async fn screenshot(&self, name: &str) {
        self.client.set_window_size(1280, 900).await.expect("size");
        tokio::time::sleep(Duration::from_millis(300)).await;
        let png = self.client.screenshot().await.expect("screenshot");
        assert!(png.starts_with(b"\x89PNG"), "a PNG");
        let dir = workspace_root().join("docs/screenshots");
        std::fs::create_dir_all(&dir).expect("docs/screenshots");
        std::fs::write(dir.join(format!("{name}.png")), png).expect("write screenshot");
    }

    /// Confirm the open confirmation dialog.
    async fn confirm(&self) {
        self.click("dialog[open] button[data-confirm]").await;
        self.until(
            "!document.querySelector('dialog[open]')",
            "the dialog to close",
        )
        .await;
    }

    async fn sign_in(&self, url: &str, key: &str) {
        self.client.goto(url).await.expect("open the console");
        self.until(
            "!document.getElementById('sign-in').hidden",
            "the sign-in form",
        )
        .await;
        self.type_into("#api-key", key).await;
        self.click("#key-form button[type=submit]").await;
        self.until(
            "!document.getElementById('nav').hidden",
            "the console to open",
        )
        .await;
    }
}

/// Every input, select and textarea on the page has a label (or an aria-label), and nothing
/// relies on a style attribute or inline script (the CSP would block them).
async fn assert_accessible_and_strict(b: &Browser, page: &str) {
    let unlabelled = b
        .js(
            "return [...document.querySelectorAll('input, select, textarea')]
               .filter((e) => e.type !== 'hidden' && !(e.labels && e.labels.length) && !e.getAttribute('aria-label') && !e.getAttribute('aria-labelledby'))
               .map((e) => e.outerHTML);",
        )
        .await;
    assert_eq!(unlabelled, json!([]), "unlabelled controls on {page}");
    let inline = b
        .js("return document.querySelectorAll('[style], script:not([src])').length")
        .await;
    assert_eq!(inline, json!(0), "inline style or script on {page}");
}

/// At 390 px the page itself does not scroll sideways (wide tables scroll inside their box).
async fn assert_fits_narrow(b: &Browser, page: &str) {
    // A phone's viewport (a desktop window has a minimum width in Chromium).
    b.client
        .cdp(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": 390, "height": 844, "deviceScaleFactor": 1, "mobile": true}),
        )
        .await
        .expect("emulate 390 px");
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Nothing outside a table box reaches past the viewport (tables scroll inside their box).
    let wide = b
        .js("return [...document.querySelectorAll('body *')].filter((e) => e.getBoundingClientRect().right > document.documentElement.clientWidth + 1 && !(e.parentElement && e.parentElement.closest('.table-wrap'))).slice(0, 12).map((e) => e.tagName + '.' + e.className + '#' + e.id + ' ' + Math.round(e.getBoundingClientRect().right))")
        .await;
    assert_eq!(wide, json!([]), "{page} at 390 px: too wide");
    b.client
        .cdp("Emulation.clearDeviceMetricsOverride", json!({}))
        .await
        .expect("back to the window");
}

fn write_file(dir: &Path, name: &str, content: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, content).expect("write token file");
    p
}

async fn account_row(env: &Env, id: &str) -> Value {
    let r = env.get(&format!("/api/accounts/{id}")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_serves_pages_with_strict_headers_and_revalidation() {
    let env = Env::start().await;
    let r = env.call("GET", "/", None, None).await;
    assert_eq!(r.status, 200);
    let h = |n: &str| {
        r.headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    assert_eq!(h("content-type"), "text/html; charset=utf-8");
    assert!(r
        .text()
        .contains("<script type=\"module\" src=\"/js/app.js\">"));
    let csp = h("content-security-policy");
    for part in [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "connect-src 'self'",
        "frame-ancestors 'none'",
    ] {
        assert!(csp.contains(part), "{part} in {csp}");
    }
    assert!(
        !csp.contains("unsafe-inline") && !csp.contains("unsafe-eval"),
        "{csp}"
    );
    assert_eq!(h("x-content-type-options"), "nosniff");
    assert_eq!(h("referrer-policy"), "no-referrer");
    assert_eq!(h("cache-control"), "no-cache");
    let etag = h("etag");
    assert!(etag.starts_with('"') && etag.len() > 4, "{etag}");
    assert!(r.headers.get("set-cookie").is_none());

    // Revalidation: the same ETag gets 304 without a body; another gets the file.
    let req = |tag: &str| {
        http::Request::builder()
            .uri("/")
            .header("if-none-match", tag)
            .body(Vec::new())
            .expect("request")
    };
    let not_modified = env.app.handle(req(&etag)).await.expect("304");
    assert_eq!(not_modified.status(), 304);
    assert!(not_modified.body().is_empty());
    assert_eq!(
        not_modified
            .headers()
            .get("etag")
            .and_then(|v| v.to_str().ok()),
        Some(etag.as_str())
    );
    let changed = env.app.handle(req("\"0000\"")).await.expect("200");
    assert_eq!(changed.status(), 200);

    for (path, ty) in [
        ("/console.css", "text/css; charset=utf-8"),
        ("/js/app.js", "text/javascript; charset=utf-8"),
        ("/js/accounts.js", "text/javascript; charset=utf-8"),
        ("/icon.svg", "image/svg+xml"),
    ] {
        let r = env.call("GET", path, None, None).await;
        assert_eq!(r.status, 200, "{path}");
        assert_eq!(
            r.headers.get("content-type").and_then(|v| v.to_str().ok()),
            Some(ty),
            "{path}"
        );
        assert!(r.headers.get("content-security-policy").is_some());
    }
    let missing = env.call("GET", "/nope.js", None, None).await;
    assert_eq!(missing.status, 404);
    assert!(missing.headers.get("content-security-policy").is_some());
    assert_eq!(env.call("POST", "/", None, None).await.status, 405);

    // The API keeps its routes: /api goes to the API components, not to the console.
    let api = env
        .call("GET", "/api/accounts", None, Some(ADMIN_KEY))
        .await;
    assert_eq!(api.status, 200, "{}", api.text());
    assert!(api.json()["accounts"].is_array());
    let unknown = env.call("GET", "/api/nope", None, Some(ADMIN_KEY)).await;
    assert_eq!(unknown.status, 404);
    assert_eq!(unknown.code(), "not_found");
    assert_eq!(
        env.call("GET", "/api/settings", None, Some(ADMIN_KEY))
            .await
            .status,
        200
    );
    let who = env
        .call("GET", "/api/session", None, Some(READER_KEY))
        .await;
    assert_eq!(who.json()["role"], "reader", "{}", who.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_admin_manages_accounts_licenses_and_policies_in_chromium() {
    let _one = ONE_BROWSER.lock().await;
    // One Apple call per slice and one item per Apple page: a refresh takes several slices, so
    // the console shows it running before it ends.
    let env = Env::start_with(vec![("job_slice_apple_calls", "1".into())]).await;
    env.sim.set_page_size(1);
    let token = seed_location(
        &env.sim,
        "Head Office",
        &[("361309726", 5), ("284882215", 2), ("1090", 40)],
        &[("361309726", "FOREIGN1")],
    );
    let files = TempDir::new("console-files");
    let good = write_file(&files.0, "head-office.vpptoken", &token);
    let bad_content = "this is not a server token";
    let url = format!("{}/", env.public_url);
    let b = Browser::start().await;

    // A wrong key is refused with a clear message.
    b.client.goto(&url).await.expect("open");
    b.until("!document.getElementById('sign-in').hidden", "sign-in")
        .await;
    b.type_into("#api-key", "not-the-key").await;
    b.click("#key-form button[type=submit]").await;
    b.until(
        "document.getElementById('api-key-error').innerText.includes('did not accept')",
        "the wrong-key message",
    )
    .await;
    b.type_into("#api-key", ADMIN_KEY).await;
    b.click("#key-form button[type=submit]").await;
    b.until(
        "document.querySelector('#add-account')",
        "the accounts page",
    )
    .await;
    assert_eq!(
        b.js("return [document.cookie, sessionStorage.length]")
            .await,
        json!(["", 1]),
        "the key is in sessionStorage only, no cookie"
    );
    assert_accessible_and_strict(&b, "accounts").await;

    // Add: a bad token file (dropped on the dialog) shows the API's own error beside the field.
    let api_error = env
        .admin(
            "POST",
            "/api/accounts",
            Some(&json!({"name": "Bad", "token": bad_content})),
        )
        .await;
    assert_eq!(api_error.status, 422, "{}", api_error.text());
    let api_message = api_error.json()["error"]["message"]
        .as_str()
        .expect("message")
        .to_string();
    b.click("#add-account").await;
    b.type_into("#account-name", "Head Office").await;
    b.js(&format!(
        "const dt = new DataTransfer();
         dt.items.add(new File([{bad_content:?}], 'broken.vpptoken', {{type: 'text/plain'}}));
         document.getElementById('token-drop').dispatchEvent(new DragEvent('drop', {{dataTransfer: dt, bubbles: true, cancelable: true}}));"
    ))
    .await;
    b.until(
        "document.getElementById('account-token-chosen').innerText.includes('broken.vpptoken')",
        "the dropped file",
    )
    .await;
    b.click("dialog[open] button[type=submit]").await;
    let shown = b
        .until(
            "document.getElementById('account-token-error').innerText",
            "the token error",
        )
        .await;
    assert_eq!(shown.as_str(), Some(api_message.as_str()));
    assert_eq!(
        env.get("/api/accounts").await.json()["accounts"],
        json!([]),
        "nothing added"
    );

    // The real token through the file picker: the row appears with its status.
    b.client
        .find_css("#account-token")
        .await
        .expect("file input")
        .send_keys(&good.display().to_string())
        .await
        .expect("choose file");
    b.until(
        "document.getElementById('account-token-chosen').innerText.includes('head-office.vpptoken')",
        "the chosen file",
    )
    .await;
    b.click("dialog[open] button[type=submit]").await;
    b.until(
        "!document.querySelector('dialog[open]')",
        "the dialog to close",
    )
    .await;
    let accounts = env.get("/api/accounts").await.json();
    let id = accounts["accounts"][0]["id"]
        .as_str()
        .expect("account added")
        .to_string();
    let row = format!("tr[data-account='{id}']");
    b.until(
        &format!("document.querySelector(\"{row} .account-name\")"),
        "the new row",
    )
    .await;
    let api_account = account_row(&env, &id).await;
    assert_eq!(b.text(&format!("{row} .account-name")).await, "Head Office");
    let title = b
        .js(&format!(
            "return document.querySelector(\"{row} .status-icon\").title"
        ))
        .await;
    assert_eq!(title, api_account["status"]["description"]);
    assert!(b.text(&row).await.contains("Head Office"));

    // Refresh from the row menu: confirmation, a progress bar while it runs, then a new time.
    let before = api_account["lastSynchronized"].clone();
    b.js("window.__states = []; new MutationObserver(() => document.querySelectorAll('.job[data-kind=refresh]').forEach((j) => window.__states.push(j.dataset.state + ':' + !!j.querySelector('progress')))).observe(document.body, {subtree: true, childList: true, attributes: true});").await;
    b.click(&format!("{row} button[aria-haspopup=menu]")).await;
    b.click_xpath(&format!(
        "//tr[@data-account='{id}']//button[@role='menuitem' and text()='Refresh']"
    ))
    .await;
    let warning = b.text("dialog[open]").await;
    assert!(warning.contains("every day"), "{warning}");
    b.confirm().await;
    b.until(
        "document.querySelector('.job[data-kind=refresh][data-state=succeeded]')",
        "the refresh to finish",
    )
    .await;
    let states = b.js("return window.__states").await;
    assert!(
        states
            .as_array()
            .is_some_and(|s| s.iter().any(|x| x == "running:true")),
        "a running progress bar was shown: {states}"
    );
    let after = account_row(&env, &id).await["lastSynchronized"].clone();
    assert!(after.is_string() && after != before, "{before} -> {after}");
    let shown_time = b
        .until(
            &format!("document.querySelector(\"{row} .last-sync time\") && document.querySelector(\"{row} .last-sync time\").getAttribute('datetime')"),
            "the new last-sync time",
        )
        .await;
    assert_eq!(shown_time, after);
    b.screenshot("accounts").await;
    assert_fits_narrow(&b, "accounts").await;

    // Keyboard: the row menu opens with ArrowDown and closes with Escape, focus returning.
    let menu_button = b
        .client
        .find_css(&format!("{row} button[aria-haspopup=menu]"))
        .await
        .expect("menu button");
    menu_button.send_keys(ARROW_DOWN).await.expect("open menu");
    assert_eq!(
        b.js("return document.activeElement.getAttribute('role')")
            .await,
        "menuitem"
    );
    b.client
        .active()
        .await
        .expect("focused item")
        .send_keys(ESCAPE)
        .await
        .expect("escape");
    assert_eq!(
        b.js("return document.activeElement.getAttribute('aria-haspopup')")
            .await,
        "menu"
    );

    // Licenses: the simulator's assets with Apple's counts; the CSV downloads.
    b.page(
        "#/licenses",
        "document.querySelectorAll('tr[data-adam]').length === 3",
    )
    .await;
    let api_rows = env.get("/api/licenses").await.json()["licenses"].clone();
    for r in api_rows.as_array().expect("rows") {
        let adam = r["adamId"].as_str().expect("adam");
        let cells = b
            .js(&format!(
                "const tr = document.querySelector('tr[data-adam=\"{adam}\"]');
                 return ['total', 'available', 'inUse'].map((c) => tr.querySelector('[data-col=' + c + ']').innerText);"
            ))
            .await;
        assert_eq!(
            cells,
            json!([
                r["total"].to_string(),
                r["available"].to_string(),
                r["inUse"].to_string()
            ]),
            "{adam}"
        );
    }
    assert!(b
        .text("tr[data-adam='284882215']")
        .await
        .contains("App 284882215"));
    assert_accessible_and_strict(&b, "licenses").await;
    b.click("#license-csv").await;
    let csv_path = b.downloads.join("licenses.csv");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !csv_path.exists() {
        assert!(Instant::now() < deadline, "the CSV was not downloaded");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let csv = std::fs::read_to_string(&csv_path).expect("csv");
    let api_csv = env.get("/api/licenses?format=csv").await.text();
    assert_eq!(csv, api_csv);
    assert!(
        csv.lines().count() >= 4 && csv.contains("361309726"),
        "{csv}"
    );
    // Search narrows the list.
    b.type_into("#license-search", "1090").await;
    b.until(
        "document.querySelectorAll('tr[data-adam]').length === 1",
        "search",
    )
    .await;
    b.js("const s = document.getElementById('license-search'); s.value = ''; s.dispatchEvent(new Event('input'));")
        .await;
    b.until(
        "document.querySelectorAll('tr[data-adam]').length === 3",
        "all rows again",
    )
    .await;
    b.screenshot("licenses").await;
    assert_fits_narrow(&b, "licenses").await;

    // A policy for two devices: the dialog, the result, then the devices in the assignments.
    b.page("#/policies", "document.querySelector('#new-policy')")
        .await;
    b.click("#new-policy").await;
    b.type_into("#policy-name", "Front desk iPads").await;
    b.until(
        "document.querySelector('#policy-assets input[data-adam=\"361309726\"]')",
        "the account's assets",
    )
    .await;
    b.click("#policy-assets input[data-adam='361309726']").await;
    b.type_into("#policy-devices", "IPAD-0001\nIPAD-0002, IPAD-0001")
        .await;
    b.click("dialog[open] button[type=submit]").await;
    b.until(
        "document.querySelector('#policy-result')",
        "the policy result",
    )
    .await;
    let result = b.text("#policy-result").await;
    assert!(result.contains("Saved Front desk iPads"), "{result}");
    b.until(
        "document.querySelector('tr[data-policy=\"front-desk-ipads\"]')",
        "the policy row",
    )
    .await;
    let policy = env.get("/api/policies/front-desk-ipads").await.json();
    assert_eq!(policy["serialNumbers"], json!(["IPAD-0001", "IPAD-0002"]));
    assert_accessible_and_strict(&b, "policies").await;
    b.screenshot("policies").await;
    assert_fits_narrow(&b, "policies").await;
    env.sim_idle().await;

    // Sync (an incremental refresh) brings Apple's assignments in; the drill-down shows them.
    b.page(
        "#/licenses",
        "document.querySelectorAll('tr[data-adam]').length === 3",
    )
    .await;
    b.click("#license-sync").await;
    b.until(
        "document.querySelector('.job[data-kind=refresh]') && !document.querySelector('.job[data-kind=refresh][data-state=running]')",
        "the sync to finish",
    )
    .await;
    assert_eq!(
        b.js("return document.querySelector('.job[data-kind=refresh]').dataset.state")
            .await,
        "succeeded"
    );
    b.click("tr[data-adam='361309726'] a").await;
    b.until(
        "document.querySelector('tr[data-subject=\"IPAD-0001\"]') && document.querySelector('tr[data-subject=\"IPAD-0002\"]')",
        "the policy's devices in the assignments",
    )
    .await;
    assert!(b
        .text("tr[data-subject='IPAD-0001']")
        .await
        .contains("This app"));
    assert!(b
        .text("tr[data-subject='FOREIGN1']")
        .await
        .contains("Another MDM"));
    b.screenshot("license-assignments").await;

    // Delete is refused while the policy uses the account, naming it.
    b.page("#/accounts", &format!("document.querySelector(\"{row}\")"))
        .await;
    let delete = b
        .js(&format!(
            "const d = document.querySelector(\"{row} button.danger\"); return [d.disabled, d.title];"
        ))
        .await;
    assert_eq!(delete[0], true);
    assert!(
        delete[1]
            .as_str()
            .is_some_and(|t| t.contains("Front desk iPads")),
        "{delete}"
    );
    let menu_delete = b
        .js(&format!(
            "return [...document.querySelectorAll(\"{row} [role=menuitem]\")].find((m) => m.innerText === 'Delete').disabled"
        ))
        .await;
    assert_eq!(menu_delete, true);

    // The notification toggle asks Save or Cancel.
    assert_eq!(
        env.get("/api/settings").await.json()["licenseRemovalNotification"],
        false
    );
    b.click("#removal-notification").await;
    b.until(
        "document.querySelector('#save-settings')",
        "Save and Cancel",
    )
    .await;
    b.click("#cancel-settings").await;
    assert_eq!(
        b.js("return document.getElementById('removal-notification').checked")
            .await,
        false
    );
    b.click("#removal-notification").await;
    // Leaving the page with the change unsaved asks too; Save writes it.
    b.js("location.hash = '#/connectors';").await;
    b.until(
        "document.querySelector('dialog[open]') && document.querySelector('dialog[open]').innerText.includes('Save')",
        "the unsaved-changes prompt",
    )
    .await;
    b.click_xpath("//dialog[@open]//button[text()='Save']")
        .await;
    b.until("document.querySelector('.card')", "the connector page")
        .await;
    assert_eq!(
        env.get("/api/settings").await.json()["licenseRemovalNotification"],
        true
    );

    // Connector status.
    let card = b.text(&format!(".card[data-account='{id}']")).await;
    assert!(
        card.contains("This app") && card.contains("Token expiry"),
        "{card}"
    );
    b.until("document.getElementById('app-status')", "the app's health")
        .await;
    assert_accessible_and_strict(&b, "connectors").await;
    b.screenshot("connector-status").await;
    assert_fits_narrow(&b, "connectors").await;

    // Reconcile shows its result.
    b.page("#/accounts", "document.querySelector('#reconcile')")
        .await;
    b.click("#reconcile").await;
    b.confirm().await;
    b.until(
        "document.querySelector('.job[data-kind=reconcile]:not([data-state=running]) .result')",
        "the reconcile result",
    )
    .await;
    let outcome = b.text(".job[data-kind=reconcile] .result").await;
    assert!(outcome.starts_with("Finished."), "{outcome}");

    // Notices and audit.
    b.page("#/activity", "document.querySelector('#audit-h') && document.querySelectorAll('section table').length === 2")
        .await;
    let audit = b.text("section[aria-labelledby=audit-h]").await;
    assert!(
        audit.contains("PUT /api/policies/front-desk-ipads"),
        "{audit}"
    );
    assert_accessible_and_strict(&b, "activity").await;
    b.screenshot("notices-and-audit").await;
    assert_fits_narrow(&b, "activity").await;

    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_reader_key_sees_everything_and_no_enabled_action() {
    let _one = ONE_BROWSER.lock().await;
    let env = Env::start().await;
    let token = seed_location(&env.sim, "Branch", &[("555", 3)], &[("555", "SER-R1")]);
    let id = env.add_account("Branch", &token).await;
    env.refresh(&id).await;
    let r = env
        .admin(
            "PUT",
            "/api/policies/branch",
            Some(&json!({"name": "Branch policy", "accountId": id, "assets": [{"adamId": "555"}], "serialNumbers": ["SER-R2"]})),
        )
        .await;
    assert!(r.status == 201 || r.status == 200, "{}", r.text());
    let b = Browser::start().await;
    b.sign_in(&format!("{}/", env.public_url), READER_KEY).await;
    assert!(b.text("#role-badge").await.contains("Reader"));
    for (hash, ready) in [
        ("#/accounts", "document.querySelector('tr[data-account] .account-name') && document.querySelector('#removal-notification')"),
        ("#/licenses", "document.querySelector('tr[data-adam]')"),
        ("#/policies", "document.querySelector('tr[data-policy]')"),
        ("#/activity", "document.querySelector('#audit-h') && document.querySelector('#deliver-notices')"),
    ] {
        b.page(hash, ready).await;
        let actions = b
            .js("return [...document.querySelectorAll('[data-action]')].map((e) => [e.id || e.innerText, e.disabled])")
            .await;
        let list = actions.as_array().expect("actions");
        assert!(!list.is_empty(), "{hash} has actions");
        let enabled: Vec<&Value> = list.iter().filter(|a| a[1] != true).collect();
        assert!(enabled.is_empty(), "{hash}: enabled for a reader: {enabled:?}");
    }
    // Reads still work: the licenses, the drill-down (navigation is not an action), the CSV.
    b.page("#/licenses", "document.querySelector('tr[data-adam]')")
        .await;
    assert!(
        b.js("return !document.getElementById('license-csv').disabled")
            .await
            == true
    );
    b.page("#/activity", "document.querySelector('#audit-h')")
        .await;
    assert!(b
        .text("section[aria-labelledby=audit-h]")
        .await
        .contains("needs the admin key"));

    // The app going away is said plainly, and a later page load says so too.
    let Env { server, .. } = env;
    drop(server);
    b.js("location.hash = '#/connectors';").await;
    b.until(
        "!document.getElementById('banner').hidden && document.getElementById('banner').innerText.includes('cannot be reached')",
        "the unreachable message",
    )
    .await;
    b.stop().await;
}

/// The adamIds of the rows the licenses page shows, in order.
async fn shown_rows(b: &Browser) -> Vec<String> {
    let v = b
        .js("return [...document.querySelectorAll('tr[data-adam]')].map((t) => t.dataset.adam)")
        .await;
    serde_json::from_value(v).expect("adamIds")
}

/// The `limit` of every licenses-list request the page sent since `window.__api` was reset.
async fn list_limits(b: &Browser) -> Vec<u64> {
    let v = b
        .js("return window.__api.filter((u) => u.includes('/api/licenses?') && !u.includes('format=csv')).map((u) => Number(new URL(u, location.href).searchParams.get('limit')))")
        .await;
    serde_json::from_value(v).expect("limits")
}

/// An account with more assets than a page (450; a page is 50, and a search request of the API
/// reads a bounded part of them): the list shows one page at a time and its Next/Previous walk
/// shows every asset exactly once, in the API's order; a search starts again at the first page
/// and gathers its matches from the API's short pages; an asset far down the list opens with its counts; the policy
/// editor's picker pages, finds an asset beyond its first page by search, and keeps the chosen
/// assets ticked and shown whatever the search.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_pages_an_account_larger_than_a_page_in_chromium() {
    let _one = ONE_BROWSER.lock().await;
    let env = Env::start().await;
    let ids: Vec<String> = (0..450).map(|i| (700_000 + i).to_string()).collect();
    // Nine assets are low on licenses (one left), spread over the list.
    let low = |i: usize| i % 50 == 7;
    let assets: Vec<(&str, u64)> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| (id.as_str(), if low(i) { 1 } else { 40 }))
        .collect();
    let token = seed_location(&env.sim, "District", &assets, &[]);
    let account = env.add_account("District", &token).await;
    env.refresh(&account).await;
    let all = env.get("/api/licenses?limit=1000").await.json();
    assert!(all["nextCursor"].is_null(), "{}", all["nextCursor"]);
    let order: Vec<String> = all["licenses"]
        .as_array()
        .expect("rows")
        .iter()
        .map(|r| r["adamId"].as_str().expect("adamId").to_string())
        .collect();
    let mut sorted = order.clone();
    sorted.sort();
    assert_eq!(sorted, ids, "the API lists every asset once");

    let b = Browser::start().await;
    b.sign_in(&format!("{}/", env.public_url), ADMIN_KEY).await;
    // Every API call the page makes, to check the size of what it asks for.
    b.js("window.__api = []; const f = window.fetch; window.fetch = (u, o) => { window.__api.push(String(u)); return f(u, o); };")
        .await;

    // The list: one page of 50, then Next until the end, each row once.
    b.page(
        "#/licenses",
        "document.querySelectorAll('tr[data-adam]').length > 0 && document.getElementById('license-summary').innerText",
    )
    .await;
    assert_eq!(
        b.js("return document.getElementById('license-prev').disabled")
            .await,
        true,
        "no Previous on the first page"
    );
    let mut seen: Vec<String> = Vec::new();
    let mut sizes = Vec::new();
    loop {
        let rows = shown_rows(&b).await;
        let summary = b.text("#license-summary").await;
        let (from, to) = (seen.len() + 1, seen.len() + rows.len());
        assert!(
            summary.starts_with(&format!("Rows {from}–{to}")),
            "{summary}"
        );
        sizes.push(rows.len());
        seen.extend(rows);
        let last = b
            .js("return document.getElementById('license-next').disabled")
            .await;
        if last == true {
            assert!(
                summary.starts_with(&format!("Rows {from}–{to} of {to}")),
                "{summary}"
            );
            break;
        }
        assert!(
            summary.starts_with(&format!("Rows {from}–{to}, more follow")),
            "{summary}"
        );
        assert!(sizes.len() < 10, "the walk ends");
        b.click("#license-next").await;
        b.until(
            &format!(
                "document.getElementById('license-summary').innerText.startsWith('Rows {}–')",
                to + 1
            ),
            "the next page",
        )
        .await;
    }
    assert_eq!(sizes, [50; 9]);
    assert_eq!(
        b.js("return document.activeElement.id").await,
        "license-prev",
        "the focus leaves the disabled Next for Previous"
    );
    assert_eq!(seen, order, "every asset exactly once, in the API's order");
    let limits = list_limits(&b).await;
    assert!(
        !limits.is_empty() && limits.iter().all(|l| (1..=50).contains(l)),
        "the page asks for a page at a time: {limits:?}"
    );
    assert_accessible_and_strict(&b, "licenses, last page").await;
    assert_fits_narrow(&b, "licenses, last page").await;

    // Previous walks back along the same pages.
    for (from, to) in [(351, 400), (301, 350)] {
        b.click("#license-prev").await;
        b.until(
            &format!("document.getElementById('license-summary').innerText.startsWith('Rows {from}–{to}')"),
            "the page before",
        )
        .await;
        assert_eq!(shown_rows(&b).await, order[from - 1..to]);
    }

    // A search from the seventh page starts again at the first, with every match (the API
    // answers it in short pages: the console asks again until its page is full or nothing
    // follows).
    b.js("window.__api = [];").await;
    b.type_into("#license-search", "70011").await;
    b.until(
        "document.getElementById('license-summary').innerText.startsWith('Rows 1–10')",
        "the search's first page",
    )
    .await;
    let found = shown_rows(&b).await;
    let want: Vec<String> = order
        .iter()
        .filter(|a| a.contains("70011"))
        .cloned()
        .collect();
    assert_eq!(found, want);
    assert_eq!(b.text("#license-summary").await, "Rows 1–10 of 10");
    let asked = b
        .js("return window.__api.filter((u) => u.includes('search=70011')).length")
        .await;
    assert!(
        asked.as_u64().is_some_and(|n| n >= 2),
        "the search's page came from more than one of the API's short pages: {asked}"
    );
    assert_eq!(
        b.js("return [document.getElementById('license-prev').disabled, document.getElementById('license-next').disabled]")
            .await,
        json!([true, true])
    );
    b.js("const s = document.getElementById('license-search'); s.value = ''; s.dispatchEvent(new Event('input'));")
        .await;
    b.until(
        "document.getElementById('license-summary').innerText.startsWith('Rows 1–50')",
        "the first page again",
    )
    .await;

    // The low-license filter, from the second page, starts again at the first too: the nine.
    b.click("#license-next").await;
    b.until(
        "document.getElementById('license-summary').innerText.startsWith('Rows 51–100')",
        "the second page",
    )
    .await;
    b.click("#license-low").await;
    b.until(
        "document.getElementById('license-summary').innerText.startsWith('Rows 1–9 ')",
        "the low-license filter's first page",
    )
    .await;
    assert_eq!(
        b.text("#license-summary").await,
        "Rows 1–9 of 9 · 9 low on licenses"
    );
    let lows: Vec<String> = order
        .iter()
        .filter(|a| a.ends_with("07") || a.ends_with("57"))
        .cloned()
        .collect();
    assert_eq!(shown_rows(&b).await, lows);
    b.click("#license-low").await;
    b.until(
        "document.getElementById('license-summary').innerText.startsWith('Rows 1–50')",
        "the first page without the filter",
    )
    .await;

    // The last asset of the list opens with its counts in one request: the first page of its
    // assignments carries its row of the list.
    let far = order[449].clone();
    b.js("window.__api = [];").await;
    b.page(
        &format!("#/licenses/{account}/{far}/STDQ"),
        "document.querySelector('#page h1') && document.querySelector('#page h1').innerText.startsWith('App ')",
    )
    .await;
    assert_eq!(b.text("#page h1").await, format!("App {far}"));
    let head = b.text("#page p.hint").await;
    let total = if low(ids.iter().position(|i| *i == far).expect("far")) {
        1
    } else {
        40
    };
    assert!(
        head.contains(&format!("total {total}, available {total}")),
        "{head}"
    );
    let asked = b
        .js("return window.__api.filter((u) => u.includes('/api/licenses'))")
        .await;
    let asked: Vec<String> = serde_json::from_value(asked).expect("urls");
    assert!(
        asked.len() == 1
            && asked[0].contains(&format!("/api/licenses/{account}/{far}/assignments?page=0")),
        "one request for the asset's page: {asked:?}"
    );

    // The policy editor's picker: a page of assets, a search the API runs, More for the rest.
    b.page("#/policies", "document.querySelector('#new-policy')")
        .await;
    b.click("#new-policy").await;
    b.type_into("#policy-name", "Lab Macs").await;
    b.until(
        "document.querySelectorAll('#policy-assets input[data-adam]').length === 50 && !document.getElementById('policy-assets-more').hidden",
        "the picker's first page",
    )
    .await;
    assert_accessible_and_strict(&b, "the policy editor").await;
    assert_fits_narrow(&b, "the policy editor").await;
    let first = order[0].clone();
    let beyond = order[80].clone();
    assert!(
        b.js(&format!(
            "return !document.querySelector('#policy-assets input[data-adam=\"{beyond}\"]')"
        ))
        .await
            == true
    );
    b.click(&format!("#policy-assets input[data-adam='{first}']"))
        .await;
    b.type_into("#policy-asset-search", &beyond).await;
    b.until(
        &format!("document.querySelectorAll('#policy-assets input[data-adam]').length === 1 && document.querySelector('#policy-assets input[data-adam=\"{beyond}\"]')"),
        "the search's match",
    )
    .await;
    b.click(&format!("#policy-assets input[data-adam='{beyond}']"))
        .await;
    let chosen = "return [...document.querySelectorAll('#policy-chosen input[data-adam]')].filter((c) => c.checked).map((c) => c.dataset.adam)";
    assert_eq!(b.js(chosen).await, json!([first, beyond]));
    // Back to the whole list: both stay chosen, the one beyond the page shown among the chosen.
    b.js("const s = document.getElementById('policy-asset-search'); s.value = ''; s.dispatchEvent(new Event('input'));")
        .await;
    b.until(
        "document.querySelectorAll('#policy-assets input[data-adam]').length === 50",
        "the picker's first page again",
    )
    .await;
    assert_eq!(b.js(chosen).await, json!([first, beyond]));
    assert_eq!(
        b.js(&format!(
            "return document.querySelector('#policy-assets input[data-adam=\"{first}\"]').checked"
        ))
        .await,
        true
    );
    b.click("#policy-assets-more").await;
    b.until(
        "document.querySelectorAll('#policy-assets input[data-adam]').length === 100",
        "the picker's second page",
    )
    .await;
    assert_eq!(
        b.js(&format!(
            "return document.querySelector('#policy-assets input[data-adam=\"{beyond}\"]').checked"
        ))
        .await,
        true
    );
    b.type_into("#policy-devices", "MAC-0001").await;
    b.click("dialog[open] button[type=submit]").await;
    b.until(
        "document.querySelector('#policy-result')",
        "the policy result",
    )
    .await;
    let policy = env.get("/api/policies/lab-macs").await.json();
    let mut saved: Vec<String> = policy["assets"]
        .as_array()
        .expect("assets")
        .iter()
        .map(|a| a["adamId"].as_str().expect("adamId").to_string())
        .collect();
    saved.sort();
    let mut want = vec![first.clone(), beyond.clone()];
    want.sort();
    assert_eq!(saved, want);

    // Editing it again shows both chosen, though one is not on the picker's first page.
    b.click("tr[data-policy='lab-macs'] button.link").await;
    b.until(
        "document.querySelectorAll('#policy-assets input[data-adam]').length === 50",
        "the picker of the saved policy",
    )
    .await;
    let mut shown: Vec<String> = serde_json::from_value(b.js(chosen).await).expect("chosen");
    shown.sort();
    assert_eq!(shown, want);
    b.stop().await;
}
