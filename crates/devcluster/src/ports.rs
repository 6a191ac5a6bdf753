//! The fixed loopback addresses the nodes listen on, checked free before anything starts:
//! a second local cluster (another terminal's, a benchmark's, a test run's) is refused at
//! once, naming the address and the process holding it, instead of its nodes failing one
//! by one with "Address already in use" in their logs.

use std::net::{Ipv4Addr, SocketAddrV4};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Proto {
    Tcp,
    Udp,
}

/// What each node listens on, at 127.0.0.N (see `write_seed` and the store's arguments).
const LISTENS: [(Proto, u16, &str); 6] = [
    (Proto::Udp, 7946, "discovery"),
    (Proto::Tcp, 7947, "Raft"),
    (Proto::Tcp, 8006, "REST API"),
    (Proto::Tcp, 10809, "NBD"),
    (Proto::Udp, 10809, "QUIC volume export"),
    (Proto::Udp, 7410, "replication"),
];

/// Every address nodes `nodes` (numbers from 1) would listen on that a socket of this
/// machine already holds, in words: the address, what the node would serve there, and
/// the holder (pid and command line) when `/proc` shows it. Read from `/proc/net` only:
/// binding to find out would take the address for a moment from a cluster starting
/// beside it.
pub fn taken(nodes: impl IntoIterator<Item = u8>) -> Vec<String> {
    let tables = Tables::read();
    let mut out = Vec::new();
    for i in nodes {
        for (proto, port, what) in LISTENS {
            let addr = SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, i), port);
            let Some(inode) = tables.holding(proto, addr) else {
                continue;
            };
            let by = owner(&inode)
                .map(|(pid, cmd)| format!(" by pid {pid} ({cmd})"))
                .unwrap_or_default();
            let proto = if proto == Proto::Tcp { "TCP" } else { "UDP" };
            out.push(format!("{addr} ({proto}, node {i}'s {what}): in use{by}"));
        }
    }
    out
}

/// The kernel's socket tables (`/proc/net/{tcp,udp}` and their IPv6 twins), as text.
struct Tables {
    tcp: String,
    udp: String,
}

impl Tables {
    fn read() -> Tables {
        let read = |names: [&str; 2]| {
            names
                .iter()
                .map(|n| std::fs::read_to_string(format!("/proc/net/{n}")).unwrap_or_default())
                .collect::<Vec<_>>()
                .join("\n")
        };
        Tables {
            tcp: read(["tcp", "tcp6"]),
            udp: read(["udp", "udp6"]),
        }
    }

    /// The inode of a socket that keeps `addr` from being bound: a TCP listener, or a bound
    /// UDP socket, on that address or on the port of every address (IPv4 or IPv6).
    fn holding(&self, proto: Proto, addr: SocketAddrV4) -> Option<String> {
        // The kernel writes an address as its 32-bit words in host order, in hex.
        let port = format!(":{:04X}", addr.port());
        let wanted = [
            format!("{:08X}{port}", u32::from_ne_bytes(addr.ip().octets())),
            format!("00000000{port}"),
            format!("{}{port}", "0".repeat(32)),
        ];
        let text = match proto {
            Proto::Tcp => &self.tcp,
            Proto::Udp => &self.udp,
        };
        text.lines().find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (local, state, inode) = (*f.get(1)?, *f.get(3)?, *f.get(9)?);
            // 0A: LISTEN. A TCP socket in another state (a connection, TIME_WAIT) does not
            // keep a listener with SO_REUSEADDR, as the daemons' are, from binding.
            let holds = wanted.iter().any(|w| w == local) && (proto == Proto::Udp || state == "0A");
            holds.then(|| inode.to_string())
        })
    }
}

/// The process with socket `inode` open: pid and command line.
fn owner(inode: &str) -> Option<(u32, String)> {
    let socket = format!("socket:[{inode}]");
    for p in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = p.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        let holds = fds
            .flatten()
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|t| t.as_os_str() == &*socket));
        if holds {
            let cmd = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            return Some((pid, cmd.trim().to_string()));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn a_port_held_here_is_named_with_this_process() {
        // Node 9's REST API address: no test cluster has nine nodes.
        let held = TcpListener::bind("127.0.0.9:8006").unwrap();
        let said = taken([9]);
        let line = said
            .iter()
            .find(|l| l.starts_with("127.0.0.9:8006 (TCP, node 9's REST API)"))
            .unwrap_or_else(|| panic!("{said:?}"));
        assert!(
            line.contains(&format!("by pid {}", std::process::id())),
            "{line}"
        );
        drop(held);
        assert!(!taken([9]).iter().any(|l| l.starts_with("127.0.0.9:8006 ")));
    }

    #[test]
    fn listeners_and_bound_udp_sockets_hold_their_address_or_every_address() {
        let head = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode";
        let line = |local: &str, st: &str, inode: u32| {
            format!("   0: {local} 00000000:0000 {st} 00000000:00000000 00:00000000 00000000     0        0 {inode} 1 0")
        };
        let tables = Tables {
            tcp: [
                head.to_string(),
                // 127.0.0.2:8006 listening; 127.0.0.3:8006 only in TIME_WAIT.
                line("0200007F:1F46", "0A", 11),
                line("0300007F:1F46", "06", 12),
                // [::]:10809 listening: every address.
                line("00000000000000000000000000000000:2A39", "0A", 13),
            ]
            .join("\n"),
            udp: [head.to_string(), line("00000000:1CF2", "07", 14)].join("\n"),
        };
        let at = |i: u8, port: u16| SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, i), port);
        assert_eq!(
            tables.holding(Proto::Tcp, at(2, 8006)).as_deref(),
            Some("11")
        );
        assert_eq!(tables.holding(Proto::Tcp, at(1, 8006)), None);
        assert_eq!(tables.holding(Proto::Tcp, at(3, 8006)), None);
        assert_eq!(
            tables.holding(Proto::Tcp, at(1, 10809)).as_deref(),
            Some("13")
        );
        assert_eq!(tables.holding(Proto::Udp, at(1, 10809)), None);
        // 0.0.0.0:7410 bound over UDP.
        assert_eq!(
            tables.holding(Proto::Udp, at(5, 7410)).as_deref(),
            Some("14")
        );
    }
}
