//! Agent configuration: command-line flags (with environment variables) over an optional TOML
//! file over defaults, validated on start with errors that name the field.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use clap::{Parser, ValueEnum};
use serde::Deserialize;

/// graywatch-agent: measures gray-failure signals on this node (TCP RTT, retransmits, kernel
/// drops with reason, per pod) with eBPF and procfs, and serves them as window summaries,
/// Prometheus metrics and a stream to the aggregator.
///
/// Standalone use (no cluster, no aggregator): `graywatch-agent --once --output json` prints
/// one window; `--interval 5s --output json` streams them.
#[derive(Debug, Parser)]
#[command(name = "graywatch-agent", version, about, long_about)]
pub struct Cli {
    /// TOML config file; flags and environment variables override it.
    #[arg(long, env = "GRAYWATCH_CONFIG")]
    pub config: Option<PathBuf>,

    /// Node name reported in summaries (in a DaemonSet: from spec.nodeName via the downward API).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,

    /// Window length: how often maps are read and a summary is produced (e.g. 1s, 500ms).
    #[arg(long, env = "GRAYWATCH_INTERVAL", value_parser = parse_duration)]
    pub interval: Option<Duration>,

    /// Print one window summary and exit.
    #[arg(long)]
    pub once: bool,

    /// How to print window summaries on stdout.
    #[arg(long, value_enum, env = "GRAYWATCH_OUTPUT")]
    pub output: Option<OutputFormat>,

    /// Address for /metrics and /healthz; "off" disables the server.
    #[arg(long, env = "GRAYWATCH_LISTEN")]
    pub listen: Option<String>,

    /// tracefs mount point (tracepoint formats). Must be the tracefs the eBPF library attaches
    /// through: /sys/kernel/tracing (or /sys/kernel/debug/tracing) in this mount namespace; the
    /// agent refuses to start otherwise, or when it is not a mounted tracefs.
    #[arg(long, env = "GRAYWATCH_TRACEFS")]
    pub tracefs: Option<PathBuf>,

    /// Kernel BTF file (struct layouts).
    #[arg(long, env = "GRAYWATCH_BTF")]
    pub btf: Option<PathBuf>,

    /// Where TCP RTT samples come from: `auto` takes the `tcp:tcp_probe` tracepoint when its
    /// record carries the socket address (kernels after 6.1) and the raw tracepoint of the same
    /// hook otherwise (6.1); `tracepoint` and `raw-tracepoint` force one.
    #[arg(long, value_enum, env = "GRAYWATCH_RTT_SOURCE")]
    pub rtt_source: Option<RttSource>,

    /// Which program counts kernel packet drops: `auto` takes the BTF tracepoint on
    /// `kfree_skb` (plain loads of the skb, less than half the cost per drop) and falls back to
    /// the `skb:kfree_skb` tracepoint if it cannot attach; `tracepoint` forces the latter.
    #[arg(long, value_enum, env = "GRAYWATCH_DROP_SOURCE")]
    pub drop_source: Option<DropSource>,

    /// cgroup v2 mount point; found from /proc/self/mountinfo when unset.
    #[arg(long, env = "GRAYWATCH_CGROUP_ROOT")]
    pub cgroup_root: Option<PathBuf>,

    /// Only report cgroups at or below this path of the v2 hierarchy (e.g. /kubepods.slice).
    #[arg(long, env = "GRAYWATCH_CGROUP_SCOPE")]
    pub cgroup_scope: Option<String>,

    /// Take the node-level pressure figures (PSI) from the scope's own cgroup instead of
    /// /proc/pressure: for several agents sharing one kernel (the netns bench), where each
    /// "node" is a cgroup. Needs --cgroup-scope. Never on a real node.
    #[arg(long, env = "GRAYWATCH_NODE_FIGURES_FROM_SCOPE")]
    pub node_figures_from_scope: bool,

