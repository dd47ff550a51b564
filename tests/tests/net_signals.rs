//! The agent's network signals against real faults on the real kernel (run as root by
//! `cargo xtask test`): kernel programs loaded and attached, traffic between network
//! namespaces, faults from our injector, and the kernel's own counters (ss, nstat) as truth.

use std::{
    io::BufReader,
    net::{IpAddr, SocketAddr},
    process::{Child, ChildStdout},
    time::Duration,
};

use graywatch_agent::{
    app::{Collector, CollectorOptions},
    config::{DropSource, RttSource},
    pods::PodDirectory,
    signals::net::{DropPlace, remote_addr},
    summary::{Direction, FlowWindow, WindowSummary},
};
use graywatch_common::{DROP_SLOT_FREE, DROP_SLOT_HELD, drop_slot_index};
use graywatch_testbench::{
    fault::{LinkEmulator, LinkSpec, NftDrop, RateLimit},
    ground_truth::{nstat_counter, nstat_retrans_segs, qdisc_dropped, ss_segments, ss_srtt_ms},
    netns::{Bench, Node, TestCgroup2, exec_in, ip_in, spawn_piped},
    traffic::await_line,
};

const TRAFFIC: &str = env!("CARGO_BIN_EXE_graywatch-traffic");
const PORT: u16 = 7000;

fn collector() -> Collector {
    collector_with(RttSource::Auto)
}

/// A collector whose RTT program is `source`: the raw tracepoint is what kernels without the
/// tracepoint record's socket address (6.1) run, and it must measure the same.
fn collector_with(source: RttSource) -> Collector {
    let mut options = CollectorOptions::for_node("bench");
    options.load.rtt_source = source;
    Collector::start(&options, PodDirectory::default())
        .expect("load and attach the kernel programs (root, tracefs, BTF)")
}

fn cgroup(collector: &mut Collector, name: &str) -> TestCgroup2 {
    let root = collector
        .cgroups()
        .root()
        .expect("this machine has a cgroup v2 hierarchy")
        .to_owned();
    TestCgroup2::create(&root, name).expect("create a cgroup v2 directory")
}

/// Two bench nodes, a traffic server on the second, and a collector watching one workload
/// cgroup on the first: the set-up of the tests about one flow. Fields drop in order: the
/// workload and the collector first, the nodes last.
struct OneFlow {
    workload: TestCgroup2,
    agent: Collector,
    _server: Server,
    bench: Bench,
}

impl OneFlow {
    fn start(source: RttSource, workload: &str) -> Self {
        let bench = Bench::new(2).expect("bench");
        let server = Server::start(bench.node(1));
        let mut agent = collector_with(source);
        let workload = cgroup(&mut agent, workload);
        OneFlow {
            workload,
            agent,
            _server: server,
            bench,
        }
    }

    fn client_node(&self) -> &Node {
        self.bench.node(0)
    }

    fn server_node(&self) -> &Node {
        self.bench.node(1)
    }

    /// A client in the workload cgroup towards the server's IPv4 address.
    fn client(&self, args: &[&str]) -> Client {
        let target = SocketAddr::new(self.server_node().ipv4.into(), PORT);
        Client::start(self.client_node(), &self.workload, target, args)
    }
}

/// A traffic server on `node`, ready when this returns.
struct Server(Child);

impl Server {
    fn start(node: &Node) -> Self {
        let mut cmd = node.command(TRAFFIC, &[]).expect("server command");
        cmd.args(["server", "--listen", &format!("[::]:{PORT}")]);
        let mut child = spawn_piped(&mut cmd).expect("spawn server");
        let stdout = child.stdout.take().expect("piped stdout");
        await_line(&mut BufReader::new(stdout), "listening").expect("server ready");
        Server(child)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A client run on `node` inside `cgroup`; `--hold` keeps its connection open until dropped.
struct Client {
    child: Child,
    stdout: BufReader<ChildStdout>,
}

impl Client {
    fn start(node: &Node, cgroup: &TestCgroup2, target: SocketAddr, args: &[&str]) -> Self {
        let mut cmd = node.command(TRAFFIC, &[cgroup.procs()]).expect("client command");
        cmd.args(["client", "--connect", &target.to_string()]).args(args);
        let mut child = spawn_piped(&mut cmd).expect("spawn client");
        let stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        Client { child, stdout }
    }

    /// Waits for the client's report line (its load is done).
    fn report(&mut self) -> serde_json::Value {
        let line = await_line(&mut self.stdout, "{").expect("client report");
        serde_json::from_str(&line).expect("report is JSON")
    }

    /// Waits until a `--hold` client has finished its load and holds the connection.
    fn await_holding(&mut self) -> serde_json::Value {
        let report = self.report();
        await_line(&mut self.stdout, "holding").expect("client holds its connection");
        report
    }

    fn finish(mut self) -> std::process::ExitStatus {
        drop(self.child.stdin.take());
        self.child.wait().expect("client exits")
    }
}

fn flow<'a>(summary: &'a WindowSummary, cgroup: &TestCgroup2, remote: IpAddr) -> Option<&'a FlowWindow> {
    summary
        .network
        .flows
        .iter()
        .find(|f| f.workload.cgroup_path.as_deref() == Some(cgroup.cgroup_path.as_str()) && f.remote == remote)
}

