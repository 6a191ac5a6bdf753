//! The scenario format: a small text file of setup lines and timed commands.
//!
//! ```text
//! # comment
//! nodes node1 node2 node3 cpus=8 memory=8192      # capacity of each (MiB)
//! node node4 cpus=2 memory=1024
//! vm web on=node2 ha prio=10 cpus=2 memory=1024 disks=web-root,web-data prefer=node3
//! vm batch on=node1 memory=512 restart=never      # HA off
//! at 1 power node2 off            # also: power NODE on
//! at 5 network node3 off          # the node's link; network NODE on
//! at 7 partition node1 | node2 node3
//! at 9 heal
//! at 11 maintenance node1 on      # maintenance NODE off
//! at 12 capacity node4 cpus=8 memory=8192
//! end 20
//! ```
//! Times are seconds with at most one decimal (the simulator's tick is 100 ms).

use std::fmt;

use crate::model::{Millis, NodeId, Resources, RestartPolicy, VmId, VmSpec, VolumeId};

/// A scripted change of the world.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// Power a node on or off (off: everything on it stops at once).
    Power(NodeId, bool),
    /// A node's network link up or down (down: it hears no one, no one hears it).
    Link(NodeId, bool),
    /// Split the nodes into groups that hear only each other.
    Partition(Vec<Vec<NodeId>>),
    /// One group again.
    Heal,
    /// Maintenance mode on or off.
    Maintenance(NodeId, bool),
    /// A node's capacity changes.
    Capacity(NodeId, Resources),
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let onoff = |b: &bool| if *b { "on" } else { "off" };
        match self {
            Command::Power(n, b) => write!(f, "power {n} {}", onoff(b)),
            Command::Link(n, b) => write!(f, "network {n} {}", onoff(b)),
            Command::Partition(groups) => {
                let g: Vec<String> = groups
                    .iter()
                    .map(|g| g.iter().map(|n| n.0.as_str()).collect::<Vec<_>>().join(" "))
                    .collect();
                write!(f, "partition {}", g.join(" | "))
            }
            Command::Heal => f.write_str("heal"),
            Command::Maintenance(n, b) => write!(f, "maintenance {n} {}", onoff(b)),
            Command::Capacity(n, r) => write!(f, "capacity {n} {r}"),
        }
    }
}

/// A parsed scenario.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Scenario {
    /// Nodes and their capacities, in order.
    pub nodes: Vec<(NodeId, Resources)>,
    /// VMs; those with `placed_on` run there at time 0.
    pub vms: Vec<VmSpec>,
    /// Commands by time (ms), in file order.
    pub commands: Vec<(Millis, Command)>,
    /// When the run ends (ms).
    pub end: Millis,
}

/// A line the parser refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParseError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.message)
    }
}

impl std::error::Error for ParseError {}

fn time(s: &str) -> Result<Millis, String> {
    let (whole, tenths) = match s.split_once('.') {
        Some((w, t)) if t.len() == 1 => (w, t),
        Some(_) => return Err(format!("time {s:?}: at most one decimal")),
        None => (s, "0"),
    };
    let w: Millis = whole
        .parse()
        .map_err(|_| format!("time {s:?} is not a number of seconds"))?;
    let t: Millis = tenths
        .parse()
        .map_err(|_| format!("time {s:?} is not a number of seconds"))?;
    Ok(w * 1000 + t * 100)
}

fn number(key: &str, v: &str) -> Result<u64, String> {
    v.parse().map_err(|_| format!("{key}={v}: not a number"))
}

fn resources(opts: &[&str], mut r: Resources) -> Result<Resources, String> {
    for o in opts {
        match o.split_once('=') {
            Some(("cpus", v)) => r.vcpus = number("cpus", v)?,
            Some(("memory", v)) => r.memory_mib = number("memory", v)?,
            _ => return Err(format!("unknown option {o:?}")),
        }
    }
    Ok(r)
}

fn on_off(s: Option<&&str>) -> Result<bool, String> {
    match s {
        Some(&"on") => Ok(true),
        Some(&"off") => Ok(false),
        _ => Err("expected on or off".into()),
    }
}

impl Scenario {
    fn node(&self, name: &str) -> Result<NodeId, String> {
        self.nodes
            .iter()
            .find(|(n, _)| n.0 == name)
            .map(|(n, _)| n.clone())
            .ok_or_else(|| format!("no node {name:?} (declare it first)"))
    }

