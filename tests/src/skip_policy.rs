//! Which SKIPs a CI run accepts: the allow-list in `tests/skip-allowlist`, and the check that
//! fails a test which skips in CI (`CI=true`) without being on it.
//!
//! This file has no dependencies so that test crates outside `tessera-tests` (the hostnet
//! netns tests) include it with `#[path]` and share the one list.

/// The allow-list, built into the test executables (cargo rebuilds them when it changes).
pub const ALLOWLIST: &str = include_str!("../skip-allowlist");

/// Whether this run is a CI run: `CI` set to anything but empty, `0` or `false` (CI
/// services set `CI=true`).
pub fn is_ci() -> bool {
    match std::env::var("CI") {
        Ok(v) => !matches!(v.trim().to_ascii_lowercase().as_str(), "" | "0" | "false"),
        Err(_) => false,
    }
}

/// Whether `test` may skip for `reason` under `allowlist`: it must be listed with a text
/// its reason contains. The error says what to do about it.
pub fn check(test: &str, reason: &str, allowlist: &str) -> Result<(), String> {
    for line in allowlist.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let entry = line.split_once(" #").map_or(line, |(e, _)| e).trim();
        let Some((name, expected)) = entry.split_once(char::is_whitespace) else {
            continue;
        };
        if name == test && reason.contains(expected.trim()) {
            return Ok(());
        }
    }
    Err(format!(
        "SKIP in CI: {test} did not run ({reason}) and tests/skip-allowlist does not expect \
         that; make it run here, or list it with the reason if this machine cannot run it"
    ))
}

/// Prints `SKIP: test: reason` on the real standard error (libtest captures `eprint!`, which
/// would hide the line), then, in CI, panics unless the allow-list expects this skip.
pub fn report(test: &str, reason: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "SKIP: {test}: {reason}");
    if is_ci() {
        if let Err(e) = check(test, reason, ALLOWLIST) {
            panic!("{e}");
        }
    }
}
