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
}
