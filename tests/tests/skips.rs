//! A SKIP in CI fails the run unless tests/skip-allowlist expects it: checked on the real
//! thing, this test executable run again with `CI=true` and one test that skips.
// Helpers outside `#[test]`s unwrap too: a failed setup step is a failed test.
#![allow(clippy::unwrap_used)]

use std::process::Command;

use tessera_tests::skip_policy::{check, ALLOWLIST};

/// Skips as told by `TESSERA_SKIP_PROBE` (`test|reason`); does nothing without it, so it
/// passes in the normal run.
#[test]
fn skip_probe() {
    let Ok(spec) = std::env::var("TESSERA_SKIP_PROBE") else {
        return;
    };
    let (test, reason) = spec.split_once('|').unwrap();
    tessera_tests::skip(test, reason);
}

/// Runs only `skip_probe` in a child of this executable; returns (success, stderr).
fn probe(ci: Option<&str>, test: &str, reason: &str) -> (bool, String) {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", "skip_probe", "--test-threads=1", "--nocapture"])
        .env("TESSERA_SKIP_PROBE", format!("{test}|{reason}"))
        .env_remove("CI");
    if let Some(v) = ci {
        cmd.env("CI", v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn an_unlisted_skip_fails_in_ci_and_only_there() {
    let (ok, err) = probe(Some("true"), "made_up_test", "needs a unicorn");
    assert!(!ok, "an unlisted SKIP passed under CI=true:\n{err}");
    assert!(err.contains("SKIP: made_up_test: needs a unicorn"), "{err}");
    assert!(err.contains("tests/skip-allowlist"), "{err}");

    // Outside CI a skip is reported and passes.
    let (ok, err) = probe(None, "made_up_test", "needs a unicorn");
    assert!(ok, "{err}");
    assert!(err.contains("SKIP: made_up_test: needs a unicorn"), "{err}");
    let (ok, err) = probe(Some("false"), "made_up_test", "needs a unicorn");
    assert!(ok, "{err}");
}

#[test]
fn a_listed_skip_passes_in_ci_only_for_its_listed_reason() {
    let test = "stock_linux_boots_to_init_and_uses_its_virtio_disk";
    let (ok, err) = probe(
        Some("true"),
        test,
        "no hardware virtualization (/proc/cpuinfo has no vmx or svm flag)",
    );
    assert!(ok, "{err}");
    // The same test skipping for another reason is not what the list expects.
    let (ok, err) = probe(Some("true"), test, "needs root");
    assert!(!ok, "{err}");
}

#[test]
fn the_policy_matches_name_and_reason() {
    let list = "# comment\n\nsome_test   lacks a thing   # note\n";
    assert!(check("some_test", "this host lacks a thing here", list).is_ok());
    assert!(check("some_test", "needs root", list).is_err());
    assert!(check("other_test", "lacks a thing", list).is_err());
    assert!(check("some", "lacks a thing", list).is_err());
}

/// Every entry names a test that exists and gives a reason, so the list cannot keep a
/// stale permission for a test renamed since.
#[test]
fn every_allow_list_entry_names_an_existing_test() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut sources = String::new();
    let mut dirs = vec![root.join("tests/tests")];
    for c in std::fs::read_dir(root.join("crates")).unwrap() {
        let c = c.unwrap().path();
        dirs.push(c.join("tests"));
        dirs.push(c.join("src"));
    }
    let mut stack = dirs;
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                sources.push_str(&std::fs::read_to_string(&p).unwrap());
            }
        }
    }
    let mut n = 0;
    for line in ALLOWLIST.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let entry = line.split_once(" #").map_or(line, |(e, _)| e).trim();
        let (name, reason) = entry
            .split_once(char::is_whitespace)
            .unwrap_or_else(|| panic!("allow-list entry without a reason: {line}"));
        assert!(!reason.trim().is_empty(), "{line}");
        assert!(
            sources.contains(&format!("fn {name}(")),
            "tests/skip-allowlist lists {name}, which is no test any more"
        );
        n += 1;
    }
    assert!(n >= 1);
}
