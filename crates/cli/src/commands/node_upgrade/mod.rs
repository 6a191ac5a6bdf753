//! `tessera node upgrade`: nodes booted from the node image get a new image's root file
//! system, one node at a time: drained (maintenance mode), the image sent to the node's
//! own API, the node followed through its reboot until it runs the new slot healthy (or
//! went back to its old slot by itself), taken out of maintenance, then the next node.
//! Before each node it waits until the cluster is whole (`plan`): the previous node back,
//! every store healthy, every volume's copies in sync, so a node's reboot never costs
//! the cluster its quorum; the cluster is asked through any node's API that answers.
//! It stops at the first node that does not come back on the new slot. The image's
//! blake3 (`IMAGE.b3` beside it, as `image/build` and `b3sum` write it) is checked here
//! before anything is sent, and sent with the image: the node checks it again.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tessera_api::{
    ClusterStatus, MaintenanceRequest, NodeInfo, NodeUpgradeStatus, UpgradeState, VolumeView,
};

use crate::client::{CallFailed, Client};
use crate::endpoints::{
    CLUSTER, NODES, NODE_MAINTENANCE, NODE_UPGRADE, NODE_UPGRADE_STATUS, VOLUMES,
};
use crate::node_names::NodeNames;
use crate::output::Output;

mod plan;
use plan::{Readiness, View};

/// What `node upgrade` was asked.
pub struct Upgrade<'a> {
    pub nodes: &'a [String],
    pub image: &'a Path,
    pub tries: Option<u32>,
    /// How long one node may take from the image sent to healthy on the new slot.
    pub timeout: Duration,
    /// Skip the drain (the node's VMs stop with its reboot).
    pub no_drain: bool,
    /// How long to wait, before each node, for the cluster to be whole.
    pub settle: Duration,
}

pub fn run(client: &Client, up: Upgrade, out: Output) -> anyhow::Result<()> {
    let len = std::fs::metadata(up.image)
        .with_context(|| format!("reading {}", up.image.display()))?
        .len();
    let blake3 = checked_blake3(up.image)?;
    let show = !out.is_json();
    let nodes: Vec<NodeInfo> = client.get(NODES, &[])?;
    let names = NodeNames::new(&nodes);
    let ids: Vec<(String, String)> = up
        .nodes
        .iter()
        .map(|g| (g.clone(), names.resolve(g)))
        .collect();
    plan::check_order(&ids).map_err(anyhow::Error::msg)?;
    // The API given first, then every node's own: while a node reboots, the cluster is
    // asked through the first of them that answers (the one given may be rebooting).
    let mut apis = vec![client.api().trim_end_matches('/').to_string()];
    for n in &nodes {
        let a = own_api(client, n);
        if !apis.contains(&a) {
            apis.push(a);
        }
    }
    let mut done = Vec::new();
    for (i, (given, id)) in ids.iter().enumerate() {
        match upgrade_one(client, &apis, &up, given, id, (len, &blake3), show) {
            Ok(s) => done.push(s),
            Err(e) => {
                let list = |v: &[(String, String)]| {
                    let v: Vec<&str> = v.iter().map(|(g, _)| g.as_str()).collect();
                    if v.is_empty() {
                        "none".to_string()
                    } else {
                        v.join(", ")
                    }
                };
                return Err(e.context(format!(
                    "stopped at {given} (upgraded: {}; not touched: {})",
                    list(&ids[..i]),
                    list(&ids[i + 1..])
                )));
            }
        }
    }
    out.print(&serde_json::to_value(&done)?, |_| {});
    Ok(())
}

