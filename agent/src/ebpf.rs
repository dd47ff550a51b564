//! Loads and attaches graywatch's kernel programs.
//!
//! Before load, the programs' globals are filled with this kernel's tracepoint field offsets
//! (tracefs) and struct member offsets (BTF). Programs stay attached as long as
//! [`KernelPrograms`] lives; dropping it detaches everything.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use aya::{
    Btf, Ebpf, EbpfLoader, Endianness,
    maps::Map,
    programs::{BtfTracePoint, Program, ProgramError, RawTracePoint, TracePoint},
};
use graywatch_common::{
    KfreeSkbFields, NetSettings, SOCKET_KEY_ADDRESS, SOCKET_KEY_COOKIE, SockStateFields, TcpProbeFields,
    TcpRetransmitFields,
};
use tracing::{debug, info, warn};

use crate::{
    config::{DropSource, RttSource},
    kernel_layout::{KernelLayout, LayoutError},
    tracefs::{Tracefs, TracefsError},
};

/// The kernel object built by build.rs (empty when built without the eBPF toolchain).
static KERNEL_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/graywatch.bpf.o"));

/// Where to find the kernel's self-description; overridable for a DaemonSet's host mounts.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub tracefs: PathBuf,
    pub btf: PathBuf,
    pub rtt_source: RttSource,
    pub drop_source: DropSource,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            tracefs: crate::tracefs::DEFAULT_TRACEFS.into(),
            btf: "/sys/kernel/btf/vmlinux".into(),
            rtt_source: RttSource::default(),
            drop_source: DropSource::default(),
        }
    }
}

/// The signals each network program feeds, for `unavailable` and `signal_available`.
fn network_signals(program: &str) -> &'static [&'static str] {
    match program {
        "tcp_probe" | "tcp_probe_raw" => &["rtt", "segments_sent"],
        "tcp_retransmit_skb" => &["retransmits"],
        "kfree_skb" | "kfree_skb_btf" | "kfree_skb_btf_rx_sk" => &["drops"],
        "inet_sock_set_state" => &["segments_sent_at_close"],
        _ => &[],
    }
}

/// The record layout of `program`'s tracepoint, or (when this kernel lacks it) zeroes and the
/// program noted as not to be attached.
fn fields_or_skip<T: Default>(
    skipped: &mut Vec<(&'static str, String)>,
    program: &'static str,
    fields: Result<T, TracefsError>,
) -> T {
    fields.unwrap_or_else(|error| {
        skipped.push((program, error.to_string()));
        T::default()
    })
}

/// Every signal a network program can feed (each reported as available or not).
pub const NETWORK_SIGNALS: &[&str] = &["rtt", "segments_sent", "retransmits", "drops", "segments_sent_at_close"];

/// How a program attaches to its tracepoint.
#[derive(Debug, Clone, Copy)]
pub enum Attach {
    /// A classic tracepoint of this category (the record's layout from tracefs).
    Tracepoint(&'static str),
    /// A raw tracepoint (the tracepoint's arguments, untyped).
    Raw,
    /// A BTF tracepoint (`tp_btf`): the arguments typed by the kernel's BTF, so a program can
    /// load a task's fields (and follow its pointers) directly, checked by the verifier.
    Btf,
}

/// An optional program a caller brings (the CPU/memory families), how it attaches, and the
/// `signal_available` label it feeds.
#[derive(Debug)]
pub struct ProgramSpec {
    pub program: &'static str,
    pub attach: Attach,
    pub event: &'static str,
    pub signal: &'static str,
}

/// Globals of a caller's programs, written into the object before load.
pub trait ProgramGlobals: Sized {
    /// Stand-ins when this kernel lacks what resolving them needs: the programs then load with
    /// these and are not attached.
    fn unresolved() -> Self;
    fn write<'a>(&'a self, loader: &mut EbpfLoader<'a>);
    /// Programs of the group that cannot run on this kernel although the rest can, and why.
    fn skipped(&self) -> Vec<(&'static str, String)> {
        Vec::new()
    }
}

/// The caller's optional programs and how to resolve their globals from this kernel's layout
/// (`Err(why)`: their signals are unavailable, the rest of the agent runs).
pub struct ProgramGroup<'a, G> {
    pub programs: &'a [ProgramSpec],
    pub resolve: ResolveGlobals<'a, G>,
}

/// Resolves a group's globals from this kernel's BTF layout and tracepoint formats.
pub type ResolveGlobals<'a, G> = Box<dyn FnOnce(&KernelLayout, &Tracefs) -> Result<G, String> + 'a>;

/// The kernel's BTF, parsed when the first program that attaches by it asks (aya's loader was
/// given none: see [`KernelPrograms::load`]), then kept for the others.
struct KernelBtf<'a> {
    path: &'a Path,
    parsed: Option<Result<Btf, String>>,
}

