//! Reporting to every aggregator replica, not just one.
//!
//! The aggregator runs as two replicas with one leader; a follower must have the whole fleet's
//! windows to take over without a blind spot, so each agent streams to every replica. One
//! [`Reporter`] runs per replica address (new pods are picked up, vanished ones dropped).
//!
//! The replicas come from the Kubernetes API when configured (the Endpoints of the headless
//! Service, see discovery.rs: no dependence on cluster DNS), applied as soon as they change.
//! Whenever the API offers no address (not configured, unreachable, not synced, no ready
//! replica), the aggregator address' DNS answers are used instead, re-resolved periodically. An
//! IP address or a name with one answer behaves like a single stream. Either way TLS verifies the
//! certificate against the Service name (`tls_server_name` or the URL host), not the pod IP.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use graywatch_proto::v1::NodeSummary;
use tracing::{info, warn};

use crate::{
    discovery::{ApiView, diff},
    report::{ReportConfig, ReportStats, Reporter},
};

/// How often replica addresses are re-resolved.
const REFRESH_EVERY: Duration = Duration::from_secs(30);
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
#[error("invalid aggregator address {0:?}: expected http(s)://host:port")]
pub struct BadEndpoint(String);

/// `scheme`, `host` and `port` of an `http(s)://host:port` URL.
pub fn split_endpoint(endpoint: &str) -> Result<(String, String, u16), BadEndpoint> {
    let bad = || BadEndpoint(endpoint.to_owned());
    let (scheme, rest) = endpoint.split_once("://").ok_or_else(bad)?;
    if scheme != "http" && scheme != "https" {
        return Err(bad());
    }
    let authority = rest.split('/').next().unwrap_or_default();
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6.split_once(']').ok_or_else(bad)?;
        (host, after.strip_prefix(':').ok_or_else(bad)?)
    } else {
        authority.rsplit_once(':').ok_or_else(bad)?
    };
    let port = port.parse().map_err(|_| bad())?;
    if host.is_empty() {
        return Err(bad());
    }
    Ok((scheme.to_owned(), host.to_owned(), port))
}

/// One stream per aggregator replica.
pub struct Fanout {
    scheme: String,
    host: String,
    port: u16,
    template: ReportConfig,
    reporters: BTreeMap<SocketAddr, Reporter>,
    /// Replicas from the Kubernetes API (discovery.rs), when configured.
    api: Option<tokio::sync::watch::Receiver<ApiView>>,
    /// Whether the running streams follow the API's view (else DNS').
    from_api: bool,
    last_refresh: Option<Instant>,
    /// Totals of reporters already shut down, so the exported counters never go backwards.
    retired: ReportStats,
    /// The node's latest pod IPs (generation, addresses), handed to every stream.
    pod_addresses: Option<(u64, Vec<String>)>,
}

impl Fanout {
    pub fn new(template: ReportConfig) -> Result<Self, BadEndpoint> {
        let (scheme, host, port) = split_endpoint(&template.endpoint)?;
        Ok(Self {
            scheme,
            host,
            port,
            template,
            reporters: BTreeMap::new(),
            api: None,
            from_api: false,
            last_refresh: None,
            retired: ReportStats::default(),
            pod_addresses: None,
        })
    }

    /// Follows the replicas the API lists (see [`crate::discovery::spawn_watch`]); DNS stays the
    /// fallback while that view is empty.
    #[must_use]
    pub fn with_api(mut self, view: tokio::sync::watch::Receiver<ApiView>) -> Self {
        self.api = Some(view);
        self
    }

    /// The port of the aggregator URL (what the Endpoints port defaults to).
    #[must_use]
    pub fn port(&self) -> u16 {
        self.port
    }

    fn config_for(&self, addr: SocketAddr) -> ReportConfig {
        let mut config = self.template.clone();
        config.endpoint = format!("{}://{addr}", self.scheme);
        // The certificate names the Service, not the pod IP we dial.
        if config.security.tls_server_name.is_none() && self.host.parse::<IpAddr>().is_err() {
            config.security.tls_server_name = Some(self.host.clone());
        }
        config
    }

