//! Server-Sent Events read with `curl -N` (a client we did not write), stopped as soon as
//! the test has seen what it waits for: a stream never ends by itself, so reading it to
//! the end would only wait for curl's time limit.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

/// One event of a stream: its `event:`, `id:` and `data:` fields.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SseEvent {
    pub event: String,
    pub id: String,
    pub data: String,
}

/// What was read of a stream: the status line and headers, then the events.
#[derive(Debug)]
pub struct SseRead {
    /// The HTTP status (0 when curl printed none).
    pub status: u16,
    /// The headers, names in lower case.
    pub headers: Vec<(String, String)>,
    pub events: Vec<SseEvent>,
    /// The body's lines as read (an error's JSON, say).
    pub body: String,
}

impl SseRead {
    /// The value of header `name` (lower case), if sent.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Runs `curl` (given its URL, credentials and CA by the caller) with `-s -N -i -m secs`
/// and reads the stream until `done` accepts the events read so far, then ends curl. An
/// answer that is not a stream (an error) is read to its end. Panics when the stream ends
/// (or curl's `secs` run out) before `done` is satisfied, showing what was read.
pub fn read_until(mut curl: Command, secs: u64, done: impl Fn(&[SseEvent]) -> bool) -> SseRead {
    curl.args(["-s", "-N", "-i", "-m", &secs.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    let mut child = curl
        .spawn()
        .unwrap_or_else(|e| panic!("could not run {curl:?}: {e}"));
    let mut read = SseRead {
        status: 0,
        headers: Vec::new(),
        events: Vec::new(),
        body: String::new(),
    };
    let mut in_head = true;
    let mut current = SseEvent::default();
    let mut satisfied = false;
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let Ok(line) = line else { break };
        let line = line.trim_end_matches('\r');
        if in_head {
            if line.starts_with("HTTP/") {
                // A new status line (after a `100 Continue`, say) starts the head again.
                read.status = line
                    .split_whitespace()
                    .nth(1)
                    .and_then(|c| c.parse().ok())
                    .unwrap_or(0);
                read.headers.clear();
            } else if line.is_empty() {
                in_head = false;
            } else if let Some((n, v)) = line.split_once(':') {
                read.headers
                    .push((n.trim().to_ascii_lowercase(), v.trim().to_string()));
            }
            continue;
        }
        read.body.push_str(line);
        read.body.push('\n');
        if line.is_empty() {
            if current != SseEvent::default() {
                read.events.push(std::mem::take(&mut current));
                if done(&read.events) {
                    satisfied = true;
                    break;
                }
            }
            continue;
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "event" => current.event = value.to_string(),
            "id" => current.id = value.to_string(),
            "data" if current.data.is_empty() => current.data = value.to_string(),
            "data" => {
                current.data.push('\n');
                current.data.push_str(value);
            }
            // A comment (`: keep-alive`) or a field we do not use.
            _ => {}
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        satisfied || read.status != 200,
        "the event stream ended (or {secs} s passed) before what was awaited: {read:?}"
    );
    read
}