impl<'a> KernelBtf<'a> {
    fn new(path: &'a Path) -> Self {
        Self { path, parsed: None }
    }

    fn get(&mut self) -> Result<&Btf, String> {
        let path = self.path;
        self.parsed
            .get_or_insert_with(|| {
                Btf::parse_file(path, Endianness::default())
                    .map_err(|error| format!("cannot read the kernel's BTF at {}: {error}", path.display()))
            })
            .as_ref()
            .map_err(Clone::clone)
    }
}

/// A kernel program and the tracepoint it attaches to.
struct TracepointProgram {
    program: &'static str,
    category: &'static str,
    event: &'static str,
}

const TCP_PROBE: TracepointProgram = TracepointProgram {
    program: "tcp_probe",
    category: "tcp",
    event: "tcp_probe",
};

const NETWORK_TRACEPOINTS: &[TracepointProgram] = &[
    TracepointProgram {
        program: "tcp_retransmit_skb",
        category: "tcp",
        event: "tcp_retransmit_skb",
    },
    TracepointProgram {
        program: "kfree_skb",
        category: "skb",
        event: "kfree_skb",
    },
    TracepointProgram {
        program: "inet_sock_set_state",
        category: "sock",
        event: "inet_sock_set_state",
    },
];

#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    #[error(
        "this graywatch-agent was built without its kernel programs (the eBPF toolchain was \
         missing at build time): run `cargo xtask setup` and rebuild"
    )]
    NotBuilt,
    #[error(transparent)]
    Tracefs(#[from] TracefsError),
    #[error(transparent)]
    Layout(#[from] LayoutError),
    #[error("loading the kernel object failed: {source}{hint}")]
    Load {
        #[source]
        source: aya::EbpfError,
        hint: &'static str,
    },
    #[error("the kernel object has no program `{0}` (agent and agent-ebpf out of sync?)")]
    MissingProgram(&'static str),
    #[error("the kernel object has no map `{0}` (agent and agent-ebpf out of sync?)")]
    MissingMap(&'static str),
    #[error("kernel program `{program}` was rejected by the verifier ({error}); last verifier lines:\n{log_tail}")]
    Verifier {
        program: &'static str,
        error: std::io::Error,
        log_tail: String,
    },
    #[error("kernel program `{program}` cannot attach: {why}")]
    Unavailable { program: &'static str, why: String },
    #[error("kernel program `{program}`: {source}{hint}")]
    Program {
        program: &'static str,
        #[source]
        source: ProgramError,
        hint: &'static str,
    },
}

const PERMISSION_HINT: &str = " (loading eBPF needs root, or CAP_BPF + CAP_PERFMON + CAP_NET_ADMIN)";

fn hint_for(error: &(dyn std::error::Error + 'static)) -> &'static str {
    let mut source = Some(error);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && io
                .raw_os_error()
                .is_some_and(|code| code == libc::EPERM || code == libc::EACCES)
        {
            return PERMISSION_HINT;
        }
        source = e.source();
    }
    ""
}

/// The loaded, attached programs and their maps.
pub struct KernelPrograms {
    ebpf: Ebpf,
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    drop_reasons: HashMap<u32, String>,
    attached: Vec<String>,
    attached_programs: Vec<&'static str>,
    unavailable: Vec<(String, String)>,
}

impl std::fmt::Debug for KernelPrograms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelPrograms")
            .field("attached", &self.attached)
            .finish_non_exhaustive()
    }
}

impl KernelPrograms {
    /// Resolves offsets, loads the object and attaches the network programs and `group`'s.
    /// `procfs` is read for sysctls.
    #[expect(
        clippy::too_many_lines,
        reason = "loads and attaches each program in turn, one block per program"
    )]
    pub fn load<G: ProgramGlobals>(
        options: &LoadOptions,
        procfs: &Path,
        group: ProgramGroup<'_, G>,
    ) -> Result<Self, EbpfError> {
        if KERNEL_OBJECT.is_empty() {
            return Err(EbpfError::NotBuilt);
        }
        let tracefs = Tracefs::open(&options.tracefs)?;
        let layout = KernelLayout::from_file(&options.btf)?;
        let offsets = layout.kernel_offsets()?;
        // Each network program needs its tracepoint's record layout; one this kernel lacks
        // disables that program (and its signals), not the agent.
        let mut unavailable_programs: Vec<(&'static str, String)> = Vec::new();
        let tcp_probe_fields = tracefs
            .event("tcp", "tcp_probe")
            .and_then(|format| TcpProbeFields::try_from(&format));
        let rtt_program = match (options.rtt_source, &tcp_probe_fields) {
            (RttSource::Tracepoint, _) | (RttSource::Auto, Ok(_)) => "tcp_probe",
            (RttSource::RawTracepoint, _) => "tcp_probe_raw",
            (RttSource::Auto, Err(why)) => {
                info!(%why, "tcp:tcp_probe's record lacks what the RTT program reads; sampling RTT from the raw tracepoint");
                "tcp_probe_raw"
            }
        };
        let tcp_probe = if rtt_program == "tcp_probe" {
            fields_or_skip(&mut unavailable_programs, "tcp_probe", tcp_probe_fields)
        } else {
            TcpProbeFields::default()
        };
        let tcp_retransmit = fields_or_skip(
            &mut unavailable_programs,
            "tcp_retransmit_skb",
            tracefs
                .event("tcp", "tcp_retransmit_skb")
                .and_then(|format| TcpRetransmitFields::try_from(&format)),
        );
        let sock_state = fields_or_skip(
            &mut unavailable_programs,
            "inet_sock_set_state",
            tracefs
                .event("sock", "inet_sock_set_state")
                .and_then(|format| SockStateFields::try_from(&format)),
        );
        let kfree_skb_format = tracefs.event("skb", "kfree_skb");
        let drop_reasons = kfree_skb_format
            .as_ref()
            .map(|format| format.symbolic_names("reason"))
            .unwrap_or_default();
        let kfree_skb = fields_or_skip(
            &mut unavailable_programs,
            "kfree_skb",
            kfree_skb_format.and_then(|format| KfreeSkbFields::try_from(&format)),
        );
        debug!(
            ?offsets,
            ?tcp_probe,
            ?tcp_retransmit,
            ?sock_state,
            ?kfree_skb,
            rtt_program,
            "kernel layout resolved"
        );
        // The caller's programs are optional: a kernel lacking what they need still runs the rest.
        let (group_globals, group_unavailable) = match (group.resolve)(&layout, &tracefs) {
            Ok(globals) => (globals, None),
            Err(why) => (G::unresolved(), Some(why)),
        };

        // Everything needed from BTF is resolved: free the parsed copy (tens of MiB) before the
        // loader parses its own, so start-up peaks at one parse instead of two.
        drop(layout);

        let net_settings = NetSettings {
            ephemeral_port_min: ephemeral_port_min(procfs),
            socket_key: if rtt_program == "tcp_probe" {
                SOCKET_KEY_COOKIE
            } else {
                SOCKET_KEY_ADDRESS
            },
        };
        let mut loader = EbpfLoader::new();
        loader
            // rustc emits no CO-RE relocations, the only use aya has for the kernel's BTF
            // (offsets come from tracefs and BTF above): free its parsed copy before maps and
            // programs are created.
            .btf(None)
            .override_global("NET_SETTINGS", &net_settings, true)
            .override_global("KERNEL_OFFSETS", &offsets, true)
            .override_global("TCP_PROBE_FIELDS", &tcp_probe, true)
            .override_global("TCP_RETRANSMIT_FIELDS", &tcp_retransmit, true)
            .override_global("KFREE_SKB_FIELDS", &kfree_skb, true)
            .override_global("SOCK_STATE_FIELDS", &sock_state, true);
        group_globals.write(&mut loader);
        let mut ebpf = loader.load(KERNEL_OBJECT).map_err(|source| EbpfError::Load {
            hint: hint_for(&source),
            source,
        })?;
        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(logger) => Some(logger),
            Err(error) => {
                warn!(%error, "kernel program logging unavailable; counters still report losses");
                None
            }
        };
        let mut programs = Self {
            ebpf,
            logger,
            drop_reasons,
            attached: Vec::new(),
            attached_programs: Vec::new(),
            unavailable: Vec::new(),
        };
        // The drop program as a BTF tracepoint when the kernel allows it (its form depends on
        // whether the tracepoint names the receiving socket), else the tracepoint program.
        let drop_program = match options.drop_source {
            DropSource::Tracepoint => None,
            DropSource::Auto if kfree_skb.rx_sk == KfreeSkbFields::ABSENT => Some("kfree_skb_btf"),
            DropSource::Auto => Some("kfree_skb_btf_rx_sk"),
        };
        // The kernel's BTF for the programs that attach by it: parsed at the first one, once, and
        // dropped when every program is attached.
        let mut btf = KernelBtf::new(&options.btf);
        programs.attach_network_programs(rtt_program, drop_program, &unavailable_programs, &mut btf);
        if programs.attached_programs.is_empty() && !unavailable_programs.is_empty() {
            // Not one network program: the first reason is the one a user must fix.
            let (program, why) = &unavailable_programs[0];
            warn!(program, %why, "no network program could be attached on this kernel");
        }
        let skipped = group_globals.skipped();
        programs.attach_group(group.programs, group_unavailable, &skipped, &mut btf);
        drop(btf);
        info!(programs = ?programs.attached, "kernel programs attached");
        release_startup_heap();
        Ok(programs)
    }

    /// Program `name` of the object, as its type.
    fn program<T>(&mut self, name: &'static str) -> Result<&mut T, EbpfError>
    where
        for<'a> &'a mut T: TryFrom<&'a mut Program, Error = ProgramError>,
    {
        self.ebpf
            .program_mut(name)
            .ok_or(EbpfError::MissingProgram(name))?
            .try_into()
            .map_err(|source| EbpfError::Program {
                program: name,
                source,
                hint: "",
            })
    }

    fn attach_tracepoint(&mut self, tp: &TracepointProgram) -> Result<(), EbpfError> {
        let program: &mut TracePoint = self.program(tp.program)?;
        program.load().map_err(|source| load_failed(tp.program, source))?;
        program
            .attach(tp.category, tp.event)
            .map_err(|source| attach_failed(tp.program, source))?;
        self.attached.push(format!("{}:{}", tp.category, tp.event));
        self.attached_programs.push(tp.program);
        Ok(())
    }

    /// Attaches the network programs (`rtt_program` for RTT); a program that cannot attach
    /// disables its signals (logged, listed by [`KernelPrograms::unavailable`]) and the others
    /// keep working.
    fn attach_network_programs(
        &mut self,
        rtt_program: &'static str,
        drop_program: Option<&'static str>,
        skipped: &[(&'static str, String)],
        btf: &mut KernelBtf<'_>,
    ) {
        let disable = |programs: &mut Self, program: &'static str, why: String| {
            warn!(program, %why, "kernel program not attached; its signals are unavailable on this kernel");
            for signal in network_signals(program) {
                programs
                    .unavailable
                    .push(((*signal).to_owned(), format!("{program}: {why}")));
            }
        };
        let rtt = if rtt_program == "tcp_probe" {
            Some(&TCP_PROBE)
        } else {
            None
        };
        for tp in rtt.into_iter().chain(NETWORK_TRACEPOINTS) {
            if let Some((_, why)) = skipped.iter().find(|(p, _)| *p == tp.program) {
                disable(self, tp.program, why.clone());
                continue;
            }
            if tp.program == "kfree_skb"
                && let Some(drop_program) = drop_program
            {
                match self.attach_btf_tracepoint(drop_program, tp.event, btf) {
                    Ok(()) => continue,
                    Err(error) => {
                        info!(program = drop_program, %error, "drops counted by the skb:kfree_skb tracepoint program instead");
                    }
                }
            }
            if let Err(error) = self.attach_tracepoint(tp) {
                disable(self, tp.program, error.to_string());
            }
        }
        if rtt.is_none()
            && let Err(error) = self.attach_raw_tracepoint(rtt_program, TCP_PROBE.event)
        {
            disable(self, rtt_program, error.to_string());
        }
    }

    /// Attaches a caller's programs; a failure disables that signal (logged once, listed by
    /// [`KernelPrograms::unavailable`]) instead of stopping the agent.
    fn attach_group(
        &mut self,
        specs: &[ProgramSpec],
        unresolved: Option<String>,
        skipped: &[(&'static str, String)],
        btf: &mut KernelBtf<'_>,
    ) {
        for p in specs {
            if let Some(why) = &unresolved {
                self.unavailable.push((p.signal.to_owned(), why.clone()));
                continue;
            }
            if let Some((_, why)) = skipped.iter().find(|(program, _)| *program == p.program) {
                warn!(program = p.program, signal = p.signal, %why, "signal unavailable on this kernel");
                self.unavailable.push((p.signal.to_owned(), why.clone()));
                continue;
            }
            let result = match p.attach {
                Attach::Tracepoint(category) => self.attach_tracepoint(&TracepointProgram {
                    program: p.program,
                    category,
                    event: p.event,
                }),
                Attach::Raw => self.attach_raw_tracepoint(p.program, p.event),
                Attach::Btf => self.attach_btf_tracepoint(p.program, p.event, btf),
            };
            if let Err(error) = result {
                warn!(program = p.program, signal = p.signal, %error, "signal unavailable on this kernel");
                self.unavailable.push((p.signal.to_owned(), error.to_string()));
            }
        }
        if let Some(why) = unresolved {
            warn!(%why, "CPU/memory kernel programs not attached: layout facts missing on this kernel");
        }
    }

    fn attach_btf_tracepoint(
        &mut self,
        name: &'static str,
        event: &'static str,
        btf: &mut KernelBtf<'_>,
    ) -> Result<(), EbpfError> {
        let btf = btf.get().map_err(|why| EbpfError::Unavailable { program: name, why })?;
        let program: &mut BtfTracePoint = self.program(name)?;
        program.load(event, btf).map_err(|source| load_failed(name, source))?;
        program.attach().map_err(|source| attach_failed(name, source))?;
        self.attached.push(format!("tp_btf:{event}"));
        self.attached_programs.push(name);
        Ok(())
    }

    fn attach_raw_tracepoint(&mut self, name: &'static str, event: &'static str) -> Result<(), EbpfError> {
        let program: &mut RawTracePoint = self.program(name)?;
        program.load().map_err(|source| load_failed(name, source))?;
        program.attach(event).map_err(|source| attach_failed(name, source))?;
        self.attached.push(format!("raw_tp:{event}"));
        self.attached_programs.push(name);
        Ok(())
    }

    /// Whether program `name` loaded and attached.
    pub fn is_attached(&self, name: &str) -> bool {
        self.attached_programs.contains(&name)
    }

    /// (signal, why) for signals whose programs could not be attached on this kernel.
    pub fn unavailable(&self) -> &[(String, String)] {
        &self.unavailable
    }

    /// Marks `signal` unavailable although its program attached (its maps cannot be read).
    pub fn mark_unavailable(&mut self, signal: &str, why: String) {
        warn!(signal, %why, "signal unavailable on this kernel");
        self.unavailable.push((signal.to_owned(), why));
    }

    /// Takes a map out of the object so a reader can own it.
    pub fn take_map(&mut self, name: &'static str) -> Result<Map, EbpfError> {
        self.ebpf.take_map(name).ok_or(EbpfError::MissingMap(name))
    }

    /// The kernel's names for `enum skb_drop_reason` values, from the `kfree_skb` format.
    pub fn drop_reasons(&self) -> &HashMap<u32, String> {
        &self.drop_reasons
    }

    /// `category:event` of every attached program.
    pub fn attached(&self) -> &[String] {
        &self.attached
    }

    /// The ring buffer of log lines from the kernel programs, to be flushed when readable.
    pub fn take_logger(&mut self) -> Option<aya_log::EbpfLogger<&'static dyn log::Log>> {
        self.logger.take()
    }
}

/// Converts an owned map into a typed aya map, naming it in the error.
pub fn typed_map<T>(map: Map, name: &'static str) -> Result<T, EbpfError>
where
    T: TryFrom<Map, Error = aya::maps::MapError>,
{
    T::try_from(map).map_err(|_| EbpfError::MissingMap(name))
}

/// Low end of `net.ipv4.ip_local_port_range` (the agent's network namespace; Linux's default
/// 32768 when unreadable).
fn ephemeral_port_min(procfs: &std::path::Path) -> u32 {
    let path = procfs.join("sys/net/ipv4/ip_local_port_range");
    let parsed = std::fs::read_to_string(&path)
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse().ok());
    parsed.unwrap_or_else(|| {
        warn!(path = %path.display(), "cannot read the ephemeral port range; assuming 32768");
        32_768
    })
}

/// A program the kernel refused to load: the verifier's last lines when it was the verifier.
fn load_failed(program: &'static str, source: ProgramError) -> EbpfError {
    match source {
        ProgramError::LoadError { io_error, verifier_log } => EbpfError::Verifier {
            program,
            error: io_error,
            log_tail: tail(&verifier_log.to_string(), 20),
        },
        source => EbpfError::Program {
            program,
            hint: hint_for(&source),
            source,
        },
    }
}

fn attach_failed(program: &'static str, source: ProgramError) -> EbpfError {
    EbpfError::Program {
        program,
        hint: hint_for(&source),
        source,
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Gives the heap that start-up used (two BTF parses, the object's relocation data) back to the
/// kernel. Without it glibc keeps those pages: the BTF copies are freed in an order that leaves
/// long-lived allocations above them, and the agent idled at ~37 MiB instead of ~25 MiB.
fn release_startup_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free heap memory to the kernel; no pointer is touched.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_the_last_lines() {
        assert_eq!(tail("a\nb\nc\nd", 2), "c\nd");
        assert_eq!(tail("a", 5), "a");
        assert_eq!(tail("", 5), "");
    }

    #[test]
    fn permission_errors_get_a_hint() {
        let eperm = std::io::Error::from_raw_os_error(libc::EPERM);
        assert_eq!(hint_for(&eperm), PERMISSION_HINT);
        let other = std::io::Error::from_raw_os_error(libc::ENOENT);
        assert_eq!(hint_for(&other), "");
    }
}