    /// Follows the replicas: the API's view as soon as it changes; else DNS, re-resolved if
    /// due. Starts streams to new addresses, stops streams to addresses no longer listed. A
    /// failed lookup keeps the current streams.
    pub async fn refresh(&mut self) {
        let api_view = self.api.as_mut().and_then(|rx| {
            let changed = rx.has_changed().unwrap_or(false);
            let view = rx.borrow_and_update().clone().filter(|addrs| !addrs.is_empty());
            view.map(|addrs| (changed, addrs))
        });
        match api_view {
            Some((changed, addrs)) => {
                if changed || !self.from_api {
                    if !self.from_api {
                        info!(
                            replicas = addrs.len(),
                            "following the aggregator replicas the API lists"
                        );
                    }
                    self.from_api = true;
                    self.apply(&addrs, "the API").await;
                }
                return;
            }
            None if self.from_api => {
                // Fall back at once: the API's last view may be what went stale.
                info!(host = %self.host, "no aggregator replicas from the API; resolving the Service name");
                self.from_api = false;
                self.last_refresh = None;
            }
            None => {}
        }
        if self.last_refresh.is_some_and(|t| t.elapsed() < REFRESH_EVERY) {
            return;
        }
        self.last_refresh = Some(Instant::now());
        let host = self.host.clone();
        let lookup = tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host((host.as_str(), self.port))).await;
        let addrs: BTreeSet<SocketAddr> = match lookup {
            Ok(Ok(addrs)) => addrs.collect(),
            Ok(Err(error)) => {
                warn!(host = %self.host, %error, "cannot resolve the aggregator; keeping current streams");
                return;
            }
            Err(_) => {
                warn!(host = %self.host, "resolving the aggregator timed out; keeping current streams");
                return;
            }
        };
        if addrs.is_empty() {
            return;
        }
        self.apply(&addrs, "DNS").await;
    }

    /// Makes the streams match `addrs` (listed by `source`).
    async fn apply(&mut self, addrs: &BTreeSet<SocketAddr>, source: &'static str) {
        let change = diff(self.reporters.keys(), addrs);
        for addr in change.removed {
            if let Some(reporter) = self.reporters.remove(&addr) {
                info!(%addr, source, "aggregator replica no longer listed; closing its stream");
                add_into(&self.retired, reporter.stats());
                reporter.close().await;
            }
        }
        for addr in change.added {
            info!(%addr, source, host = %self.host, "streaming to aggregator replica");
            let config = self.config_for(addr);
            let reporter = Reporter::spawn(config);
            if let Some((generation, addresses)) = &self.pod_addresses {
                reporter.set_pod_addresses(*generation, addresses.clone());
            }
            self.reporters.insert(addr, reporter);
        }
    }

    /// The node's pod IPs for every stream (see [`Reporter::set_pod_addresses`]); a generation
    /// already handed over is ignored.
    pub fn set_pod_addresses(&mut self, generation: u64, addresses: Vec<String>) {
        if self.pod_addresses.as_ref().is_some_and(|(g, _)| *g >= generation) {
            return;
        }
        for reporter in self.reporters.values() {
            reporter.set_pod_addresses(generation, addresses.clone());
        }
        self.pod_addresses = Some((generation, addresses));
    }

    /// Queues the window for every replica.
    pub fn push(&self, summary: &NodeSummary) {
        for reporter in self.reporters.values() {
            reporter.push(summary.clone());
        }
    }

    /// Counters summed over all streams, past and present.
    pub fn stats(&self) -> ReportStats {
        let total = ReportStats::default();
        add_into(&total, &self.retired);
        for reporter in self.reporters.values() {
            add_into(&total, reporter.stats());
        }
        total
    }

    /// The answers to address lookups any replica sent since the last call.
    pub fn take_answers(&self) -> Vec<graywatch_proto::v1::AddressAnswers> {
        self.reporters.values().flat_map(Reporter::take_answers).collect()
    }

    /// The latest peer book any replica (of an older version) sent (they build it from the same Nodes).
    pub fn peer_book(&self) -> Option<std::sync::Arc<graywatch_proto::v1::PeerBook>> {
        self.reporters.values().find_map(Reporter::peer_book)
    }

    /// The largest backlog of any stream.
    pub fn buffered(&self) -> usize {
        self.reporters.values().map(Reporter::buffered).max().unwrap_or(0)
    }

    pub fn replicas(&self) -> usize {
        self.reporters.len()
    }

    /// The agent stops: every stream sends its last windows and a stop notice, all at once.
    pub async fn shutdown(self) {
        futures::future::join_all(self.reporters.into_values().map(Reporter::shutdown)).await;
    }
}

