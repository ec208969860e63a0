//! Spin's Redis key-value backend (`crates/key-value-redis/src/store.rs` in spinframework/spin,
//! the same at v4.0.2 and on main), against a real Redis server, with the same commands and the
//! same client crate:
//! - `get`/`set`/`delete`/`exists` are `GET`/`SET`/`DEL`/`EXISTS`; the store label is ignored
//!   (every label of a Redis URL shares its keys);
//! - `get-keys` and `list-keys` are `KEYS *`;
//! - `increment` is `INCRBY`: the counter is stored as ASCII decimal, and incrementing a value
//!   that is not one is an error the guest sees;
//! - `get-many` sends `KEYS` with the requested keys as patterns (as Spin does), which Redis
//!   refuses for more than one key; `set-many` is `MSET`, `delete-many` is `DEL`;
//! - compare-and-swap: `cas.new` opens a dedicated connection, `current()` sends `WATCH key`
//!   and `GET key`, and `swap` sends `MULTI`/`SET`/`EXEC` and then `UNWATCH key`. Redis refuses
//!   `UNWATCH` with an argument, and Spin returns that error as `cas-failed`: **every swap is
//!   reported as failed, whether its `EXEC` applied the write or not** (`EXEC` aborted by the
//!   `WATCH` is not an error for the client either). A guest must read the key back to know.

use std::sync::Mutex;

use redis::{Commands, Connection};

use crate::key_value::SwapError;

/// A Redis-backed store: the server's URL and a few idle connections.
pub struct RedisStore {
    client: redis::Client,
    idle: Mutex<Vec<Connection>>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("addr", &self.client.get_connection_info().addr())
            .finish()
    }
}

fn err(e: redis::RedisError) -> String {
    format!("{e:?}")
}

/// Idle connections kept per store; more are opened while requests overlap.
const MAX_IDLE: usize = 8;

impl RedisStore {
    /// Connect to `url` (`redis://host:port[/db]`); fails when the server does not answer.
    pub fn open(url: &str) -> anyhow::Result<RedisStore> {
        let client = redis::Client::open(url)
            .map_err(|e| anyhow::anyhow!("invalid Redis URL {url:?}: {e}"))?;
        let mut conn = client
            .get_connection()
            .map_err(|e| anyhow::anyhow!("connecting to Redis at {url:?}: {e}"))?;
        redis::cmd("PING")
            .exec(&mut conn)
            .map_err(|e| anyhow::anyhow!("Redis at {url:?} does not answer PING: {e}"))?;
        Ok(RedisStore {
            client,
            idle: Mutex::new(vec![conn]),
        })
    }

