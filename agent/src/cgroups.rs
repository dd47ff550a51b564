//! The agent's one cgroup model: which hierarchies the host mounts ([`CgroupMode`], as vector's
//! `host_metrics` has it: legacy v1, hybrid, modern v2) and where ([`CgroupLayout`]), which paths
//! are kubelet's pod cgroups ([`parse_pod_cgroup`]), and cgroup ids → cgroup paths → pods.
//!
//! The kernel programs key everything by cgroup v2 id, which is the inode number of the cgroup's
//! directory in the v2 hierarchy. We find that hierarchy (pure v2 at /sys/fs/cgroup, or the
//! hybrid layout's /sys/fs/cgroup/unified), index directory inodes, and recognise kubelet's pod
//! cgroup names for both the cgroupfs and the systemd drivers.

use std::{
    collections::HashMap,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use crate::summary::PodRef;

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error(
        "no cgroup v2 hierarchy found in {mountinfo} (looked for a cgroup2 mount under {root}); \
         per-pod attribution needs cgroup v2 (pure or hybrid). Set --cgroup-root to override"
    )]
    NoUnifiedHierarchy { mountinfo: String, root: String },
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Which cgroup hierarchies a host mounts (the three modes of vector's `host_metrics` cgroups).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CgroupMode {
    /// cgroup v1 only (older AMIs).
    Legacy,
    /// v1 controllers under `<root>/<controller>` plus a v2 hierarchy without controllers at
    /// `<root>/unified` that still carries PSI files (systemd's "hybrid", the dev/CI machine).
    Hybrid,
    /// cgroup v2 only (EKS AL2023, recent distributions).
    Modern,
}

impl CgroupMode {
    pub fn name(self) -> &'static str {
        match self {
            CgroupMode::Legacy => "v1",
            CgroupMode::Hybrid => "hybrid",
            CgroupMode::Modern => "v2",
        }
    }
}

/// Where a host's hierarchies are under its cgroup mount root (default `/sys/fs/cgroup`,
/// overridable for a DaemonSet that mounts the host's at e.g. `/host/sys/fs/cgroup`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CgroupLayout {
    pub mode: CgroupMode,
    root: PathBuf,
    /// The v2 hierarchy (where PSI files and the eBPF cgroup ids live), if any.
    v2: Option<PathBuf>,
}

impl CgroupLayout {
    pub fn detect(root: &Path) -> Self {
        let (mode, v2) = if root.join("cgroup.controllers").exists() {
            (CgroupMode::Modern, Some(root.to_owned()))
        } else if root.join("unified/cgroup.controllers").exists() {
            (CgroupMode::Hybrid, Some(root.join("unified")))
        } else {
            (CgroupMode::Legacy, None)
        };
        Self {
            mode,
            root: root.to_owned(),
            v2,
        }
    }

    /// The v2 hierarchy (where PSI files and the eBPF cgroup ids live), if any.
    pub fn v2_root(&self) -> Option<&Path> {
        self.v2.as_deref()
    }

    /// The v1 hierarchy of `controller` (`cpu`, `memory`), if the layout has v1.
    pub fn v1_root(&self, controller: &str) -> Option<PathBuf> {
        if self.mode == CgroupMode::Modern {
            return None;
        }
        // Some distributions co-mount cpu and cpuacct as `cpu,cpuacct`, with `cpu` a symlink.
        let dir = self.root.join(controller);
        dir.exists().then_some(dir)
    }
}

/// Finds the cgroup v2 mount point from a mountinfo text (e.g. /proc/self/mountinfo).
///
/// Returns the mount point and the mode: hybrid when v1 controllers are mounted too.
pub fn find_unified_mount(mountinfo: &str) -> Option<(PathBuf, CgroupMode)> {
    let mut unified = None;
    let mut has_v1 = false;
    for line in mountinfo.lines() {
        // Fields: id parent major:minor root mount-point options [optional…] - fstype source …
        let Some((before, after)) = line.split_once(" - ") else {
            continue;
        };
        let fstype = after.split_whitespace().next().unwrap_or_default();
        let mount_point = before.split_whitespace().nth(4).unwrap_or_default();
        match fstype {
            "cgroup2" if unified.is_none() => unified = Some(PathBuf::from(unescape_mount(mount_point))),
            "cgroup" => has_v1 = true,
            _ => {}
        }
    }
    let mode = if has_v1 { CgroupMode::Hybrid } else { CgroupMode::Modern };
    unified.map(|path| (path, mode))
}

