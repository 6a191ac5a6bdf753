//! The golden scenarios: every directory under `tests/scenarios/` holds a `cmdlist` (the
//! script, format in `tessera_ha::sim::scenario`) and an `expected_log`; the simulator's
//! log must equal it line for line, and no invariant may break.
//!
//! After a deliberate change of behaviour, re-bless with
//! `TESSERA_HA_BLESS=1 cargo test -p tessera-ha --test scenarios` and review the diff.

use std::fs;
use std::path::{Path, PathBuf};

use tessera_ha::sim::{run, Options, Scenario};

fn scenario_dirs() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/scenarios");
    let mut dirs: Vec<PathBuf> = fs::read_dir(&root)
        .expect("tests/scenarios exists")
        .map(|e| e.expect("readable directory entry").path())
        .filter(|p| p.join("cmdlist").is_file())
        .collect();
    dirs.sort();
    dirs
}

fn load(dir: &Path) -> Scenario {
    let text = fs::read_to_string(dir.join("cmdlist")).expect("cmdlist readable");
    Scenario::parse(&text).unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
}

#[test]
fn every_scenario_produces_its_expected_log() {
    let bless = std::env::var_os("TESSERA_HA_BLESS").is_some();
    let dirs = scenario_dirs();
    let mut failures = Vec::new();
    for dir in &dirs {
        let name = dir
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("?")
            .to_owned();
        let outcome = run(&load(dir), Options::default());
        if !outcome.violations.is_empty() {
            failures.push(format!(
                "{name}: invariants broken:\n  {}",
                outcome.violations.join("\n  ")
            ));
        }
        let got = outcome.log.join("\n") + "\n";
        let path = dir.join("expected_log");
        if bless {
            fs::write(&path, &got).expect("expected_log writable");
            continue;
        }
        let want = fs::read_to_string(&path).unwrap_or_default();
        if got != want {
            let first = got
                .lines()
                .zip(
                    want.lines()
                        .chain(std::iter::repeat("<end of expected_log>")),
                )
                .position(|(g, w)| g != w)
                .unwrap_or(got.lines().count().min(want.lines().count()));
            failures.push(format!(
                "{name}: log differs from expected_log at line {}:\n  got:  {}\n  want: {}\n--- full log ---\n{got}",
                first + 1,
                got.lines().nth(first).unwrap_or("<end of log>"),
                want.lines().nth(first).unwrap_or("<end of expected_log>"),
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    assert!(dirs.len() >= 8, "scenarios missing: {dirs:?}");
}
