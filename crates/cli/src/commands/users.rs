//! Users and their roles (administrators only).

use tessera_api::{NewUser, UserInfo, UserUpdate};

use crate::args::UserCmd;
use crate::client::Client;
use crate::endpoints::{USERS, USER_CREATE, USER_RM, USER_SET, USER_TOTP_RM};
use crate::output::{col, table, word, Output};
use crate::prompt::Secrets;

pub fn run(client: &Client, cmd: UserCmd, out: Output) -> anyhow::Result<()> {
    match cmd {
        UserCmd::Ls => {
            let v = client.call(USERS, &[], None)?;
            out.show(USERS, &v, |users: Vec<UserInfo>| {
                table(
                    &users,
                    &[
                        col("USER", |u: &UserInfo| u.username.clone()),
                        col("ROLE", |u: &UserInfo| word(&u.role)),
                        col("MUST CHANGE PASSWORD", |u: &UserInfo| {
                            u.must_change_password.to_string()
                        }),
                    ],
                    out.wide(),
                )
            })?;
        }
        UserCmd::Create { name, role } => {
            let password = Secrets::detect().read_new("initial password")?;
            let v = client.send(
                USER_CREATE,
                &[],
                &NewUser {
                    username: name.clone(),
                    password,
                    role,
                },
            )?;
            out.print(&v, |_| println!("created user {name} ({})", word(&role)));
        }
        UserCmd::SetRole { name, role } => {
            let update = UserUpdate {
                role: Some(role),
                ..UserUpdate::default()
            };
            let v = client.send(USER_SET, &[&name], &update)?;
            out.print(&v, |_| println!("{name} is now {}", word(&role)));
        }
        UserCmd::Rm { name } => {
            let v = client.call(USER_RM, &[&name], None)?;
            out.print(&v, |_| println!("deleted user {name}"));
        }
        UserCmd::RmTotp { name } => {
            let v = client.call(USER_TOTP_RM, &[&name], None)?;
            out.print(&v, |_| {
                println!(
                    "removed the authenticator of {name}: its next login needs the password only"
                )
            });
        }
    }
    Ok(())
}