/// mountinfo escapes spaces and a few other bytes as octal `\040`.
fn unescape_mount(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let code = rest.get(i + 1..i + 4).and_then(|o| u8::from_str_radix(o, 8).ok());
        if let Some(byte) = code {
            out.push(char::from(byte));
            rest = &rest[i + 4..];
        } else {
            out.push('\\');
            rest = &rest[i + 1..];
        }
    }
    out.push_str(rest);
    out
}

/// Kubernetes QoS class as encoded in the cgroup path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum QosClass {
    Guaranteed,
    Burstable,
    BestEffort,
}

/// A pod's cgroup as far as its path tells it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize)]
pub struct PodCgroup {
    /// The pod's own cgroup, relative to the hierarchy root as given (e.g.
    /// `kubepods/burstable/pod<uid>` or
    /// `kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_>.slice`).
    pub path: String,
    /// Pod UID with dashes (as in the Pod object; the systemd driver writes underscores).
    pub uid: String,
    pub qos: QosClass,
    /// Container id when the path is a container's cgroup below the pod's.
    pub container_id: Option<String>,
}

impl From<PodCgroup> for PodRef {
    fn from(p: PodCgroup) -> Self {
        PodRef {
            uid: p.uid,
            namespace: None,
            name: None,
            container_id: p.container_id,
        }
    }
}

/// Recognises kubelet pod cgroups in a cgroup path (relative to a hierarchy root, at any prefix
/// such as a `kubelet.slice` parent): cgroupfs driver `kubepods/burstable/pod<uid>/<container>`
/// and systemd driver
/// `kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_>.slice/cri-containerd-<id>.scope`.
/// Container cgroups below a pod yield the pod (with the container id).
pub fn parse_pod_cgroup(path: &str) -> Option<PodCgroup> {
    let components: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
    let (index, uid) = components
        .iter()
        .enumerate()
        .find_map(|(i, component)| Some((i, pod_uid_from_component(component)?)))?;
    let pod = &components[..=index];
    // cgroupfs: a `burstable` / `besteffort` parent; systemd: `kubepods-burstable-pod<uid>`.
    let qos = pod
        .iter()
        .flat_map(|component| component.strip_suffix(".slice").unwrap_or(component).split('-'))
        .find_map(|word| match word {
            "burstable" => Some(QosClass::Burstable),
            "besteffort" => Some(QosClass::BestEffort),
            _ => None,
        })
        .unwrap_or(QosClass::Guaranteed);
    Some(PodCgroup {
        path: pod.join("/"),
        uid,
        qos,
        container_id: components.get(index + 1).map(|c| container_id_from_component(c)),
    })
}

fn pod_uid_from_component(component: &str) -> Option<String> {
    // systemd: kubepods-burstable-pod1234_5678.slice ; cgroupfs: pod1234-5678
    let name = component.strip_suffix(".slice").unwrap_or(component);
    let start = name.rfind("pod")?;
    if start > 0 && !name[..start].ends_with('-') {
        return None;
    }
    let uid = &name[start + 3..];
    let looks_like_uid = uid.len() >= 32 && uid.chars().all(|c| c.is_ascii_hexdigit() || c == '-' || c == '_');
    looks_like_uid.then(|| uid.replace('_', "-"))
}

fn container_id_from_component(component: &str) -> String {
    // cri-containerd-<id>.scope, crio-<id>.scope, docker-<id>.scope, or a bare id (cgroupfs).
    let name = component.strip_suffix(".scope").unwrap_or(component);
    name.rsplit('-').next().unwrap_or(name).to_owned()
}

