//! Node health from the management network: every node announces itself five times a
//! second, so silence is measured, not guessed. Up below 1 s of silence, suspect below
//! [`DOWN_AFTER`], down from then on: a cut-off node is reported down within 3 s.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// Silence after which a node is suspect.
pub const SUSPECT_AFTER: Duration = Duration::from_secs(1);
/// Silence after which a node is down (the detection bound).
pub const DOWN_AFTER: Duration = Duration::from_secs(3);

/// The state a silence of `quiet` means.
pub fn state(quiet: Option<Duration>) -> &'static str {
    match quiet {
        Some(q) if q < SUSPECT_AFTER => "up",
        Some(q) if q < DOWN_AFTER => "suspect",
        _ => "down",
    }
}

/// Health of every other registered node (and every node heard), by node id.
pub fn report(me: &str, registered: &Value, heard: &HashMap<String, Instant>) -> Value {
    let mut ids: Vec<String> = heard.keys().cloned().collect();
    if let Some(obj) = registered.as_object() {
        ids.extend(obj.keys().cloned());
    }
    ids.sort();
    ids.dedup();
    let mut out = serde_json::Map::new();
    for id in ids.into_iter().filter(|id| id != me) {
        let quiet = heard.get(&id).map(|t| t.elapsed());
        out.insert(
            id,
            json!({ "state": state(quiet), "silent_ms": quiet.map(|q| q.as_millis() as u64) }),
        );
    }
    Value::Object(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silence_maps_to_states() {
        assert_eq!(state(Some(Duration::from_millis(200))), "up");
        assert_eq!(state(Some(Duration::from_millis(1500))), "suspect");
        assert_eq!(state(Some(Duration::from_secs(4))), "down");
        assert_eq!(state(None), "down");
    }
}
