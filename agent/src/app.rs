//! The agent's run loop: load the kernel programs, then every window read the signals, build a
//! [`WindowSummary`], export it (stdout, /metrics, aggregator) until told to stop.

use std::{
    collections::BTreeMap,
    io::Write,
    path::{Path, PathBuf},
    sync::Arc,
    time::Instant,
};

use anyhow::Context;
use tokio::io::unix::AsyncFd;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::{
    cgroups::{CgroupResolver, parse_pod_cgroup},
    config::{CgroupAttribution, Config, HostPaths, KubeMode, OutputFormat},
    ebpf::{KernelPrograms, LoadOptions},
    http::{self, Health, now_ms},
    metrics::Metrics,
    pods::PodDirectory,
    signals::{
        host::{HostGlobals, HostSignals},
        net::{NetCollector, network_window},
    },
    summary::{PodRef, WindowSummary, Workload},
};

/// Everything that turns kernel counters into window summaries.
pub struct Collector {
    programs: KernelPrograms,
    net: NetCollector,
    host: HostSignals,
    cgroups: CgroupResolver,
    pods: PodDirectory,
    node: String,
    scope: Option<String>,
    window_start_ms: u64,
    window_started: Instant,
}

/// What a [`Collector`] needs to start.
#[derive(Debug, Clone)]
pub struct CollectorOptions {
    pub node: String,
    pub load: LoadOptions,
    pub paths: HostPaths,
    pub cgroup_root: Option<PathBuf>,
    pub scope: Option<String>,
    /// Node-level PSI from the scope's cgroup (see [`Config::node_figures_from_scope`]).
    pub node_figures_from_scope: bool,
    /// Cgroups reported besides the pods (relative to each hierarchy root).
    pub watch_cgroups: Vec<String>,
    pub cgroup_attribution: CgroupAttribution,
}

impl CollectorOptions {
    /// Defaults for `node`: standard host paths, no scope.
    pub fn for_node(node: &str) -> Self {
        Self {
            node: node.to_owned(),
            load: LoadOptions::default(),
            paths: HostPaths::default(),
            cgroup_root: None,
            scope: None,
            node_figures_from_scope: false,
            watch_cgroups: Vec::new(),
            cgroup_attribution: CgroupAttribution::default(),
        }
    }
}

impl From<&Config> for CollectorOptions {
    fn from(config: &Config) -> Self {
        Self {
            node: config.node_name.clone(),
            load: LoadOptions {
                tracefs: config.tracefs.clone(),
                btf: config.btf.clone(),
                rtt_source: config.rtt_source,
                drop_source: config.drop_source,
            },
            paths: config.paths.clone(),
            cgroup_root: config.cgroup_root.clone(),
            scope: config.cgroup_scope.clone(),
            node_figures_from_scope: config.node_figures_from_scope,
            watch_cgroups: config.watch_cgroups.clone(),
            cgroup_attribution: config.cgroup_attribution,
        }
    }
}

