//! Tracepoint record layouts from tracefs `format` files, so the kernel programs read fields at
//! this kernel's offsets rather than at offsets compiled in.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use graywatch_common::{KfreeSkbFields, SockStateFields, TcpProbeFields, TcpRetransmitFields};

/// Where tracefs is mounted on current kernels (debugfs' `tracing/` is the legacy location).
pub const DEFAULT_TRACEFS: &str = "/sys/kernel/tracing";

#[derive(Debug, thiserror::Error)]
pub enum TracefsError {
    #[error(
        "tracefs is not mounted at {0}: mount it with `mount -t tracefs nodev {0}` (in a \
         DaemonSet, mount the host's /sys/kernel/tracing)"
    )]
    NotMounted(String),
    #[error("tracepoint {event} does not exist on this kernel ({path})")]
    NoEvent { event: String, path: String },
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}: malformed field line `{text}`")]
    Malformed { path: String, line: usize, text: String },
    #[error("tracepoint {event} has no field `{field}` on this kernel")]
    NoField { event: String, field: String },
}

/// One field of a tracepoint record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Field {
    pub offset: u32,
    pub size: u32,
}

/// A parsed `format` file: fields by name, and the `print fmt` line.
#[derive(Debug, Clone, Default)]
pub struct EventFormat {
    pub event: String,
    pub fields: HashMap<String, Field>,
    pub print_fmt: String,
}

impl EventFormat {
    /// Parses the text of a tracefs `format` file. `source` names it in errors.
    pub fn parse(event: &str, source: &str, text: &str) -> Result<Self, TracefsError> {
        let mut format = EventFormat {
            event: event.to_owned(),
            ..Default::default()
        };
        for (index, line) in text.lines().enumerate() {
            let line = line.trim();
            if let Some(rest) = line.strip_prefix("print fmt:") {
                format.print_fmt = rest.trim().to_owned();
                continue;
            }
            if !line.starts_with("field:") {
                continue;
            }
            let malformed = || TracefsError::Malformed {
                path: source.to_owned(),
                line: index + 1,
                text: line.to_owned(),
            };
            let mut decl = None;
            let mut offset = None;
            let mut size = None;
            for part in line.split(';').map(str::trim).filter(|p| !p.is_empty()) {
                let (key, value) = part.split_once(':').ok_or_else(malformed)?;
                match key {
                    "field" => decl = Some(value),
                    "offset" => offset = Some(value.parse::<u32>().map_err(|_| malformed())?),
                    "size" => size = Some(value.parse::<u32>().map_err(|_| malformed())?),
                    _ => {}
                }
            }
            let (decl, offset, size) = match (decl, offset, size) {
                (Some(d), Some(o), Some(s)) => (d, o, s),
                _ => return Err(malformed()),
            };
            // The name is the last word of the declaration, without an array suffix.
            let name = decl
                .rsplit(|c: char| c.is_whitespace() || c == '*')
                .next()
                .and_then(|word| word.split('[').next())
                .filter(|name| !name.is_empty())
                .ok_or_else(malformed)?;
            format.fields.insert(name.to_owned(), Field { offset, size });
        }
        Ok(format)
    }

    pub fn field(&self, name: &str) -> Result<Field, TracefsError> {
        self.fields.get(name).copied().ok_or_else(|| TracefsError::NoField {
            event: self.event.clone(),
            field: name.to_owned(),
        })
    }

    fn offset(&self, name: &str) -> Result<u32, TracefsError> {
        self.field(name).map(|f| f.offset)
    }

