//! A minimal W3C WebDriver client for the console's browser tests, speaking JSON over HTTP/1.1
//! to Debian's `chromedriver` on the loopback interface.
//!
//! Why not a WebDriver crate: the ones on crates.io bring a second `http`, `url`/ICU and
//! hyper-client features whose unification rebuilds the test host's whole wasmtime tree; the
//! handful of commands below are plain W3C WebDriver (https://www.w3.org/TR/webdriver2/).
//! Each call runs on a blocking thread: the app under test is served from the same runtime.

use base64::Engine;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// The W3C key under which an element reference travels.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

#[derive(Debug)]
pub struct WdError {
    pub status: u16,
    pub error: String,
    pub message: String,
}

impl std::fmt::Display for WdError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.status, self.error, self.message)
    }
}

pub type WdResult<T> = Result<T, WdError>;

fn http(port: u16, method: &str, path: &str, body: Option<&Value>) -> WdResult<(u16, Value)> {
    let io = |e: std::io::Error| WdError {
        status: 0,
        error: "io".into(),
        message: e.to_string(),
    };
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(io)?;
    s.set_read_timeout(Some(Duration::from_secs(120)))
        .map_err(io)?;
    let payload = body.map(|b| b.to_string()).unwrap_or_default();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\nAccept: application/json\r\n"
    );
    if body.is_some() {
        req.push_str("Content-Type: application/json; charset=utf-8\r\n");
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n", payload.len()));
    s.write_all(req.as_bytes()).map_err(io)?;
    s.write_all(payload.as_bytes()).map_err(io)?;
    // chromedriver keeps the connection open: read the head, then Content-Length bytes (or the
    // chunks, or to the end when it says neither).
    let mut raw = Vec::new();
    let mut buf = [0u8; 16384];
    let split = loop {
        if let Some(p) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break p;
        }
        let n = s.read(&mut buf).map_err(io)?;
        if n == 0 {
            return Err(WdError {
                status: 0,
                error: "http".into(),
                message: "connection closed before the response head".into(),
            });
        }
        raw.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let mut body = raw[split + 4..].to_vec();
    let lower = head.to_ascii_lowercase();
    let length = lower
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok());
    let chunked = lower.contains("transfer-encoding: chunked");
    loop {
        let complete = match length {
            Some(len) => body.len() >= len,
            None if chunked => body.windows(5).any(|w| w == b"0\r\n\r\n"),
            None => false,
        };
        if complete {
            break;
        }
        let n = s.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&buf[..n]);
    }
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    if chunked {
        body = dechunk(&body);
    }
    let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    Ok((status, v))
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = b.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size = usize::from_str_radix(
            String::from_utf8_lossy(&b[..eol])
                .split(';')
                .next()
                .unwrap_or("0")
                .trim(),
            16,
        )
        .unwrap_or(0);
        if size == 0 || b.len() < eol + 2 + size {
            return out;
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + size]);
        b = &b[(eol + 4 + size).min(b.len())..];
    }
}

/// One WebDriver session.
#[derive(Clone)]
pub struct Session {
    port: u16,
    id: String,
}

#[derive(Clone)]
pub struct Element {
    session: Session,
    id: String,
}

impl Session {
    /// Start a session with these capabilities (`alwaysMatch`).
    pub async fn new(port: u16, always_match: Value) -> WdResult<Session> {
        let body = json!({"capabilities": {"alwaysMatch": always_match}});
        let v = call(port, "POST".into(), "/session".into(), Some(body)).await?;
        let id = v["sessionId"].as_str().unwrap_or_default().to_string();
        Ok(Session { port, id })
    }

    async fn cmd(&self, method: &str, path: &str, body: Option<Value>) -> WdResult<Value> {
        call(
            self.port,
            method.to_string(),
            format!("/session/{}{path}", self.id),
            body,
        )
        .await
    }

    pub async fn goto(&self, url: &str) -> WdResult<()> {
        self.cmd("POST", "/url", Some(json!({"url": url})))
            .await
            .map(|_| ())
    }