impl Collector {
    /// Loads and attaches the programs and takes the first (baseline) reading.
    pub fn start(options: &CollectorOptions, pods: PodDirectory) -> anyhow::Result<Self> {
        // Fail with the fix named rather than with aya's bare "tracefs not found" at attach.
        crate::tracefs::check_attachable(&options.load.tracefs).context("checking tracefs")?;
        let paths = &options.paths;
        let mut programs = KernelPrograms::load(
            &options.load,
            &paths.procfs,
            HostGlobals::program_group(paths, options.cgroup_attribution),
        )
        .context("starting the kernel programs")?;
        let net = NetCollector::new(&mut programs)?;
        let mut host = HostSignals::new(paths, &options.watch_cgroups, &mut programs)?;
        let cgroups = match CgroupResolver::discover(options.cgroup_root.as_deref(), Path::new("/proc/self/mountinfo"))
        {
            Ok(cgroups) => {
                info!(root = ?cgroups.root(), mode = ?cgroups.mode(), "cgroup hierarchy");
                cgroups
            }
            Err(error @ crate::cgroups::CgroupError::NoUnifiedHierarchy { .. }) => {
                // cgroup v1-only hosts: sockets all belong to the v2 root, so network samples
                // cannot be attributed to pods. Keep measuring the node.
                warn!(%error, "network signals will not be attributed to pods");
                CgroupResolver::unavailable()
            }
            Err(error) => return Err(error).context("finding the cgroup v2 hierarchy for pod attribution"),
        };
        if options.node_figures_from_scope {
            let (Some(root), Some(scope)) = (cgroups.root(), options.scope.as_deref()) else {
                anyhow::bail!("node figures from the scope need a cgroup v2 hierarchy and a scope");
            };
            let dir = root.join(scope.trim_start_matches('/'));
            info!(dir = %dir.display(), "node-level pressure from the scope's cgroup (bench node on a shared kernel)");
            host.node_pressure_from_cgroup(&dir);
        }
        let mut collector = Self {
            programs,
            net,
            host,
            cgroups,
            pods,
            node: options.node.clone(),
            scope: options.scope.clone(),
            window_start_ms: now_ms(),
            window_started: Instant::now(),
        };
        // Counters are cumulative since load; the first read is the baseline of window one.
        collector.net.collect().context("reading the network maps")?;
        Ok(collector)
    }

    pub fn programs_mut(&mut self) -> &mut KernelPrograms {
        &mut self.programs
    }

    /// Ends the current window and returns its summary. Blocking (map syscalls, cgroupfs).
    pub fn collect(&mut self) -> anyhow::Result<WindowSummary> {
        let delta = self.net.collect().context("reading the network maps")?;
        let window_seconds = self.window_started.elapsed().as_secs_f64();
        let start = self.window_start_ms;
        self.window_started = Instant::now();
        self.window_start_ms = now_ms();

        let (cgroups, pods) = (&mut self.cgroups, &self.pods);
        let mut network = network_window(&delta, self.programs.drop_reasons(), |id| workload(cgroups, pods, id));
        if let Some(scope) = &self.scope {
            let inside = |w: &Workload| w.cgroup_path.as_deref().is_some_and(|p| in_scope(p, scope));
            network.flows.retain(|f| inside(&f.workload));
            network.workloads.retain(|w| inside(&w.workload));
            // Drops without a socket cannot be told apart between scopes on a shared kernel.
            network.drops.retain(|d| d.workload.as_ref().is_some_and(inside));
        }
        let (mut cpu, mut memory, mut pressure) = self.host.collect(|id| workload(cgroups, pods, id));
        if let Some(scope) = &self.scope {
            // A scoped agent (one of several on a shared kernel, as in the demo) reports only its
            // own cgroups, so its run-queue figure is its subtree's; node PSI is the scope's with
            // --node-figures-from-scope, steal always the kernel's.
            let inside = |w: &Workload| w.cgroup_path.as_deref().is_some_and(|p| in_scope(p, scope));
            cpu.run_queue.retain(|r| inside(&r.workload));
            memory.reclaim.retain(|r| inside(&r.workload));
            memory.oom_kills.retain(|k| inside(&k.workload));
            pressure.cgroups.retain(|c| in_scope(&c.path, scope));
        }
        let mut unavailable = BTreeMap::new();
        for (signal, why) in self.programs.unavailable() {
            unavailable.insert(signal.clone(), why.clone());
        }
        if self.cgroups.root().is_none() {
            unavailable.insert(
                "pod_attribution".to_owned(),
                "no cgroup v2 hierarchy on this host (cgroup v1 only): network samples cannot be attributed to pods"
                    .to_owned(),
            );
        }
        for (signal, available) in self.host.availability() {
            if !available {
                unavailable
                    .entry(signal.to_owned())
                    .or_insert_with(|| HostSignals::why_unavailable(signal).to_owned());
            }
        }
        Ok(WindowSummary {
            node: self.node.clone(),
            window_start_unix_ms: start,
            window_seconds,
            network,
            cpu,
            memory,
            pressure,
            lost_events: delta.lost_events,
            unavailable,
            local_scores: Vec::new(),
            predictions: Vec::new(),
        })
    }

