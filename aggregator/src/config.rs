//! Configuration: command-line flags (each also an environment variable) plus an optional TOML
//! file, validated on start; errors name the offending field.

use std::{net::SocketAddr, path::PathBuf};

use serde::{Deserialize, Serialize};

use crate::{
    core::policy::{Policy, PolicyError},
    security::{SecurityConfig, SecurityError},
};

#[derive(Debug, Clone, clap::Parser)]
#[command(name = "graywatch-aggregator", about = "graywatch fleet aggregator", version)]
pub struct Args {
    /// TOML config file (see `FileConfig`); flags override it.
    #[arg(long, env = "GRAYWATCH_CONFIG")]
    pub config: Option<PathBuf>,
    /// gRPC listen address for agents.
    #[arg(long, env = "GRAYWATCH_GRPC_LISTEN")]
    pub grpc_listen: Option<SocketAddr>,
    /// HTTP listen address for /metrics and /healthz.
    #[arg(long, env = "GRAYWATCH_HTTP_LISTEN")]
    pub http_listen: Option<SocketAddr>,
    /// Our identity in the leader Lease (the pod name in a Deployment).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// Namespace for the Lease, Events of pools, and NodePool snapshots.
    #[arg(long, env = "POD_NAMESPACE")]
    pub namespace: Option<String>,
    /// Dry-run / shadow mode: only Events and logs of what would be done.
    #[arg(long, env = "GRAYWATCH_DRY_RUN")]
    pub dry_run: bool,
    /// Node writes (conditions, taints) in flight at once within a decision step, 1-256
    /// (file: `max_concurrent_writes`, default 16).
    #[arg(long, env = "GRAYWATCH_MAX_CONCURRENT_WRITES")]
    pub max_concurrent_writes: Option<usize>,
    /// INSECURE, development and benchmarks only: act (not dry-run) on unauthenticated reports
    /// (file: `security.insecure_allow_acting_without_identity`).
    #[arg(long, env = "GRAYWATCH_INSECURE_ALLOW_ACTING_WITHOUT_IDENTITY")]
    pub insecure_allow_acting_without_identity: bool,
    /// Log as JSON lines.
    #[arg(long, env = "GRAYWATCH_LOG_JSON")]
    pub log_json: bool,
    /// Without a subcommand: run the aggregator.
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// Remove everything the aggregator wrote to the cluster and exit: our taint and conditions
    /// on every Node, NodePools restored from our snapshots (then deleted). Run by the chart's
    /// pre-delete hook on `helm uninstall`. Exit code 1 if a write failed.
    Cleanup(CleanupArgs),
}

#[derive(Debug, Clone, clap::Args)]
pub struct CleanupArgs {
    /// How long the cleanup keeps the leader Lease (seconds): long enough that no aggregator
    /// replica takes it back before `helm uninstall` has deleted them.
    #[arg(long, env = "GRAYWATCH_CLEANUP_HOLD_LEASE_SECONDS", default_value_t = 300)]
    pub hold_lease_seconds: u32,
    /// A NodeReadinessRule of ours (repeatable): deleted before our conditions are removed, and
    /// its taint removed from every Node.
    #[arg(long, value_name = "NAME")]
    pub node_readiness_rule: Vec<String>,
    /// What to remove: `all` (taints, NodePool changes, conditions) or only our `taint`.
    #[arg(long, value_enum, default_value_t = Only::All)]
    pub only: Only,
    /// The aggregator Deployment (release namespace) to scale to 0 first, waiting until its
    /// pods are gone: the fence of a `helm upgrade` (`stop.rs`). The Lease is then released at
    /// the end instead of held, and the Deployment scaled back if the cleanup fails.
    #[arg(long, value_name = "NAME")]
    pub stop_deployment: Option<String>,
    /// Longest wait for the Deployment's pods to be gone (seconds).
    #[arg(long, default_value_t = 300)]
    pub stop_timeout_seconds: u64,
    /// Why, for the logs and the summary: the mode the release ran in before
    /// (`dry-run`, `nrc`, `direct-taint`) ...
    #[arg(long, value_name = "MODE")]
    pub from_mode: Option<String>,
    /// ... and the mode it is upgraded to.
    #[arg(long, value_name = "MODE")]
    pub to_mode: Option<String>,
}

