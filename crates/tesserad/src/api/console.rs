//! A VM's serial console as a WebSocket (`GET /api/v1/vms/{name}/console`), bridged to
//! the control socket of its VMM on this node: on attach the last 64 KiB of output, then
//! output as it comes (polled every 100 ms) as text messages; what the client sends is
//! typed into the console. Asked of another node, the request is forwarded to the node
//! that runs the VM ([`forward`]).

mod forward;

use std::path::PathBuf;
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use serde_json::json;
use tessera_api::{VmState, VmStatus};

use super::extract::{Auth, Operator, Param, Synced};
use super::{read, ApiError, ErrorBody, St};
use crate::records::table::VMS;
use crate::vmrun::supervisor::{self, RunDir};
use crate::vmrun::VM_STATUS;

/// Scrollback sent on attach.
const SCROLLBACK: usize = 64 * 1024;

/// Attach to a VM's serial console (WebSocket; Operator). Text or binary messages are
/// typed into the console; the VM's output arrives as text messages, first the last
/// 64 KiB. Any node answers: one that does not run the VM forwards the request to the one
/// that does.
#[utoipa::path(get, path = "/api/v1/vms/{name}/console", tag = "vms", operation_id = "vm_console",
    params(("name" = String, Path)),
    security(("token" = []), ("cookie" = [])),
    responses((status = 101, description = "Switching to the WebSocket protocol"),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "The VM is not running"),
        (status = 502, body = ErrorBody, description = "The node that runs the VM cannot be reached"),
        (status = 426, body = ErrorBody, description = "Not a WebSocket request"),
        (status = 503, body = ErrorBody)))]
pub async fn console(
    State(st): St,
    _: Auth<Operator>,
    Param(name): Param<String>,
    n: Synced,
    headers: axum::http::HeaderMap,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    if read::<serde_json::Value>(&n, VMS, &name)?.is_none() {
        return Err(ApiError::not_found(format!("no VM {name}")));
    }
    let status: Option<VmStatus> = read(&n, VM_STATUS, &name)?;
    let Some(s) = status.filter(|s| matches!(s.state, VmState::Running | VmState::Paused)) else {
        return Err(ApiError::conflict(format!("VM {name} is not running")));
    };
    let ws = ws.map_err(|e| {
        ApiError::new(
            StatusCode::UPGRADE_REQUIRED,
            format!("this endpoint is a WebSocket: {e}"),
        )
    })?;
    if s.node != st.me.0 {
        // Forwarded once at most: two nodes that disagree about where it runs must not
        // pass the request back and forth.
        if headers.contains_key(forward::FORWARDED) {
            return Err(ApiError::conflict(format!(
                "VM {name} runs on node {}, not here",
                s.node
            )));
        }
        let addr = read::<serde_json::Value>(&n, crate::vmrun::NODE_API, &s.node)?
            .and_then(|v| v["api"].as_str().and_then(|a| a.parse().ok()))
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    format!(
                        "VM {name} runs on node {}, which has published no API address",
                        s.node
                    ),
                )
            })?;
        let peer = forward::connect(&st.data_dir, &s.node, addr, &name, &headers).await?;
        return Ok(ws
            .on_failed_upgrade(|e| tracing::warn!(error = %e, "console WebSocket upgrade failed"))
            .on_upgrade(move |socket| forward::pipe(socket, peer)));
    }
    let sock = RunDir::new(&st.data_dir, &name).api_socket();
    Ok(ws
        .on_failed_upgrade(|e| tracing::warn!(error = %e, "console WebSocket upgrade failed"))
        .on_upgrade(move |socket| bridge(socket, sock)))
}

async fn call(sock: &std::path::Path, op: serde_json::Value) -> Option<serde_json::Value> {
    let sock = sock.to_path_buf();
    tokio::task::spawn_blocking(move || supervisor::call(&sock, op))
        .await
        .ok()?
        .ok()
}

/// The tail of `s` of at most `max` bytes, cut at a character boundary.
fn tail(s: &str, max: usize) -> &str {
    let mut from = s.len().saturating_sub(max);
    while !s.is_char_boundary(from) {
        from += 1;
    }
    &s[from..]
}