    /// The CPU/memory collectors, e.g. to watch a test's cgroup.
    pub fn host_mut(&mut self) -> &mut HostSignals {
        &mut self.host
    }

    /// The network reader, e.g. to inspect or tune its drop reader (tests and diagnostics).
    pub fn net_mut(&mut self) -> &mut NetCollector {
        &mut self.net
    }

    /// The cgroup resolver, e.g. to look up the id of a test's cgroup.
    pub fn cgroups(&mut self) -> &mut CgroupResolver {
        &mut self.cgroups
    }
}

fn workload(cgroups: &mut CgroupResolver, pods: &PodDirectory, cgroup_id: u64) -> Workload {
    let cgroup_path = cgroups.path_of(cgroup_id).map(str::to_owned);
    let pod = cgroup_path.as_deref().and_then(parse_pod_cgroup).map(|pod_cgroup| {
        let mut pod = PodRef::from(pod_cgroup);
        if let Some(name) = pods.get(&pod.uid) {
            pod.namespace = Some(name.namespace);
            pod.name = Some(name.name);
        }
        pod
    });
    Workload {
        cgroup_id,
        cgroup_path,
        pod,
    }
}

/// True if cgroup `path` is `scope` or below it (whole path components only).
pub fn in_scope(path: &str, scope: &str) -> bool {
    let scope = scope.trim_end_matches('/');
    scope.is_empty() || path == scope || path.strip_prefix(scope).is_some_and(|rest| rest.starts_with('/'))
}

