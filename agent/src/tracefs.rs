//! Tracepoint record layouts from tracefs `format` files, so the kernel programs read fields at
//! this kernel's offsets rather than at offsets compiled in.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use graywatch_common::{KfreeSkbFields, SockStateFields, TcpProbeFields, TcpRetransmitFields};

/// Where tracefs is mounted on current kernels (debugfs' `tracing/` is the legacy location).
pub const DEFAULT_TRACEFS: &str = "/sys/kernel/tracing";

/// Where aya's `TracePoint::attach` looks for tracefs, in this order: the first existing,
/// non-empty directory wins (aya 0.14 `programs::utils::find_tracefs_path`). It ignores our
/// `--tracefs`, so the two must agree.
pub const AYA_TRACEFS_PATHS: [&str; 2] = [DEFAULT_TRACEFS, "/sys/kernel/debug/tracing"];

/// How to get a tracefs where it is needed, for the error messages.
const MOUNT_FIX: &str = "on the host run `mount -t tracefs nodev /sys/kernel/tracing` (or add it to \
     /etc/fstab); in the Helm chart, agent.hostPaths.tracefs names the host's tracefs, which is \
     mounted at /sys/kernel/tracing in the agent container";

#[derive(Debug, thiserror::Error)]
pub enum TracefsError {
    #[error(
        "{path} is not a mounted tracefs (the directory exists but {why}): {fix}",
        fix = MOUNT_FIX
    )]
    NotTracefs { path: String, why: &'static str },
    #[error(
        "tracepoints are attached through tracefs at {aya} (where the eBPF library looks; it \
         ignores --tracefs), but --tracefs is {configured}: mount the host's tracefs at \
         {DEFAULT_TRACEFS} in this container and use --tracefs={DEFAULT_TRACEFS}; {fix}",
        fix = MOUNT_FIX
    )]
    Mismatch { configured: String, aya: String },
    #[error(
        "no tracefs at {DEFAULT_TRACEFS} or /sys/kernel/debug/tracing, where the eBPF library \
         attaches tracepoints (it ignores --tracefs {configured}): {fix}",
        fix = MOUNT_FIX
    )]
    NoneForAttach { configured: String },
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
                rest.trim().clone_into(&mut format.print_fmt);
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
            let (Some(decl), Some(offset), Some(size)) = (decl, offset, size) else {
                return Err(malformed());
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

/// Checks, before anything is loaded, that tracepoints can be attached: `configured` (the
/// `--tracefs` directory, read for event formats) is a mounted tracefs, and it is the one aya
/// attaches through (the first of [`AYA_TRACEFS_PATHS`] that exists and is not empty).
///
/// Catches the two ways a DaemonSet gets this wrong: a hostPath `Directory` mount of a host
/// where tracefs is not mounted (the directory exists, empty), and `--tracefs` pointing at a
/// mount other than the one aya uses.
pub fn check_attachable(configured: &Path) -> Result<(), TracefsError> {
    check_attachable_via(configured, &AYA_TRACEFS_PATHS.map(Path::new))
}

/// [`check_attachable`] with aya's candidate directories given.
fn check_attachable_via(configured: &Path, aya_paths: &[&Path]) -> Result<(), TracefsError> {
    check_mounted(configured)?;
    let aya = aya_paths
        .iter()
        .copied()
        .find(|p| non_empty_dir(p))
        .ok_or_else(|| TracefsError::NoneForAttach {
            configured: configured.display().to_string(),
        })?;
    // The same directory of the same filesystem, whatever the path (bind mounts of the host's
    // tracefs, symlinks, debugfs' tracing/ automount all qualify).
    let id = |p: &Path| {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(p).map(|m| (m.dev(), m.ino())).ok()
    };
    let same = matches!((id(configured), id(aya)), (Some(a), Some(b)) if a == b);
    if !same {
        return Err(TracefsError::Mismatch {
            configured: configured.display().to_string(),
            aya: aya.display().to_string(),
        });
    }
    Ok(())
}

fn non_empty_dir(path: &Path) -> bool {
    std::fs::read_dir(path).is_ok_and(|mut entries| entries.next().is_some())
}

/// `path` is a mounted tracefs: a non-empty directory with `events/` on a tracefs filesystem.
pub fn check_mounted(path: &Path) -> Result<(), TracefsError> {
    let not = |why| TracefsError::NotTracefs {
        path: path.display().to_string(),
        why,
    };
    if !path.is_dir() {
        return Err(TracefsError::NotMounted(path.display().to_string()));
    }
    if !non_empty_dir(path) {
        return Err(not("is empty"));
    }
    if !path.join("events").is_dir() {
        return Err(not("has no events/ directory"));
    }
    match nix::sys::statfs::statfs(path) {
        Ok(fs) if fs.filesystem_type() == nix::sys::statfs::TRACEFS_MAGIC => Ok(()),
        Ok(_) => Err(not("is on another filesystem, not tracefs")),
        // Cannot tell the type: the layout looked right, let the format reads decide.
        Err(_) => Ok(()),
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
            newstate: f.offset("newstate")?,
            protocol: f.offset("protocol")?,
            family: f.offset("family")?,
            sport: f.offset("sport")?,
            dport: f.offset("dport")?,
            daddr: f.offset("daddr")?,
            daddr_v6: f.offset("daddr_v6")?,
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
    fn an_empty_or_plain_directory_is_not_a_tracefs() {
        let dir = std::env::temp_dir().join(format!("graywatch-tracefs-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        // What a hostPath Directory mount of a host without tracefs looks like.
        let err = check_attachable(&dir).expect_err("empty directory");
        let text = err.to_string();
        assert!(matches!(err, TracefsError::NotTracefs { .. }), "{text}");
        assert!(text.contains(&dir.display().to_string()), "names the path: {text}");
        assert!(
            text.contains("mount -t tracefs nodev /sys/kernel/tracing") && text.contains("agent.hostPaths.tracefs"),
            "names the fix: {text}"
        );
        // Looks like tracefs, is not one.
        std::fs::create_dir_all(dir.join("events/tcp")).expect("events dir");
        let err = check_mounted(&dir).expect_err("tmp is not tracefs");
        assert!(err.to_string().contains("not tracefs"), "{err}");
        let err = check_mounted(&dir.join("missing")).expect_err("missing");
        assert!(matches!(err, TracefsError::NotMounted(_)), "{err}");
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn the_tracefs_aya_uses_is_accepted_and_another_one_is_named() {
        let tracefs = Path::new(DEFAULT_TRACEFS);
        check_attachable(tracefs).expect("tracefs must be mounted for the test suite (cargo xtask test mounts it)");
        let dir = std::env::temp_dir().join(format!("graywatch-tracefs-aya-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (empty, other, link) = (dir.join("empty"), dir.join("other"), dir.join("link"));
        std::fs::create_dir_all(&empty).expect("temp dir");
        std::fs::create_dir_all(other.join("events")).expect("temp dir");
        std::os::unix::fs::symlink(tracefs, &link).expect("symlink");
        // Like aya: an empty candidate is skipped; the same tracefs by another path is fine.
        check_attachable_via(&link, &[&empty, tracefs]).expect("same tracefs");
        // aya would attach through another directory than --tracefs names: refused, both named.
        let err = check_attachable_via(tracefs, &[&other, tracefs]).expect_err("mismatch");
        let text = err.to_string();
        assert!(matches!(err, TracefsError::Mismatch { .. }), "{text}");
        assert!(
            text.contains(&other.display().to_string()) && text.contains(DEFAULT_TRACEFS),
            "{text}"
        );
        let err = check_attachable_via(tracefs, &[&empty]).expect_err("aya finds none");
        assert!(matches!(err, TracefsError::NoneForAttach { .. }), "{err}");
        std::fs::remove_dir_all(&dir).expect("cleanup");
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