    /// Also report the pressure, OOM and throttling figures of these cgroups, beyond the pods
    /// found under kubepods: paths relative to each hierarchy root, comma-separated (e.g.
    /// system.slice/kubelet.service).
    #[arg(
        long,
        env = "GRAYWATCH_WATCH_CGROUPS",
        value_delimiter = ',',
        value_name = "PATH,..."
    )]
    pub watch_cgroups: Vec<String>,

    /// Which cgroups key the CPU and memory signals: `auto` the v2 hierarchy when the host has
    /// one; `v1` the v1 cpu and memory controllers' cgroups even then (a hybrid host whose pods
    /// live only in v1).
    #[arg(long, value_enum, env = "GRAYWATCH_CGROUP_ATTRIBUTION")]
    pub cgroup_attribution: Option<CgroupAttribution>,

    /// Where the host's /proc is mounted (a DaemonSet mounts it elsewhere, e.g. /host/proc, as
    /// node exporters do).
    #[arg(long, env = "PROCFS_ROOT")]
    pub procfs_root: Option<PathBuf>,

    /// Where the host's /sys is mounted; its fs/cgroup holds the cgroup hierarchies.
    #[arg(long, env = "SYSFS_ROOT")]
    pub sysfs_root: Option<PathBuf>,

    /// Stream window summaries to this aggregator (e.g. <http://graywatch-aggregator:7443>).
    #[arg(long, env = "GRAYWATCH_AGGREGATOR")]
    pub aggregator: Option<String>,

    /// Find the aggregator replicas through the Kubernetes API, not DNS: watch the Endpoints of
    /// this Service, given as <namespace>/<service>[:<port-name>] (e.g.
    /// graywatch/graywatch-aggregator-replicas:grpc), and stream to every ready address. Without
    /// a port name: the only port, or the one numbered as in --aggregator. --aggregator still
    /// gives the scheme and the TLS server name, and its DNS name is the fallback while the API
    /// is unreachable or lists no ready replica. Needs RBAC: endpoints get/list/watch in that
    /// namespace.
    #[arg(
        long,
        env = "GRAYWATCH_AGGREGATOR_ENDPOINTS",
        value_name = "NAMESPACE/SERVICE[:PORT]"
    )]
    pub aggregator_endpoints: Option<String>,

    /// Projected ServiceAccount token presented to the aggregator (re-read on every reconnect).
    #[arg(long, env = "GRAYWATCH_AGGREGATOR_TOKEN_FILE")]
    pub aggregator_token_file: Option<PathBuf>,

    /// PEM CA bundle for the aggregator's TLS certificate (required for https:// aggregators).
    #[arg(long, env = "GRAYWATCH_AGGREGATOR_CA_FILE")]
    pub aggregator_ca_file: Option<PathBuf>,

    /// INSECURE, development only: send the token to an http:// (plaintext) aggregator, where
    /// anyone on the path can copy it. Refused without this.
    #[arg(long, env = "GRAYWATCH_AGGREGATOR_INSECURE_PLAINTEXT_TOKEN")]
    pub aggregator_insecure_plaintext_token: bool,

    /// Name expected in the aggregator's certificate (default: the URL's host).
    #[arg(long, env = "GRAYWATCH_AGGREGATOR_TLS_SERVER_NAME")]
    pub aggregator_tls_server_name: Option<String>,

    /// PEM client certificate and key for mTLS to the aggregator.
    #[arg(long, env = "GRAYWATCH_AGGREGATOR_CLIENT_CERT_FILE")]
    pub aggregator_client_cert_file: Option<PathBuf>,
    #[arg(long, env = "GRAYWATCH_AGGREGATOR_CLIENT_KEY_FILE")]
    pub aggregator_client_key_file: Option<PathBuf>,

    /// Resolve pod names from the API server: auto (when in a cluster), on, off.
    #[arg(long, value_enum, env = "GRAYWATCH_KUBE")]
    pub kube: Option<KubeMode>,

    /// Log filter (tracing `EnvFilter` syntax, e.g. info or `graywatch_agent=debug`).
    #[arg(long, env = "GRAYWATCH_LOG", default_value = "info")]
    pub log: String,

    /// Log format.
    #[arg(long, value_enum, env = "GRAYWATCH_LOG_FORMAT", default_value = "text")]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputFormat {
    /// One JSON object per window, one per line.
    Json,
    /// No summaries on stdout (metrics and the aggregator stream only).
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KubeMode {
    Auto,
    On,
    Off,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Which program samples TCP RTT (both hook `tcp_probe`, which fires as segments arrive).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RttSource {
    /// The tracepoint when its record has what the program needs, else the raw tracepoint.
    #[default]
    Auto,
    /// `tcp:tcp_probe`: reads the record the kernel prepares (needs its `skaddr` field, which
    /// 6.1 lacks), with the socket cookie as key.
    Tracepoint,
    /// `raw_tp/tcp_probe`: reads `struct sock` at BTF offsets; works on every kernel line.
    RawTracepoint,
}

/// Which program counts kernel packet drops (both hook `kfree_skb`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DropSource {
    /// The BTF tracepoint, else the tracepoint.
    #[default]
    Auto,
    /// `skb:kfree_skb`: reads the record the kernel prepares and the skb through helper calls.
    Tracepoint,
}