/// One node: waits for the cluster to be whole, drains the node, sends the image and
/// follows it to healthy on its new slot, takes it out of maintenance.
fn upgrade_one(
    client: &Client,
    apis: &[String],
    up: &Upgrade,
    given: &str,
    id: &str,
    (len, blake3): (u64, &str),
    show: bool,
) -> anyhow::Result<NodeUpgradeStatus> {
    let turn = Turn {
        client,
        apis,
        id,
        given,
        wait: up.settle,
        show,
    };
    let node = settle(&turn)?;
    let own = client.at(own_api(client, &node));
    if !up.no_drain {
        if show {
            println!("{given}: maintenance on, draining its VMs");
        }
        let secs = up.settle.as_secs();
        on_any_api(
            &turn,
            "putting it in maintenance",
            |c| {
                c.send(
                    NODE_MAINTENANCE,
                    &[id],
                    &MaintenanceRequest { enabled: true },
                )
            },
            |why| {
                format!(
                    "{given} could not be put in maintenance within {secs} s: {why}; nothing sent"
                )
            },
        )?;
        let nodes = || {
            on_any_api(
                &turn,
                "following its drain",
                |c| c.get::<Vec<NodeInfo>>(NODES, &[]),
                |why| {
                    format!("no node's API told how {given}'s drain goes within {secs} s: {why}; nothing sent, it stays in maintenance")
                },
            )
        };
        super::nodes::drain(nodes, id, given, show)?;
    }
    let before: NodeUpgradeStatus = own.get(NODE_UPGRADE_STATUS, &[id])?;
    if show {
        println!(
            "{given}: sending {} ({len} bytes) to {} (running {} on slot {})",
            up.image.display(),
            own.api(),
            before.release,
            before.slot
        );
    }
    send(&own, id, up.image, len, blake3, up.tries)?;
    let after = follow(&own, id, given, &before, up.timeout, show)?;
    if !up.no_drain {
        maintenance_off(&turn)?;
    }
    if show {
        println!(
            "{given}: running {} on slot {}{}",
            after.release,
            after.slot,
            if up.no_drain {
                ""
            } else {
                "; out of maintenance"
            }
        );
    }
    Ok(after)
}

/// Takes node `id` out of maintenance through the first API that takes it, asking again
/// for up to the settle time: right after the node came back, its own API (the first
/// asked when it is the one logged in to) answers 503 until it has caught up with the
/// leader, and an election may be under way.
fn maintenance_off(t: &Turn) -> anyhow::Result<()> {
    let (id, given, secs) = (t.id, t.given, t.wait.as_secs());
    on_any_api(
        t,
        "taking it out of maintenance",
        |c| {
            c.send(
                NODE_MAINTENANCE,
                &[id],
                &MaintenanceRequest { enabled: false },
            )
        },
        |why| {
            format!("{given} runs its new slot but could not be taken out of maintenance within {secs} s: {why}")
        },
    )?;
    Ok(())
}

/// `call` through the first of the turn's APIs that answers it. A node not ready or not
/// answering (`plan::ask_again`: no answer, 502-504) is passed over, and all of them are
/// asked again every 3 s for up to the turn's settle time, saying why after "NODE: what:"
/// when it changes; then the run stops with `give_up`. A refusal stops it at once.
fn on_any_api<T>(
    t: &Turn,
    what: &str,
    call: impl Fn(&Client) -> anyhow::Result<T>,
    give_up: impl Fn(&str) -> String,
) -> anyhow::Result<T> {
    let attempt = || {
        let mut last = String::new();
        for a in t.apis {
            match call(&t.client.at(a.clone())) {
                Ok(v) => return Ok(Ok(v)),
                Err(e) if ask_again(&e) => last = format!("{e:#}"),
                Err(e) => return Err(e),
            }
        }
        Ok(Err(last))
    };
    let prefix = format!("{}: {what}:", t.given);
    until_ok(t.wait, t.show.then_some(prefix.as_str()), attempt, give_up)
}

/// Whether the call that failed with `e` is asked again (`plan::ask_again`); an error
/// that is not a failed call (an answer not understood) is not.
fn ask_again(e: &anyhow::Error) -> bool {
    e.downcast_ref::<CallFailed>()
        .is_some_and(|f| plan::ask_again(f.status()))
}