async fn bridge(mut ws: WebSocket, sock: PathBuf) {
    let Some(first) = call(&sock, json!({"type": "serial_read", "since": 0})).await else {
        tracing::warn!(socket = %sock.display(), "console: the VMM's control socket does not answer");
        let _ = ws.send(Message::Close(None)).await;
        return;
    };
    let mut next = first["next"].as_u64().unwrap_or(0);
    let back = tail(first["data"].as_str().unwrap_or(""), SCROLLBACK);
    if !back.is_empty() && ws.send(Message::Text(back.into())).await.is_err() {
        return;
    }
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            msg = ws.recv() => {
                let data = match msg {
                    Some(Ok(Message::Text(t))) => t.to_string(),
                    Some(Ok(Message::Binary(b))) => String::from_utf8_lossy(&b).into_owned(),
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                    _ => return,
                };
                if call(&sock, json!({"type": "serial_write", "data": data})).await.is_none() {
                    break;
                }
            }
            _ = tick.tick() => {
                let Some(r) = call(&sock, json!({"type": "serial_read", "since": next})).await else {
                    break;
                };
                next = r["next"].as_u64().unwrap_or(next);
                let data = r["data"].as_str().unwrap_or("");
                if !data.is_empty() && ws.send(Message::Text(data.into())).await.is_err() {
                    return;
                }
            }
        }
    }
    // The VMM is gone (the VM stopped).
    let _ = ws.send(Message::Close(None)).await;
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixListener;
    use std::sync::{Arc, Mutex};

    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message as Msg;

    /// A stand-in for a VMM's control socket: a console that starts with 70 KiB of
    /// output and answers what is typed with `got:<input>`.
    fn fake_vmm(path: &std::path::Path) {
        let out = Arc::new(Mutex::new(format!("{}TAIL\n", "x".repeat(70 * 1024))));
        let listener = UnixListener::bind(path).unwrap();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let (out, conn) = (out.clone(), conn.unwrap());
                std::thread::spawn(move || {
                    let mut w = conn.try_clone().unwrap();
                    for line in BufReader::new(conn).lines() {
                        let req: serde_json::Value = serde_json::from_str(&line.unwrap()).unwrap();
                        let op = &req["op"];
                        let mut o = out.lock().unwrap();
                        let reply = match op["type"].as_str().unwrap() {
                            "serial_read" => {
                                let since = op["since"].as_u64().unwrap() as usize;
                                serde_json::json!({"v": 1, "ok": {"data": &o[since.min(o.len())..], "next": o.len()}})
                            }
                            "serial_write" => {
                                o.push_str(&format!("got:{}\n", op["data"].as_str().unwrap()));
                                serde_json::json!({"v": 1, "ok": {}})
                            }
                            other => panic!("unexpected {other}"),
                        };
                        writeln!(w, "{reply}").unwrap();
                    }
                });
            }
        });
    }

    #[tokio::test]
    async fn the_console_sends_64_kib_of_scrollback_then_output_and_types_input() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("api.sock");
        fake_vmm(&sock);
        let app = axum::Router::new().route(
            "/console",
            axum::routing::get(move |ws: super::WebSocketUpgrade| {
                let sock = sock.clone();
                async move { ws.on_upgrade(move |s| super::bridge(s, sock)) }
            }),
        );
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(tcp, app).await });
        let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/console"))
            .await
            .unwrap();
        let first = match ws.next().await.unwrap().unwrap() {
            Msg::Text(t) => t.to_string(),
            m => panic!("{m:?}"),
        };
        assert_eq!(first.len(), super::SCROLLBACK);
        assert!(first.ends_with("xTAIL\n"));
        ws.send(Msg::Text("abc".into())).await.unwrap();
        let echoed = tokio::time::timeout(std::time::Duration::from_secs(5), async {
            loop {
                if let Msg::Text(t) = ws.next().await.unwrap().unwrap() {
                    return t.to_string();
                }
            }
        })
        .await
        .unwrap();
        assert_eq!(echoed, "got:abc\n");
    }

    #[test]
    fn the_scrollback_is_cut_at_a_character() {
        assert_eq!(super::tail("abcdef", 3), "def");
        assert_eq!(super::tail("aé", 1), "");
        assert_eq!(super::tail("ab", 10), "ab");
    }
}