    /// Value → name pairs of `__print_symbolic(REC-><field>, { 2, "NAME" }, …)` in the print
    /// format: how the kernel itself names enum values such as drop reasons.
    pub fn symbolic_names(&self, field: &str) -> HashMap<u32, String> {
        let mut names = HashMap::new();
        let marker = format!("__print_symbolic(REC->{field},");
        let Some(start) = self.print_fmt.find(&marker) else {
            return names;
        };
        let mut rest = &self.print_fmt[start + marker.len()..];
        while let Some(open) = rest.find('{') {
            let Some(close) = rest[open..].find('}') else { break };
            let pair = &rest[open + 1..open + close];
            rest = &rest[open + close + 1..];
            if let Some((value, name)) = pair.split_once(',')
                && let Ok(value) = value.trim().parse::<u32>()
            {
                names.insert(value, name.trim().trim_matches('"').to_owned());
            }
            // The symbolic list ends at the closing parenthesis of __print_symbolic.
            if rest.trim_start().starts_with(')') {
                break;
            }
        }
        names
    }
}

/// Reads event formats from a tracefs mount.
#[derive(Debug, Clone)]
pub struct Tracefs {
    root: PathBuf,
}

impl Tracefs {
    pub fn open(root: &Path) -> Result<Self, TracefsError> {
        if !root.join("events").is_dir() {
            return Err(TracefsError::NotMounted(root.display().to_string()));
        }
        Ok(Self { root: root.to_owned() })
    }

    /// The format of `category/name`, e.g. `tcp/tcp_probe`.
    pub fn event(&self, category: &str, name: &str) -> Result<EventFormat, TracefsError> {
        let event = format!("{category}:{name}");
        let path = self.root.join("events").join(category).join(name).join("format");
        let text = std::fs::read_to_string(&path).map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                TracefsError::NoEvent {
                    event: event.clone(),
                    path: path.display().to_string(),
                }
            } else {
                TracefsError::Read {
                    path: path.display().to_string(),
                    source,
                }
            }
        })?;
        EventFormat::parse(&event, &path.display().to_string(), &text)
    }
}

impl TryFrom<&EventFormat> for TcpProbeFields {
    type Error = TracefsError;
    fn try_from(f: &EventFormat) -> Result<Self, TracefsError> {
        Ok(Self {
            daddr: f.offset("daddr")?,
            family: f.offset("family")?,
            srtt: f.offset("srtt")?,
            skaddr: f.offset("skaddr")?,
            sock_cookie: f.offset("sock_cookie")?,
            sport: f.offset("sport")?,
            dport: f.offset("dport")?,
            record_len: record_len(
                f,
                &["daddr", "family", "srtt", "skaddr", "sock_cookie", "sport", "dport"],
            )?,
        })
    }
}

/// Bytes from the record start to the end of the last of `names`, checked against what the
/// program copies.
fn record_len(f: &EventFormat, names: &[&str]) -> Result<u32, TracefsError> {
    let mut end = 0;
    for name in names {
        let field = f.field(name)?;
        end = end.max(field.offset + field.size);
    }
    if end as usize > graywatch_common::TCP_PROBE_RECORD_MAX {
        return Err(TracefsError::Malformed {
            path: f.event.clone(),
            line: 0,
            text: format!(
                "fields end at byte {end}, beyond the {} the program copies",
                graywatch_common::TCP_PROBE_RECORD_MAX
            ),
        });
    }
    Ok(end)
}

impl TryFrom<&EventFormat> for TcpRetransmitFields {
    type Error = TracefsError;
    fn try_from(f: &EventFormat) -> Result<Self, TracefsError> {
        Ok(Self {
            skbaddr: f.offset("skbaddr")?,
            skaddr: f.offset("skaddr")?,
            family: f.offset("family")?,
            daddr: f.offset("daddr")?,
            daddr_v6: f.offset("daddr_v6")?,
            sport: f.offset("sport")?,
            dport: f.offset("dport")?,
            // `err` is recent; without it every event counts as a sent retransmission.
            err: f.offset("err").unwrap_or(KfreeSkbFields::ABSENT),
        })
    }
}

impl TryFrom<&EventFormat> for SockStateFields {
    type Error = TracefsError;
    fn try_from(f: &EventFormat) -> Result<Self, TracefsError> {
        Ok(Self {
            skaddr: f.offset("skaddr")?,
            oldstate: f.offset("oldstate")?,
            protocol: f.offset("protocol")?,
            _pad: 0,
        })
    }
}

