//! Users and their roles (administrators only).

use serde_json::{json, Value};

use crate::args::UserCmd;
use crate::client::Client;
use crate::endpoints::{USERS, USER_CREATE, USER_RM, USER_SET};
use crate::output::{col, field, table, Output};
use crate::prompt::Secrets;

pub fn run(client: &Client, cmd: UserCmd, out: Output) -> anyhow::Result<()> {
    match cmd {
        UserCmd::Ls => {
            let v = client.call(USERS, &[], None)?;
            out.print(&v, |v| {
                let rows = v.as_array().cloned().unwrap_or_default();
                table(
                    &rows,
                    &[
                        col("USER", |u: &Value| field(u, "username")),
                        col("ROLE", |u: &Value| field(u, "role")),
                        col("MUST CHANGE PASSWORD", |u: &Value| {
                            field(u, "must_change_password")
                        }),
                    ],
                    out.wide(),
                )
            });
        }
        UserCmd::Create { name, role } => {
            let password = Secrets::detect().read_new("initial password")?;
            let v = client.call(
                USER_CREATE,
                &[],
                Some(json!({ "username": name, "password": password, "role": role })),
            )?;
            out.print(&v, |_| println!("created user {name} ({role})"));
        }
        UserCmd::SetRole { name, role } => {
            let v = client.call(USER_SET, &[&name], Some(json!({ "role": role })))?;
            out.print(&v, |_| println!("{name} is now {role}"));
        }
        UserCmd::Rm { name } => {
            let v = client.call(USER_RM, &[&name], None)?;
            out.print(&v, |_| println!("deleted user {name}"));
        }
    }
    Ok(())
}