fn flows_of<'a>(summary: &'a WindowSummary, cgroup: &TestCgroup2) -> Vec<&'a FlowWindow> {
    summary
        .network
        .flows
        .iter()
        .filter(|f| f.workload.cgroup_path.as_deref() == Some(cgroup.cgroup_path.as_str()))
        .collect()
}

#[test]
fn rtt_matches_injected_delay_and_the_kernels_own_srtt() {
    rtt_matches_injected_delay(RttSource::Tracepoint);
}

#[test]
fn rtt_from_the_raw_tracepoint_matches_injected_delay_and_the_kernels_own_srtt() {
    rtt_matches_injected_delay(RttSource::RawTracepoint);
}

fn rtt_matches_injected_delay(source: RttSource) {
    let bench = Bench::new(3).expect("bench");
    let (client_node, delayed, direct) = (bench.node(0), bench.node(1), bench.node(2));
    let _servers = [Server::start(delayed), Server::start(direct)];
    let mut agent = collector_with(source);
    let slow = cgroup(&mut agent, "rtt-delayed");
    let fast = cgroup(&mut agent, "rtt-direct");
    let delay = Duration::from_millis(20);
    let _fault = LinkEmulator::start(
        &client_node.netns,
        client_node.ipv4,
        "eth0",
        &[delayed.ipv4],
        LinkSpec {
            delay,
            jitter: Duration::ZERO,
            loss: 0.0,
        },
    )
    .expect("start the link emulator");

    let mut slow_client = Client::start(
        client_node,
        &slow,
        SocketAddr::new(delayed.ipv4.into(), PORT),
        &["--count", "100", "--hold"],
    );
    let mut fast_client = Client::start(
        client_node,
        &fast,
        SocketAddr::new(direct.ipv4.into(), PORT),
        // A socket adds at most one RTT sample per millisecond: run long enough for many.
        &["--duration", "1s", "--hold"],
    );
    slow_client.await_holding();
    fast_client.await_holding();
    let summary = agent.collect().expect("collect a window");
    let kernel_srtt_ms = ss_srtt_ms(&client_node.netns, delayed.ipv4.into()).expect("ss");

    let baseline = flow(&summary, &fast, direct.ipv4.into()).expect("baseline flow reported");
    let baseline_rtt = baseline.rtt.as_ref().expect("baseline RTT samples");
    let faulted = flow(&summary, &slow, delayed.ipv4.into()).expect("delayed flow reported");
    let faulted_rtt = faulted.rtt.as_ref().expect("delayed RTT samples");
    eprintln!(
        "baseline p50 {} us (n={}), delayed p50 {} us p99 {} us (n={}), ss srtt {:?} ms",
        baseline_rtt.p50_us,
        baseline_rtt.samples,
        faulted_rtt.p50_us,
        faulted_rtt.p99_us,
        faulted_rtt.samples,
        kernel_srtt_ms
    );

    assert!(
        baseline_rtt.p50_us < 1_000,
        "no-fault RTT p50 must be under 1 ms: {baseline_rtt:?}"
    );
    // The clients connected out from ephemeral ports to port 7000.
    assert_eq!(
        (faulted.direction, baseline.direction),
        (Direction::Outbound, Direction::Outbound)
    );
    let expected = delay.as_micros() as f64 + baseline_rtt.p50_us as f64;
    let error = (faulted_rtt.p50_us as f64 - expected).abs() / expected;
    assert!(
        error <= 0.15,
        "delayed p50 {} us vs expected {expected} us ({:.1}% off)",
        faulted_rtt.p50_us,
        error * 100.0
    );
    assert_eq!(
        kernel_srtt_ms.len(),
        1,
        "one connection to the delayed node: {kernel_srtt_ms:?}"
    );
    let kernel_us = kernel_srtt_ms[0] * 1000.0;
    let disagreement = (faulted_rtt.p50_us as f64 - kernel_us).abs() / kernel_us;
    assert!(
        disagreement <= 0.15,
        "agent p50 {} us vs ss srtt {kernel_us} us",
        faulted_rtt.p50_us
    );

    // Attribution: each cgroup's samples only towards the node it talked to.
    assert!(flow(&summary, &slow, direct.ipv4.into()).is_none());
    assert!(flow(&summary, &fast, delayed.ipv4.into()).is_none());
    assert!(slow_client.finish().success());
    assert!(fast_client.finish().success());
}

