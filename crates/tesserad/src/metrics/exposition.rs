//! `GET /metrics` as Prometheus' text exposition format (version 0.0.4): a `# HELP` and a
//! `# TYPE` line per family, then its samples, label values escaped. Pure: the handler
//! gathers the numbers, this writes them.
//!
//! Written here rather than with `prometheus-client` (the official Rust client): that
//! crate writes OpenMetrics only, whose counter families (`foo` with samples
//! `foo_total`) the text format parsers, `promtool check metrics` among them, refuse; the
//! text format itself is four kinds of line.

use std::fmt::Write;

/// What a family's samples are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Goes up and down.
    Gauge,
    /// Only goes up (reset by a restart); the name ends in `_total`.
    Counter,
}

/// One family: its name, help, kind and samples (label pairs, value).
#[derive(Debug)]
pub struct Family {
    name: &'static str,
    help: &'static str,
    kind: Kind,
    samples: Vec<(Vec<(&'static str, String)>, f64)>,
}

impl Family {
    /// A family without samples yet.
    pub fn new(name: &'static str, kind: Kind, help: &'static str) -> Family {
        debug_assert!(valid_name(name), "{name}");
        debug_assert_eq!(kind == Kind::Counter, name.ends_with("_total"), "{name}");
        Family {
            name,
            help,
            kind,
            samples: Vec::new(),
        }
    }

    /// Adds a sample.
    pub fn sample(&mut self, labels: Vec<(&'static str, String)>, value: f64) -> &mut Family {
        self.samples.push((labels, value));
        self
    }
}

fn valid_name(n: &str) -> bool {
    let mut c = n.chars();
    c.next()
        .is_some_and(|f| f.is_ascii_alphabetic() || f == '_' || f == ':')
        && c.all(|x| x.is_ascii_alphanumeric() || x == '_' || x == ':')
}

/// A label value as the format wants it: backslash, double quote and newline escaped.
fn escape_label(v: &str, out: &mut String) {
    for ch in v.chars() {
        match ch {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// A sample value: integers without a fraction, the non-finite ones by their names.
fn value(v: f64, out: &mut String) {
    if v.is_nan() {
        out.push_str("NaN");
    } else if v.is_infinite() {
        out.push_str(if v > 0.0 { "+Inf" } else { "-Inf" });
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        let _ = write!(out, "{}", v as i64);
    } else {
        let _ = write!(out, "{v}");
    }
}

/// The families as one text document. A family without samples is left out (a HELP and
/// TYPE with nothing under them says nothing).
pub fn render(families: &[Family]) -> String {
    let mut out = String::new();
    for f in families.iter().filter(|f| !f.samples.is_empty()) {
        // HELP text escapes only backslash and newline.
        let help = f.help.replace('\\', "\\\\").replace('\n', "\\n");
        let kind = match f.kind {
            Kind::Gauge => "gauge",
            Kind::Counter => "counter",
        };
        let _ = writeln!(out, "# HELP {} {help}", f.name);
        let _ = writeln!(out, "# TYPE {} {kind}", f.name);
        for (labels, v) in &f.samples {
            out.push_str(f.name);
            if !labels.is_empty() {
                out.push('{');
                for (i, (k, lv)) in labels.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(k);
                    out.push_str("=\"");
                    escape_label(lv, &mut out);
                    out.push('"');
                }
                out.push('}');
            }
            out.push(' ');
            value(*v, &mut out);
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::{render, Family, Kind};

    #[test]
    fn families_render_with_help_type_and_escaped_labels() {
        let mut up = Family::new("tessera_nodes", Kind::Gauge, "Nodes by state.");
        up.sample(vec![("state", "up".into())], 3.0)
            .sample(vec![("state", "down".into())], 0.0);
        let mut rx = Family::new(
            "tessera_node_network_receive_bytes_total",
            Kind::Counter,
            "Bytes received.",
        );
        rx.sample(vec![("node", "a\"b\\c\nd".into())], 1.5e20);
        let empty = Family::new("tessera_unused", Kind::Gauge, "Nothing.");
        let text = render(&[up, rx, empty]);
        assert_eq!(
            text,
            "# HELP tessera_nodes Nodes by state.\n\
             # TYPE tessera_nodes gauge\n\
             tessera_nodes{state=\"up\"} 3\n\
             tessera_nodes{state=\"down\"} 0\n\
             # HELP tessera_node_network_receive_bytes_total Bytes received.\n\
             # TYPE tessera_node_network_receive_bytes_total counter\n\
             tessera_node_network_receive_bytes_total{node=\"a\\\"b\\\\c\\nd\"} 150000000000000000000\n"
        );
    }
}