    /// Run `script` (a function body) in the page; returns what it returns.
    pub async fn execute(&self, script: &str) -> WdResult<Value> {
        self.cmd(
            "POST",
            "/execute/sync",
            Some(json!({"script": script, "args": []})),
        )
        .await
    }

    pub async fn find_css(&self, css: &str) -> WdResult<Element> {
        self.find("css selector", css).await
    }

    pub async fn find_xpath(&self, xpath: &str) -> WdResult<Element> {
        self.find("xpath", xpath).await
    }

    async fn find(&self, using: &str, value: &str) -> WdResult<Element> {
        let v = self
            .cmd(
                "POST",
                "/element",
                Some(json!({"using": using, "value": value})),
            )
            .await?;
        Ok(Element {
            session: self.clone(),
            id: v[ELEMENT].as_str().unwrap_or_default().to_string(),
        })
    }

    /// The element that has the focus.
    pub async fn active(&self) -> WdResult<Element> {
        let v = self.cmd("GET", "/element/active", None).await?;
        Ok(Element {
            session: self.clone(),
            id: v[ELEMENT].as_str().unwrap_or_default().to_string(),
        })
    }

    pub async fn set_window_size(&self, width: u32, height: u32) -> WdResult<()> {
        self.cmd(
            "POST",
            "/window/rect",
            Some(json!({"width": width, "height": height})),
        )
        .await
        .map(|_| ())
    }

    /// A Chrome DevTools command through chromedriver (e.g. `Emulation.*`).
    pub async fn cdp(&self, cmd: &str, params: Value) -> WdResult<Value> {
        self.cmd(
            "POST",
            "/goog/cdp/execute",
            Some(json!({"cmd": cmd, "params": params})),
        )
        .await
    }

    /// A PNG of the viewport.
    pub async fn screenshot(&self) -> WdResult<Vec<u8>> {
        let v = self.cmd("GET", "/screenshot", None).await?;
        base64::engine::general_purpose::STANDARD
            .decode(v.as_str().unwrap_or_default())
            .map_err(|e| WdError {
                status: 0,
                error: "base64".into(),
                message: e.to_string(),
            })
    }

    /// End the session (chromedriver quits the browser) without a runtime: for `Drop`.
    pub fn close_blocking(&self) {
        let _ = http(self.port, "DELETE", &format!("/session/{}", self.id), None);
    }

    pub async fn close(&self) -> WdResult<()> {
        call(
            self.port,
            "DELETE".into(),
            format!("/session/{}", self.id),
            None,
        )
        .await
        .map(|_| ())
    }
}

impl Element {
    async fn cmd(&self, method: &str, what: &str, body: Option<Value>) -> WdResult<Value> {
        self.session
            .cmd(method, &format!("/element/{}{what}", self.id), body)
            .await
    }

    pub async fn click(&self) -> WdResult<()> {
        self.cmd("POST", "/click", Some(json!({})))
            .await
            .map(|_| ())
    }

    pub async fn clear(&self) -> WdResult<()> {
        self.cmd("POST", "/clear", Some(json!({})))
            .await
            .map(|_| ())
    }

    /// Type text (or WebDriver key codes such as "\u{E015}" for ArrowDown); for a file input,
    /// the path of the file to choose.
    pub async fn send_keys(&self, text: &str) -> WdResult<()> {
        self.cmd("POST", "/value", Some(json!({"text": text})))
            .await
            .map(|_| ())
    }

    pub async fn is_enabled(&self) -> WdResult<bool> {
        Ok(self.cmd("GET", "/enabled", None).await?.as_bool() == Some(true))
    }
}

async fn call(port: u16, method: String, path: String, body: Option<Value>) -> WdResult<Value> {
    let (status, v) =
        tokio::task::spawn_blocking(move || http(port, &method, &path, body.as_ref()))
            .await
            .map_err(|e| WdError {
                status: 0,
                error: "join".into(),
                message: e.to_string(),
            })??;
    if status != 200 {
        return Err(WdError {
            status,
            error: v["value"]["error"].as_str().unwrap_or("unknown").into(),
            message: v["value"]["message"].as_str().unwrap_or("").into(),
        });
    }
    Ok(v["value"].clone())
}
