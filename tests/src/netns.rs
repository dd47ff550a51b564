//! A bench of network namespaces ("nodes") joined by veth pairs to one bridge, created with
//! iproute2 and removed on drop, even when a test fails.

use std::{
    ffi::OsStr,
    fs::File,
    net::{Ipv4Addr, Ipv6Addr},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
};

use nix::sched::{CloneFlags, setns};

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("`{command}` failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("could not run `{command}`: {source}")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

/// Runs a command and returns its output, failing with its stderr.
pub fn run<I, S>(program: &str, args: I) -> Result<Output, BenchError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new(program);
    cmd.args(args);
    let command = describe(&cmd);
    let output = cmd.output().map_err(|source| BenchError::Spawn {
        command: command.clone(),
        source,
    })?;
    if !output.status.success() {
        return Err(BenchError::Command {
            command,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(output)
}

fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|s| s.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// `ip -n <netns> …`, `ip netns exec <netns> …` shorthands.
pub fn ip_in(netns: &str, args: &[&str]) -> Result<Output, BenchError> {
    run("ip", ["-n", netns].iter().chain(args))
}

pub fn exec_in(netns: &str, program: &str, args: &[&str]) -> Result<Output, BenchError> {
    run("ip", ["netns", "exec", netns, program].iter().chain(args))
}

/// One simulated node: a network namespace with `eth0` on the bench bridge.
#[derive(Debug, Clone)]
pub struct Node {
    pub name: String,
    pub netns: String,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
}

impl Node {
    /// A command that will run inside this node's namespace (and in `cgroups`, if any).
    ///
    /// `cgroup_procs` are `cgroup.procs` files the child writes its pid into before exec, so
    /// every socket it opens belongs to those cgroups.
    pub fn command(&self, program: impl AsRef<OsStr>, cgroup_procs: &[PathBuf]) -> Result<Command, BenchError> {
        let netns_path = Path::new("/run/netns").join(&self.netns);
        let netns = File::open(&netns_path).map_err(|source| BenchError::Io {
            what: format!("open {}", netns_path.display()),
            source,
        })?;
        let procs = cgroup_procs.to_vec();
        let mut cmd = Command::new(program);
        // SAFETY: the closure only calls async-signal-safe syscalls (setns, open/write/close).
        unsafe {
            cmd.pre_exec(move || {
                let pid = nix::unistd::getpid().to_string();
                for file in &procs {
                    std::fs::write(file, pid.as_bytes())?;
                }
                setns(&netns, CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)
            });
        }
        Ok(cmd)
    }
}

static NEXT_BENCH: AtomicU32 = AtomicU32::new(0);

/// N nodes on a bridge. Dropping it deletes the namespaces, links and bridge.
#[derive(Debug)]
pub struct Bench {
    pub id: String,
    pub bridge: String,
    pub nodes: Vec<Node>,
    /// The /24 (and /64) the nodes live in.
    pub subnet_v4: Ipv4Addr,
}

impl Bench {
    /// Creates `count` nodes named `n0`, `n1`, … Requires root.
    pub fn new(count: u8) -> Result<Self, BenchError> {
        let serial = NEXT_BENCH.fetch_add(1, Ordering::Relaxed);
        // Unique per process and bench, short enough for 15-character interface names.
        let tag = (std::process::id().wrapping_mul(31).wrapping_add(serial)) % 4096;
        let id = format!("{tag:03x}");
        let third_octet = u8::try_from(tag % 250).unwrap_or(0) + 1;
        let subnet_v4 = Ipv4Addr::new(10, 231, third_octet, 0);
        let mut bench = Bench {
            bridge: format!("gwb{id}"),
            id,
            nodes: Vec::new(),
            subnet_v4,
        };
        bench.cleanup_leftovers();
        run("ip", ["link", "add", &bench.bridge, "type", "bridge"])?;
        run("ip", ["link", "set", &bench.bridge, "up"])?;
        for index in 0..count {
            bench.add_node(index, third_octet)?;
        }
        Ok(bench)
    }

    fn add_node(&mut self, index: u8, third_octet: u8) -> Result<(), BenchError> {
        let name = format!("n{index}");
        let netns = format!("gw-{}-{name}", self.id);
        let host_if = format!("gw{}{name}", self.id);
        let ipv4 = Ipv4Addr::new(10, 231, third_octet, index + 1);
        let ipv6: Ipv6Addr = format!("fd00:6777:{third_octet:x}::{:x}", u16::from(index) + 1)
            .parse()
            .map_err(|_| BenchError::Command {
                command: "ipv6 address".into(),
                stderr: "invalid".into(),
            })?;
        run("ip", ["netns", "add", &netns])?;
        // Register the node first so Drop removes it even if the next steps fail.
        self.nodes.push(Node {
            name,
            netns: netns.clone(),
            ipv4,
            ipv6,
        });
        run(
            "ip",
            [
                "link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns", &netns,
            ],
        )?;
        run("ip", ["link", "set", &host_if, "master", &self.bridge, "up"])?;
        ip_in(&netns, &["link", "set", "lo", "up"])?;
        ip_in(&netns, &["addr", "add", &format!("{ipv4}/24"), "dev", "eth0"])?;
        ip_in(&netns, &["addr", "add", &format!("{ipv6}/64"), "dev", "eth0", "nodad"])?;
        ip_in(&netns, &["link", "set", "eth0", "up"])?;
        Ok(())
    }

    pub fn node(&self, index: usize) -> &Node {
        &self.nodes[index]
    }

    fn cleanup_leftovers(&self) {
        // A previous run of the same id that was killed: remove what it left.
        for index in 0..16 {
            let _ = run("ip", ["netns", "del", &format!("gw-{}-n{index}", self.id)]);
        }
        let _ = run("ip", ["link", "del", &self.bridge]);
    }
}

impl Drop for Bench {
    fn drop(&mut self) {
        for node in &self.nodes {
            // Deleting the namespace deletes its end of the veth, and with it the host end.
            if let Err(error) = run("ip", ["netns", "del", &node.netns]) {
                eprintln!("bench cleanup: {error}");
            }
        }
        if let Err(error) = run("ip", ["link", "del", &self.bridge]) {
            eprintln!("bench cleanup: {error}");
        }
    }
}

/// A cgroup v2 directory for a test, removed on drop (after its processes have exited).
#[derive(Debug)]
pub struct TestCgroup2 {
    pub path: PathBuf,
    /// Path relative to the hierarchy root, as the agent reports it.
    pub cgroup_path: String,
}

impl TestCgroup2 {
    /// Creates `<root>/graywatch-bench/<name>` in the v2 hierarchy at `root`.
    pub fn create(root: &Path, name: &str) -> Result<Self, BenchError> {
        let relative = format!("graywatch-bench/{name}-{}", std::process::id());
        let path = root.join(&relative);
        std::fs::create_dir_all(&path).map_err(|source| BenchError::Io {
            what: format!("mkdir {}", path.display()),
            source,
        })?;
        Ok(Self {
            path,
            cgroup_path: format!("/{relative}"),
        })
    }

    pub fn procs(&self) -> PathBuf {
        self.path.join("cgroup.procs")
    }
}

impl Drop for TestCgroup2 {
    fn drop(&mut self) {
        if let Err(error) = std::fs::remove_dir(&self.path) {
            eprintln!("cgroup cleanup {}: {error}", self.path.display());
        }
    }
}

/// Spawns `cmd` with piped stdin/stdout so the test can talk to it.
pub fn spawn_piped(cmd: &mut Command) -> Result<std::process::Child, BenchError> {
    let command = describe(cmd);
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|source| BenchError::Spawn { command, source })
}