/// Runs the agent until SIGINT/SIGTERM (or after one window with `--once`).
#[expect(
    clippy::too_many_lines,
    clippy::similar_names,
    reason = "the agent's wiring in start-up order: config, programs, tasks, window loop, shutdown; \
              `scorer` and its `scores`"
)]
pub async fn run(config: Config) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    tokio::spawn(signal_shutdown(shutdown.clone()));

    let pods = PodDirectory::default();
    let kube = kube_client(&config).await?;
    start_pod_watch(&config, &pods, kube.as_ref(), &shutdown);
    let peer_book = crate::peers::SharedPeerBook::default();
    if let Some(client) = kube.as_ref().filter(|_| pod_names_wanted(&config)) {
        let (book, client, shutdown) = (peer_book.clone(), client.clone(), shutdown.clone());
        tokio::spawn(async move {
            tokio::select! {
                () = book.watch_nodes(client) => {}
                () = shutdown.cancelled() => {}
            }
        });
    }

    let mut collector =
        tokio::task::block_in_place(|| Collector::start(&CollectorOptions::from(&config), pods.clone()))?;
    if let Some(logger) = collector.programs_mut().take_logger() {
        tokio::spawn(forward_kernel_logs(logger, shutdown.clone()));
    }

    let health = Arc::new(Health::new(Metrics::new(), config.interval));
    for signal in crate::ebpf::NETWORK_SIGNALS {
        let missing = collector.programs_mut().unavailable().iter().any(|(s, _)| s == signal);
        health.metrics.set_available(signal, !missing);
    }
    for (signal, available) in collector.host_mut().availability() {
        health.metrics.set_available(signal, available);
    }
    let server = match config.listen {
        Some(addr) if !config.once => {
            let (health, shutdown) = (health.clone(), shutdown.clone());
            Some(tokio::spawn(async move { http::serve(addr, health, shutdown).await }))
        }
        _ => None,
    };

    let mut reporter = match &config.aggregator {
        Some(endpoint) => {
            info!(%endpoint, "streaming window summaries to every aggregator replica behind this address");
            let template = crate::report::ReportConfig {
                endpoint: endpoint.clone(),
                security: config.aggregator_security.clone(),
                ..Default::default()
            };
            let mut fanout = crate::fanout::Fanout::new(template)?;
            match (&config.aggregator_endpoints, &kube) {
                (Some(service), Some(client)) => {
                    info!(%service, "finding aggregator replicas through the Kubernetes API (DNS as fallback)");
                    let view =
                        crate::discovery::spawn_watch(client.clone(), service.clone(), fanout.port(), shutdown.clone());
                    fanout = fanout.with_api(view);
                }
                (Some(service), None) => {
                    warn!(%service, "no Kubernetes API client; finding aggregator replicas through DNS only");
                }
                (None, _) => {}
            }
            fanout.refresh().await;
            Some(fanout)
        }
        None => None,
    };
    let identity = crate::wire::Identity::from_host(&config.node_name, Path::new("/proc"));
    let mut scorer = crate::scoring::LocalScorer::default();
    let mut predictor = crate::predict::Predictor::default();
    let started_at = Instant::now();
    let mut seq = 0u64;
    let mut last_book: Option<Arc<graywatch_proto::v1::PeerBook>> = None;
    let mut address_answers = crate::peers::AddressAnswers::default();

    let mut ticker = tokio::time::interval(config.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await; // the first tick is immediate; the baseline was just taken
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            _ = ticker.tick() => {}
        }
        let started = Instant::now();
        let summary = match tokio::task::block_in_place(|| collector.collect()) {
            Ok(summary) => summary,
            Err(error) => {
                health.metrics.count_error("collect");
                warn!(
                    error = format!("{error:#}"),
                    "window collection failed; retrying next window"
                );
                continue;
            }
        };
        health.metrics.collect_seconds.observe(started.elapsed().as_secs_f64());
        health.metrics.observe(&summary);
        // Once per window, for the scorer and the wire summary alike.
        let crate::peers::WindowPeers { peers, unmapped } = crate::peers::peers(
            &summary,
            &peer_book.get(),
            &address_answers,
            crate::peers::PeerLimits::default(),
        );
        health.metrics.observe_peers(&peers);
        let t = started_at.elapsed().as_secs_f64();
        let scores = scorer.observe(t, &summary, &peers);
        health.metrics.observe_scores(&scores);
        for (family, onset) in scores.iter().filter_map(|s| s.onset.as_ref().map(|o| (s.family, o))) {
            info!(
                family = family.as_str(),
                score = format!("{:.2}", onset.score),
                reason = %onset.reason,
                "anomaly onset"
            );
        }
        let predictions = predictor.observe(t, &summary, |uid| {
            pods.get(uid).map(|pod| format!("{}/{}", pod.namespace, pod.name))
        });
        let mut summary = summary;
        summary.predictions = predictions;
        summary.local_scores = scores
            .iter()
            .filter_map(|s| {
                s.score.map(|score| crate::summary::LocalScoreView {
                    family: s.family.as_str().to_owned(),
                    score,
                    reason: s.reason.clone(),
                    onset: s.onset.clone(),
                })
            })
            .collect();
        if let Some(reporter) = &mut reporter {
            seq += 1;
            reporter.refresh().await;
            if let Some(book) = reporter.peer_book()
                && last_book.as_ref().is_none_or(|last| !Arc::ptr_eq(last, &book))
            {
                peer_book.set_aggregator_book(&book);
                debug!(nodes = book.nodes.len(), "peer book from the aggregator");
                last_book = Some(book);
            }
            if pods.pod_addresses_generation() > 0 {
                let (generation, addresses) = pods.pod_addresses();
                reporter.set_pod_addresses(generation, addresses);
            }
            let now = Instant::now();
            for answers in reporter.take_answers() {
                address_answers.absorb(&answers, now);
            }
            let mut msg = crate::wire::node_summary(&identity, seq, &summary, &peers, &scores, scorer.sustained_loss());
            msg.address_lookups = address_answers
                .lookups(&unmapped, now, graywatch_proto::MAX_ADDRESS_LOOKUPS)
                .iter()
                .map(ToString::to_string)
                .collect();
            health
                .metrics
                .address_answers
                .set(i64::try_from(address_answers.len()).unwrap_or(i64::MAX));
            reporter.push(&msg);
            health.metrics.observe_report(&reporter.stats(), reporter.buffered());
        }
        health.window_done();
        debug!(
            flows = summary.network.flows.len(),
            peers = peers.len(),
            drops = summary.network.drops.len(),
            "window"
        );
        if config.output == OutputFormat::Json {
            print_json(&summary)?;
        }
        if config.once {
            break;
        }
    }
    shutdown.cancel();
    if let Some(reporter) = reporter {
        reporter.shutdown().await;
    }
    if let Some(server) = server {
        server.await.context("metrics server task")?.context("metrics server")?;
    }
    info!("stopped; kernel programs detached");
    Ok(())
}