    fn vm(&self, words: &[&str]) -> Result<VmSpec, String> {
        let Some((name, opts)) = words.split_first() else {
            return Err("vm needs a name".into());
        };
        let mut spec = VmSpec {
            id: VmId((*name).to_owned()),
            ha: false,
            priority: 0,
            resources: Resources {
                vcpus: 1,
                memory_mib: 256,
            },
            disks: Vec::new(),
            preferred: None,
            restart: RestartPolicy::OnCrash,
            desired_running: true,
            placed_on: None,
        };
        for o in opts {
            match o.split_once('=') {
                None if *o == "ha" => spec.ha = true,
                None if *o == "stopped" => spec.desired_running = false,
                Some(("on", n)) => spec.placed_on = Some(self.node(n)?),
                Some(("prefer", n)) => spec.preferred = Some(self.node(n)?),
                Some(("prio", v)) => {
                    spec.priority = v.parse().map_err(|_| format!("prio={v}: not a number"))?
                }
                Some(("cpus" | "memory", _)) => spec.resources = resources(&[o], spec.resources)?,
                Some(("disks", v)) => {
                    spec.disks = v.split(',').map(|d| VolumeId(d.to_owned())).collect()
                }
                Some(("restart", v)) => {
                    spec.restart = match v {
                        "never" => RestartPolicy::Never,
                        "on-crash" => RestartPolicy::OnCrash,
                        "always" => RestartPolicy::Always,
                        _ => return Err(format!("restart={v}: never, on-crash or always")),
                    }
                }
                _ => return Err(format!("unknown vm option {o:?}")),
            }
        }
        if spec.placed_on.is_none() {
            spec.desired_running = false;
        }
        Ok(spec)
    }

    fn command(&self, words: &[&str]) -> Result<Command, String> {
        match words {
            ["power", n, rest @ ..] => Ok(Command::Power(self.node(n)?, on_off(rest.first())?)),
            ["network", n, rest @ ..] => Ok(Command::Link(self.node(n)?, on_off(rest.first())?)),
            ["maintenance", n, rest @ ..] => {
                Ok(Command::Maintenance(self.node(n)?, on_off(rest.first())?))
            }
            ["capacity", n, rest @ ..] => {
                let node = self.node(n)?;
                Ok(Command::Capacity(
                    node,
                    resources(rest, Resources::default())?,
                ))
            }
            ["heal"] => Ok(Command::Heal),
            ["partition", rest @ ..] => {
                let mut groups = vec![Vec::new()];
                for w in rest {
                    if *w == "|" {
                        groups.push(Vec::new());
                    } else if let Some(g) = groups.last_mut() {
                        g.push(self.node(w)?);
                    }
                }
                if groups.iter().any(Vec::is_empty) || groups.len() < 2 {
                    return Err("partition needs groups separated by |".into());
                }
                Ok(Command::Partition(groups))
            }
            _ => Err(format!("unknown command {:?}", words.join(" "))),
        }
    }

    /// Parses a scenario file's text.
    pub fn parse(text: &str) -> Result<Scenario, ParseError> {
        let mut s = Scenario::default();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.split('#').next().unwrap_or_default();
            let words: Vec<&str> = line.split_whitespace().collect();
            let err = |message: String| ParseError {
                line: i + 1,
                message,
            };
            match words.as_slice() {
                [] => {}
                ["nodes", rest @ ..] | ["node", rest @ ..] => {
                    let (names, opts): (Vec<&str>, Vec<&str>) =
                        rest.iter().partition(|w| !w.contains('='));
                    let r = resources(
                        &opts,
                        Resources {
                            vcpus: 8,
                            memory_mib: 8192,
                        },
                    )
                    .map_err(err)?;
                    for n in names {
                        s.nodes.push((NodeId(n.to_owned()), r));
                    }
                }
                ["vm", rest @ ..] => {
                    let vm = s.vm(rest).map_err(err)?;
                    s.vms.push(vm);
                }
                ["at", t, rest @ ..] => {
                    let at = time(t).map_err(err)?;
                    let c = s.command(rest).map_err(err)?;
                    s.commands.push((at, c));
                }
                ["end", t] => s.end = time(t).map_err(err)?,
                _ => return Err(err(format!("cannot read {:?}", line.trim()))),
            }
        }
        if s.end == 0 {
            return Err(ParseError {
                line: 0,
                message: "no `end` line".into(),
            });
        }
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scenario_reads_back_as_written() {
        let s = Scenario::parse(
            "nodes a b cpus=4 memory=2048\nvm v on=a ha prio=3 disks=x,y memory=512 # c\n\
             at 1.5 partition a | b\nat 2 power b off\nend 10\n",
        )
        .unwrap();
        assert_eq!(s.nodes.len(), 2);
        assert_eq!(
            s.nodes[1].1,
            Resources {
                vcpus: 4,
                memory_mib: 2048
            }
        );
        let v = &s.vms[0];
        assert!(v.ha && v.desired_running);
        assert_eq!(
            (v.priority, v.resources.memory_mib, v.disks.len()),
            (3, 512, 2)
        );
        assert_eq!(s.commands[0].0, 1_500);
        assert_eq!(s.commands[0].1.to_string(), "partition a | b");
        assert_eq!(s.commands[1], (2_000, Command::Power("b".into(), false)));
        assert_eq!(s.end, 10_000);
    }

    #[test]
    fn bad_lines_are_refused_with_their_number() {
        for (text, line) in [
            ("nodes a\nvm v on=zz\nend 1", 2),
            ("nodes a\nat 1.25 power a off\nend 1", 2),
            ("nodes a\nat 1 power a sideways\nend 1", 2),
            ("nodes a\nat 1 partition a |\nend 1", 2),
            ("nodes a\nfly away\nend 1", 2),
            ("nodes a", 0),
        ] {
            let e = Scenario::parse(text).unwrap_err();
            assert_eq!(e.line, line, "{text:?}: {e}");
        }
    }
}
