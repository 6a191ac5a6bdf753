//! What a migration's task shows, from the source VMM's `migration_status`: the figures,
//! the progress percentage and the words for each phase. Pure, so it is unit-tested.

use serde_json::Value;
use tessera_api::{MigrationPhase, MigrationProgress};

/// The task's figures from the source VMM's status `st`.
pub fn figures(from: &str, to: &str, phase: MigrationPhase, st: &Value) -> MigrationProgress {
    let n = |k: &str| st[k].as_u64().unwrap_or(0);
    MigrationProgress {
        from: from.to_string(),
        to: to.to_string(),
        phase,
        memory_bytes: n("memory_bytes"),
        bytes: n("bytes"),
        iterations: u32::try_from(n("iterations")).unwrap_or(u32::MAX),
        dirty_bytes_per_s: n("dirty_bytes_per_s"),
        bandwidth_bytes_per_s: n("bandwidth_bytes_per_s"),
        remaining_bytes: n("remaining_bytes"),
        expected_downtime_ms: n("expected_downtime_ms"),
        downtime_target_ms: n("downtime_target_ms"),
        converged: st["converged"].as_bool(),
        downtime_ms: st["downtime_ms"].as_u64(),
        total_ms: st["total_ms"].as_u64(),
    }
}

/// The task's progress for the source VMM's phase (`precopy` rises with its rounds).
pub fn percent(vmm_phase: &str, iterations: u32) -> u8 {
    match vmm_phase {
        "connecting" => 15,
        "precopy" => 20 + (iterations.min(5) as u8) * 10,
        "stop_and_copy" => 80,
        "switching_over" | "undecided" => 90,
        "completed" => 100,
        _ => 10,
    }
}

/// What a task log line says when the source VMM enters `vmm_phase`.
pub fn words(vmm_phase: &str, st: &Value) -> Option<String> {
    let n = |k: &str| st[k].as_u64().unwrap_or(0);
    Some(match vmm_phase {
        "connecting" => "connecting to the target VMM (TLS)".into(),
        "precopy" => "sending memory while the guest runs".into(),
        "stop_and_copy" => format!(
            "guest paused after {} round(s): {} KiB left at {} KiB/s, expected downtime {} ms (target {} ms)",
            n("iterations"),
            n("remaining_bytes") / 1024,
            n("bandwidth_bytes_per_s") / 1024,
            n("expected_downtime_ms"),
            n("downtime_target_ms"),
        ),
        "switching_over" => {
            "the target holds the VM; moving the VM and its disk to it".into()
        }
        "completed" => format!(
            "the guest runs on the target: downtime {} ms, {} KiB sent in {} round(s), {} ms in all",
            n("downtime_ms"),
            n("bytes") / 1024,
            n("iterations"),
            n("total_ms"),
        ),
        _ => return None,
    })
}

/// Moments of a switch-over: what, and when on the host's monotonic clock (µs), the
/// clock the VMMs mark their own with (their `migration_status`'s `timeline`).
pub type Marks = Vec<(String, u64)>;

/// Now on the host's monotonic clock, in µs (0 if it cannot be read).
pub fn mono_us() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_or(0, |t| {
        t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1_000
    })
}

/// Appends `what` happening now to `marks`.
pub fn mark(marks: &mut Marks, what: &str) {
    marks.push((what.to_string(), mono_us()));
}

/// The marks in a VMM's `migration_status` `st`, each named `<prefix><what>`.
pub fn vmm_marks(st: &Value, prefix: &str) -> Marks {
    st["timeline"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|m| {
                    Some((
                        format!("{prefix}{}", m["what"].as_str()?),
                        m["mono_us"].as_u64()?,
                    ))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The task log line of a switch-over's moments, in time order:
/// `timeline <side>: t0=<host monotonic ms of the first> <what>=+<ms after it> ...`
/// (bench/migrate.py reads it; with both nodes on one host the sides' clocks compare).
pub fn timeline_line(side: &str, marks: &Marks) -> Option<String> {
    let mut m = marks.clone();
    m.sort_by_key(|(_, at)| *at);
    let t0 = m.first()?.1;
    let mut line = format!("timeline {side}: t0={:.3}", t0 as f64 / 1000.0);
    for (what, at) in &m {
        line.push_str(&format!(" {what}=+{:.1}", (at - t0) as f64 / 1000.0));
    }
    Some(line)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_task_shows_the_vmm_figures_and_rises_with_the_phases() {
        let st = json!({
            "phase": "completed", "memory_bytes": 67108864u64, "bytes": 409600, "iterations": 2,
            "dirty_bytes_per_s": 8192, "bandwidth_bytes_per_s": 104857600, "remaining_bytes": 4096,
            "expected_downtime_ms": 0, "downtime_target_ms": 50, "converged": true,
            "downtime_ms": 31, "total_ms": 240,
        });
        let f = figures("a", "b", MigrationPhase::Done, &st);
        assert_eq!(f.bytes, 409600);
        assert_eq!(f.iterations, 2);
        assert_eq!(f.downtime_ms, Some(31));
        assert_eq!(f.converged, Some(true));
        assert_eq!((f.from.as_str(), f.to.as_str()), ("a", "b"));
        let order = [
            percent("", 0),
            percent("connecting", 0),
            percent("precopy", 1),
            percent("precopy", 9),
            percent("stop_and_copy", 9),
            percent("switching_over", 9),
            percent("completed", 9),
        ];
        assert!(order.windows(2).all(|w| w[0] < w[1]), "{order:?}");
        assert_eq!(percent("completed", 0), 100);
        assert!(words("completed", &st).unwrap().contains("downtime 31 ms"));
        assert_eq!(words("failed", &st), None);
    }

    #[test]
    fn a_timeline_line_orders_the_marks_from_both_processes() {
        let st = json!({"timeline": [{"what": "paused", "mono_us": 1_000_000u64},
                                     {"what": "sent", "mono_us": 1_004_500u64}, {"bad": 1}]});
        let mut marks = vmm_marks(&st, "vmm_");
        marks.push(("store_replica".into(), 1_002_000));
        assert_eq!(
            timeline_line("source", &marks).unwrap(),
            "timeline source: t0=1000.000 vmm_paused=+0.0 store_replica=+2.0 vmm_sent=+4.5"
        );
        assert_eq!(timeline_line("source", &Vec::new()), None);
        assert!(mono_us() > 0);
    }
}