    /// Run `f` on a pooled connection. A connection that failed is dropped, not pooled.
    fn with<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> redis::RedisResult<T>,
    ) -> Result<T, String> {
        let pooled = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let mut conn = match pooled {
            Some(c) => c,
            None => self.client.get_connection().map_err(err)?,
        };
        let out = f(&mut conn).map_err(err);
        if out.is_ok() {
            let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
            if idle.len() < MAX_IDLE {
                idle.push(conn);
            }
        }
        out
    }

    pub fn get(&self, key: &str) -> Result<Option<Vec<u8>>, String> {
        self.with(|c| c.get(key))
    }

    pub fn set(&self, key: &str, value: &[u8]) -> Result<(), String> {
        self.with(|c| c.set(key, value))
    }

    pub fn delete(&self, key: &str) -> Result<(), String> {
        self.with(|c| c.del(key))
    }

    pub fn exists(&self, key: &str) -> Result<bool, String> {
        self.with(|c| c.exists(key))
    }

    /// `KEYS *`, as Spin's `get_keys`.
    pub fn keys(&self) -> Result<Vec<String>, String> {
        self.with(|c| c.keys("*"))
    }

    pub fn key_count(&self) -> Result<usize, String> {
        self.with(|c| redis::cmd("DBSIZE").query(c))
    }

    /// Every key by `SCAN` (does not block the server), sorted: for tests that inspect.
    pub fn scan_keys(&self) -> Result<Vec<String>, String> {
        let mut keys: Vec<String> = self.with(|c| c.scan::<String>()?.collect())?;
        keys.sort();
        Ok(keys)
    }

    /// What Spin's Redis `get_many` sends: `KEYS` with the keys as patterns, its answer read as
    /// key/value pairs. Redis refuses more than one pattern, and one pattern's answer (key
    /// names) does not read as pairs, so this fails as it does under Spin.
    pub fn get_many(&self, keys: &[String]) -> Result<crate::key_value::KeyValues, String> {
        self.with(|c| redis::cmd("KEYS").arg(keys).query(c))
    }

    pub fn set_many(&self, pairs: &[(String, Vec<u8>)]) -> Result<(), String> {
        self.with(|c| c.mset(pairs))
    }

    pub fn delete_many(&self, keys: &[String]) -> Result<(), String> {
        self.with(|c| c.del(keys))
    }

    /// `INCRBY key delta`.
    pub fn increment(&self, key: &str, delta: i64) -> Result<i64, String> {
        self.with(|c| c.incr(key, delta))
    }

    /// A compare-and-swap gets its own connection: `WATCH` is scoped to a connection.
    pub fn new_cas(&self) -> Result<RedisCas, String> {
        Ok(RedisCas {
            conn: self.client.get_connection().map_err(err)?,
        })
    }
}

/// One compare-and-swap in progress.
pub struct RedisCas {
    conn: Connection,
}

impl std::fmt::Debug for RedisCas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RedisCas")
    }
}

impl RedisCas {
    /// `WATCH key`, then `GET key`.
    pub fn current(&mut self, key: &str) -> Result<Option<Vec<u8>>, String> {
        redis::cmd("WATCH")
            .arg(key)
            .exec(&mut self.conn)
            .map_err(err)?;
        self.conn.get(key).map_err(err)
    }

    /// `MULTI`/`SET`/`EXEC`, then `UNWATCH key`, with Spin's error mapping.
    pub fn swap(&mut self, key: &str, value: &[u8]) -> Result<(), SwapError> {
        let res: redis::RedisResult<()> =
            redis::pipe().atomic().set(key, value).query(&mut self.conn);
        redis::cmd("UNWATCH")
            .arg(key)
            .exec(&mut self.conn)
            .map_err(|e| SwapError::CasFailed(format!("{e:?}")))?;
        match res {
            Ok(()) => Ok(()),
            Err(e) => Err(SwapError::CasFailed(format!("{e:?}"))),
        }
    }
}

/// A `redis-server` of its own for a test: started on a free loopback port, without
/// persistence, stopped when dropped. Needs `redis-server` on PATH (`bash scripts/setup-redis`).
pub struct RedisServer {
    child: std::process::Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl RedisServer {
    pub fn start() -> anyhow::Result<RedisServer> {
        use anyhow::Context;
        let mut last_error = None;
        for _ in 0..5 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")?
                .local_addr()?
                .port();
            let dir = tempfile::tempdir()?;
            let child = std::process::Command::new("redis-server")
                .args(["--port", &port.to_string()])
                .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
                .arg("--dir")
                .arg(dir.path())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .context("starting redis-server (install it with `bash scripts/setup-redis`)")?;
            let mut server = RedisServer {
                child,
                port,
                _dir: dir,
            };
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while std::time::Instant::now() < deadline {
                if let Ok(Some(status)) = server.child.try_wait() {
                    last_error = Some(anyhow::anyhow!("redis-server exited: {status}"));
                    break;
                }
                if RedisStore::open(&server.url()).is_ok() {
                    return Ok(server);
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            let _ = server.child.kill();
        }
        Err(last_error.unwrap_or_else(|| anyhow::anyhow!("redis-server did not start")))
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
