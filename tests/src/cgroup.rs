//! Test cgroups with a CPU quota and/or a memory limit, in whichever layout the host runs:
//! pure v2 (`cpu.max`, `memory.max`), hybrid (v1 `cpu`/`memory` controllers plus the
//! controller-less v2 hierarchy at `unified`, which carries PSI and the eBPF cgroup ids), or v1.
//!
//! A [`TestCgroup`] is created under a fixed `graywatch-test` parent in every relevant
//! hierarchy; processes are spawned straight into it (the child joins every hierarchy before
//! `exec`); on drop every process in it is killed and the directories are removed, also when
//! the test panicked.

use std::{
    ffi::CString,
    io,
    os::unix::{fs::MetadataExt, process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command},
    time::{Duration, Instant},
};

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("no usable cgroup hierarchy under {0} (need v2, or v1 cpu and memory controllers)")]
    NoHierarchy(PathBuf),
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> CgroupError {
    let path = path.to_owned();
    move |source| CgroupError::Io { action, path, source }
}

/// The host's cgroup layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    V2 { root: PathBuf },
    Hybrid { root: PathBuf, unified: PathBuf },
    V1 { root: PathBuf },
}

impl Layout {
    pub fn detect(root: &Path) -> Result<Self, CgroupError> {
        if root.join("cgroup.controllers").exists() {
            return Ok(Layout::V2 { root: root.to_owned() });
        }
        if !root.join("cpu").exists() || !root.join("memory").exists() {
            return Err(CgroupError::NoHierarchy(root.to_owned()));
        }
        let unified = root.join("unified");
        if unified.join("cgroup.controllers").exists() {
            return Ok(Layout::Hybrid {
                root: root.to_owned(),
                unified,
            });
        }
        Ok(Layout::V1 { root: root.to_owned() })
    }

    /// Detects the layout of the standard mount at /sys/fs/cgroup.
    pub fn host() -> Result<Self, CgroupError> {
        Self::detect(Path::new("/sys/fs/cgroup"))
    }

    pub fn v2_root(&self) -> Option<&Path> {
        match self {
            Layout::V2 { root } => Some(root),
            Layout::Hybrid { unified, .. } => Some(unified),
            Layout::V1 { .. } => None,
        }
    }

    fn v1(&self, controller: &str) -> Option<PathBuf> {
        match self {
            Layout::V2 { .. } => None,
            Layout::Hybrid { root, .. } | Layout::V1 { root } => Some(root.join(controller)),
        }
    }
}

/// What to limit.
#[derive(Debug, Clone, Copy, Default)]
pub struct Limits {
    /// CPU bandwidth: (quota µs, period µs), e.g. (`20_000`, `100_000`) = 20% of one CPU.
    pub cpu_quota: Option<(u64, u64)>,
    /// Memory limit in bytes (swap too, where the kernel accounts it).
    pub memory_max: Option<u64>,
}

/// Parent of every test cgroup, so a crashed run's leftovers are easy to find.
pub const PARENT: &str = "graywatch-test";

/// A cgroup present in every relevant hierarchy under the same relative path.
#[derive(Debug)]
pub struct TestCgroup {
    rel: String,
    layout: Layout,
    /// Directories created, one per hierarchy (v2 and/or v1 cpu, v1 memory).
    dirs: Vec<PathBuf>,
    /// Parent directories this cgroup created (removed on drop once empty).
    parents: Vec<PathBuf>,
}

impl TestCgroup {
    /// Creates `graywatch-test/<name>-<pid>` with `limits`.
    pub fn create(name: &str, limits: Limits) -> Result<Self, CgroupError> {
        Self::create_at(&format!("{PARENT}/{name}-{}", std::process::id()), limits)
    }

    /// Creates the cgroup at `rel` (relative to each hierarchy root; its parent must exist in the
    /// v2 hierarchy, e.g. a bench node's cgroup, and is created in the v1 ones) with `limits`:
    /// a workload inside a bench node, limited by the v1 controllers on a hybrid host.
    pub fn create_at(rel: &str, limits: Limits) -> Result<Self, CgroupError> {
        let layout = Layout::host()?;
        let rel = rel.trim_matches('/').to_owned();
        let parent = Path::new(&rel).parent().unwrap_or(Path::new(""));
        let mut cgroup = TestCgroup {
            rel: rel.clone(),
            layout: layout.clone(),
            dirs: Vec::new(),
            parents: Vec::new(),
        };
        if let Some(v2) = layout.v2_root() {
            if matches!(layout, Layout::V2 { .. }) {
                // Controllers must be delegated down to our parent for cpu.max / memory.max.
                write(&v2.join("cgroup.subtree_control"), "+cpu +memory")?;
                cgroup.make_parents(v2, parent)?;
                let mut dir = v2.to_owned();
                for part in parent.components() {
                    dir.push(part);
                    write(&dir.join("cgroup.subtree_control"), "+cpu +memory")?;
                }
            } else {
                cgroup.make_parents(v2, parent)?;
            }
            let dir = v2.join(&rel);
            make_dir(&dir)?;
            cgroup.dirs.push(dir);
        }
        for controller in ["cpu", "memory"] {
            if let Some(root) = layout.v1(controller) {
                cgroup.make_parents(&root, parent)?;
                let dir = root.join(&rel);
                make_dir(&dir)?;
                cgroup.dirs.push(dir);
            }
        }
        cgroup.apply(limits)?;
        Ok(cgroup)
    }

