//! How answers are shown: aligned tables (names and human sizes) for people, the API's
//! JSON unchanged for scripts.

use clap::ValueEnum;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use crate::client::decode;
use crate::endpoints::Ep;

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Tables and short reports, nodes by name.
    Table,
    /// Tables with ids as well.
    Wide,
    /// The API's answer as JSON.
    Json,
}

impl Output {
    /// Prints `v` as JSON, or as `human` shows it.
    pub fn print<T: Serialize + ?Sized>(self, v: &T, human: impl FnOnce(&T)) {
        match self {
            Output::Json => println!("{}", serde_json::to_string_pretty(v).unwrap_or_default()),
            Output::Table | Output::Wide => human(v),
        }
    }

    /// Prints an answer of `ep`: as the API sent it for JSON, else read as its API type
    /// `T` and shown by `human`.
    pub fn show<T: DeserializeOwned>(
        self,
        ep: Ep,
        v: &Value,
        human: impl FnOnce(T),
    ) -> anyhow::Result<()> {
        match self {
            Output::Json => self.print(v, |_| {}),
            Output::Table | Output::Wide => human(decode(ep, v)?),
        }
        Ok(())
    }

    /// Whether tables show ids as well.
    pub fn wide(self) -> bool {
        self == Output::Wide
    }

    pub fn is_json(self) -> bool {
        self == Output::Json
    }
}

/// A column: its heading, whether only the wide view shows it, and its cell.
pub struct Column<'a, T> {
    pub head: &'static str,
    pub wide_only: bool,
    pub cell: Box<dyn Fn(&T) -> String + 'a>,
}

/// A column every view shows.
pub fn col<'a, T>(head: &'static str, cell: impl Fn(&T) -> String + 'a) -> Column<'a, T> {
    Column {
        head,
        wide_only: false,
        cell: Box::new(cell),
    }
}

/// A column only the wide view shows.
pub fn wide_col<'a, T>(head: &'static str, cell: impl Fn(&T) -> String + 'a) -> Column<'a, T> {
    Column {
        head,
        wide_only: true,
        cell: Box::new(cell),
    }
}

/// Prints `rows` as aligned columns.
pub fn table<T>(rows: &[T], cols: &[Column<'_, T>], wide: bool) {
    print!("{}", render(rows, cols, wide));
}

fn render<T>(rows: &[T], cols: &[Column<'_, T>], wide: bool) -> String {
    let cols: Vec<&Column<'_, T>> = cols.iter().filter(|c| wide || !c.wide_only).collect();
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| cols.iter().map(|c| (c.cell)(r)).collect())
        .collect();
    let widths: Vec<usize> = cols
        .iter()
        .enumerate()
        .map(|(i, c)| {
            cells
                .iter()
                .map(|r| r[i].chars().count())
                .chain([c.head.len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: Vec<String>| {
        let parts: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        format!("{}\n", parts.join("  ").trim_end())
    };
    let mut out = line(cols.iter().map(|c| c.head.to_string()).collect());
    for r in cells {
        out.push_str(&line(r));
    }
    out
}

/// The field at `path` (`a.b` looks into nested objects) as text: `-` when absent,
/// lists joined with commas.
pub fn field(v: &Value, path: &str) -> String {
    let mut cur = v;
    for p in path.split('.') {
        cur = &cur[p];
    }
    match cur {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        Value::Array(a) => a
            .iter()
            .map(|x| {
                x.as_str()
                    .map(String::from)
                    .unwrap_or_else(|| x.to_string())
            })
            .collect::<Vec<_>>()
            .join(","),
        other => other.to_string(),
    }
}

/// An API enum (a state, a role) as the API spells it.
pub fn word(v: &impl Serialize) -> String {
    match serde_json::to_value(v) {
        Ok(Value::String(s)) => s,
        Ok(other) => field(&other, "type"),
        Err(_) => "?".into(),
    }
}

/// An optional text, `-` when absent.
pub fn opt(v: &Option<String>) -> String {
    v.clone().unwrap_or_else(|| "-".into())
}

/// Bytes as a human size (`1.0 GiB`), `-` when absent.
pub fn size(bytes: Option<u64>) -> String {
    bytes.map_or_else(|| "-".into(), tessera_units::format_size)
}

/// Milliseconds since the epoch as `YYYY-MM-DD HH:MM:SS` UTC.
pub fn utc(ms: u64) -> String {
    let (days, secs) = ((ms / 1000) / 86400, (ms / 1000) % 86400);
    // Howard Hinnant's civil-from-days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_utc() {
        assert_eq!(utc(1_764_028_800_123), "2025-11-25 00:00:00");
        assert_eq!(utc(0), "1970-01-01 00:00:00");
    }

    #[test]
    fn tables_align_and_hide_wide_columns() {
        let rows = [("vol1", 1u64 << 30, "aa11"), ("a-long-name", 4096, "bb22")];
        let cols = [
            col("NAME", |r: &(&str, u64, &str)| r.0.to_string()),
            col("SIZE", |r: &(&str, u64, &str)| size(Some(r.1))),
            wide_col("ID", |r: &(&str, u64, &str)| r.2.to_string()),
        ];
        assert_eq!(
            render(&rows, &cols, false),
            "NAME         SIZE\nvol1         1.0 GiB\na-long-name  4.0 KiB\n"
        );
        assert_eq!(
            render(&rows, &cols, true),
            "NAME         SIZE     ID\nvol1         1.0 GiB  aa11\na-long-name  4.0 KiB  bb22\n"
        );
    }

    #[test]
    fn fields_read_nested_values_and_lists() {
        let v = serde_json::json!({"op": {"type": "volume.create"}, "disks": ["a", "b"]});
        assert_eq!(field(&v, "op.type"), "volume.create");
        assert_eq!(field(&v, "disks"), "a,b");
        assert_eq!(field(&v, "missing"), "-");
    }
}
