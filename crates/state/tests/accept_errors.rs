//! The node-to-node port survives running out of file descriptors: a failed accept
//! (`EMFILE`) is retried, and once descriptors are free again a fresh caller is answered.
//! It lowers its process's descriptor limit with `prlimit`, which would starve the other
//! tests of this binary running beside it: so the test runs this binary again, as a child
//! process running this one test alone, and the child lowers its own limit.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::Duration;

use tessera_state::Node;

fn set_nofile(limit: &str) {
    let out = Command::new("prlimit")
        .args([
            "--pid",
            &std::process::id().to_string(),
            &format!("--nofile={limit}"),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "prlimit: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// This process's soft limit on open files.
fn soft_nofile() -> String {
    let out = Command::new("prlimit")
        .args([
            "--pid",
            &std::process::id().to_string(),
            "--nofile",
            "--noheadings",
            "--raw",
            "-o",
            "SOFT",
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// One read-index request on a fresh connection; the answer line, if any within 5 s.
fn ask(addr: SocketAddr) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"{\"rpc\":\"read_index\"}\n")?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    Ok(line)
}

/// Set in the child process, which runs the test's body.
const IN_CHILD: &str = "TESSERA_STATE_TEST_DESCRIPTORS_CHILD";

#[test]
fn the_raft_port_serves_again_after_descriptors_ran_out() {
    if std::env::var_os(IN_CHILD).is_some() {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
            .block_on(serves_again_after_descriptors_ran_out());
        return;
    }
    // This test's name as the harness knows it: the module path without the crate.
    let name = format!(
        "{}::the_raft_port_serves_again_after_descriptors_ran_out",
        module_path!().split_once("::").unwrap().1
    );
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", &name, "--test-threads", "1", "--nocapture"])
        .env(IN_CHILD, "1")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "the child run failed:\n{text}");
    // The filter matched: the body ran (not zero tests).
    assert!(text.contains("test result: ok. 1 passed"), "{text}");
}

async fn serves_again_after_descriptors_ran_out() {
    // prlimit (util-linux) is part of the test machine; without it the test fails.
    let dir = tempfile::tempdir().unwrap();
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let node = Node::start(1, addr, dir.path(), None, None).await.unwrap();
    let before = tokio::task::spawn_blocking(move || ask(addr))
        .await
        .unwrap();
    assert!(
        before.unwrap().contains("leader"),
        "no answer before the test"
    );

    let soft = soft_nofile();
    let held = tokio::task::spawn_blocking(move || {
        set_nofile(&format!("{}:", open_fds() + 16));
        // Connect until the process is out of descriptors (each connection costs one
        // here and one in the server once accepted) ...
        let mut held = Vec::new();
        while let Ok(s) = TcpStream::connect(addr) {
            held.push(s);
            assert!(held.len() < 1000, "the descriptor limit did not bind");
        }
        // ... then free one for a last connection, which the server cannot accept.
        held.pop();
        if let Ok(s) = TcpStream::connect(addr) {
            held.push(s);
        }
        std::thread::sleep(Duration::from_millis(300));
        held
    })
    .await
    .unwrap();
    drop(held);
    set_nofile(&format!("{soft}:"));
    let after = tokio::task::spawn_blocking(move || ask(addr))
        .await
        .unwrap();
    assert!(
        after.as_ref().is_ok_and(|l| l.contains("leader")),
        "the Raft port no longer answers after running out of descriptors: {after:?}"
    );
    drop(node);
}
