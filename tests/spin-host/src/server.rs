//! `spin up`'s HTTP listener: hyper HTTP/1 on a TCP socket, each request through the trigger.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::{http_trigger, AppInner};

/// A running server; dropping it stops accepting and closes connections.
pub struct ServerHandle {
    local_addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl ServerHandle {
    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serve until the task ends (it only ends when stopped).
    pub async fn wait(mut self) {
        let task = std::mem::replace(&mut self.task, tokio::spawn(async {}));
        let _ = task.await;
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        self.task.abort();
    }
}

pub async fn serve(app: Arc<AppInner>, listen: SocketAddr) -> anyhow::Result<ServerHandle> {
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("Unable to listen on {listen}: {e}"))?;
    let local_addr = listener.local_addr()?;
    if let Ok(mut origin) = app.self_origin.lock() {
        *origin = Some(local_addr);
    }
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(accept_loop(app, listener, stopped));
    Ok(ServerHandle {
        local_addr,
        stop,
        task,
    })
}

async fn accept_loop(
    app: Arc<AppInner>,
    listener: TcpListener,
    mut stopped: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stopped.changed() => return,
        };
        let (stream, client) = match accepted {
            Ok(x) => x,
            Err(e) => {
                eprintln!("spin-host: accept failed: {e}");
                continue;
            }
        };
        let app = app.clone();
        let mut conn_stopped = stopped.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let app = app.clone();
                async move {
                    let (parts, body) = req.into_parts();
                    let bytes = match body.collect().await {
                        Ok(c) => c.to_bytes().to_vec(),
                        Err(e) => {
                            return Ok::<_, Infallible>(error_response(&format!(
                                "reading request body: {e}"
                            )))
                        }
                    };
                    let req = http::Request::from_parts(parts, bytes);
                    let resp = match http_trigger::handle(app, req, client).await {
                        Ok(r) => r.map(|b| Full::new(Bytes::from(b))),
                        Err(e) => error_response(&format!("{e:#}")),
                    };
                    Ok(resp)
                }
            });
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                r = conn => if let Err(e) = r {
                    eprintln!("spin-host: connection error: {e}");
                },
                _ = conn_stopped.changed() => {}
            }
        });
    }
}

fn error_response(msg: &str) -> http::Response<Full<Bytes>> {
    eprintln!("spin-host: {msg}");
    let mut r = http::Response::new(Full::new(Bytes::new()));
    *r.status_mut() = http::StatusCode::INTERNAL_SERVER_ERROR;
    r
}