/// Calls `attempt` every 3 s until it gives a value (`Ok(Ok)`), for at most `wait`; a
/// reason to ask again (`Ok(Err)`) is printed after `show`'s prefix when it changes, and
/// is what the run stops with when the time is up (`give_up`); `Err` stops at once.
fn until_ok<T>(
    wait: Duration,
    show: Option<&str>,
    mut attempt: impl FnMut() -> anyhow::Result<Result<T, String>>,
    give_up: impl Fn(&str) -> String,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + wait;
    let mut said = String::new();
    loop {
        let why = match attempt()? {
            Ok(v) => return Ok(v),
            Err(why) => why,
        };
        if let Some(prefix) = show.filter(|_| why != said) {
            println!("{prefix} {why}");
            said.clone_from(&why);
        }
        if Instant::now() >= deadline {
            bail!("{}", give_up(&why));
        }
        std::thread::sleep(Duration::from_secs(3));
    }
}

/// One node's turn: the APIs to ask, the node, how long to wait and whether to say why.
#[derive(Clone, Copy)]
struct Turn<'a> {
    client: &'a Client,
    apis: &'a [String],
    id: &'a str,
    given: &'a str,
    wait: Duration,
    show: bool,
}

/// The first of `apis` that answers.
fn answering(client: &Client, apis: &[String]) -> anyhow::Result<Client> {
    let mut last = None;
    for a in apis {
        let c = client.at(a.clone());
        match c.get::<ClusterStatus>(CLUSTER, &[]) {
            Ok(_) => return Ok(c),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("no API to ask"))).context("no node's API answers")
}

/// Waits until node `id` may go down (the cluster whole: `plan::readiness`), for at most
/// `wait`; then stops saying what is missing, before anything is done to the node.
/// Returns the node as the cluster sees it.
fn settle(t: &Turn) -> anyhow::Result<NodeInfo> {
    let (client, apis, id, given) = (t.client, t.apis, t.id, t.given);
    let (wait, show) = (t.wait, t.show);
    let attempt = || match whole_view(client, apis) {
        Ok((nodes, cluster, volumes)) => {
            let view = View {
                nodes: &nodes,
                cluster: &cluster,
                volumes: &volumes,
            };
            match plan::readiness(id, &view) {
                Readiness::Ready { note } => {
                    if let (true, Some(n)) = (show, note) {
                        println!("{given}: note: {n}");
                    }
                    let node = nodes
                        .into_iter()
                        .find(|n| n.id == id)
                        .with_context(|| format!("no node {given}"))?;
                    Ok(Ok(node))
                }
                Readiness::Stop(why) => bail!("{why}; nothing sent"),
                Readiness::Wait(why) => Ok(Err(why)),
            }
        }
        Err(e) => Ok(Err(format!("{e:#}"))),
    };
    let prefix = format!("{given}: waiting:");
    let secs = wait.as_secs();
    until_ok(wait, show.then_some(prefix.as_str()), attempt, |why| {
        format!("the cluster is not whole after {secs} s: {why}; {given} not touched (not put in maintenance, nothing sent)")
    })
}

/// The nodes, the cluster and the volumes, all from the first API that answers all three.
fn whole_view(
    client: &Client,
    apis: &[String],
) -> anyhow::Result<(Vec<NodeInfo>, ClusterStatus, Vec<VolumeView>)> {
    let cl = answering(client, apis)?;
    let cluster: ClusterStatus = cl.get(CLUSTER, &[])?;
    let nodes: Vec<NodeInfo> = cl.get(NODES, &[])?;
    let volumes: Vec<VolumeView> = cl.get(VOLUMES, &[])?;
    Ok((nodes, cluster, volumes))
}