impl TryFrom<&EventFormat> for KfreeSkbFields {
    type Error = TracefsError;
    fn try_from(f: &EventFormat) -> Result<Self, TracefsError> {
        Ok(Self {
            skbaddr: f.offset("skbaddr")?,
            // rx_sk arrived in 6.10; older kernels fall back to skb->sk.
            rx_sk: f.offset("rx_sk").unwrap_or(KfreeSkbFields::ABSENT),
            protocol: f.offset("protocol")?,
            reason: f.offset("reason")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KFREE_SKB: &str = "name: kfree_skb\nID: 1\nformat:\n\
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\
\tfield:void * skbaddr;\toffset:8;\tsize:8;\tsigned:0;\n\
\tfield:void * location;\toffset:16;\tsize:8;\tsigned:0;\n\
\tfield:void * rx_sk;\toffset:24;\tsize:8;\tsigned:0;\n\
\tfield:unsigned short protocol;\toffset:32;\tsize:2;\tsigned:0;\n\
\tfield:enum skb_drop_reason reason;\toffset:36;\tsize:4;\tsigned:0;\n\n\
print fmt: \"skbaddr=%p reason: %s\", REC->skbaddr, __print_symbolic(REC->reason, { 2, \"NOT_SPECIFIED\" }, { 3, \"NO_SOCKET\" }, { 6, \"SOCKET_RCVBUFF\" }), REC->x\n";

    #[test]
    fn parses_fields_and_symbolic_names() {
        let f = EventFormat::parse("skb:kfree_skb", "fixture", KFREE_SKB).expect("parse");
        assert_eq!(f.field("rx_sk").expect("rx_sk"), Field { offset: 24, size: 8 });
        let fields = KfreeSkbFields::try_from(&f).expect("fields");
        assert_eq!(
            fields,
            KfreeSkbFields {
                skbaddr: 8,
                rx_sk: 24,
                protocol: 32,
                reason: 36
            }
        );
        let names = f.symbolic_names("reason");
        assert_eq!(names.get(&3).map(String::as_str), Some("NO_SOCKET"));
        assert_eq!(names.len(), 3);
    }

    #[test]
    fn array_fields_drop_their_suffix() {
        let text = "\tfield:__u8 daddr[28];\toffset:36;\tsize:28;\tsigned:0;\n";
        let f = EventFormat::parse("tcp:tcp_probe", "fixture", text).expect("parse");
        assert_eq!(f.field("daddr").expect("daddr").offset, 36);
    }

    #[test]
    fn malformed_lines_name_the_line() {
        let text = "format:\n\tfield:int x;\toffset:abc;\tsize:4;\n";
        let err = EventFormat::parse("x:y", "fixture", text).expect_err("bad offset");
        assert!(err.to_string().contains("fixture:2"), "{err}");
        let missing = EventFormat::parse("x:y", "f", "\tfield:int x;\tsize:4;\n").expect_err("no offset");
        assert!(matches!(missing, TracefsError::Malformed { .. }));
    }

    #[test]
    fn a_missing_field_is_named() {
        let f = EventFormat::parse("x:y", "f", "").expect("empty parses");
        let err = TcpProbeFields::try_from(&f).expect_err("no fields");
        assert!(
            err.to_string().contains("x:y") && err.to_string().contains("daddr"),
            "{err}"
        );
    }

    #[test]
    fn this_kernels_network_tracepoints_parse() {
        let tracefs = Tracefs::open(Path::new(DEFAULT_TRACEFS))
            .expect("tracefs must be mounted for the test suite (cargo xtask test mounts it)");
        let probe = tracefs.event("tcp", "tcp_probe").expect("tcp_probe");
        TcpProbeFields::try_from(&probe).expect("tcp_probe fields");
        let kfree = tracefs.event("skb", "kfree_skb").expect("kfree_skb");
        assert!(kfree.symbolic_names("reason").values().any(|n| n == "NO_SOCKET"));
        assert!(matches!(
            tracefs.event("tcp", "no_such_event"),
            Err(TracefsError::NoEvent { .. })
        ));
    }
}
