//! What happened in the cluster: the latest events, or the live stream.

use std::io::{BufRead, Write};

use anyhow::Context;
use serde::Deserialize;
use serde_json::Value;
use tessera_api::Event;

use crate::args::EventCmd;
use crate::client::Client;
use crate::endpoints::{EVENTS, EVENT_STREAM};
use crate::output::{utc, Output};

pub fn run(client: &Client, cmd: EventCmd, out: Output) -> anyhow::Result<()> {
    match cmd {
        EventCmd::Ls { limit, user } => {
            let mut q = format!("?limit={limit}");
            if let Some(u) = user {
                q.push_str(&format!(
                    "&user={}",
                    crate::endpoints::fill("{user}", &[&u])
                ));
            }
            let v = client.call_q(EVENTS, &[], &q, None)?;
            out.show(EVENTS, &v, |events: Vec<Event>| {
                events.iter().for_each(print_event)
            })?;
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
                    match Event::deserialize(&e) {
                        Ok(e) => print_event(&e),
                        Err(err) => eprintln!("an event this client cannot read ({err}): {e}"),
                    }
                }
                let _ = std::io::stdout().flush();
            }
        }
    }
    Ok(())
}

fn print_event(e: &Event) {
    println!(
        "{}  {:<18} {:<24} {:<10} {:<15} {}",
        utc(e.time_ms),
        e.kind,
        e.target,
        e.user,
        e.source.as_deref().unwrap_or("-"),
        e.message
    );
}