#[test]
fn retransmits_follow_injected_loss_and_agree_with_nstat() {
    let bench = Bench::new(3).expect("bench");
    let (client_node, lossy, clean) = (bench.node(0), bench.node(1), bench.node(2));
    let _servers = [Server::start(lossy), Server::start(clean)];
    let mut agent = collector();
    let lossy_cgroup = cgroup(&mut agent, "loss-lossy");
    let clean_cgroup = cgroup(&mut agent, "loss-clean");
    let _fault = LinkEmulator::start(
        &client_node.netns,
        client_node.ipv4,
        "eth0",
        &[lossy.ipv4],
        LinkSpec {
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            loss: 0.02,
        },
    )
    .expect("start the link emulator");
    // One transfer at a time, so the clean one does not compete for the two CPUs (receive
    // buffer pressure would cause real, but unwanted, drops). The kernel's count is taken around
    // each transfer: our clients are the node's only senders, so each delta is the truth for
    // that one flow, whatever the kernel did (a clean link still retransmits now and then, e.g.
    // a spurious timeout on a busy two-core machine).
    let bytes = (20u64 << 20).to_string();
    let transfer = |cgroup: &TestCgroup2, target: &Node| -> u64 {
        let before = nstat_retrans_segs(&client_node.netns).expect("nstat");
        let mut client = Client::start(
            client_node,
            cgroup,
            SocketAddr::new(target.ipv4.into(), PORT),
            &["--bulk", &bytes],
        );
        client.report();
        assert!(client.finish().success());
        nstat_retrans_segs(&client_node.netns).expect("nstat") - before
    };
    let kernel_lossy = transfer(&lossy_cgroup, lossy);
    let kernel_clean = transfer(&clean_cgroup, clean);
    let summary = agent.collect().expect("collect a window");

    let lossy_flow = flow(&summary, &lossy_cgroup, lossy.ipv4.into()).expect("lossy flow reported");
    let clean_flow = flow(&summary, &clean_cgroup, clean.ipv4.into()).expect("clean flow reported");
    for d in &summary.network.drops {
        eprintln!("drop {} x{} remote {:?}", d.reason, d.count, d.remote);
    }
    let retransmits_of =
        |cgroup: &TestCgroup2| -> u64 { flows_of(&summary, cgroup).iter().map(|f| f.retransmits).sum() };
    let (agent_lossy, agent_clean) = (retransmits_of(&lossy_cgroup), retransmits_of(&clean_cgroup));
    eprintln!(
        "lossy: {} retransmits / {} segments (ratio {:?}), nstat {kernel_lossy}; clean: {} / {}, nstat {kernel_clean}",
        lossy_flow.retransmits,
        lossy_flow.segments_sent,
        lossy_flow.retransmit_ratio,
        clean_flow.retransmits,
        clean_flow.segments_sent
    );

    assert!(lossy_flow.retransmits > 0, "2% loss must cause retransmits");
    let ratio = lossy_flow.retransmit_ratio.expect("segments were sent");
    assert!(
        (0.005..=0.08).contains(&ratio),
        "retransmit ratio {ratio} should be in proportion to 2% loss"
    );
    // The injected loss must be charged to the lossy flow only, and each flow must carry what
    // the kernel retransmitted while it ran. Slack: 5 %, and 2 segments for a FIN retransmitted
    // between the kernel's read and the agent's window.
    let agrees = |agent: u64, kernel: u64| agent.abs_diff(kernel) <= (kernel / 20).max(2);
    assert!(
        agrees(agent_lossy, kernel_lossy),
        "lossy flow: agent {agent_lossy} vs nstat {kernel_lossy}"
    );
    assert!(
        agrees(agent_clean, kernel_clean),
        "clean flow: agent {agent_clean} vs nstat {kernel_clean} (the lossy flow's retransmits must not leak into it)"
    );
    assert!(clean_flow.segments_sent > 0, "the clean flow sent segments");
}

#[test]
fn drops_are_reported_with_the_kernels_reason() {
    drops_are_reported_with_the_kernels_reason_by(DropSource::Auto, "tp_btf:kfree_skb");
}

/// The fallback drop program (the agent takes it where the BTF one cannot attach) counts the same.
#[test]
fn drops_are_reported_with_the_kernels_reason_by_the_tracepoint_program() {
    drops_are_reported_with_the_kernels_reason_by(DropSource::Tracepoint, "skb:kfree_skb");
}

