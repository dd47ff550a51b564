//! etcd + kube-apiserver as child processes, blocking and without a kube client: the one way
//! graywatch starts a test apiserver. [`crate::TestApiserver`] waits on it with a kube client;
//! `cargo xtask k8s start` and `cargo xtask bench fleet` use it directly.

use std::{
    fs::OpenOptions,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

use crate::{
    ApiserverOptions, BUILD_COMMAND, TOKEN, apiserver_args, apiserver_binary, etcd_args, etcd_binary, free_ports,
    gen_pki, spawn_logged, write_kubeconfig,
};

/// How long an apiserver may take to answer `/readyz` with `ok`.
pub const READY_TIMEOUT: Duration = Duration::from_secs(90);

static INSTANCE: AtomicU32 = AtomicU32::new(0);

/// A running etcd + kube-apiserver on loopback. Both are killed on drop (unless detached), and a
/// private directory made by [`Instance::start`] is removed.
pub struct Instance {
    dir: PathBuf,
    port: u16,
    etcd: Child,
    apiserver: Child,
    apiserver_args: Vec<String>,
    /// `dir` is ours to remove on drop.
    owns_dir: bool,
    /// The processes outlive this value ([`Instance::detach`]).
    detached: bool,
}

impl Instance {
    /// The error text when the apiserver or etcd binary is missing (it names the build command).
    #[must_use]
    pub fn missing_binaries() -> Option<String> {
        let (bin, etcd) = (apiserver_binary(), etcd_binary());
        (!bin.exists() || !etcd.exists()).then(|| {
            format!(
                "kube-apiserver ({}) or etcd ({}) is missing. Build it once with `{BUILD_COMMAND}` \
                 (as root: installs etcd-server and golang-1.19-go from Debian, ~4 min on 2 cores)",
                bin.display(),
                etcd.display()
            )
        })
    }

    /// Starts an instance in a fresh directory `<tmp>/<prefix>-<pid>-<n>` on free ports (not yet
    /// ready: see [`Instance::wait_ready`]).
    pub fn start(prefix: &str, opts: &ApiserverOptions) -> anyhow::Result<Self> {
        let n = INSTANCE.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("{prefix}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut me = Self::start_in(&dir, free_ports()?, opts)?;
        me.owns_dir = true;
        Ok(me)
    }

    /// Starts an instance in `dir` on `[apiserver, etcd client, etcd peer]` ports, keeping the
    /// PKI already there; the directory stays after drop.
    pub fn start_in(dir: &Path, ports: [u16; 3], opts: &ApiserverOptions) -> anyhow::Result<Self> {
        if let Some(msg) = Self::missing_binaries() {
            bail!(msg);
        }
        let [port, etcd_port, peer_port] = ports;
        let pki = dir.join("pki");
        std::fs::create_dir_all(&pki).with_context(|| format!("creating {}", pki.display()))?;
        if !pki.join("apiserver.crt").exists() {
            gen_pki(&pki)?;
        }
        write_kubeconfig(dir, port)?;
        let mut etcd = spawn_logged(
            Command::new(etcd_binary()).args(etcd_args(dir, etcd_port, peer_port)),
            &dir.join("etcd.log"),
        )
        .context("starting etcd")?;
        let apiserver_args = apiserver_args(dir, port, etcd_port, opts);
        let apiserver = match spawn_logged(
            Command::new(apiserver_binary()).args(&apiserver_args),
            &dir.join("kube-apiserver.log"),
        ) {
            Ok(c) => c,
            Err(e) => {
                let _ = etcd.kill();
                let _ = etcd.wait();
                return Err(e.context("starting kube-apiserver"));
            }
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            port,
            etcd,
            apiserver,
            apiserver_args,
            owns_dir: false,
            detached: false,
        })
    }

    /// Blocks until `/readyz` answers `ok` (checked with curl), failing early with the log tail
    /// when etcd or the apiserver exits.
    pub fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if self.curl("/readyz", &[]).is_ok_and(|body| body.starts_with("ok")) {
                return Ok(());
            }
            self.check_deadline(deadline)?;
            // A process without readiness notification: poll it.
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// An error (with the log tail) when a process has exited or `deadline` has passed.
    pub(crate) fn check_deadline(&mut self, deadline: Instant) -> anyhow::Result<()> {
        for name in ["etcd", "kube-apiserver"] {
            let child = if name == "etcd" {
                &mut self.etcd
            } else {
                &mut self.apiserver
            };
            if let Some(status) = child.try_wait()? {
                bail!(
                    "{name} exited with {status} before the apiserver was ready; log tail:\n{}",
                    self.log_tail(name)
                );
            }
        }
        if Instant::now() > deadline {
            bail!(
                "apiserver not ready within {} s; log tail:\n{}",
                READY_TIMEOUT.as_secs(),
                self.log_tail("kube-apiserver")
            );
        }
        Ok(())
    }

    /// `curl <url><path> <extra…>` as the static admin; the body.
    pub fn curl(&self, path: &str, extra: &[&str]) -> anyhow::Result<String> {
        let output = Command::new("curl")
            .args(["-sS", "--cacert"])
            .arg(self.ca_path())
            .args(["-H", &format!("Authorization: Bearer {TOKEN}")])
            .args(extra)
            .arg(format!("{}{path}", self.url()))
            .output()
            .context("running curl")?;
        if !output.status.success() {
            bail!("curl {path}: {}", String::from_utf8_lossy(&output.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// `https://127.0.0.1:<port>`.
    #[must_use]
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// The admin kubeconfig (static token, this instance's CA).
    #[must_use]
    pub fn kubeconfig_path(&self) -> PathBuf {
        self.dir.join("kubeconfig")
    }

    /// The CA that signed the serving certificate.
    #[must_use]
    pub fn ca_path(&self) -> PathBuf {
        self.dir.join("pki/ca.crt")
    }

    /// The instance's directory (PKI, kubeconfig, logs, etcd data).
    #[must_use]
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The last lines of a process log (`etcd` or `kube-apiserver`).
    #[must_use]
    pub fn log_tail(&self, name: &str) -> String {
        let text = std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// The pid of the kube-apiserver process (e.g. to stop it with SIGSTOP).
    #[must_use]
    pub fn apiserver_pid(&self) -> u32 {
        self.apiserver.id()
    }

    /// SIGKILLs the apiserver (its port closes; etcd keeps the data).
    pub fn kill_apiserver(&mut self) {
        let _ = self.apiserver.kill();
        let _ = self.apiserver.wait();
    }

    /// Starts the apiserver again with the same command line (port, certificates, etcd), its
    /// output appended to the same log; the new process is killed on drop like the first.
    pub fn restart_apiserver(&mut self) -> anyhow::Result<()> {
        self.kill_apiserver();
        let log = OpenOptions::new()
            .append(true)
            .open(self.dir.join("kube-apiserver.log"))
            .context("opening the apiserver log")?;
        self.apiserver = Command::new(apiserver_binary())
            .args(&self.apiserver_args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("restarting kube-apiserver")?;
        Ok(())
    }

    /// Leaves both processes running past this value; their pids `[etcd, kube-apiserver]`.
    #[must_use]
    pub fn detach(mut self) -> [u32; 2] {
        self.detached = true;
        [self.etcd.id(), self.apiserver.id()]
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        if !self.detached {
            for child in [&mut self.apiserver, &mut self.etcd] {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if self.owns_dir {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