/// Which cgroups key the CPU and memory signals (see `--cgroup-attribution`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CgroupAttribution {
    /// The v2 hierarchy when the host has one, else the v1 controllers'.
    #[default]
    Auto,
    /// The v1 cpu and memory controllers' cgroups.
    V1,
}

/// Where the host's procfs and sysfs are mounted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPaths {
    pub procfs: PathBuf,
    pub sysfs: PathBuf,
}

impl Default for HostPaths {
    fn default() -> Self {
        Self {
            procfs: "/proc".into(),
            sysfs: "/sys".into(),
        }
    }
}

impl HostPaths {
    pub fn cgroup_root(&self) -> PathBuf {
        self.sysfs.join("fs/cgroup")
    }
}

/// The config file's shape; every field optional, unknown fields rejected.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub node_name: Option<String>,
    #[serde(default, with = "humantime_serde")]
    pub interval: Option<Duration>,
    pub output: Option<OutputFormat>,
    pub listen: Option<String>,
    pub tracefs: Option<PathBuf>,
    pub btf: Option<PathBuf>,
    pub rtt_source: Option<RttSource>,
    pub drop_source: Option<DropSource>,
    pub cgroup_root: Option<PathBuf>,
    pub cgroup_scope: Option<String>,
    #[serde(default)]
    pub node_figures_from_scope: bool,
    pub watch_cgroups: Option<Vec<String>>,
    pub cgroup_attribution: Option<CgroupAttribution>,
    pub procfs_root: Option<PathBuf>,
    pub sysfs_root: Option<PathBuf>,
    pub kube: Option<KubeMode>,
    pub aggregator: Option<String>,
    pub aggregator_endpoints: Option<String>,
    pub aggregator_token_file: Option<PathBuf>,
    #[serde(default)]
    pub aggregator_insecure_plaintext_token: bool,
    pub aggregator_ca_file: Option<PathBuf>,
    pub aggregator_tls_server_name: Option<String>,
    pub aggregator_client_cert_file: Option<PathBuf>,
    pub aggregator_client_key_file: Option<PathBuf>,
}

/// The validated configuration the agent runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub node_name: String,
    pub interval: Duration,
    pub once: bool,
    pub output: OutputFormat,
    pub listen: Option<SocketAddr>,
    pub tracefs: PathBuf,
    pub btf: PathBuf,
    pub rtt_source: RttSource,
    pub drop_source: DropSource,
    pub cgroup_root: Option<PathBuf>,
    pub cgroup_scope: Option<String>,
    /// Node-level PSI from the scope's cgroup (bench nodes sharing one kernel).
    pub node_figures_from_scope: bool,
    /// Cgroups reported besides the pods (relative to each hierarchy root).
    pub watch_cgroups: Vec<String>,
    pub cgroup_attribution: CgroupAttribution,
    pub paths: HostPaths,
    pub kube: KubeMode,
    pub aggregator: Option<String>,
    /// The Service whose Endpoints list the aggregator replicas (API discovery instead of DNS).
    pub aggregator_endpoints: Option<crate::discovery::ServiceRef>,
    /// TLS and token for the aggregator stream.
    pub aggregator_security: crate::stream_security::StreamSecurity,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path}: {source}")]
    Parse {
        path: String,
        #[source]
        source: toml::de::Error,
    },
    #[error("invalid `{field}`: {reason}")]
    Invalid { field: &'static str, reason: String },
}

pub const DEFAULT_LISTEN: &str = "0.0.0.0:9101";
const MIN_INTERVAL: Duration = Duration::from_millis(100);
const MAX_INTERVAL: Duration = Duration::from_hours(1);

impl Config {
    /// Merges flags over the file (if any) over defaults, and validates.
    pub fn load(cli: &Cli) -> Result<Self, ConfigError> {
        let file = match &cli.config {
            Some(path) => FileConfig::from_path(path)?,
            None => FileConfig::default(),
        };
        Self::merge(cli, file)
    }