fn drops_are_reported_with_the_kernels_reason_by(source: DropSource, program: &str) {
    let bench = Bench::new(3).expect("bench");
    let (client_node, closed, firewalled) = (bench.node(0), bench.node(1), bench.node(2));
    let _server = Server::start(firewalled);
    let mut options = CollectorOptions::for_node("bench");
    options.load.drop_source = source;
    let mut agent = Collector::start(&options, PodDirectory::default())
        .expect("load and attach the kernel programs (root, tracefs, BTF)");
    let attached = agent.programs_mut().attached().to_vec();
    assert!(
        attached.iter().any(|p| p == program),
        "{program} attached: {attached:?}"
    );
    let blocked = cgroup(&mut agent, "drops-blocked");
    let _fault = NftDrop::start(
        &client_node.netns,
        "output",
        &format!("ip daddr {} tcp dport {PORT}", firewalled.ipv4),
        100,
    )
    .expect("nftables drop rule");

    // Nothing listens on port 7999: the SYN is dropped at `closed` with NO_SOCKET.
    let mut refused = Client::start(client_node, &blocked, SocketAddr::new(closed.ipv4.into(), 7999), &[]);
    // The firewall drops our SYN on the way out: NETFILTER_DROP, charged to our socket.
    let mut filtered = Client::start(
        client_node,
        &blocked,
        SocketAddr::new(firewalled.ipv4.into(), PORT),
        &["--connect-timeout", "1500ms"],
    );
    let refused_status = refused.child.wait().expect("refused client exits");
    let filtered_status = filtered.child.wait().expect("filtered client exits");
    assert!(
        !refused_status.success() && !filtered_status.success(),
        "both connections must fail"
    );
    drop(refused.child.stdin.take());
    drop(filtered.child.stdin.take());
    let summary = agent.collect().expect("collect a window");
    for d in &summary.network.drops {
        eprintln!(
            "drop {} x{} remote {:?} workload {:?}",
            d.reason,
            d.count,
            d.remote,
            d.workload.as_ref().and_then(|w| w.cgroup_path.clone())
        );
    }

    let no_socket = summary
        .network
        .drops
        .iter()
        .find(|d| d.reason == "NO_SOCKET" && d.remote == Some(client_node.ipv4.into()))
        .expect("the SYN to a closed port is reported as NO_SOCKET from the client's address");
    assert!(no_socket.count >= 1);
    let netfilter = summary
        .network
        .drops
        .iter()
        .find(|d| d.reason == "NETFILTER_DROP" && d.remote == Some(firewalled.ipv4.into()))
        .expect("the firewalled SYN is reported as NETFILTER_DROP towards the firewalled node");
    assert_eq!(
        netfilter.workload.as_ref().and_then(|w| w.cgroup_path.as_deref()),
        Some(blocked.cgroup_path.as_str()),
        "the drop is charged to the socket's cgroup"
    );
}

/// A node whose egress queue overflows loses datagrams that no retransmit will ever show. The
/// kernel drops them for lack of room (a qdisc reason), charged to the sending workload, and the
/// agent counts each of them: the qdisc's own drop counter is the truth. That reason is one the
/// local score counts as packet loss (`graywatch_detect::drops`).
#[test]
fn a_full_egress_queue_is_reported_as_drops_for_lack_of_room() {
    const DATAGRAMS: u64 = 3_000;
    let bench = Bench::new(2).expect("bench");
    let (sender, receiver) = (bench.node(0), bench.node(1));
    let mut agent = collector();
    let workload = cgroup(&mut agent, "drops-no-room");
    // Only our datagrams go through the queue, so that its drop counter is ours alone: a static
    // neighbour entry (no ARP) and no IPv6 on the interface (no neighbour discovery, no MLD).
    // Without them one kernel packet in a CI run was dropped beside ours (2,921 for 2,920).
    let neighbour = format!(
        "neigh replace {} lladdr {} dev eth0 nud permanent",
        receiver.ipv4,
        interface_mac(&receiver.netns, "eth0")
    );
    ip_in(&sender.netns, &neighbour.split(' ').collect::<Vec<_>>()).expect("a static neighbour entry");
    exec_in(&sender.netns, "sysctl", &["-qw", "net.ipv6.conf.eth0.disable_ipv6=1"]).expect("IPv6 off on eth0");
    // 8 kbit/s with a 400 ms queue: a few dozen small datagrams fit, the rest of a burst cannot.
    let _limit = RateLimit::start(&sender.netns, "eth0", "8kbit").expect("tbf on the sender's interface");
    agent.collect().expect("baseline window");
    let before = qdisc_dropped(&sender.netns, "eth0").expect("tc -s qdisc");
    let target = SocketAddr::new(receiver.ipv4.into(), 7010).to_string();
    let mut cmd = sender.command(TRAFFIC, &[workload.procs()]).expect("traffic command");
    cmd.args(["unreachable", "--connect", &target, "--count", &DATAGRAMS.to_string()]);
    let out = cmd.output().expect("run graywatch-traffic unreachable");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // A qdisc drops at enqueue, inside the send: all drops are counted once the sender is done.
    let dropped = qdisc_dropped(&sender.netns, "eth0").expect("tc -s qdisc") - before;
    assert!(
        dropped > DATAGRAMS / 2,
        "the queue overflowed: {dropped} of {DATAGRAMS} dropped"
    );

    let summary = agent.collect().expect("collect a window");
    let ours: Vec<_> = summary
        .network
        .drops
        .iter()
        .filter(|d| d.workload.as_ref().and_then(|w| w.cgroup_path.as_deref()) == Some(workload.cgroup_path.as_str()))
        .collect();
    for d in &ours {
        eprintln!("drop {} x{} remote {:?}", d.reason, d.count, d.remote);
    }
    assert!(
        ours.iter()
            .all(|d| graywatch_detect::drop_class(&d.reason) == graywatch_detect::DropClass::NoRoom),
        "every drop of the workload is the queue's: {ours:?}"
    );
    // The sending socket is unconnected: it names no peer, and the drop none either.
    assert!(ours.iter().all(|d| d.remote.is_none()), "no made-up peer: {ours:?}");
    assert_eq!(
        ours.iter().map(|d| d.count).sum::<u64>(),
        dropped,
        "each drop counted once"
    );
}