    /// Creates the missing directories of `parent` under `root`, remembering them for drop.
    fn make_parents(&mut self, root: &Path, parent: &Path) -> Result<(), CgroupError> {
        let mut dir = root.to_owned();
        for part in parent.components() {
            dir.push(part);
            if !dir.exists() {
                make_dir(&dir)?;
                self.parents.push(dir.clone());
            }
        }
        Ok(())
    }

    fn apply(&self, limits: Limits) -> Result<(), CgroupError> {
        match &self.layout {
            Layout::V2 { root } => {
                let dir = root.join(&self.rel);
                if let Some((quota, period)) = limits.cpu_quota {
                    write(&dir.join("cpu.max"), &format!("{quota} {period}"))?;
                }
                if let Some(max) = limits.memory_max {
                    write(&dir.join("memory.max"), &max.to_string())?;
                    // No swap escape hatch: the working set must stay within the limit.
                    let swap = dir.join("memory.swap.max");
                    if swap.exists() {
                        write(&swap, "0")?;
                    }
                }
            }
            Layout::Hybrid { root, .. } | Layout::V1 { root } => {
                if let Some((quota, period)) = limits.cpu_quota {
                    let dir = root.join("cpu").join(&self.rel);
                    write(&dir.join("cpu.cfs_period_us"), &period.to_string())?;
                    write(&dir.join("cpu.cfs_quota_us"), &quota.to_string())?;
                }
                if let Some(max) = limits.memory_max {
                    let dir = root.join("memory").join(&self.rel);
                    write(&dir.join("memory.limit_in_bytes"), &max.to_string())?;
                }
            }
        }
        Ok(())
    }

    /// Path relative to each hierarchy root (`graywatch-test/<name>-<pid>`).
    pub fn rel(&self) -> &str {
        &self.rel
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The v2 cgroup id (directory inode) the kernel programs key by, if the host has v2.
    pub fn v2_id(&self) -> Option<u64> {
        let dir = self.layout.v2_root()?.join(&self.rel);
        std::fs::metadata(dir).ok().map(|m| m.ino())
    }

    /// The id (directory inode) of the cgroup in a v1 controller's hierarchy, if the host has it.
    pub fn v1_id(&self, controller: &str) -> Option<u64> {
        let dir = self.layout.v1(controller)?.join(&self.rel);
        std::fs::metadata(dir).ok().map(|m| m.ino())
    }

    /// The v2 directory (PSI files), if any.
    pub fn v2_dir(&self) -> Option<PathBuf> {
        self.layout.v2_root().map(|root| root.join(&self.rel))
    }

    /// Spawns `command` inside the cgroup: the child writes itself into `cgroup.procs` of every
    /// hierarchy before exec, so not one instruction of it runs outside.
    pub fn spawn(&self, command: &mut Command) -> Result<Child, CgroupError> {
        let procs: Vec<CString> = self
            .dirs
            .iter()
            .map(|d| CString::new(d.join("cgroup.procs").into_os_string().into_encoded_bytes()))
            .collect::<Result<_, _>>()
            .map_err(|e| CgroupError::Io {
                action: "encoding",
                path: PathBuf::from(&self.rel),
                source: io::Error::new(io::ErrorKind::InvalidInput, e),
            })?;
        // SAFETY: the hook only calls async-signal-safe functions (open, write, close) on
        // buffers allocated before fork.
        unsafe {
            command.pre_exec(move || {
                for path in &procs {
                    let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                    if fd < 0 {
                        return Err(io::Error::last_os_error());
                    }
                    // "0" means the writing process itself, in v1 and v2.
                    let written = libc::write(fd, b"0".as_ptr().cast(), 1);
                    let error = io::Error::last_os_error();
                    libc::close(fd);
                    if written != 1 {
                        return Err(error);
                    }
                }
                Ok(())
            });
        }
        command.spawn().map_err(io_err("spawning into", Path::new(&self.rel)))
    }

    /// Pids currently in the cgroup (any hierarchy).
    pub fn pids(&self) -> Vec<i32> {
        let mut pids: Vec<i32> = self
            .dirs
            .iter()
            .filter_map(|d| std::fs::read_to_string(d.join("cgroup.procs")).ok())
            .flat_map(|text| text.lines().filter_map(|l| l.trim().parse().ok()).collect::<Vec<i32>>())
            .collect();
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    /// Kills everything inside and waits (bounded) until the cgroup is empty.
    pub fn kill_all(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let pids = self.pids();
            if pids.is_empty() || Instant::now() > deadline {
                return;
            }
            for pid in pids {
                // SAFETY: plain syscall; a pid that already exited just fails with ESRCH.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        self.kill_all();
        for dir in &self.dirs {
            // An exiting task can keep a cgroup busy for a moment after it left cgroup.procs.
            let deadline = Instant::now() + Duration::from_secs(5);
            while let Err(error) = std::fs::remove_dir(dir) {
                if error.kind() == io::ErrorKind::NotFound {
                    break;
                }
                if Instant::now() > deadline {
                    eprintln!("graywatch-testbench: could not remove {}: {error}", dir.display());
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        // The shared parents go too once no other test cgroup is left in them (EBUSY otherwise).
        for parent in self.parents.iter().rev() {
            let _ = std::fs::remove_dir(parent);
        }
    }
}

fn make_dir(path: &Path) -> Result<(), CgroupError> {
    match std::fs::create_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(io_err("creating", path)(e)),
    }
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    std::fs::write(path, value).map_err(io_err("writing", path))
}

/// True when running as root (cgroup creation and eBPF need it).
pub fn is_root() -> bool {
    // SAFETY: no preconditions.
    unsafe { libc::geteuid() == 0 }
}