/// Pod cgroups found under a hierarchy root (depth-limited walk of the kubepods subtree).
pub fn find_pod_cgroups(hierarchy: &Path) -> Vec<PodCgroup> {
    let mut found = Vec::new();
    let mut stack = vec![(hierarchy.to_owned(), 0usize)];
    while let Some((dir, depth)) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let path = entry.path();
            let Ok(rel) = path.strip_prefix(hierarchy) else {
                continue;
            };
            let rel = rel.to_string_lossy();
            if let Some(pod) = parse_pod_cgroup(&rel) {
                found.push(pod);
            } else if depth < 4 && (rel.contains("kubepods") || depth < 1) {
                stack.push((path, depth + 1));
            }
        }
    }
    found.sort_by(|a, b| a.path.cmp(&b.path));
    found
}

/// Maps cgroup v2 ids to paths by indexing the hierarchy's directory inodes.
#[derive(Debug)]
pub struct CgroupResolver {
    /// `None` on hosts without a cgroup v2 hierarchy.
    root: Option<PathBuf>,
    mode: CgroupMode,
    by_id: HashMap<u64, String>,
}

impl CgroupResolver {
    /// Uses `root` if given, else the cgroup2 mount found in `mountinfo_path`.
    pub fn discover(root: Option<&Path>, mountinfo_path: &Path) -> Result<Self, CgroupError> {
        let mountinfo = std::fs::read_to_string(mountinfo_path).map_err(|source| CgroupError::Read {
            path: mountinfo_path.display().to_string(),
            source,
        })?;
        let found = find_unified_mount(&mountinfo);
        let (root, mode) = match (root, found) {
            (Some(root), found) => (root.to_owned(), found.map_or(CgroupMode::Modern, |f| f.1)),
            (None, Some(found)) => found,
            (None, None) => {
                return Err(CgroupError::NoUnifiedHierarchy {
                    mountinfo: mountinfo_path.display().to_string(),
                    root: "/".into(),
                });
            }
        };
        let mut resolver = Self {
            root: Some(root),
            mode,
            by_id: HashMap::new(),
        };
        resolver.rescan();
        Ok(resolver)
    }

    /// A resolver for a host without cgroup v2: every lookup is unknown.
    pub fn unavailable() -> Self {
        Self {
            root: None,
            mode: CgroupMode::Legacy,
            by_id: HashMap::new(),
        }
    }

    /// The v2 hierarchy's mount point, if the host has one.
    pub fn root(&self) -> Option<&Path> {
        self.root.as_deref()
    }

    pub fn mode(&self) -> CgroupMode {
        self.mode
    }

    /// The cgroup path (`/` for the root) of `id`, rescanning once on a miss for new cgroups.
    pub fn path_of(&mut self, id: u64) -> Option<&str> {
        if !self.by_id.contains_key(&id) {
            self.rescan();
        }
        self.by_id.get(&id).map(String::as_str)
    }

    /// The id of the cgroup directory at `path` (relative to the root, `/`-separated).
    pub fn id_of(&self, path: &str) -> Option<u64> {
        let dir = self.root.as_ref()?.join(path.trim_start_matches('/'));
        std::fs::metadata(dir).ok().map(|m| m.ino())
    }