/// The hardware address of `device` in `netns` (`ip -o link show`).
fn interface_mac(netns: &str, device: &str) -> String {
    let out = ip_in(netns, &["-o", "link", "show", device]).expect("ip link show");
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .skip_while(|word| *word != "link/ether")
        .nth(1)
        .unwrap_or_else(|| panic!("no link/ether address in {text:?}"))
        .to_owned()
}

/// Issue 18: the drop program counts each (workload, remote, protocol, reason) in the slot of
/// `DROP_SLOTS` at the key's index, claimed by the program itself (the `DROPS` hash only takes
/// keys whose slot another holds). A key idle for long gives its place back, the slot zeroed;
/// when it drops again it claims the slot afresh and counts from zero. Every drop is counted
/// once: the kernel's own `UdpNoPorts` counter is the truth.
#[test]
fn idle_drop_keys_give_their_place_back_and_count_afresh() {
    const IDLE_WINDOWS: u32 = 3;
    let bench = Bench::new(2).expect("bench");
    let (sender, closed) = (bench.node(0), bench.node(1));
    let mut agent = collector();
    agent
        .net_mut()
        .drop_reader()
        .expect("the drop slots are mapped")
        .set_idle_windows_before_eviction(IDLE_WINDOWS);
    let target = SocketAddr::new(closed.ipv4.into(), 7009);
    // Sends `count` datagrams to a closed port and returns this window's NO_SOCKET drops from
    // the sender, once the kernel has counted every one of them.
    let burst = |agent: &mut Collector, count: u64| -> u64 {
        let before = nstat_counter(&closed.netns, "UdpNoPorts").expect("nstat");
        let mut cmd = sender.command(TRAFFIC, &[]).expect("traffic command");
        let target = target.to_string();
        cmd.args(["unreachable", "--connect", &target, "--count", &count.to_string()]);
        let out = cmd.output().expect("run graywatch-traffic unreachable");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while nstat_counter(&closed.netns, "UdpNoPorts").expect("nstat") < before + count {
            assert!(
                std::time::Instant::now() < deadline,
                "the kernel never counted {count} datagrams"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let summary = agent.collect().expect("collect a window");
        summary
            .network
            .drops
            .iter()
            .filter(|d| d.reason == "NO_SOCKET" && d.remote == Some(sender.ipv4.into()))
            .map(|d| d.count)
            .sum()
    };
    let place_of_sender = |agent: &mut Collector| {
        let reader = agent.net_mut().drop_reader().expect("drop reader");
        reader
            .places()
            .into_iter()
            .find(|(_, key)| remote_addr(key.family, key.remote_addr) == IpAddr::from(sender.ipv4))
    };

    agent.collect().expect("baseline window");
    assert_eq!(burst(&mut agent, 50), 50, "every drop counted once");
    let (place, key) = place_of_sender(&mut agent).expect("the sender's drops have a place");
    let index = drop_slot_index(&key.words());
    let slot_state = agent.net_mut().drop_reader().expect("drop reader").slot_state(index);
    eprintln!("first burst at {place:?}; slot {index} state {slot_state}");
    match place {
        DropPlace::Slot(i) => assert_eq!(i, index, "a key's slot is at its index"),
        // Only when another key holds the slot.
        DropPlace::Hash => assert_eq!(slot_state, DROP_SLOT_HELD, "slot {index} held by another key"),
    }

    // Idle: the place goes back (a slot freed and zeroed).
    for _ in 0..IDLE_WINDOWS {
        agent.collect().expect("idle window");
    }
    assert!(
        place_of_sender(&mut agent).is_none(),
        "an idle key's place is taken back"
    );
    if place == DropPlace::Slot(index) {
        let state = agent.net_mut().drop_reader().expect("drop reader").slot_state(index);
        assert!(
            state == DROP_SLOT_FREE || state == DROP_SLOT_HELD,
            "slot {index} released: {state}"
        );
    }

    // Dropping again: counted afresh, not as 50 + 30 and not as a negative change.
    assert_eq!(burst(&mut agent, 30), 30, "a reclaimed place counts from zero");
    let (again, _) = place_of_sender(&mut agent).expect("a place again");
    eprintln!("second burst at {again:?}");
}

#[test]
fn ipv6_flows_are_attributed_to_their_cgroup() {
    let mut one = OneFlow::start(RttSource::Auto, "ipv6");
    let (client_node, server_node) = (one.bench.node(0), one.bench.node(1));
    let (agent, v6) = (&mut one.agent, &one.workload);
    let mut client = Client::start(
        client_node,
        v6,
        SocketAddr::new(server_node.ipv6.into(), PORT),
        // Long enough for many RTT samples: a socket adds at most one per millisecond.
        &["--duration", "1s"],
    );
    let report = client.report();
    assert!(client.finish().success());
    let summary = agent.collect().expect("collect a window");
    let v6_flow = flow(&summary, v6, server_node.ipv6.into()).expect("IPv6 flow reported under its cgroup");
    let rtt = v6_flow.rtt.as_ref().expect("RTT samples over IPv6");
    assert!(rtt.samples >= 100, "{rtt:?} for {report}");
    assert_eq!(flows_of(&summary, v6).len(), 1, "only the one peer");
}

#[test]
fn short_connections_count_the_segments_they_sent() {
    short_connections_count_their_segments(RttSource::Tracepoint);
}

#[test]
fn short_connections_count_their_segments_with_the_raw_tracepoint() {
    // Per-socket state is keyed by socket address there; the close hand-over must find it.
    short_connections_count_their_segments(RttSource::RawTracepoint);
}

fn short_connections_count_their_segments(source: RttSource) {
    // A socket hands its segment count to its flow with an RTT sample (at most once a
    // millisecond) or when it leaves ESTABLISHED; a connection shorter than that interval is
    // counted only by the second path. Without it, these connections would count ~0 segments.
    let mut one = OneFlow::start(source, "short-connections");
    let (client_netns, server_addr) = (one.client_node().netns.clone(), one.server_node().ipv4);
    let out_before = nstat_counter(&client_netns, "TcpOutSegs").expect("nstat");
    #[expect(clippy::items_after_statements, reason = "declared where the scenario uses it")]
    const CONNECTIONS: u64 = 20;
    for _ in 0..CONNECTIONS {
        let mut client = one.client(&["--count", "5"]);
        client.report();
        assert!(client.finish().success());
    }
    let summary = one.agent.collect().expect("collect a window");
    let kernel_out = nstat_counter(&client_netns, "TcpOutSegs").expect("nstat") - out_before;
    let flow = flow(&summary, &one.workload, server_addr.into()).expect("flow reported under its cgroup");
    eprintln!(
        "{CONNECTIONS} short connections: agent {} segments sent, kernel TcpOutSegs +{kernel_out}",
        flow.segments_sent
    );
    // The agent counts segments with payload; the kernel's TcpOutSegs also counts the handshake,
    // pure ACKs and the FIN. Every one of the 5 transactions of a connection sends its request.
    assert!(
        flow.segments_sent <= kernel_out && flow.segments_sent >= CONNECTIONS * 5,
        "agent {} vs kernel {kernel_out}",
        flow.segments_sent
    );
}

/// The retransmit ratio's denominator is the kernel's count of segments with payload
/// (`data_segs_out`, which `ss -i` shows per connection), not of every segment: a
/// request-response connection's pure ACKs, never retransmitted, would halve its ratio.
#[test]
fn a_connection_counts_the_data_segments_the_kernel_counts() {
    let mut one = OneFlow::start(RttSource::Auto, "data-segments");
    let server_addr = one.server_node().ipv4;
    let mut client = one.client(&["--count", "300", "--hold"]);
    client.await_holding();
    let kernel = ss_segments(&one.client_node().netns, server_addr.into()).expect("ss");
    let [kernel] = kernel.as_slice() else {
        panic!("one connection towards the server, not {kernel:?}");
    };
    // Closing hands the socket's count over; the FIN and last ACK carry no payload.
    assert!(client.finish().success());
    let summary = one.agent.collect().expect("collect a window");
    let flow = flow(&summary, &one.workload, server_addr.into()).expect("flow reported under its cgroup");
    eprintln!(
        "300 transactions: agent {} data segments; ss data_segs_out {} of segs_out {}",
        flow.segments_sent, kernel.data, kernel.all
    );
    assert_eq!(flow.segments_sent, kernel.data);
    assert!(
        kernel.data < kernel.all,
        "pure ACKs are counted in segs_out only: {kernel:?}"
    );
}

#[test]
fn a_blackholed_peer_shows_its_loss_ratio() {
    blackholed_peer_shows_its_loss_ratio(RttSource::Tracepoint);
}

#[test]
fn a_blackholed_peer_shows_its_loss_ratio_with_the_raw_tracepoint() {
    blackholed_peer_shows_its_loss_ratio(RttSource::RawTracepoint);
}

/// Issue 16.6: a peer that stops answering entirely (a blackhole) shows retransmits, but
/// segments sent were handed over only when a segment arrived: none does, so the window had
/// retransmits over 0 segments sent and no loss ratio for the worst gray failure there is.
fn blackholed_peer_shows_its_loss_ratio(source: RttSource) {
    let mut one = OneFlow::start(source, "blackhole");
    let (client_node, server_node) = (one.bench.node(0), one.bench.node(1));
    let (agent, cgroup) = (&mut one.agent, &one.workload);
    let target = SocketAddr::new(server_node.ipv4.into(), PORT);
    let mut client = Client::start(client_node, cgroup, target, &["--rate", "20", "--duration", "120s"]);
    // The connection works: a window with RTT samples towards the peer.
    let healthy = loop {
        let summary = agent.collect().expect("collect a window");
        if flow(&summary, cgroup, target.ip()).is_some_and(|f| f.rtt.is_some()) {
            break summary;
        }
    };
    drop(healthy);
    // Everything from the peer is dropped from now on: it is a blackhole.
    let _blackhole = NftDrop::start(
        &client_node.netns,
        "input",
        &format!("ip saddr {}", server_node.ipv4),
        100,
    )
    .expect("nft drop");
    let before = nstat_retrans_segs(&client_node.netns).expect("nstat");
    // (retransmits, segments sent, loss ratio) of each window with the flow.
    let mut windows = Vec::new();
    let mut next_window = || {
        let summary = agent.collect().expect("collect a window");
        flow(&summary, cgroup, target.ip()).map(|f| (f.retransmits, f.segments_sent, f.retransmit_ratio))
    };
    // RTO backoff: 200 ms, 400 ms, 800 ms, … — three retransmissions within a couple of seconds.
    while nstat_retrans_segs(&client_node.netns).expect("nstat") < before + 3 {
        windows.extend(next_window());
    }
    // The kernel counts a retransmission (RetransSegs) before it sends it and fires the
    // tracepoint after: on a busy machine the agent's map lags nstat by a segment for a moment.
    let kernel = nstat_retrans_segs(&client_node.netns).expect("nstat") - before;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let counted = |windows: &[(u64, u64, Option<f64>)]| windows.iter().map(|w| w.0).sum::<u64>();
    loop {
        windows.extend(next_window());
        if counted(&windows) >= 3 || std::time::Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let retransmits = counted(&windows);
    let segments: u64 = windows.iter().map(|w| w.1).sum();
    let _ = client.child.kill();
    let _ = client.child.wait();
    eprintln!(
        "blackhole: {retransmits} retransmits over {segments} segments sent (nstat {kernel}); windows {windows:?}"
    );
    assert!(retransmits >= 3, "retransmits towards the blackhole: {retransmits}");
    // Each window with retransmits counts them among its segments sent: a loss ratio in (0, 1].
    for (r, s, ratio) in &windows {
        if *r > 0 {
            assert!(
                *s >= *r && ratio.is_some_and(|x| x > 0.0 && x <= 1.0),
                "a window with {r} retransmits over {s} segments shows the loss: {ratio:?}"
            );
        }
    }
}

/// Issue 17.3: towards a blackholed peer, a client with a deadline gives up each connection
/// attempt before TCP retransmits its SYN (initial RTO 1 s): nothing is retransmitted and nothing
/// sent, so only the attempts themselves show the loss. Every attempt the client gave up is
/// counted, once, towards its peer; a refusal (a reset, the path works) is not, even when it
/// comes as late as an unanswered attempt would be given up.
#[test]
fn connects_nobody_answers_are_counted_and_refusals_are_not() {
    let mut one = OneFlow::start(RttSource::Auto, "unanswered");
    let (client_node, server_node) = (one.bench.node(0), one.bench.node(1));
    let (agent, cgroup) = (&mut one.agent, &one.workload);
    let server = server_node.ipv4;
    let unanswered =
        |summary: &WindowSummary| flow(summary, cgroup, server.into()).map_or(0, |f| f.unanswered_connects);
    let failures = |client: &mut Client| {
        client.report()["failures"]
            .as_u64()
            .expect("the client reports its failed attempts")
    };

    // Refused after 250 ms (the link emulator delays the SYN): later than the 200 ms after which
    // an abandoned attempt counts, so only the kernel's ECONNREFUSED tells it apart.
    let slow = LinkEmulator::start(
        &client_node.netns,
        client_node.ipv4,
        "eth0",
        &[server],
        LinkSpec {
            delay: Duration::from_millis(250),
            jitter: Duration::ZERO,
            loss: 0.0,
        },
    )
    .expect("start the link emulator");
    let closed_port = SocketAddr::new(server.into(), PORT + 1);
    let mut refused = Client::start(
        client_node,
        cgroup,
        closed_port,
        &["--request-timeout", "2s", "--duration", "1500ms"],
    );
    let refusals = failures(&mut refused);
    let _ = refused.child.wait();
    drop(slow);
    let after_refusals = agent.collect().expect("collect a window");
    assert!(refusals >= 2, "the closed port refused the attempts: {refusals}");
    assert_eq!(unanswered(&after_refusals), 0, "a refusal is an answer");

    // Everything from the peer is dropped: no SYN-ACK ever arrives.
    let _blackhole = NftDrop::start(&client_node.netns, "input", &format!("ip saddr {server}"), 100).expect("nft drop");
    let target = SocketAddr::new(server.into(), PORT);
    let mut client = Client::start(
        client_node,
        cgroup,
        target,
        &["--request-timeout", "300ms", "--duration", "2s"],
    );
    let given_up = failures(&mut client);
    let _ = client.child.wait();
    let summary = agent.collect().expect("collect a window");
    let towards_peer = flow(&summary, cgroup, server.into()).expect("the attempts are a flow towards the peer");
    eprintln!(
        "unanswered: client gave up {given_up} attempts; flow {} unanswered, {} retransmits, {} segments",
        towards_peer.unanswered_connects, towards_peer.retransmits, towards_peer.segments_sent
    );
    assert!(given_up >= 3, "the client kept trying: {given_up}");
    assert_eq!(
        towards_peer.unanswered_connects, given_up,
        "each abandoned attempt counted once"
    );
    assert_eq!(towards_peer.direction, Direction::Outbound);
}

/// A `TIME_WAIT` socket is an `inet_timewait_sock`, only a `sock_common`: packets dropped at it
/// (or that it sent) are reported towards its peer, charged to no workload, and no read of a full
/// socket's fields (its cgroup) is attempted there, so nothing is counted as lost.
#[test]
fn drops_at_a_time_wait_socket_are_reported_without_lost_events() {
    let mut one = OneFlow::start(RttSource::Auto, "time-wait");
    let (client_node, server_node) = (one.bench.node(0), one.bench.node(1));
    let (agent, cgroup) = (&mut one.agent, &one.workload);
    let target = SocketAddr::new(server_node.ipv4.into(), PORT);
    let mut client = Client::start(client_node, cgroup, target, &["--count", "10", "--hold"]);
    client.await_holding();
    let lost_before = agent.collect().expect("collect a window").lost_events;
    // The client's pure ACKs are lost from now on. It closes first, so its socket goes to
    // TIME_WAIT; the ACK of the server's FIN never arrives, so the server retransmits its FIN
    // (200 ms, 400 ms, … apart) to the TIME_WAIT socket, which drops it and ACKs again.
    let _lost_acks = NftDrop::start(
        &client_node.netns,
        "output",
        &format!("ip daddr {} tcp dport {PORT} tcp flags == ack", server_node.ipv4),
        100,
    )
    .expect("nft drop");
    assert!(client.finish().success(), "the client closes cleanly");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut seen = Vec::new();
    // Three drops: the last ACK and two re-ACKs, each sent after a retransmitted FIN reached
    // (and was freed at) the TIME_WAIT socket.
    let lost_after = loop {
        let summary = agent.collect().expect("collect a window");
        seen.extend(
            summary
                .network
                .drops
                .iter()
                .filter(|d| d.remote == Some(target.ip()) && d.workload.is_none())
                .cloned(),
        );
        if seen.iter().map(|d| d.count).sum::<u64>() >= 3 {
            break summary.lost_events;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "fewer than 3 drops towards {} within 30 s of the close: {seen:?}; all drops of the last window: {:?}",
            target.ip(),
            summary.network.drops
        );
    };
    eprintln!("time-wait drops: {seen:?}, lost before {lost_before:?}, after {lost_after:?}");
    assert_eq!(
        lost_after.get("kernel_read_failed"),
        lost_before.get("kernel_read_failed"),
        "a TIME_WAIT socket's packets are no failed kernel read"
    );
}
