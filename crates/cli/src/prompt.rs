//! Secrets from the person or the script: prompted without echo when standard input is a
//! terminal, else read one per line from standard input (so scripts can pipe them in).

use std::io::{BufRead, IsTerminal};

use anyhow::{bail, Context};

/// Where secrets come from for this run.
pub enum Secrets {
    /// A person at a terminal: prompts on the terminal, echo off.
    Terminal,
    /// A script: one secret per line of standard input.
    Lines,
}

impl Secrets {
    pub fn detect() -> Secrets {
        if std::io::stdin().is_terminal() {
            Secrets::Terminal
        } else {
            Secrets::Lines
        }
    }

    /// One secret, `what` naming it in the prompt and in errors.
    pub fn read(&self, what: &str) -> anyhow::Result<String> {
        let s = match self {
            Secrets::Terminal => rpassword::prompt_password(format!("{what}: "))
                .with_context(|| format!("reading {what}"))?,
            Secrets::Lines => read_line(&mut std::io::stdin().lock(), what)?,
        };
        if s.is_empty() {
            bail!("no {what} given");
        }
        Ok(s)
    }

    /// A new secret: on a terminal it is typed twice, and must match.
    pub fn read_new(&self, what: &str) -> anyhow::Result<String> {
        let s = self.read(what)?;
        if let Secrets::Terminal = self {
            if self.read(&format!("{what} again"))? != s {
                bail!("the two {what}s differ");
            }
        }
        Ok(s)
    }
}

/// One line without its line ending; an empty line or none at all is an error.
fn read_line(input: &mut impl BufRead, what: &str) -> anyhow::Result<String> {
    let mut line = String::new();
    input
        .read_line(&mut line)
        .with_context(|| format!("reading {what}"))?;
    let line = line.trim_end_matches(['\n', '\r']).to_string();
    if line.is_empty() {
        bail!("no {what} on standard input");
    }
    Ok(line)
}

#[cfg(test)]
mod tests {
    use super::read_line;

    #[test]
    fn lines_are_read_one_by_one_without_their_endings() {
        let mut input: &[u8] = b"old pw\r\nnew pw\n";
        assert_eq!(read_line(&mut input, "old").unwrap(), "old pw");
        assert_eq!(read_line(&mut input, "new").unwrap(), "new pw");
        let e = read_line(&mut input, "third").unwrap_err();
        assert!(e.to_string().contains("no third on standard input"), "{e}");
    }
}