fn print_json(summary: &WindowSummary) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    serde_json::to_writer(&mut stdout, summary).context("encoding the window summary")?;
    stdout.write_all(b"\n").context("writing to stdout")?;
    stdout.flush().context("writing to stdout")
}

/// Whether pod names are resolved from the API server (`--kube`).
fn pod_names_wanted(config: &Config) -> bool {
    match config.kube {
        KubeMode::Off => false,
        KubeMode::On => true,
        KubeMode::Auto => std::env::var_os("KUBERNETES_SERVICE_HOST").is_some(),
    }
}

/// A client for the API server if anything needs one (pod names, aggregator discovery).
/// Required only with `--kube=on`; otherwise its absence is logged and the agent does without.
async fn kube_client(config: &Config) -> anyhow::Result<Option<kube::Client>> {
    if !pod_names_wanted(config) && config.aggregator_endpoints.is_none() {
        return Ok(None);
    }
    match kube::Client::try_default().await {
        Ok(client) => Ok(Some(client)),
        Err(error) if config.kube != KubeMode::On => {
            warn!(%error, "no usable kube config; no pod names, aggregator replicas through DNS only");
            Ok(None)
        }
        Err(error) => Err(error).context("--kube=on but no usable kube config"),
    }
}

fn start_pod_watch(config: &Config, pods: &PodDirectory, client: Option<&kube::Client>, shutdown: &CancellationToken) {
    let client = match client {
        Some(client) if pod_names_wanted(config) => client.clone(),
        _ => {
            info!("not resolving pod names (no cluster); workloads are reported by cgroup path and pod UID");
            return;
        }
    };
    let (pods, node, shutdown) = (pods.clone(), config.node_name.clone(), shutdown.clone());
    tokio::spawn(async move {
        tokio::select! {
            () = pods.watch(client, node) => {}
            () = shutdown.cancelled() => {}
        }
    });
}

async fn forward_kernel_logs(logger: aya_log::EbpfLogger<&'static dyn log::Log>, shutdown: CancellationToken) {
    // SAFETY: the AsyncFd owns the logger, so its ring buffer fd stays open while registered.
    let mut fd = match unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) } {
        Ok(fd) => fd,
        Err(error) => {
            warn!(error = %error, "cannot poll the kernel log ring");
            return;
        }
    };
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            guard = fd.readable_mut() => match guard {
                Ok(mut guard) => {
                    guard.get_inner_mut().flush();
                    guard.clear_ready();
                }
                Err(error) => {
                    warn!(%error, "kernel log ring failed");
                    return;
                }
            }
        }
    }
}

async fn signal_shutdown(shutdown: CancellationToken) {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(error) => {
            warn!(%error, "cannot listen for SIGTERM; only SIGINT stops the agent");
            let _ = tokio::signal::ctrl_c().await;
            shutdown.cancel();
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => info!("SIGINT: shutting down"),
        _ = term.recv() => info!("SIGTERM: shutting down"),
    }
    shutdown.cancel();
}

#[cfg(test)]
mod tests {
    use super::in_scope;

    #[test]
    fn scope_matches_whole_components() {
        assert!(in_scope("/kubepods.slice/pod1", "/kubepods.slice"));
        assert!(in_scope("/kubepods.slice", "/kubepods.slice/"));
        assert!(!in_scope("/kubepods.slice2/x", "/kubepods.slice"));
        assert!(in_scope("/anything", "/"));
    }
}