fn add_into(total: &ReportStats, more: &ReportStats) {
    let add = |into: &AtomicU64, from: &AtomicU64| {
        into.fetch_add(from.load(Ordering::Relaxed), Ordering::Relaxed);
    };
    add(&total.sent, &more.sent);
    add(&total.acked, &more.acked);
    add(&total.dropped, &more.dropped);
    add(&total.reconnects, &more.reconnects);
    add(&total.rejected, &more.rejected);
    add(&total.invalid, &more.invalid);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_split_into_scheme_host_port() {
        assert_eq!(
            split_endpoint("http://graywatch-aggregator.graywatch:7443").expect("valid"),
            ("http".into(), "graywatch-aggregator.graywatch".into(), 7443)
        );
        assert_eq!(
            split_endpoint("https://[fd00::1]:7443").expect("valid"),
            ("https".into(), "fd00::1".into(), 7443)
        );
        assert!(split_endpoint("graywatch:7443").is_err());
        assert!(split_endpoint("http://graywatch").is_err());
        assert!(split_endpoint("ftp://x:1").is_err());
    }

    #[tokio::test]
    async fn one_stream_per_resolved_address_with_the_service_name_for_tls() {
        let template = ReportConfig {
            endpoint: "https://localhost:7443".into(),
            ..Default::default()
        };
        let mut fanout = Fanout::new(template).expect("valid endpoint");
        fanout.refresh().await;
        // localhost resolves to 127.0.0.1 and possibly ::1: one reporter each.
        assert!(fanout.replicas() >= 1);
        let addr = *fanout.reporters.keys().next().expect("an address");
        let config = fanout.config_for(addr);
        assert_eq!(config.security.tls_server_name.as_deref(), Some("localhost"));
        assert!(config.endpoint.starts_with("https://"));
        // Not due again: a second refresh changes nothing.
        let before = fanout.replicas();
        fanout.refresh().await;
        assert_eq!(fanout.replicas(), before);
        fanout.shutdown().await;
    }

    #[tokio::test]
    async fn follows_the_api_view_and_keeps_the_service_name_for_tls() {
        let template = ReportConfig {
            endpoint: "https://graywatch-aggregator-replicas.graywatch.svc:7443".into(),
            ..Default::default()
        };
        let one: SocketAddr = "127.0.0.1:7443".parse().expect("addr");
        let two: SocketAddr = "127.0.0.2:7443".parse().expect("addr");
        let (tx, rx) = tokio::sync::watch::channel(Some(BTreeSet::from([one, two])));
        let mut fanout = Fanout::new(template).expect("valid endpoint").with_api(rx);
        // The API lists the replicas: no DNS lookup of the Service name is needed.
        fanout.refresh().await;
        assert_eq!(fanout.reporters.keys().copied().collect::<Vec<_>>(), vec![one, two]);
        let config = fanout.config_for(one);
        assert_eq!(config.endpoint, "https://127.0.0.1:7443");
        assert_eq!(
            config.security.tls_server_name.as_deref(),
            Some("graywatch-aggregator-replicas.graywatch.svc")
        );
        // A replica replaced: applied on the next refresh, not after the DNS period.
        let three: SocketAddr = "127.0.0.3:7443".parse().expect("addr");
        tx.send_replace(Some(BTreeSet::from([two, three])));
        fanout.refresh().await;
        assert_eq!(fanout.reporters.keys().copied().collect::<Vec<_>>(), vec![two, three]);
        fanout.shutdown().await;
    }
}
