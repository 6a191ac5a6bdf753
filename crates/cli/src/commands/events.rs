//! What happened in the cluster: the latest events, or the live stream.

use std::io::{BufRead, Write};

use anyhow::Context;
use serde_json::Value;

use crate::args::EventCmd;
use crate::client::Client;
use crate::endpoints::{EVENTS, EVENT_STREAM};
use crate::output::{field, utc, Output};

pub fn run(client: &Client, cmd: EventCmd, out: Output) -> anyhow::Result<()> {
    match cmd {
        EventCmd::Ls { limit } => {
            let v = client.call_q(EVENTS, &[], &format!("?limit={limit}"), None)?;
            out.print(&v, |v| {
                for e in v.as_array().into_iter().flatten() {
                    print_event(e);
                }
            });
        }
        EventCmd::Watch => {
            let (_, req) = client.request(EVENT_STREAM, &[], "");
            let r = req
                .call()
                .map_err(|e| anyhow::anyhow!("GET {}: {e}", EVENT_STREAM.1))?;
            let reader = std::io::BufReader::new(r.into_reader());
            for line in reader.lines() {
                let line = line.context("reading the event stream")?;
                // Server-sent events: only `data:` lines carry an event.
                let Some(data) = line.strip_prefix("data:") else {
                    continue;
                };
                let e: Value = serde_json::from_str(data.trim()).unwrap_or(Value::Null);
                if out.is_json() {
                    println!("{e}");
                } else {
                    print_event(&e);
                }
                let _ = std::io::stdout().flush();
            }
        }
    }
    Ok(())
}

fn print_event(e: &Value) {
    println!(
        "{}  {:<18} {:<24} {:<10} {}",
        utc(&e["time_ms"]),
        field(e, "kind"),
        field(e, "target"),
        field(e, "user"),
        field(e, "message")
    );
}