    #[expect(
        clippy::too_many_lines,
        reason = "one short block per setting: command line over file over default"
    )]
    pub fn merge(cli: &Cli, file: FileConfig) -> Result<Self, ConfigError> {
        let node_name = cli
            .node_name
            .clone()
            .or(file.node_name)
            .or_else(hostname)
            .ok_or(ConfigError::Invalid {
                field: "node_name",
                reason: "not set and no hostname".into(),
            })?;
        if node_name.is_empty() || node_name.len() > 253 {
            return Err(ConfigError::Invalid {
                field: "node_name",
                reason: format!("must be 1-253 characters, got {node_name:?}"),
            });
        }
        let interval = cli.interval.or(file.interval).unwrap_or(Duration::from_secs(1));
        if !(MIN_INTERVAL..=MAX_INTERVAL).contains(&interval) {
            return Err(ConfigError::Invalid {
                field: "interval",
                reason: format!("{interval:?} is outside {MIN_INTERVAL:?}..={MAX_INTERVAL:?}"),
            });
        }
        let listen = cli
            .listen
            .clone()
            .or(file.listen)
            .unwrap_or_else(|| DEFAULT_LISTEN.into());
        let listen = match listen.as_str() {
            "off" | "" => None,
            addr => Some(addr.parse::<SocketAddr>().map_err(|e| ConfigError::Invalid {
                field: "listen",
                reason: format!("{addr:?} is not host:port ({e})"),
            })?),
        };
        let cgroup_scope = cli.cgroup_scope.clone().or(file.cgroup_scope);
        if let Some(scope) = &cgroup_scope
            && !scope.starts_with('/')
        {
            return Err(ConfigError::Invalid {
                field: "cgroup_scope",
                reason: format!("{scope:?} must be an absolute cgroup path like /kubepods.slice"),
            });
        }
        let node_figures_from_scope = cli.node_figures_from_scope || file.node_figures_from_scope;
        if node_figures_from_scope && cgroup_scope.is_none() {
            return Err(ConfigError::Invalid {
                field: "node_figures_from_scope",
                reason: "needs cgroup_scope (the cgroup whose figures stand for the node's)".into(),
            });
        }
        let aggregator = cli.aggregator.clone().or(file.aggregator);
        if let Some(url) = &aggregator
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return Err(ConfigError::Invalid {
                field: "aggregator",
                reason: format!("{url:?} must be a URL like http://graywatch-aggregator:7443"),
            });
        }
        let aggregator_endpoints = cli
            .aggregator_endpoints
            .clone()
            .or(file.aggregator_endpoints)
            .map(|s| {
                s.parse::<crate::discovery::ServiceRef>()
                    .map_err(|e| ConfigError::Invalid {
                        field: "aggregator_endpoints",
                        reason: e.to_string(),
                    })
            })
            .transpose()?;
        if aggregator_endpoints.is_some() && aggregator.is_none() {
            return Err(ConfigError::Invalid {
                field: "aggregator_endpoints",
                reason: "needs `aggregator` too (its scheme, TLS server name and DNS fallback)".into(),
            });
        }
        let aggregator_security = crate::stream_security::StreamSecurity {
            token_file: cli.aggregator_token_file.clone().or(file.aggregator_token_file),
            ca_file: cli.aggregator_ca_file.clone().or(file.aggregator_ca_file),
            tls_server_name: cli
                .aggregator_tls_server_name
                .clone()
                .or(file.aggregator_tls_server_name),
            client_cert_file: cli
                .aggregator_client_cert_file
                .clone()
                .or(file.aggregator_client_cert_file),
            client_key_file: cli
                .aggregator_client_key_file
                .clone()
                .or(file.aggregator_client_key_file),
        };
        if aggregator.as_deref().is_some_and(|u| u.starts_with("https://")) != aggregator_security.tls() {
            return Err(ConfigError::Invalid {
                field: "aggregator_ca_file",
                reason: "an https:// aggregator needs aggregator_ca_file, and aggregator_ca_file needs https://".into(),
            });
        }
        let plaintext_ok = cli.aggregator_insecure_plaintext_token || file.aggregator_insecure_plaintext_token;
        if aggregator_security.token_file.is_some()
            && aggregator.as_deref().is_some_and(|u| u.starts_with("http://"))
            && !plaintext_ok
        {
            return Err(ConfigError::Invalid {
                field: "aggregator_token_file",
                reason: "the token would cross the network in plaintext to an http:// aggregator: use https:// \
                         with aggregator_ca_file, or aggregator_insecure_plaintext_token = true to accept that"
                    .into(),
            });
        }
        if aggregator_security.client_cert_file.is_some() != aggregator_security.client_key_file.is_some() {
            return Err(ConfigError::Invalid {
                field: "aggregator_client_cert_file",
                reason: "aggregator_client_cert_file and aggregator_client_key_file go together".into(),
            });
        }
        Ok(Config {
            aggregator,
            aggregator_endpoints,
            aggregator_security,
            node_name,
            interval,
            once: cli.once,
            output: cli.output.or(file.output).unwrap_or(if cli.once {
                OutputFormat::Json
            } else {
                OutputFormat::None
            }),
            listen,
            tracefs: cli
                .tracefs
                .clone()
                .or(file.tracefs)
                .unwrap_or_else(|| crate::tracefs::DEFAULT_TRACEFS.into()),
            btf: cli
                .btf
                .clone()
                .or(file.btf)
                .unwrap_or_else(|| "/sys/kernel/btf/vmlinux".into()),
            cgroup_root: cli.cgroup_root.clone().or(file.cgroup_root),
            cgroup_scope,
            node_figures_from_scope,
            watch_cgroups: if cli.watch_cgroups.is_empty() {
                file.watch_cgroups.unwrap_or_default()
            } else {
                cli.watch_cgroups.clone()
            }
            .into_iter()
            .map(|rel| rel.trim().to_owned())
            .filter(|rel| !rel.is_empty())
            .collect(),
            cgroup_attribution: cli.cgroup_attribution.or(file.cgroup_attribution).unwrap_or_default(),
            paths: {
                let default = HostPaths::default();
                HostPaths {
                    procfs: cli.procfs_root.clone().or(file.procfs_root).unwrap_or(default.procfs),
                    sysfs: cli.sysfs_root.clone().or(file.sysfs_root).unwrap_or(default.sysfs),
                }
            },
            kube: cli.kube.or(file.kube).unwrap_or(KubeMode::Auto),
            rtt_source: cli.rtt_source.or(file.rtt_source).unwrap_or_default(),
            drop_source: cli.drop_source.or(file.drop_source).unwrap_or_default(),
        })
    }
}