    /// Re-indexes the hierarchy. Directories that vanish mid-walk are skipped.
    pub fn rescan(&mut self) {
        self.by_id.clear();
        let Some(root) = self.root.clone() else { return };
        let mut stack = vec![(root, String::from("/"))];
        while let Some((dir, path)) = stack.pop() {
            let Ok(meta) = std::fs::metadata(&dir) else { continue };
            self.by_id.insert(meta.ino(), path.clone());
            let Ok(entries) = std::fs::read_dir(&dir) else { continue };
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    let name = entry.file_name().to_string_lossy().into_owned();
                    let child = if path == "/" {
                        format!("/{name}")
                    } else {
                        format!("{path}/{name}")
                    };
                    stack.push((entry.path(), child));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_hybrid_and_unified_mounts() {
        let hybrid = "25 24 0:22 / /sys/fs/cgroup ro - tmpfs tmpfs ro\n\
26 25 0:23 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n\
27 25 0:24 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n";
        assert_eq!(
            find_unified_mount(hybrid),
            Some((PathBuf::from("/sys/fs/cgroup/unified"), CgroupMode::Hybrid))
        );
        let unified = "30 1 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(
            find_unified_mount(unified),
            Some((PathBuf::from("/sys/fs/cgroup"), CgroupMode::Modern))
        );
        assert_eq!(
            find_unified_mount("27 25 0:24 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw\n"),
            None
        );
        assert_eq!(find_unified_mount("garbage\n\n - \n"), None);
    }

    #[test]
    fn mount_points_are_unescaped() {
        let line = "1 1 0:1 / /mnt/with\\040space rw - cgroup2 none rw\n";
        assert_eq!(
            find_unified_mount(line).map(|f| f.0),
            Some(PathBuf::from("/mnt/with space"))
        );
    }

    #[test]
    fn recognises_cgroupfs_and_systemd_pod_paths() {
        let uid = "8f0a3c52-7d3e-4a5e-9d2b-1c2d3e4f5a6b";
        let under = uid.replace('-', "_");
        let pod = |path: String, qos, container_id: Option<&str>| PodCgroup {
            path,
            uid: uid.into(),
            qos,
            container_id: container_id.map(str::to_owned),
        };
        let cases = [
            (
                format!("/kubepods/burstable/pod{uid}/0123456789abcdef"),
                pod(
                    format!("kubepods/burstable/pod{uid}"),
                    QosClass::Burstable,
                    Some("0123456789abcdef"),
                ),
            ),
            (
                format!("kubepods/pod{uid}"),
                pod(format!("kubepods/pod{uid}"), QosClass::Guaranteed, None),
            ),
            (
                format!("kubepods/besteffort/pod{uid}"),
                pod(format!("kubepods/besteffort/pod{uid}"), QosClass::BestEffort, None),
            ),
            (
                format!(
                    "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{under}.slice/cri-containerd-abc123.scope"
                ),
                pod(
                    format!("kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{under}.slice"),
                    QosClass::BestEffort,
                    Some("abc123"),
                ),
            ),
            (
                format!("/kubepods.slice/kubepods-pod{under}.slice"),
                pod(
                    format!("kubepods.slice/kubepods-pod{under}.slice"),
                    QosClass::Guaranteed,
                    None,
                ),
            ),
            (
                format!("kubelet.slice/kubepods.slice/kubepods-pod{under}.slice"),
                pod(
                    format!("kubelet.slice/kubepods.slice/kubepods-pod{under}.slice"),
                    QosClass::Guaranteed,
                    None,
                ),
            ),
        ];
        for (input, expected) in cases {
            assert_eq!(parse_pod_cgroup(&input), Some(expected), "{input}");
        }
        for not_pod in [
            "/system.slice/sshd.service",
            "/user.slice/podman-pod.scope",
            "kubepods/burstable",
            "kubepods.slice",
            "kubepods/podzz",
            "",
        ] {
            assert_eq!(parse_pod_cgroup(not_pod), None, "{not_pod}");
        }
    }

    #[test]
    fn resolves_this_machines_cgroup_ids() {
        let mut resolver = CgroupResolver::discover(None, Path::new("/proc/self/mountinfo"))
            .expect("this machine has a cgroup v2 hierarchy");
        let root_id = resolver.id_of("/").expect("root inode");
        assert_eq!(resolver.path_of(root_id), Some("/"));
        let mut none = CgroupResolver::unavailable();
        assert_eq!(none.path_of(root_id), None);
        assert_eq!((none.root(), none.id_of("/")), (None, None));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]
        #[test]
        fn pod_paths_never_panic(path in "(kubepods(\\.slice)?/)?([a-z_\\-0-9.]{0,40}/){0,4}") {
            let _ = parse_pod_cgroup(&path);
        }
    }
}