/// The node's own API: its management address on the API's port.
fn own_api(client: &Client, node: &NodeInfo) -> String {
    let port = client
        .api()
        .rsplit_once(':')
        .and_then(|(_, rest)| rest.split('/').next())
        .filter(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
        .unwrap_or("8006")
        .to_string();
    match node.address.as_str().and_then(|a| a.rsplit_once(':')) {
        Some((host, _)) => format!("https://{host}:{port}"),
        None => client.api().to_string(),
    }
}

/// The image's blake3 from `IMAGE.b3` (b3sum's line: the hash, two spaces, the file name),
/// checked against the image itself: a corrupt or truncated copy is not sent.
fn checked_blake3(image: &Path) -> anyhow::Result<String> {
    let mut sum = image.as_os_str().to_owned();
    sum.push(".b3");
    let sum = std::path::PathBuf::from(sum);
    let text = std::fs::read_to_string(&sum).with_context(|| {
        format!(
            "reading {} (the image's blake3: image/build writes it beside tessera-root.img)",
            sum.display()
        )
    })?;
    let want = text.split_whitespace().next().unwrap_or_default();
    tessera_api::parse_blake3(want).map_err(|e| anyhow::anyhow!("{}: {e}", sum.display()))?;
    let mut hasher = blake3::Hasher::new();
    let file =
        std::fs::File::open(image).with_context(|| format!("opening {}", image.display()))?;
    hasher
        .update_reader(file)
        .with_context(|| format!("reading {}", image.display()))?;
    let got = hasher.finalize().to_hex().to_string();
    if got != want {
        bail!(
            "{}: its blake3 is {got}, not the {want} of {}: the image is corrupt or truncated; nothing sent",
            image.display(),
            sum.display()
        );
    }
    Ok(got)
}

fn send(
    own: &Client,
    id: &str,
    image: &Path,
    len: u64,
    blake3: &str,
    tries: Option<u32>,
) -> anyhow::Result<()> {
    let file =
        std::fs::File::open(image).with_context(|| format!("opening {}", image.display()))?;
    let (path, mut req) = own.request(NODE_UPGRADE, &[id], "");
    req = req
        .set("Content-Type", "application/octet-stream")
        .set("Content-Length", &len.to_string())
        .timeout(Duration::from_secs(3600))
        .query("blake3", blake3);
    if let Some(t) = tries {
        req = req.query("tries", &t.to_string());
    }
    match req.send(file) {
        Ok(_) => Ok(()),
        Err(ureq::Error::Status(code, r)) => {
            let v: serde_json::Value = r.into_json().unwrap_or_default();
            let msg = v["error"].as_str().unwrap_or("no details").to_string();
            bail!("PUT {path}: HTTP {code}: {msg}")
        }
        Err(e) => bail!("PUT {path}: {e}"),
    }
}

/// Follows the node through the upgrade until its record says good (Ok), or fell back or
/// failed (Err, saying so); answers missing while it reboots are expected.
fn follow(
    own: &Client,
    id: &str,
    given: &str,
    before: &NodeUpgradeStatus,
    timeout: Duration,
    show: bool,
) -> anyhow::Result<NodeUpgradeStatus> {
    let deadline = Instant::now() + timeout;
    let mut said = String::new();
    loop {
        let now = own.get::<NodeUpgradeStatus>(NODE_UPGRADE_STATUS, &[id]);
        let line = match &now {
            Ok(s) => s
                .last
                .as_ref()
                .map_or_else(String::new, |r| r.message.clone()),
            Err(_) => "not answering (rebooting)".to_string(),
        };
        if show && line != said && !line.is_empty() {
            println!("{given}: {line}");
            said = line;
        }
        if let Ok(s) = now {
            // A record older than the one we started from is not this upgrade's.
            let fresh = s.last.as_ref().is_some_and(|r| {
                before
                    .last
                    .as_ref()
                    .is_none_or(|b| r.updated_ms > b.updated_ms)
            });
            if let Some(r) = s.last.as_ref().filter(|_| fresh) {
                match r.state {
                    UpgradeState::Good if s.slot == r.to_slot => return Ok(s),
                    UpgradeState::FellBack => bail!(
                        "{given} went back to slot {} ({}): {}",
                        s.slot,
                        s.release,
                        r.message
                    ),
                    UpgradeState::Failed => bail!("{given}: {}", r.message),
                    _ => {}
                }
            }
        }
        if Instant::now() >= deadline {
            bail!(
                "{given} did not come back on its new slot within {} s (last: {said}); it stays in maintenance",
                timeout.as_secs()
            );
        }
        std::thread::sleep(Duration::from_secs(3));
    }
}