impl Default for CleanupArgs {
    fn default() -> Self {
        Self {
            hold_lease_seconds: 300,
            node_readiness_rule: Vec::new(),
            only: Only::All,
            stop_deployment: None,
            stop_timeout_seconds: 300,
            from_mode: None,
            to_mode: None,
        }
    }
}

/// What a cleanup removes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Only {
    /// Everything the aggregator wrote (uninstall; a change to mode dry-run).
    All,
    /// Our taint only (a change from direct-taint to nrc: the conditions stay for NRC).
    Taint,
}

impl Only {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::All => "all",
            Self::Taint => "taint",
        }
    }
}

/// Default namespace for Events about cluster-scoped objects (where the kubelet puts Node
/// events); config `event_namespace` overrides it.
pub const EVENT_NAMESPACE: &str = "default";
/// The namespaces the API server accepts Events about cluster-scoped objects (Nodes,
/// NodePools) in: an Event whose involved object has no namespace must be in "default" without
/// an eventTime, or in "kube-system" with one (the actuator sets it there).
pub const EVENT_NAMESPACES: [&str; 2] = ["default", "kube-system"];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FileConfig {
    pub grpc_listen: SocketAddr,
    pub http_listen: SocketAddr,
    pub identity: String,
    pub namespace: String,
    /// Where Events about Nodes and NodePools go: "default" (where the kubelet puts Node events)
    /// or "kube-system", the only namespaces the API server accepts Events about cluster-scoped
    /// objects in. The chart's Events RBAC follows the same value.
    pub event_namespace: String,
    /// Decision period.
    pub tick_ms: u64,
    /// Node writes in flight at once within one phase of a plan (conditions, then taints).
    /// Bounds the apiserver load of a burst, e.g. a new leader's first step over every node.
    pub max_concurrent_writes: usize,
    pub ingest: IngestConfig,
    pub leader: LeaderConfig,
    pub policy: Policy,
    /// Agent authentication, TLS and per-identity limits (see security.rs).
    pub security: SecurityConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IngestConfig {
    /// Largest accepted message (bytes); larger ones get `OUT_OF_RANGE` before decoding.
    pub max_message_bytes: usize,
    /// Most peers per summary.
    pub max_peers: usize,
    /// Most nodes in the fleet view (reports of further nodes are refused, `RESOURCE_EXHAUSTED`);
    /// the per-identity limiter and the TokenReview cache hold at most twice as many entries.
    pub max_nodes: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LeaderConfig {
    pub lease_name: String,
    pub lease_duration_ms: u64,
    pub renew_interval_ms: u64,
    /// A leader that has not renewed for this long stops acting at once, even with a renew call
    /// still hanging; between `renew_interval_ms` and `lease_duration_ms` (exclusive). Default:
    /// 2/3 of the lease duration (client-go: 10 s of 15 s).
    pub renew_deadline_ms: Option<u64>,
}

impl LeaderConfig {
    /// The renew deadline in force (the configured one or 2/3 of the lease duration).
    #[must_use]
    pub fn renew_deadline_ms(&self) -> u64 {
        self.renew_deadline_ms.unwrap_or(self.lease_duration_ms * 2 / 3)
    }
}

impl Default for FileConfig {
    fn default() -> Self {
        Self {
            grpc_listen: SocketAddr::from(([0, 0, 0, 0], 7443)),
            http_listen: SocketAddr::from(([0, 0, 0, 0], 9090)),
            identity: String::new(),
            namespace: "graywatch".into(),
            event_namespace: EVENT_NAMESPACE.into(),
            tick_ms: 1000,
            max_concurrent_writes: 16,
            ingest: IngestConfig::default(),
            leader: LeaderConfig::default(),
            policy: Policy::default(),
            security: SecurityConfig::default(),
        }
    }
}

impl Default for IngestConfig {
    fn default() -> Self {
        Self {
            max_message_bytes: graywatch_proto::MAX_MESSAGE_BYTES,
            max_peers: 4096,
            max_nodes: crate::ingest::DEFAULT_MAX_NODES,
        }
    }
}

impl Default for LeaderConfig {
    fn default() -> Self {
        Self {
            lease_name: "graywatch-aggregator".into(),
            lease_duration_ms: 15_000,
            renew_interval_ms: 5_000,
            renew_deadline_ms: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("parsing config file {path}: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("{field}: {problem}")]
    Invalid { field: &'static str, problem: String },
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error(transparent)]
    Security(#[from] SecurityError),
}

impl FileConfig {
    /// File (if any) + flags, validated.
    pub fn load(args: &Args) -> Result<Self, ConfigError> {
        let mut cfg = match &args.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                })?;
                Self::from_toml(&text).map_err(|source| ConfigError::Parse {
                    path: path.clone(),
                    source: Box::new(source),
                })?
            }
            None => Self::default(),
        };
        if let Some(a) = args.grpc_listen {
            cfg.grpc_listen = a;
        }
        if let Some(a) = args.http_listen {
            cfg.http_listen = a;
        }
        if let Some(i) = &args.identity {
            cfg.identity.clone_from(i);
        }
        if let Some(n) = &args.namespace {
            cfg.namespace.clone_from(n);
        }
        if args.dry_run {
            cfg.policy.dry_run = true;
        }
        if args.insecure_allow_acting_without_identity {
            cfg.security.insecure_allow_acting_without_identity = true;
        }
        if let Some(n) = args.max_concurrent_writes {
            cfg.max_concurrent_writes = n;
        }
        if cfg.identity.is_empty() {
            cfg.identity = std::env::var("HOSTNAME").unwrap_or_else(|_| format!("graywatch-{}", std::process::id()));
        }
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn from_toml(text: &str) -> Result<Self, toml::de::Error> {
        toml::from_str(text)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |field: &'static str, problem: &str| {
            Err(ConfigError::Invalid {
                field,
                problem: problem.into(),
            })
        };
        if self.tick_ms == 0 {
            return bad("tick_ms", "must be positive");
        }
        if !(1..=256).contains(&self.max_concurrent_writes) {
            return bad("max_concurrent_writes", "must be between 1 and 256");
        }
        if self.namespace.is_empty() {
            return bad("namespace", "must not be empty");
        }
        if !EVENT_NAMESPACES.contains(&self.event_namespace.as_str()) {
            return bad(
                "event_namespace",
                "must be \"default\" or \"kube-system\": the API server accepts Events about Nodes and NodePools (cluster-scoped) nowhere else",
            );
        }
        if self.ingest.max_message_bytes < 1024 {
            return bad("ingest.max_message_bytes", "must be at least 1024");
        }
        if self.ingest.max_peers == 0 {
            return bad("ingest.max_peers", "must be positive");
        }
        if self.ingest.max_nodes == 0 {
            return bad("ingest.max_nodes", "must be positive");
        }
        if self.leader.lease_duration_ms < 1000 || !self.leader.lease_duration_ms.is_multiple_of(1000) {
            return bad(
                "leader.lease_duration_ms",
                "must be a whole number of seconds, at least 1000",
            );
        }
        if self.leader.renew_interval_ms == 0 || self.leader.renew_interval_ms >= self.leader.lease_duration_ms {
            return bad(
                "leader.renew_interval_ms",
                "must be positive and below leader.lease_duration_ms",
            );
        }
        let deadline = self.leader.renew_deadline_ms();
        if deadline <= self.leader.renew_interval_ms || deadline >= self.leader.lease_duration_ms {
            return bad(
                "leader.renew_deadline_ms",
                "must be above leader.renew_interval_ms and below leader.lease_duration_ms",
            );
        }
        self.policy.validate()?;
        self.security.validate_for(!self.policy.dry_run)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inline_toml_overrides_defaults() {
        let cfg = FileConfig::from_toml(
            r#"
            tick_ms = 200
            [policy]
            dry_run = true
            taint_mode = "nrc"
            blast_radius = 0.1
            [leader]
            lease_duration_ms = 3000
            renew_interval_ms = 1000
            "#,
        )
        .expect("parses");
        assert_eq!(cfg.tick_ms, 200);
        assert!(cfg.policy.dry_run);
        assert_eq!(cfg.policy.taint_mode, crate::core::policy::TaintMode::Nrc);
        assert_eq!(cfg.policy.degrade_windows, Policy::default().degrade_windows);
        assert!(cfg.validate().is_ok());
        // Acting (not dry-run) without agent identity is refused unless loudly allowed.
        let acting = FileConfig::from_toml("[policy]\ntaint_mode = \"nrc\"\n").expect("parses");
        let err = acting.validate().expect_err("nrc + insecure-none");
        assert!(err.to_string().starts_with("security.auth"), "{err}");
        let allowed = FileConfig::from_toml(
            "[policy]\ntaint_mode = \"nrc\"\n[security]\ninsecure_allow_acting_without_identity = true\n",
        )
        .expect("parses");
        assert!(allowed.validate().is_ok());
    }

    #[test]
    fn unknown_field_is_rejected_with_its_name() {
        let err = FileConfig::from_toml("[policy]\nblast_radiuss = 0.1\n").expect_err("typo");
        assert!(err.to_string().contains("blast_radiuss"), "{err}");
    }

    #[test]
    fn invalid_values_name_the_field() {
        let cfg = FileConfig {
            leader: LeaderConfig {
                renew_interval_ms: 20_000,
                ..LeaderConfig::default()
            },
            ..FileConfig::default()
        };
        let cfg = FileConfig {
            policy: Policy {
                dry_run: true,
                ..Policy::default()
            },
            ..cfg
        };
        let err = cfg.validate().expect_err("renew above duration");
        assert!(err.to_string().starts_with("leader.renew_interval_ms"), "{err}");
        for deadline in [5_000, 15_000] {
            let mut cfg = cfg.clone();
            cfg.leader = LeaderConfig {
                renew_deadline_ms: Some(deadline),
                ..LeaderConfig::default()
            };
            let err = cfg.validate().expect_err("deadline outside (renew interval, lease)");
            assert!(err.to_string().starts_with("leader.renew_deadline_ms"), "{err}");
        }
        assert_eq!(LeaderConfig::default().renew_deadline_ms(), 10_000);
        for writes in [0, 257] {
            let cfg = FileConfig {
                max_concurrent_writes: writes,
                ..FileConfig::default()
            };
            let err = cfg.validate().expect_err("write concurrency out of range");
            assert!(err.to_string().starts_with("max_concurrent_writes"), "{err}");
        }
        let cfg = FileConfig {
            event_namespace: "graywatch".into(),
            ..FileConfig::default()
        };
        let err = cfg.validate().expect_err("event namespace");
        assert!(err.to_string().starts_with("event_namespace"), "{err}");
        let parsed = FileConfig::from_toml("event_namespace = \"kube-system\"\n").expect("parses");
        assert_eq!(parsed.event_namespace, "kube-system");
        let mut ok = FileConfig::default();
        ok.policy.dry_run = true;
        ok.event_namespace = "kube-system".into();
        ok.validate().expect("kube-system takes Events about Nodes");
        let mut cfg = FileConfig::default();
        cfg.policy.blast_radius = 0.9;
        assert!(
            cfg.validate()
                .expect_err("radius")
                .to_string()
                .starts_with("policy.blast_radius")
        );
    }
}
