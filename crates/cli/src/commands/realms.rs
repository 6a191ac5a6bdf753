//! Realms (administrators only): LDAP directories users log in from as `user@realm`.

use anyhow::Context;
use tessera_api::{LoginPolicy, Realm, RealmSynced, RealmTest, RealmTestReply};

use crate::args::RealmCmd;
use crate::client::Client;
use crate::endpoints::{LOGIN_POLICY, LOGIN_POLICY_SET};
use crate::endpoints::{REALM, REALMS, REALM_CREATE, REALM_RM, REALM_SET, REALM_SYNC, REALM_TEST};
use crate::output::{col, table, word, Output};
use crate::prompt::Secrets;

/// A realm's settings from a JSON file (`-`: standard input), as `POST /realms` takes them.
fn read_realm(file: &std::path::Path) -> anyhow::Result<Realm> {
    let text = if file.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin()).context("reading standard input")?
    } else {
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?
    };
    serde_json::from_str(&text).context("the realm's settings (JSON, as in docs/users.md)")
}

pub fn run(client: &Client, cmd: RealmCmd, out: Output) -> anyhow::Result<()> {
    match cmd {
        RealmCmd::Ls => {
            let v = client.call(REALMS, &[], None)?;
            out.show(REALMS, &v, |realms: Vec<Realm>| {
                table(
                    &realms,
                    &[
                        col("REALM", |r: &Realm| r.name.clone()),
                        col("SERVERS", |r: &Realm| r.uris.join(" ")),
                        col("USER BASE", |r: &Realm| r.user_base.clone()),
                        col("GROUPS MAPPED", |r: &Realm| r.group_roles.len().to_string()),
                    ],
                    out.wide(),
                )
            })?;
        }
        RealmCmd::Show { name } => {
            let v = client.call(REALM, &[&name], None)?;
            out.print(&v, |v| {
                println!("{}", serde_json::to_string_pretty(v).unwrap_or_default())
            });
        }
        RealmCmd::Create { file } => {
            let r = read_realm(&file)?;
            let v = client.send(REALM_CREATE, &[], &r)?;
            out.print(&v, |_| println!("created realm {}", r.name));
        }
        RealmCmd::Set { name, file } => {
            let r = read_realm(&file)?;
            let v = client.send(REALM_SET, &[&name], &r)?;
            out.print(&v, |_| println!("changed realm {name}"));
        }
        RealmCmd::Rm { name } => {
            let v = client.call(REALM_RM, &[&name], None)?;
            out.print(&v, |_| println!("deleted realm {name}"));
        }
        RealmCmd::Test {
            name,
            user,
            with_password,
        } => {
            let password = if with_password {
                Some(Secrets::detect().read(&format!("{user}'s password"))?)
            } else {
                None
            };
            let v = client.send(
                REALM_TEST,
                &[&name],
                &RealmTest {
                    username: user,
                    password,
                },
            )?;
            out.show(REALM_TEST, &v, |r: RealmTestReply| {
                println!("server:   {}", r.server);
                println!("dn:       {}", r.dn.as_deref().unwrap_or("(not found)"));
                println!("role:     {}", r.role.map_or("(none)".into(), |r| word(&r)));
                if let Some(ok) = r.password_ok {
                    println!("password: {}", if ok { "right" } else { "wrong" });
                }
                for g in &r.groups {
                    println!("group:    {g}");
                }
            })?;
        }
        RealmCmd::Sync { name } => {
            let v = client.call(REALM_SYNC, &[&name], None)?;
            out.show(REALM_SYNC, &v, |s: RealmSynced| {
                println!("checked {} users", s.checked);
                for u in &s.changed {
                    println!("changed: {u} (its sessions ended)");
                }
            })?;
        }
        RealmCmd::Policy => {
            let v = client.call(LOGIN_POLICY, &[], None)?;
            out.show(LOGIN_POLICY, &v, print_policy)?;
        }
        RealmCmd::SetPolicy {
            default_realm,
            two_factor_realm,
            two_factor_role,
        } => {
            let policy = LoginPolicy {
                default_realm,
                two_factor_realms: two_factor_realm,
                two_factor_roles: two_factor_role,
            };
            let v = client.send(LOGIN_POLICY_SET, &[], &policy)?;
            out.show(LOGIN_POLICY_SET, &v, print_policy)?;
        }
    }
    Ok(())
}

fn print_policy(p: LoginPolicy) {
    let none = |v: Vec<String>| {
        if v.is_empty() {
            "(none)".to_string()
        } else {
            v.join(", ")
        }
    };
    println!("default realm:              {}", p.default_realm);
    println!("second factor for realms:   {}", none(p.two_factor_realms));
    println!(
        "second factor for roles:    {}",
        none(p.two_factor_roles.iter().map(word).collect())
    );
}