impl FileConfig {
    pub fn from_path(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.display().to_string(),
            source,
        })
    }
}

fn hostname() -> Option<String> {
    nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok())
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e} (examples: 1s, 500ms, 2m)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cli(args: &[&str]) -> Cli {
        Cli::parse_from(std::iter::once("graywatch-agent").chain(args.iter().copied()))
    }

    #[test]
    fn flags_override_the_file() {
        let file: FileConfig = toml::from_str("interval = \"5s\"\nnode_name = \"from-file\"\n").expect("toml");
        let config = Config::merge(&cli(&["--node-name", "from-flag"]), file).expect("valid");
        assert_eq!(config.node_name, "from-flag");
        assert_eq!(config.interval, Duration::from_secs(5));
        assert_eq!(config.listen, Some(DEFAULT_LISTEN.parse().expect("addr")));
    }

    #[test]
    fn host_switches_are_flags_over_the_file() {
        let file: FileConfig =
            toml::from_str("watch_cgroups = [\"from-file\"]\nsysfs_root = \"/host/sys\"\n").expect("toml");
        let config = Config::merge(
            &cli(&[
                "--node-name",
                "n",
                "--watch-cgroups",
                "system.slice/a, ,b",
                "--cgroup-attribution",
                "v1",
                "--procfs-root",
                "/host/proc",
            ]),
            file,
        )
        .expect("valid");
        assert_eq!(config.watch_cgroups, ["system.slice/a", "b"]);
        assert_eq!(config.cgroup_attribution, CgroupAttribution::V1);
        assert_eq!(
            config.paths,
            HostPaths {
                procfs: "/host/proc".into(),
                sysfs: "/host/sys".into(),
            }
        );
        let defaults = Config::merge(&cli(&["--node-name", "n"]), FileConfig::default()).expect("valid");
        assert_eq!(defaults.cgroup_attribution, CgroupAttribution::Auto);
        assert_eq!(defaults.paths, HostPaths::default());
        assert!(defaults.watch_cgroups.is_empty());
    }

    #[test]
    fn once_defaults_to_json_output() {
        let config = Config::merge(&cli(&["--once", "--node-name", "n"]), FileConfig::default()).expect("valid");
        assert_eq!(config.output, OutputFormat::Json);
    }

    #[test]
    fn errors_name_the_field() {
        let err = Config::merge(&cli(&["--node-name", "n", "--interval", "1ms"]), FileConfig::default())
            .expect_err("too short");
        assert!(err.to_string().contains("`interval`"), "{err}");
        let err = Config::merge(&cli(&["--node-name", "n", "--listen", "nope"]), FileConfig::default())
            .expect_err("bad addr");
        assert!(err.to_string().contains("`listen`"), "{err}");
        let err = Config::merge(
            &cli(&["--node-name", "n", "--cgroup-scope", "kubepods"]),
            FileConfig::default(),
        )
        .expect_err("relative scope");
        assert!(err.to_string().contains("`cgroup_scope`"), "{err}");
        let err = Config::merge(
            &cli(&["--node-name", "n", "--node-figures-from-scope"]),
            FileConfig::default(),
        )
        .expect_err("node figures without a scope");
        assert!(err.to_string().contains("`node_figures_from_scope`"), "{err}");
        let err = Config::merge(
            &cli(&["--node-name", "n", "--aggregator", "aggregator:7443"]),
            FileConfig::default(),
        )
        .expect_err("no scheme");
        assert!(err.to_string().contains("`aggregator`"), "{err}");
    }

    #[test]
    fn aggregator_endpoints_from_flag_or_file() {
        let file: FileConfig = toml::from_str(
            "aggregator = \"http://agg.graywatch.svc:7443\"\naggregator_endpoints = \"graywatch/agg:grpc\"\n",
        )
        .expect("toml");
        let config = Config::merge(&cli(&["--node-name", "n"]), file).expect("valid");
        let service = config.aggregator_endpoints.expect("set");
        assert_eq!(
            (service.namespace.as_str(), service.name.as_str()),
            ("graywatch", "agg")
        );
        assert_eq!(service.port_name.as_deref(), Some("grpc"));
        let err = Config::merge(
            &cli(&["--node-name", "n", "--aggregator-endpoints", "graywatch/agg"]),
            FileConfig::default(),
        )
        .expect_err("no aggregator URL");
        assert!(err.to_string().contains("`aggregator_endpoints`"), "{err}");
        let err = Config::merge(
            &cli(&[
                "--node-name",
                "n",
                "--aggregator",
                "http://agg:7443",
                "--aggregator-endpoints",
                "agg",
            ]),
            FileConfig::default(),
        )
        .expect_err("no namespace");
        assert!(err.to_string().contains("`aggregator_endpoints`"), "{err}");
    }

    #[test]
    fn a_token_goes_over_plaintext_only_when_loudly_allowed() {
        let args = [
            "--node-name",
            "n",
            "--aggregator",
            "http://agg:7443",
            "--aggregator-token-file",
            "/t",
        ];
        let err = Config::merge(&cli(&args), FileConfig::default()).expect_err("token over http://");
        assert!(err.to_string().contains("`aggregator_token_file`"), "{err}");
        assert!(err.to_string().contains("aggregator_insecure_plaintext_token"), "{err}");
        let mut allowed = args.to_vec();
        allowed.push("--aggregator-insecure-plaintext-token");
        assert!(Config::merge(&cli(&allowed), FileConfig::default()).is_ok());
        let tls = [
            "--node-name",
            "n",
            "--aggregator",
            "https://agg:7443",
            "--aggregator-ca-file",
            "/ca",
            "--aggregator-token-file",
            "/t",
        ];
        assert!(Config::merge(&cli(&tls), FileConfig::default()).is_ok());
    }

    #[test]
    fn unknown_file_fields_are_rejected() {
        let err = toml::from_str::<FileConfig>("intervall = \"1s\"").expect_err("typo");
        assert!(err.to_string().contains("intervall"), "{err}");
    }

    #[test]
    fn listen_off_disables_the_server() {
        let config =
            Config::merge(&cli(&["--node-name", "n", "--listen", "off"]), FileConfig::default()).expect("valid");
        assert_eq!(config.listen, None);
    }
}
