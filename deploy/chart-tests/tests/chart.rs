//! The Helm chart, checked three ways:
//! 1. rendered by the real `helm template` in every mode, with the security properties and the
//!    RBAC rules asserted exactly;
//! 2. cross-checked against the binaries' sources (flags, config-file fields, the kube resources
//!    the aggregator and agent call);
//! 3. created on a real kube-apiserver v1.20.2 (dry-run for every variant; for real, with RBAC
//!    enforced, to prove each call the binaries make is allowed by the chart's roles in each mode
//!    and that calls outside them are refused).

use std::collections::{BTreeMap, BTreeSet};

use anyhow::Context;
use graywatch_chart_tests::{apiserver_with_crds, create, create_namespace, find, render, render_text, workspace_root};
use k8s_openapi::api::{
    coordination::v1::Lease,
    core::v1::{ConfigMap, Event, Node, Pod, Secret},
};
use kube::{
    Api, Client,
    api::{
        ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, ObjectMeta, Patch, PatchParams,
        PostParams, WatchParams,
    },
};
use serde_json::{Value, json};

/// A chart configuration under test: release, namespace, `--set` values.
struct Variant {
    release: &'static str,
    namespace: &'static str,
    set: &'static [&'static str],
}

const DEFAULTS: Variant = Variant {
    release: "gw",
    namespace: "graywatch",
    set: &[],
};
const DRY_RUN_KARPENTER: Variant = Variant {
    release: "dry",
    namespace: "gw-dry",
    set: &["mode=dry-run", "karpenter.enabled=true"],
};
const NRC: Variant = Variant {
    release: "nrc",
    namespace: "gw-nrc",
    set: &[
        "mode=nrc",
        // Acting without agent identity: refused unless loudly allowed (chart security-guard).
        "security.insecureAllowActingWithoutIdentity=true",
        "nodeReadinessRules.create=true",
        "nodeReadinessRules.files={gray-failure.yaml,network.yaml,bootstrap-only.yaml,noexecute-dry-run.yaml}",
        "serviceMonitor.enabled=true",
        "grafanaDashboard.enabled=true",
    ],
};
const DIRECT_KARPENTER: Variant = Variant {
    release: "direct",
    namespace: "gw-direct",
    set: &[
        "mode=direct-taint",
        "karpenter.enabled=true",
        "karpenter.replaceNodes=true",
        "serviceMonitor.enabled=true",
        "security.auth=token-review",
        "security.tls.secretName=gw-tls",
    ],
};
const DIRECT_NO_KARPENTER: Variant = Variant {
    release: "plain",
    namespace: "gw-plain",
    set: &[
        "mode=direct-taint",
        "karpenter.enabled=false",
        "security.insecureAllowActingWithoutIdentity=true",
    ],
};

const VARIANTS: [&Variant; 5] = [
    &DEFAULTS,
    &DRY_RUN_KARPENTER,
    &NRC,
    &DIRECT_KARPENTER,
    &DIRECT_NO_KARPENTER,
];

/// The aggregator's field manager.
use graywatch_aggregator::cluster::FIELD_MANAGER;

impl Variant {
    fn args(&self, kube_version: &str) -> Vec<String> {
        let mut args = vec!["--kube-version".to_string(), kube_version.to_string()];
        for s in self.set {
            args.push("--set".into());
            args.push((*s).into());
        }
        args
    }

    fn render(&self, kube_version: &str) -> anyhow::Result<Vec<Value>> {
        let args = self.args(kube_version);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        render(self.release, self.namespace, &args).with_context(|| format!("rendering {:?}", self.set))
    }

    fn mode(&self) -> &str {
        self.set
            .iter()
            .find_map(|s| s.strip_prefix("mode="))
            .unwrap_or("dry-run")
    }

    fn token_review(&self) -> bool {
        self.set.contains(&"security.auth=token-review")
    }

    fn tls(&self) -> bool {
        self.set.iter().any(|s| s.starts_with("security.tls.secretName="))
    }

    fn karpenter(&self) -> bool {
        self.set.contains(&"karpenter.enabled=true")
    }

    fn fullname(&self) -> String {
        format!("{}-graywatch", self.release)
    }

    fn sa_user(&self, component: &str) -> String {
        format!(
            "system:serviceaccount:{}:{}-{component}",
            self.namespace,
            self.fullname()
        )
    }
}

/// A rule as a set of (apiGroup, resource, resourceName or "", verb) grants.
type Grants = BTreeSet<(String, String, String, String)>;

fn grants(role: &Value) -> anyhow::Result<Grants> {
    let mut out = Grants::new();
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_string)).collect())
            .unwrap_or_default()
    };
    for rule in role["rules"].as_array().context("role without rules")? {
        let names = strings(&rule["resourceNames"]);
        let names = if names.is_empty() { vec![String::new()] } else { names };
        for g in strings(&rule["apiGroups"]) {
            for r in strings(&rule["resources"]) {
                for n in &names {
                    for v in strings(&rule["verbs"]) {
                        out.insert((g.clone(), r.clone(), n.clone(), v));
                    }
                }
            }
        }
    }
    Ok(out)
}

fn g(group: &str, resource: &str, name: &str, verbs: &[&str]) -> Grants {
    verbs
        .iter()
        .map(|v| (group.into(), resource.into(), name.into(), (*v).into()))
        .collect()
}

/// What the aggregator's roles must grant in a variant — exactly this, nothing more.
fn expected_aggregator_grants(v: &Variant) -> (Grants, Grants, Grants) {
    let writes = v.mode() != "dry-run";
    let mut cluster = g("", "nodes", "", &["get", "list", "watch"]);
    if writes {
        cluster.extend(g("", "nodes/status", "", &["patch"]));
    }
    if writes && v.mode() == "direct-taint" {
        cluster.extend(g("", "nodes", "", &["patch"]));
    }
    let mut ns = g("coordination.k8s.io", "leases", "", &["create"]);
    ns.extend(g(
        "coordination.k8s.io",
        "leases",
        &format!("{}-aggregator", v.fullname()),
        &["get", "update"],
    ));
    if v.karpenter() {
        cluster.extend(g("karpenter.sh", "nodepools", "", &["get", "list", "watch"]));
        cluster.extend(g("karpenter.sh", "nodeclaims", "", &["get", "list", "watch"]));
        ns.extend(g("", "configmaps", "", &["list"]));
        if writes {
            cluster.extend(g("karpenter.sh", "nodepools", "", &["patch"]));
            ns.extend(g("", "configmaps", "", &["create", "patch", "delete"]));
        }
        if writes && v.set.contains(&"karpenter.replaceNodes=true") {
            cluster.extend(g("karpenter.sh", "nodeclaims", "", &["delete"]));
        }
    }
    if v.token_review() {
        cluster.extend(g("authentication.k8s.io", "tokenreviews", "", &["create"]));
        ns.extend(g("", "pods", "", &["get"]));
    }
    // Events: create (audit), list (a new leader inherits the spent action budget).
    (cluster, ns, g("", "events", "", &["create", "list"]))
}

/// What the uninstall hook's roles must grant (aggregator/src/cleanup.rs and the actuator calls it
/// makes) — in every mode.
fn expected_cleanup_grants(v: &Variant) -> anyhow::Result<(Grants, Grants)> {
    let mut cluster = g("", "nodes", "", &["get", "list", "patch"]);
    cluster.extend(g("", "nodes/status", "", &["patch"]));
    cluster.extend(g("karpenter.sh", "nodepools", "", &["get", "patch"]));
    for rule in nrc_rule_names(v)? {
        cluster.extend(g(
            "readiness.node.x-k8s.io",
            "nodereadinessrules",
            &rule,
            &["get", "delete"],
        ));
    }
    let mut ns = g("", "configmaps", "", &["list", "delete"]);
    ns.extend(g("coordination.k8s.io", "leases", "", &["create"]));
    ns.extend(g(
        "coordination.k8s.io",
        "leases",
        &format!("{}-aggregator", v.fullname()),
        &["get", "update"],
    ));
    Ok((cluster, ns))
}

/// The names of the NodeReadinessRules a variant installs (metadata.name of its nrc/ files).
fn nrc_rule_names(v: &Variant) -> anyhow::Result<Vec<String>> {
    if !v.set.contains(&"nodeReadinessRules.create=true") {
        return Ok(Vec::new());
    }
    let files = v
        .set
        .iter()
        .find_map(|s| s.strip_prefix("nodeReadinessRules.files="))
        .map_or_else(
            || vec!["gray-failure.yaml".to_string()],
            |f| {
                f.trim_matches(|c| c == '{' || c == '}')
                    .split(',')
                    .map(str::to_string)
                    .collect()
            },
        );
    let mut names = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(workspace_root().join("deploy/helm/graywatch/nrc").join(&f))?;
        let rule: Value = serde_yaml::from_str(&text)?;
        names.push(rule["metadata"]["name"].as_str().context("rule name")?.to_string());
    }
    Ok(names)
}

/// The cleanup objects are pre-delete hooks: ServiceAccount and RBAC before the Job (lower
/// weight), all deleted once the hooks succeeded; the Job runs `graywatch-aggregator cleanup` with
/// the aggregator's image and config, as the hook's ServiceAccount.
fn check_cleanup_hook(objs: &[Value], v: &Variant) -> anyhow::Result<()> {
    let name = format!("{}-cleanup", v.fullname());
    let hooks: Vec<&Value> = objs
        .iter()
        .filter(|o| o["metadata"]["annotations"]["helm.sh/hook"].is_string())
        .collect();
    let kinds: BTreeSet<&str> = hooks.iter().filter_map(|o| o["kind"].as_str()).collect();
    assert_eq!(
        kinds,
        BTreeSet::from([
            "ClusterRole",
            "ClusterRoleBinding",
            "Job",
            "Role",
            "RoleBinding",
            "ServiceAccount"
        ])
    );
    for h in &hooks {
        let a = &h["metadata"]["annotations"];
        assert_eq!(h["metadata"]["name"], name.as_str());
        assert_eq!(a["helm.sh/hook"], "pre-delete");
        assert_eq!(a["helm.sh/hook-delete-policy"], "before-hook-creation,hook-succeeded");
        let weight: i32 = a["helm.sh/hook-weight"].as_str().context("weight")?.parse()?;
        if h["kind"] == "Job" {
            assert_eq!(weight, 0);
        } else {
            assert!(weight < 0, "{} must exist before the Job", h["kind"]);
        }
    }
    let job = find(objs, "Job", "-cleanup")?;
    let pod = &job["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], name.as_str());
    assert_eq!(pod["restartPolicy"], "Never");
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    let c = container(job, "cleanup")?;
    let agg = container(find(objs, "Deployment", "-aggregator")?, "aggregator")?;
    assert_eq!(c["image"], agg["image"]);
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(str_list(&c["securityContext"]["capabilities"]["drop"]), ["ALL"]);
    let args = str_list(&c["args"]);
    assert_eq!(args.first(), Some(&"--config=/etc/graywatch/aggregator.toml"));
    let sub = args
        .iter()
        .position(|a| *a == "cleanup")
        .context("no cleanup subcommand")?;
    let mut want = vec!["--hold-lease-seconds=300".to_string()];
    // mode nrc: the rules are deleted (and their taints removed) before our conditions.
    want.extend(nrc_rule_names(v)?.iter().map(|r| format!("--node-readiness-rule={r}")));
    assert_eq!(&args[sub + 1..], want);
    assert_eq!(c["env"], agg["env"], "identity and namespace as the aggregator's");
    assert_eq!(
        pod["volumes"][0]["configMap"]["name"],
        format!("{}-aggregator", v.fullname()),
        "the aggregator's own config"
    );
    Ok(())
}

fn container<'a>(workload: &'a Value, name: &str) -> anyhow::Result<&'a Value> {
    workload["spec"]["template"]["spec"]["containers"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == name))
        .with_context(|| format!("no container {name}"))
}

fn str_list(v: &Value) -> Vec<&str> {
    v.as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

#[test]
fn every_mode_renders_with_the_security_properties_and_exact_rbac() -> anyhow::Result<()> {
    for v in VARIANTS {
        let objs = v.render("1.20.2")?;
        let ctx = || format!("variant {:?}", v.set);

        // Agent: host network, no host PID, not privileged, exactly three capabilities.
        let ds = find(&objs, "DaemonSet", "-agent")?;
        let pod = &ds["spec"]["template"]["spec"];
        assert_eq!(pod["hostNetwork"], true, "{}", ctx());
        assert_eq!(pod["hostPID"], false, "{}", ctx());
        assert_eq!(pod["serviceAccountName"], format!("{}-agent", v.fullname()));
        let agent = container(ds, "agent")?;
        let sc = &agent["securityContext"];
        assert_eq!(sc["privileged"], false);
        assert_eq!(sc["allowPrivilegeEscalation"], false);
        assert_eq!(sc["readOnlyRootFilesystem"], true);
        assert_eq!(str_list(&sc["capabilities"]["drop"]), ["ALL"]);
        let added: BTreeSet<&str> = str_list(&sc["capabilities"]["add"]).into_iter().collect();
        // Tracepoints and raw tracepoints only: no NET_ADMIN (issue 15.4).
        assert_eq!(added, BTreeSet::from(["BPF", "PERFMON"]), "{}", ctx());
        assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault");
        // Host mounts: the four host paths, each read-only.
        let host_paths: BTreeMap<&str, &str> = pod["volumes"]
            .as_array()
            .context("volumes")?
            .iter()
            .filter_map(|vol| Some((vol["name"].as_str()?, vol["hostPath"]["path"].as_str()?)))
            .collect();
        assert_eq!(
            host_paths,
            BTreeMap::from([
                ("btf", "/sys/kernel/btf"),
                ("cgroup", "/sys/fs/cgroup"),
                ("proc", "/proc"),
                ("tracefs", "/sys/kernel/tracing")
            ])
        );
        let mounts = agent["volumeMounts"].as_array().context("volumeMounts")?;
        assert_eq!(mounts.len(), 4 + usize::from(v.token_review()) + usize::from(v.tls()));
        // The agent's side of the stream security: token file, CA, scheme.
        let stream_args = str_list(&agent["args"]);
        let scheme = if v.tls() { "https" } else { "http" };
        // Every replica, through the headless Service; TLS still checks the main Service name.
        let url = format!(
            "--aggregator={scheme}://{}-aggregator-replicas.{}.svc:7443",
            v.fullname(),
            v.namespace
        );
        assert!(stream_args.contains(&url.as_str()), "{stream_args:?}");
        let server_name = format!(
            "--aggregator-tls-server-name={}-aggregator.{}.svc",
            v.fullname(),
            v.namespace
        );
        assert_eq!(stream_args.contains(&server_name.as_str()), v.tls(), "{stream_args:?}");
        let token_file = "--aggregator-token-file=/var/run/secrets/graywatch/token";
        assert_eq!(stream_args.contains(&token_file), v.token_review());
        let ca_file = "--aggregator-ca-file=/var/run/secrets/graywatch-tls/ca.crt";
        assert_eq!(stream_args.contains(&ca_file), v.tls());
        assert!(
            mounts.iter().all(|m| m["readOnly"] == true),
            "every agent mount read-only: {mounts:?}"
        );
        let env = agent["env"].as_array().context("env")?;
        let node_name = env.iter().find(|e| e["name"] == "NODE_NAME").context("NODE_NAME")?;
        assert_eq!(node_name["valueFrom"]["fieldRef"]["fieldPath"], "spec.nodeName");
        let args = str_list(&agent["args"]);
        for want in [
            // tracefs where aya's tracepoint attach looks for it, not under /host.
            "--tracefs=/sys/kernel/tracing",
            "--btf=/host/sys/kernel/btf/vmlinux",
            "--cgroup-root=/host/sys/fs/cgroup",
        ] {
            assert!(args.contains(&want), "agent args {args:?} lack {want}");
        }
        let mount_of = |name: &str| {
            mounts
                .iter()
                .find(|m| m["name"] == name)
                .and_then(|m| m["mountPath"].as_str())
        };
        assert_eq!(mount_of("tracefs"), Some("/sys/kernel/tracing"));
        for (name, path) in [
            ("btf", "/host/sys/kernel/btf"),
            ("cgroup", "/host/sys/fs/cgroup"),
            ("proc", "/host/proc"),
        ] {
            assert_eq!(mount_of(name), Some(path), "{name}");
        }
        // Every path the agent is given is below a read-only mount.
        let paths = args
            .iter()
            .filter_map(|a| a.split_once('=').map(|(_, p)| p))
            .filter(|p| p.starts_with('/'))
            .chain(
                env.iter()
                    .filter(|e| e["name"] == "PROCFS_ROOT")
                    .filter_map(|e| e["value"].as_str()),
            );
        for a in paths {
            assert!(
                mounts
                    .iter()
                    .any(|m| m["mountPath"].as_str().is_some_and(|mp| a.starts_with(mp))),
                "{a} is not under a mount"
            );
        }
        // The aggregator replicas through the API (agent/src/discovery.rs), DNS as the fallback.
        let endpoints = format!(
            "--aggregator-endpoints={}/{}-aggregator-replicas",
            v.namespace,
            v.fullname()
        );
        assert!(args.contains(&endpoints.as_str()), "{args:?}");
        // EKS: never on Fargate or hybrid nodes; no SELinux label unless asked for.
        assert_eq!(
            pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"],
            json!([{"matchExpressions": [{"key": "eks.amazonaws.com/compute-type", "operator": "NotIn", "values": ["fargate", "hybrid"]}]}])
        );
        assert!(sc["seLinuxOptions"].is_null());
        assert!(
            !objs.iter().any(|o| o["kind"] == "Namespace"),
            "no Namespace unless namespace.create"
        );

        // Aggregator: 2 replicas, non-root, no capabilities, PDB keeps one.
        let dep = find(&objs, "Deployment", "-aggregator")?;
        assert_eq!(dep["spec"]["replicas"], 2);
        assert_eq!(dep["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"], true);
        let agg = container(dep, "aggregator")?;
        assert_eq!(agg["securityContext"]["privileged"], false);
        assert_eq!(str_list(&agg["securityContext"]["capabilities"]["drop"]), ["ALL"]);
        assert!(agg["securityContext"]["capabilities"]["add"].is_null());
        let pdb = find(&objs, "PodDisruptionBudget", "-aggregator")?;
        assert_eq!(pdb["apiVersion"], "policy/v1beta1", "1.20 has no policy/v1");
        assert_eq!(pdb["spec"]["minAvailable"], 1);
        assert_eq!(pdb["spec"]["selector"], dep["spec"]["selector"]);
        let svc = find(&objs, "Service", "-aggregator")?;
        assert_eq!(svc["spec"]["selector"], dep["spec"]["selector"]["matchLabels"]);

        // RBAC: nothing privileged; the agent reads pods and Nodes; the aggregator exactly its list.
        for o in objs
            .iter()
            .filter(|o| o["kind"] == "ClusterRole" || o["kind"] == "Role")
        {
            let text = o["rules"].to_string();
            assert!(!text.contains("\"*\""), "wildcard in {}: {text}", o["metadata"]["name"]);
        }
        let agent_role = find(&objs, "ClusterRole", "-agent")?;
        let mut agent_grants = g("", "pods", "", &["get", "list", "watch"]);
        agent_grants.extend(g("", "nodes", "", &["list", "watch"]));
        assert_eq!(grants(agent_role)?, agent_grants, "{}", ctx());
        let agent_ns_role = find(&objs, "Role", "-agent")?;
        assert_eq!(agent_ns_role["metadata"]["namespace"], v.namespace);
        assert_eq!(
            grants(agent_ns_role)?,
            g("", "endpoints", "", &["get", "list", "watch"])
        );
        // The uninstall hook: the same rules in every mode (what there is to undo depends on the
        // modes the release ran in before).
        let (cleanup_cluster, cleanup_ns) = expected_cleanup_grants(v)?;
        assert_eq!(grants(find(&objs, "ClusterRole", "-cleanup")?)?, cleanup_cluster);
        let cleanup_role = find(&objs, "Role", "-cleanup")?;
        assert_eq!(cleanup_role["metadata"]["namespace"], v.namespace);
        assert_eq!(grants(cleanup_role)?, cleanup_ns);
        check_cleanup_hook(&objs, v)?;
        let (cluster, ns, events) = expected_aggregator_grants(v);
        assert_eq!(
            grants(find(&objs, "ClusterRole", "-aggregator")?)?,
            cluster,
            "{}",
            ctx()
        );
        let role = find(&objs, "Role", "-aggregator")?;
        assert_eq!(role["metadata"]["namespace"], v.namespace);
        assert_eq!(grants(role)?, ns, "{}", ctx());
        let ev_role = find(&objs, "Role", "-aggregator-events")?;
        assert_eq!(ev_role["metadata"]["namespace"], "default");
        assert_eq!(grants(ev_role)?, events);
        let roles: usize = objs
            .iter()
            .filter(|o| o["kind"] == "ClusterRole" || o["kind"] == "Role")
            .count();
        assert_eq!(
            roles, 7,
            "agent ClusterRole and Role, aggregator ClusterRole, Role and events Role, cleanup ClusterRole and Role only"
        );
        // Every binding names a role of this release and the right ServiceAccount.
        for b in objs
            .iter()
            .filter(|o| o["kind"] == "ClusterRoleBinding" || o["kind"] == "RoleBinding")
        {
            let role_kind = if b["kind"] == "RoleBinding" {
                "Role"
            } else {
                "ClusterRole"
            };
            assert_eq!(b["roleRef"]["kind"], role_kind);
            assert_eq!(b["roleRef"]["name"], b["metadata"]["name"]);
            let name = b["metadata"]["name"].as_str().unwrap_or_default();
            let component = if name.ends_with("-agent") {
                "agent"
            } else if name.ends_with("-cleanup") {
                "cleanup"
            } else {
                "aggregator"
            };
            assert_eq!(b["subjects"][0]["name"], format!("{}-{component}", v.fullname()));
            assert_eq!(b["subjects"][0]["namespace"], v.namespace);
        }

        // Mode → aggregator config; optional objects only when asked for.
        let toml_text = find(&objs, "ConfigMap", "-aggregator")?["data"]["aggregator.toml"]
            .as_str()
            .context("toml")?;
        let cfg: toml::Table = toml_text
            .parse()
            .with_context(|| format!("aggregator.toml:\n{toml_text}"))?;
        let policy = cfg["policy"].as_table().context("[policy]")?;
        assert_eq!(policy["dry_run"].as_bool(), Some(v.mode() == "dry-run"), "{}", ctx());
        let taint_mode = if v.mode() == "nrc" { "nrc" } else { "direct" };
        assert_eq!(policy["taint_mode"].as_str(), Some(taint_mode));
        assert_eq!(policy["karpenter_exclude"].as_bool(), Some(v.karpenter()));
        assert_eq!(policy["blast_radius"].as_float(), Some(0.2));
        assert_eq!(
            cfg["leader"]["lease_name"].as_str(),
            Some(format!("{}-aggregator", v.fullname()).as_str())
        );
        let has = |kind: &str| objs.iter().any(|o| o["kind"] == kind);
        assert_eq!(has("ServiceMonitor"), v.set.contains(&"serviceMonitor.enabled=true"));
        assert_eq!(
            has("NodeReadinessRule"),
            v.set.contains(&"nodeReadinessRules.create=true")
        );
        // The rules are deploy/helm/graywatch/nrc/'s files, labelled, with the CRD's CEL rules (not enforced by
        // 1.20) checked here: taint keys under readiness.k8s.io/, conditions of ours.
        let rules: Vec<&Value> = objs.iter().filter(|o| o["kind"] == "NodeReadinessRule").collect();
        let wanted = v
            .set
            .iter()
            .find_map(|s| s.strip_prefix("nodeReadinessRules.files="))
            .map_or(usize::from(v.set.contains(&"nodeReadinessRules.create=true")), |f| {
                f.split(',').count()
            });
        assert_eq!(rules.len(), wanted, "{}", ctx());
        for rule in rules {
            let name = rule["metadata"]["name"].as_str().context("rule name")?;
            let shipped: Value = serde_yaml::from_str(&nrc_file_with_rule(name)?)?;
            assert_eq!(
                rule["spec"], shipped["spec"],
                "{name} differs from deploy/helm/graywatch/nrc"
            );
            assert_eq!(rule["metadata"]["labels"]["app.kubernetes.io/instance"], v.release);
            assert!(
                rule["spec"]["taint"]["key"]
                    .as_str()
                    .is_some_and(|k| k.starts_with("readiness.k8s.io/"))
            );
            for c in rule["spec"]["conditions"].as_array().context("conditions")? {
                assert!(
                    c["type"].as_str().is_some_and(|t| t.starts_with("graywatch.io/")),
                    "{c}"
                );
            }
        }
        // Every namespaced object lands in the release namespace (the events Role excepted).
        for o in &objs {
            let ns = o["metadata"]["namespace"].as_str();
            let name = o["metadata"]["name"].as_str().unwrap_or_default();
            if name.ends_with("-aggregator-events") {
                continue;
            }
            assert!(ns.is_none() || ns == Some(v.namespace), "{name} in {ns:?}");
        }
    }
    Ok(())
}

#[test]
fn the_pdb_api_version_follows_the_kubernetes_version() -> anyhow::Result<()> {
    for (version, api) in [
        ("1.20.2", "policy/v1beta1"),
        ("1.21.0", "policy/v1"),
        ("1.30.0", "policy/v1"),
    ] {
        let objs = DEFAULTS.render(version)?;
        assert_eq!(
            find(&objs, "PodDisruptionBudget", "-aggregator")?["apiVersion"],
            api,
            "kube {version}"
        );
    }
    Ok(())
}

#[test]
fn invalid_values_stop_the_render_with_the_reason() -> anyhow::Result<()> {
    for (set, reason) in [
        (vec!["mode=shadow"], "mode must be one of"),
        (
            vec!["blastRadius.fraction=0.5"],
            "blastRadius.fraction must be in (0, 0.2]",
        ),
        (
            vec![
                "mode=nrc",
                "nodeReadinessRules.create=true",
                "nodeReadinessRules.files={nope.yaml}",
            ],
            "no nope.yaml in deploy/helm/graywatch/nrc/",
        ),
        (
            vec![
                "mode=nrc",
                "nodeReadinessRules.create=true",
                "conditions.prefix=example.com/",
            ],
            "but conditions.prefix is example.com/",
        ),
        (
            vec!["mode=direct-taint", "nodeReadinessRules.create=true"],
            "nodeReadinessRules.create needs mode: nrc",
        ),
        (
            vec!["karpenter.replaceNodes=true"],
            "karpenter.replaceNodes needs karpenter.enabled",
        ),
        (
            vec!["thresholds.recoverConfidence=0.8"],
            "recoverConfidence must be below",
        ),
        // values.schema.json: typos and wrong types stop the install instead of being ignored.
        (
            vec!["blastRadious.fraction=0.1"],
            "Additional property blastRadious is not allowed",
        ),
        (
            vec!["aggregator.replicas=1"],
            "aggregator.pdb.minAvailable must be below aggregator.replicas",
        ),
        (
            vec!["aggregator.replicas=3", "aggregator.pdb.minAvailable=3"],
            "aggregator.pdb.minAvailable must be below aggregator.replicas",
        ),
        (
            vec!["thresholds.degradeConfidence=1.5"],
            "thresholds.degradeConfidence: Does not match pattern",
        ),
        (vec!["agent.kube=maybe"], "agent.kube must be one of the following"),
        (
            vec!["aggregator.replicas=0"],
            "aggregator.replicas: Must be greater than or equal to 1",
        ),
        (
            vec!["aggregator.leaseDurationMs=1500"],
            "leaseDurationMs must be a whole number of seconds",
        ),
        (
            vec!["aggregator.renewIntervalMs=15000"],
            "renewIntervalMs must be positive and below",
        ),
    ] {
        // Not the insecure-acting guard (tests/security.rs): it would fire first for nrc.
        let mut args = vec!["--set", "security.insecureAllowActingWithoutIdentity=true"];
        for s in &set {
            args.extend(["--set", s]);
        }
        match render_text("gw", "graywatch", &args)? {
            Ok(_) => panic!("{set:?} rendered"),
            Err(stderr) => assert!(stderr.contains(reason), "{set:?}: {stderr}"),
        }
    }
    Ok(())
}

/// `pub name:` fields of `pub struct <name>` in a Rust source file.
fn struct_fields(source: &str, name: &str) -> anyhow::Result<BTreeSet<String>> {
    let start = source
        .find(&format!("pub struct {name} {{"))
        .with_context(|| format!("no struct {name}"))?;
    let body = &source[start..];
    let end = body.find("\n}").context("unterminated struct")?;
    Ok(body[..end]
        .lines()
        .filter_map(|l| {
            l.trim()
                .strip_prefix("pub ")?
                .split_once(':')
                .map(|(f, _)| f.trim().to_string())
        })
        .filter(|f| f.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
        .collect())
}

fn read_source(path: &str) -> anyhow::Result<String> {
    let p = workspace_root().join(path);
    std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))
}

#[test]
fn the_rendered_config_and_flags_are_ones_the_binaries_accept() -> anyhow::Result<()> {
    let config_rs = read_source("aggregator/src/config.rs")?;
    let policy_rs = read_source("aggregator/src/core/policy.rs")?;
    let security_rs = read_source("aggregator/src/security.rs")?;
    let agent_rs = read_source("agent/src/config.rs")?;
    // The aggregator's file config rejects unknown fields (exit code 2): every key must exist.
    for v in VARIANTS {
        let objs = v.render("1.20.2")?;
        let text = find(&objs, "ConfigMap", "-aggregator")?["data"]["aggregator.toml"]
            .as_str()
            .context("toml")?;
        let cfg: toml::Table = text.parse()?;
        let top = struct_fields(&config_rs, "FileConfig")?;
        for (key, value) in &cfg {
            assert!(
                top.contains(key),
                "aggregator.toml key {key} is not a FileConfig field ({top:?})"
            );
            if let Some(table) = value.as_table() {
                let struct_name = match key.as_str() {
                    "ingest" => "IngestConfig",
                    "leader" => "LeaderConfig",
                    "policy" => "Policy",
                    "security" => "SecurityConfig",
                    other => panic!("unexpected table [{other}]"),
                };
                let source = match struct_name {
                    "Policy" => &policy_rs,
                    "SecurityConfig" => &security_rs,
                    _ => &config_rs,
                };
                let fields = struct_fields(source, struct_name)?;
                for k in table.keys() {
                    assert!(
                        fields.contains(k),
                        "[{key}] {k} is not a {struct_name} field ({fields:?})"
                    );
                }
            }
        }
        // Aggregator flags and environment: the ones its Args has.
        let dep = find(&objs, "Deployment", "-aggregator")?;
        let agg = container(dep, "aggregator")?;
        let agg_fields = struct_fields(&config_rs, "Args")?;
        for a in str_list(&agg["args"]) {
            let flag = a
                .trim_start_matches("--")
                .split('=')
                .next()
                .unwrap_or_default()
                .replace('-', "_");
            assert!(
                agg_fields.contains(&flag),
                "aggregator flag {a} not in Args ({agg_fields:?})"
            );
        }
        for e in agg["env"].as_array().context("env")? {
            let name = e["name"].as_str().context("env name")?;
            assert!(
                config_rs.contains(&format!("env = \"{name}\"")),
                "aggregator env {name} is not read"
            );
        }
        // The uninstall hook: the aggregator's flags, the `cleanup` subcommand (a variant of
        // Command), then CleanupArgs' flags.
        let cleanup_fields = struct_fields(&config_rs, "CleanupArgs")?;
        let job = find(&objs, "Job", "-cleanup")?;
        let mut sub = false;
        for a in str_list(&container(job, "cleanup")?["args"]) {
            if a == "cleanup" {
                assert!(config_rs.contains("Cleanup(CleanupArgs)"));
                sub = true;
                continue;
            }
            let flag = a
                .trim_start_matches("--")
                .split('=')
                .next()
                .unwrap_or_default()
                .replace('-', "_");
            let fields = if sub { &cleanup_fields } else { &agg_fields };
            assert!(fields.contains(&flag), "cleanup flag {a} not accepted ({fields:?})");
        }
        assert!(sub, "the hook runs the cleanup subcommand");
        // Agent flags: each one a field of its Cli.
        let ds = find(&objs, "DaemonSet", "-agent")?;
        let cli = struct_fields(&agent_rs, "Cli")?;
        for a in str_list(&container(ds, "agent")?["args"]) {
            let flag = a
                .trim_start_matches("--")
                .split('=')
                .next()
                .unwrap_or_default()
                .replace('-', "_");
            assert!(cli.contains(&flag), "agent flag {a} not in Cli ({cli:?})");
        }
    }
    Ok(())
}

fn rust_files(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let p = entry?.path();
        if p.is_dir() {
            rust_files(&p, out)?;
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
    Ok(())
}

/// The kube resources a crate's sources call: `Api<T>` / `Api::<T>` types and the Karpenter
/// `ApiResource` helpers, mapped to (group, resource).
fn kube_resources_used(src_dir: &str) -> anyhow::Result<BTreeSet<(String, String)>> {
    let mut files = Vec::new();
    rust_files(&workspace_root().join(src_dir), &mut files)?;
    // The uninstall cleanup and the mode-change hook's Deployment stop run under their own hook
    // roles (checked on their own below and in mode_changes_*).
    files.retain(|f| !f.ends_with("aggregator/src/cleanup.rs") && !f.ends_with("aggregator/src/stop.rs"));
    kube_resources_in(&files)
}

fn kube_resources_in(files: &[std::path::PathBuf]) -> anyhow::Result<BTreeSet<(String, String)>> {
    let mut out = BTreeSet::new();
    for f in files {
        let text = std::fs::read_to_string(f)?;
        for marker in ["Api<", "Api::<"] {
            for (i, _) in text.match_indices(marker) {
                let ty: String = text[i + marker.len()..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                let res = match ty.as_str() {
                    "Node" => ("", "nodes"),
                    "Event" => ("", "events"),
                    "ConfigMap" => ("", "configmaps"),
                    "Pod" => ("", "pods"),
                    "Deployment" => ("apps", "deployments"),
                    "Endpoints" => ("", "endpoints"),
                    "Lease" => ("coordination.k8s.io", "leases"),
                    "TokenReview" => ("authentication.k8s.io", "tokenreviews"),
                    // Dynamic types are resolved by the *_resource() helpers below.
                    "DynamicObject" | "K" | "T" => continue,
                    other => panic!("{}: kube Api<{other}> is not covered by the chart's RBAC", f.display()),
                };
                out.insert((res.0.to_string(), res.1.to_string()));
            }
        }
        if text.contains("nodepool_resource()") {
            out.insert(("karpenter.sh".into(), "nodepools".into()));
        }
        if text.contains("nodeclaim_resource()") {
            out.insert(("karpenter.sh".into(), "nodeclaims".into()));
        }
        if text.contains("node_readiness_rule_resource()") {
            out.insert(("readiness.node.x-k8s.io".into(), "nodereadinessrules".into()));
        }
    }
    Ok(out)
}

#[test]
fn the_resources_the_binaries_call_are_the_ones_the_chart_grants() -> anyhow::Result<()> {
    let objs = DIRECT_KARPENTER.render("1.20.2")?;
    let granted = |roles: &[&str]| -> anyhow::Result<BTreeSet<(String, String)>> {
        let mut out = BTreeSet::new();
        for r in roles {
            let (kind, suffix) = r.split_once(' ').context("kind suffix")?;
            for (group, resource, _, _) in grants(find(&objs, kind, suffix)?)? {
                out.insert((group, resource.split('/').next().unwrap_or_default().to_string()));
            }
        }
        Ok(out)
    };
    let aggregator = kube_resources_used("aggregator/src")?;
    assert_eq!(
        aggregator,
        granted(&["ClusterRole -aggregator", "Role -aggregator", "Role -aggregator-events"])?,
        "the aggregator's kube calls and the chart's aggregator roles disagree"
    );
    assert_eq!(
        kube_resources_used("agent/src")?,
        granted(&["ClusterRole -agent", "Role -agent"])?
    );
    // The uninstall cleanup: its own calls, plus the snapshot ConfigMaps it lists
    // (cluster.rs list_snapshots) and deletes (actuate.rs delete_snapshot), under the hook's
    // roles (with NodeReadinessRules in mode nrc).
    let nrc = NRC.render("1.20.2")?;
    let mut cleanup = kube_resources_in(&[workspace_root().join("aggregator/src/cleanup.rs")])?;
    cleanup.insert((String::new(), "configmaps".into()));
    let mut hook = BTreeSet::new();
    for (kind, suffix) in [("ClusterRole", "-cleanup"), ("Role", "-cleanup")] {
        for (group, resource, _, _) in grants(find(&nrc, kind, suffix)?)? {
            hook.insert((group, resource.split('/').next().unwrap_or_default().to_string()));
        }
    }
    assert_eq!(cleanup, hook, "cleanup's kube calls and the hook's roles disagree");
    // Events go to the namespace the chart's events Role is in.
    let ns = find(&objs, "Role", "-aggregator-events")?["metadata"]["namespace"]
        .as_str()
        .context("ns")?
        .to_string();
    assert_eq!(
        graywatch_aggregator::config::EVENT_NAMESPACE,
        ns,
        "the aggregator's default event namespace and the chart's events Role (aggregator.eventNamespace) disagree"
    );
    Ok(())
}

#[tokio::test]
async fn every_variant_is_accepted_by_the_apiserver_in_dry_run() -> anyhow::Result<()> {
    let (_server, admin, discovery) = apiserver_with_crds().await?;
    for v in VARIANTS {
        create_namespace(&admin, v.namespace).await?;
        let objs = v.render("1.20.2")?;
        assert!(objs.len() >= 16, "{} objects", objs.len());
        for o in &objs {
            create(&admin, &discovery, o, true)
                .await
                .with_context(|| format!("variant {:?}", v.set))?;
        }
        // Dry-run: nothing was stored.
        let sa: Api<k8s_openapi::api::core::v1::ServiceAccount> = Api::namespaced(admin.clone(), v.namespace);
        assert!(
            sa.list(&ListParams::default()).await?.items.is_empty(),
            "dry-run stored objects"
        );
    }
    // And the apiserver does refuse what is wrong: a DaemonSet without containers.
    let mut broken = find(&DEFAULTS.render("1.20.2")?, "DaemonSet", "-agent")?.clone();
    broken["spec"]["template"]["spec"]["containers"] = json!([]);
    let err = create(&admin, &discovery, &broken, true)
        .await
        .expect_err("invalid DaemonSet accepted");
    assert!(format!("{err:#}").contains("containers"), "{err:#}");
    Ok(())
}

fn nodepool_ar() -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("karpenter.sh", "v1", "NodePool"), "nodepools")
}

fn nodeclaim_ar() -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("karpenter.sh", "v1", "NodeClaim"), "nodeclaims")
}

/// Ok → allowed; a 403 → forbidden; anything else is a test failure.
fn allowed<T>(what: &str, r: Result<T, kube::Error>) -> bool {
    match r {
        Ok(_) => true,
        Err(kube::Error::Api(e)) if e.code == 403 => false,
        Err(e) => panic!("{what}: unexpected error {e}"),
    }
}

/// The calls the aggregator makes (aggregator/src/{cluster,actuate,leader}.rs), each made as the
/// chart's aggregator ServiceAccount; returns which were allowed.
async fn aggregator_calls(c: &Client, v: &Variant, node: &str) -> anyhow::Result<BTreeMap<&'static str, bool>> {
    let mut out = BTreeMap::new();
    let nodes: Api<Node> = Api::all(c.clone());
    out.insert(
        "nodes list",
        allowed("nodes list", nodes.list(&ListParams::default()).await),
    );
    out.insert(
        "nodes watch",
        allowed("nodes watch", nodes.watch(&WatchParams::default(), "0").await.map(drop)),
    );
    let got = nodes.get(node).await;
    let rv = got.as_ref().ok().and_then(|n| n.metadata.resource_version.clone());
    out.insert("nodes get", allowed("nodes get", got));
    let status = json!({
        "apiVersion": "v1", "kind": "Node", "metadata": {"name": node},
        "status": {"conditions": [{
            "type": "graywatch.io/Healthy", "status": "True", "reason": "Healthy",
            "message": "all reported families healthy",
            "lastTransitionTime": "2026-01-01T00:00:00Z", "lastHeartbeatTime": "2026-01-01T00:00:00Z"
        }]},
    });
    out.insert(
        "nodes/status apply",
        allowed(
            "nodes/status",
            nodes
                .patch_status(node, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&status))
                .await,
        ),
    );
    let rv = rv.unwrap_or_default();
    let taint = json!({"metadata": {"resourceVersion": rv}, "spec": {"taints": [{"key": "graywatch.io/degraded", "value": "gray-failure", "effect": "NoSchedule"}]}});
    let pp = PatchParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..PatchParams::default()
    };
    // A 409 (the status write above changed the resourceVersion) still means allowed.
    let taint_result = match nodes.patch(node, &pp, &Patch::Merge(&taint)).await {
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        r => r.map(drop),
    };
    out.insert("nodes patch", allowed("nodes patch", taint_result));
    out.insert(
        "nodes delete",
        allowed(
            "nodes delete",
            nodes
                .delete(
                    node,
                    &DeleteParams {
                        dry_run: true,
                        ..DeleteParams::default()
                    },
                )
                .await
                .map(drop),
        ),
    );

    let events: Api<Event> = Api::namespaced(c.clone(), "default");
    let ev = |ns: &str| Event {
        metadata: ObjectMeta {
            name: Some(format!("{node}.{}", v.release)),
            namespace: Some(ns.into()),
            ..ObjectMeta::default()
        },
        involved_object: k8s_openapi::api::core::v1::ObjectReference {
            kind: Some("Node".into()),
            name: Some(node.into()),
            ..Default::default()
        },
        reason: Some("GrayFailureDetected".into()),
        ..Event::default()
    };
    out.insert(
        "events create (default)",
        allowed("event", events.create(&PostParams::default(), &ev("default")).await),
    );
    let own_events: Api<Event> = Api::namespaced(c.clone(), v.namespace);
    out.insert(
        "events create (own ns)",
        allowed(
            "event own ns",
            own_events.create(&PostParams::default(), &ev(v.namespace)).await,
        ),
    );

    let leases: Api<Lease> = Api::namespaced(c.clone(), v.namespace);
    let lease_name = format!("{}-aggregator", v.fullname());
    let first = leases.get_opt(&lease_name).await;
    out.insert("lease get", allowed("lease get", first));
    let lease = Lease {
        metadata: ObjectMeta {
            name: Some(lease_name.clone()),
            ..ObjectMeta::default()
        },
        ..Lease::default()
    };
    out.insert(
        "lease create",
        allowed("lease create", leases.create(&PostParams::default(), &lease).await),
    );
    if let Ok(current) = leases.get(&lease_name).await {
        out.insert(
            "lease update",
            allowed(
                "lease update",
                leases.replace(&lease_name, &PostParams::default(), &current).await,
            ),
        );
    }
    out.insert(
        "other lease get",
        allowed("other lease", leases.get_opt("someone-else").await),
    );

    let cms: Api<ConfigMap> = Api::namespaced(c.clone(), v.namespace);
    out.insert(
        "configmaps list",
        allowed(
            "cm list",
            cms.list(&ListParams::default().labels("graywatch.io/snapshot-of-nodepool"))
                .await,
        ),
    );
    let snap = json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "graywatch-nodepool-default", "namespace": v.namespace,
                     "labels": {"graywatch.io/snapshot-of-nodepool": "default"}},
        "data": {"requirements": "[]", "excluded": "[]"},
    });
    out.insert(
        "configmaps apply",
        allowed(
            "cm apply",
            cms.patch(
                "graywatch-nodepool-default",
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&snap),
            )
            .await,
        ),
    );
    if out["configmaps apply"] {
        out.insert(
            "configmaps delete",
            allowed(
                "cm delete",
                cms.delete("graywatch-nodepool-default", &DeleteParams::default())
                    .await
                    .map(drop),
            ),
        );
    }
    let secrets: Api<Secret> = Api::namespaced(c.clone(), v.namespace);
    out.insert(
        "secrets list",
        allowed("secrets", secrets.list(&ListParams::default()).await),
    );
    let pods: Api<Pod> = Api::all(c.clone());
    out.insert("pods list", allowed("pods", pods.list(&ListParams::default()).await));
    // Agent authentication (auth.rs): a TokenReview, then the token's pod in our namespace.
    let review = k8s_openapi::api::authentication::v1::TokenReview {
        spec: k8s_openapi::api::authentication::v1::TokenReviewSpec {
            token: Some("not-a-token".into()),
            audiences: Some(vec!["graywatch".into()]),
        },
        ..Default::default()
    };
    let reviews: Api<k8s_openapi::api::authentication::v1::TokenReview> = Api::all(c.clone());
    out.insert(
        "tokenreviews create",
        allowed("tokenreview", reviews.create(&PostParams::default(), &review).await),
    );
    let own_pods: Api<Pod> = Api::namespaced(c.clone(), v.namespace);
    out.insert(
        "pods get (own ns)",
        allowed("pod get", own_pods.get_opt("agent-x").await),
    );

    let pools: Api<DynamicObject> = Api::all_with(c.clone(), &nodepool_ar());
    out.insert(
        "nodepools list",
        allowed("nodepools list", pools.list(&ListParams::default()).await),
    );
    let pool = json!({
        "apiVersion": "karpenter.sh/v1", "kind": "NodePool", "metadata": {"name": "default"},
        "spec": {"template": {"spec": {"requirements": [
            {"key": "topology.kubernetes.io/zone", "operator": "NotIn", "values": ["eu-west-1a"]}
        ]}}},
    });
    out.insert(
        "nodepools apply",
        allowed(
            "nodepools apply",
            pools
                .patch(
                    "default",
                    &PatchParams::apply(FIELD_MANAGER).force(),
                    &Patch::Apply(&pool),
                )
                .await,
        ),
    );
    out.insert(
        "nodepools delete",
        allowed(
            "nodepools delete",
            pools
                .delete(
                    "default",
                    &DeleteParams {
                        dry_run: true,
                        ..DeleteParams::default()
                    },
                )
                .await
                .map(drop),
        ),
    );
    let claims: Api<DynamicObject> = Api::all_with(c.clone(), &nodeclaim_ar());
    out.insert(
        "nodeclaims list",
        allowed("nodeclaims list", claims.list(&ListParams::default()).await),
    );
    out.insert(
        "nodeclaims delete",
        allowed(
            "nodeclaims delete",
            claims
                .delete(&format!("claim-{}", v.release), &DeleteParams::default())
                .await
                .map(drop),
        ),
    );
    Ok(out)
}

/// What the chart must allow the aggregator in a variant (everything else must be refused).
fn expected_aggregator_calls(v: &Variant) -> BTreeSet<&'static str> {
    let writes = v.mode() != "dry-run";
    let mut ok = BTreeSet::from([
        "nodes list",
        "nodes watch",
        "nodes get",
        "events create (default)",
        "lease get",
        "lease create",
        "lease update",
    ]);
    if writes {
        ok.insert("nodes/status apply");
    }
    if writes && v.mode() == "direct-taint" {
        ok.insert("nodes patch");
    }
    if v.karpenter() {
        ok.extend(["nodepools list", "nodeclaims list", "configmaps list"]);
        if writes {
            ok.extend(["nodepools apply", "configmaps apply", "configmaps delete"]);
        }
        if v.set.contains(&"karpenter.replaceNodes=true") {
            ok.insert("nodeclaims delete");
        }
    }
    if v.token_review() {
        ok.extend(["tokenreviews create", "pods get (own ns)"]);
    }
    ok
}

#[tokio::test]
async fn the_chart_rbac_allows_exactly_the_calls_the_binaries_make() -> anyhow::Result<()> {
    let (server, admin, discovery) = apiserver_with_crds().await?;
    // The objects the calls act on, made by the admin.
    let node = "ip-10-0-1-17.eu-west-1.compute.internal";
    let n = Node {
        metadata: ObjectMeta {
            name: Some(node.into()),
            ..ObjectMeta::default()
        },
        ..Node::default()
    };
    Api::<Node>::all(admin.clone())
        .create(&PostParams::default(), &n)
        .await?;
    let pool = json!({
        "apiVersion": "karpenter.sh/v1", "kind": "NodePool", "metadata": {"name": "default"},
        "spec": {"template": {"spec": {"nodeClassRef": {"group": "karpenter.k8s.aws", "kind": "EC2NodeClass", "name": "default"},
                  "requirements": []}}},
    });
    Api::<DynamicObject>::all_with(admin.clone(), &nodepool_ar())
        .create(&PostParams::default(), &serde_json::from_value(pool)?)
        .await?;
    let pod = Pod {
        metadata: ObjectMeta {
            name: Some("web-0".into()),
            namespace: Some("default".into()),
            ..ObjectMeta::default()
        },
        spec: Some(k8s_openapi::api::core::v1::PodSpec {
            node_name: Some(node.into()),
            containers: vec![k8s_openapi::api::core::v1::Container {
                name: "web".into(),
                image: Some("nginx".into()),
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Pod::default()
    };
    Api::<Pod>::namespaced(admin.clone(), "default")
        .create(&PostParams::default(), &pod)
        .await?;

    for v in [&DRY_RUN_KARPENTER, &NRC, &DIRECT_KARPENTER, &DIRECT_NO_KARPENTER] {
        create_namespace(&admin, v.namespace).await?;
        for o in v.render("1.20.2")? {
            create(&admin, &discovery, &o, false).await?;
        }
        // The NodeClaim this variant's aggregator tries to delete.
        let body = json!({
            "apiVersion": "karpenter.sh/v1", "kind": "NodeClaim", "metadata": {"name": format!("claim-{}", v.release)},
            "spec": {"nodeClassRef": {"group": "karpenter.k8s.aws", "kind": "EC2NodeClass", "name": "default"}, "requirements": []},
        });
        Api::<DynamicObject>::all_with(admin.clone(), &nodeclaim_ar())
            .create(&PostParams::default(), &serde_json::from_value(body)?)
            .await?;

        let aggregator = server.impersonating(&v.sa_user("aggregator")).await?;
        let got = aggregator_calls(&aggregator, v, node).await?;
        let allowed_calls: BTreeSet<&str> = got.iter().filter(|(_, ok)| **ok).map(|(k, _)| *k).collect();
        assert_eq!(
            allowed_calls,
            expected_aggregator_calls(v),
            "aggregator of {:?}; all calls: {got:?}",
            v.set
        );

        // The agent: its pod watch (field-selected to its node) and nothing else.
        let agent = server.impersonating(&v.sa_user("agent")).await?;
        let pods: Api<Pod> = Api::all(agent.clone());
        let lp = ListParams::default().fields(&format!("spec.nodeName={node}"));
        let listed = pods.list(&lp).await?;
        assert_eq!(listed.items.len(), 1);
        drop(
            pods.watch(&WatchParams::default().fields(&format!("spec.nodeName={node}")), "0")
                .await?,
        );
        Api::<Pod>::namespaced(agent.clone(), "default").get("web-0").await?;
        // agent/src/discovery.rs: the aggregator replicas' Endpoints, in the release namespace.
        let own_endpoints: Api<k8s_openapi::api::core::v1::Endpoints> = Api::namespaced(agent.clone(), v.namespace);
        own_endpoints.list(&ListParams::default()).await?;
        drop(own_endpoints.watch(&WatchParams::default(), "0").await?);
        own_endpoints
            .get_opt(&format!("{}-aggregator-replicas", v.fullname()))
            .await?;
        let forbidden = [
            (
                "nodes get",
                allowed("agent nodes", Api::<Node>::all(agent.clone()).get(node).await),
            ),
            (
                "pods delete",
                allowed(
                    "agent pod delete",
                    Api::<Pod>::namespaced(agent.clone(), "default")
                        .delete(
                            "web-0",
                            &DeleteParams {
                                dry_run: true,
                                ..DeleteParams::default()
                            },
                        )
                        .await
                        .map(drop),
                ),
            ),
            (
                "endpoints list (other ns)",
                allowed(
                    "agent endpoints default",
                    Api::<k8s_openapi::api::core::v1::Endpoints>::namespaced(agent.clone(), "default")
                        .list(&ListParams::default())
                        .await,
                ),
            ),
            (
                "secrets list",
                allowed(
                    "agent secrets",
                    Api::<Secret>::all(agent.clone()).list(&ListParams::default()).await,
                ),
            ),
            (
                "configmaps list",
                allowed(
                    "agent cms",
                    Api::<ConfigMap>::all(agent.clone()).list(&ListParams::default()).await,
                ),
            ),
        ];
        for (what, ok) in forbidden {
            assert!(!ok, "agent of {:?} may {what}", v.set);
        }
    }
    // The direct-taint run really wrote: our condition and taint are on the Node.
    let n = Api::<Node>::all(admin.clone()).get(node).await?;
    let conds = n.status.and_then(|s| s.conditions).unwrap_or_default();
    assert!(conds.iter().any(|c| c.type_ == "graywatch.io/Healthy"), "{conds:?}");
    Ok(())
}

/// Metric names registered by a source file: the first string literal after each `register(`.
fn registered_metrics(path: &str, prefix: &str) -> anyhow::Result<BTreeSet<String>> {
    let text = read_source(path)?;
    let mut out = BTreeSet::new();
    for (i, _) in text.match_indices(".register(") {
        let rest = &text[i..];
        let start = rest.find('"').context("register without a name")? + 1;
        let end = start + rest[start..].find('"').context("unterminated name")?;
        out.insert(format!("{prefix}{}", &rest[start..end]));
    }
    Ok(out)
}

#[test]
fn the_dashboard_queries_metrics_the_binaries_export() -> anyhow::Result<()> {
    let mut known = registered_metrics("agent/src/metrics.rs", "graywatch_")?;
    known.extend(registered_metrics("agent/src/signals/host.rs", "graywatch_")?);
    known.extend(registered_metrics(
        "aggregator/src/metrics.rs",
        "graywatch_aggregator_",
    )?);
    assert!(known.len() > 20, "{known:?}");
    let text = read_source("deploy/helm/graywatch/dashboards/graywatch.json")?;
    let dash: Value = serde_json::from_str(&text)?;
    let panels = dash["panels"].as_array().context("panels")?;
    let mut ids = BTreeSet::new();
    let mut used = BTreeSet::new();
    for p in panels {
        assert!(
            ids.insert(p["id"].as_u64().context("panel id")?),
            "duplicate panel id {}",
            p["id"]
        );
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().context("expr")?;
            for (i, _) in expr.match_indices("graywatch_") {
                let name: String = expr[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                used.insert(name);
            }
        }
    }
    assert!(used.len() > 20, "{used:?}");
    for name in &used {
        // OpenMetrics suffixes of counters and histograms.
        let base = ["_total", "_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        assert!(
            known.contains(base),
            "dashboard queries {name}, which no binary registers"
        );
    }
    // The ConfigMap carries the chart's file, unchanged.
    let objs = NRC.render("1.20.2")?;
    let cm = find(&objs, "ConfigMap", "-dashboard")?;
    let shipped: Value = serde_json::from_str(cm["data"]["graywatch.json"].as_str().context("data")?)?;
    assert_eq!(shipped, dash);
    assert_eq!(cm["metadata"]["labels"]["grafana_dashboard"], "1");
    Ok(())
}

#[test]
fn the_agent_environment_is_read_by_the_agent_and_it_reaches_the_aggregator() -> anyhow::Result<()> {
    let mut files = Vec::new();
    rust_files(&workspace_root().join("agent/src"), &mut files)?;
    let mut sources = String::new();
    for f in files {
        sources.push_str(&std::fs::read_to_string(f)?);
    }
    let objs = DEFAULTS.render("1.20.2")?;
    let agent = container(find(&objs, "DaemonSet", "-agent")?, "agent")?;
    let env = agent["env"].as_array().context("env")?;
    assert!(env.len() >= 2);
    for e in env {
        let name = e["name"].as_str().context("name")?;
        assert!(sources.contains(&format!("\"{name}\"")), "the agent never reads {name}");
    }
    // The agent streams to every aggregator replica (headless Service).
    let args = str_list(&agent["args"]);
    assert!(
        args.contains(&"--aggregator=http://gw-graywatch-aggregator-replicas.graywatch.svc:7443"),
        "{args:?}"
    );
    let replicas = find(&objs, "Service", "-aggregator-replicas")?;
    assert_eq!(replicas["spec"]["clusterIP"], "None");
    let svc = find(&objs, "Service", "-aggregator")?;
    assert_eq!(svc["metadata"]["name"], "gw-graywatch-aggregator");
    assert_eq!(svc["spec"]["ports"][0]["port"], 7443);
    Ok(())
}

/// The text of the deploy/helm/graywatch/nrc/ file that defines the rule `name`.
fn nrc_file_with_rule(name: &str) -> anyhow::Result<String> {
    for entry in std::fs::read_dir(workspace_root().join("deploy/helm/graywatch/nrc"))? {
        let p = entry?.path();
        if p.extension().is_some_and(|e| e == "yaml") {
            let text = std::fs::read_to_string(&p)?;
            let v: Value = serde_yaml::from_str(&text)?;
            if v["metadata"]["name"] == name {
                return Ok(text);
            }
        }
    }
    anyhow::bail!("no deploy/helm/graywatch/nrc/*.yaml defines {name}")
}

#[test]
fn node_readiness_rules_can_be_forced_into_dry_run() -> anyhow::Result<()> {
    let files = "nodeReadinessRules.files={gray-failure.yaml,network.yaml}";
    for dry_run in [false, true] {
        let flag = format!("nodeReadinessRules.dryRun={dry_run}");
        let objs = render(
            "gw",
            "graywatch",
            &[
                "--set",
                "mode=nrc",
                "--set",
                "security.insecureAllowActingWithoutIdentity=true",
                "--set",
                "nodeReadinessRules.create=true",
                "--set",
                files,
                "--set",
                &flag,
            ],
        )?;
        let rules: Vec<&Value> = objs.iter().filter(|o| o["kind"] == "NodeReadinessRule").collect();
        assert_eq!(rules.len(), 2);
        for r in rules {
            // Off: the file's own setting (these two have none); on: forced.
            assert_eq!(
                r["spec"]["dryRun"].as_bool().unwrap_or(false),
                dry_run,
                "{}",
                r["metadata"]["name"]
            );
        }
    }
    Ok(())
}

#[test]
fn helm_lint_strict_passes_for_every_variant() -> anyhow::Result<()> {
    let helm = graywatch_chart_tests::helm_binary()?;
    for v in VARIANTS {
        let mut cmd = std::process::Command::new(&helm);
        cmd.args(["lint", "--strict"]).arg(graywatch_chart_tests::chart_dir());
        for s in v.set {
            cmd.args(["--set", s]);
        }
        let out = cmd.output()?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "helm lint {:?}:\n{stdout}{}",
            v.set,
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains("0 chart(s) failed"), "{stdout}");
    }
    Ok(())
}

#[test]
fn decimal_values_from_set_reach_the_aggregator_config_as_numbers() -> anyhow::Result<()> {
    // helm --set passes decimals as strings; the chart must still write TOML floats.
    let objs = render(
        "gw",
        "graywatch",
        &[
            "--set",
            "thresholds.degradeConfidence=0.9",
            "--set",
            "thresholds.minActionConfidence=1",
            "--set",
            "blastRadius.fraction=.1",
            "--set",
            "extraPolicy.peer_min_group=6",
        ],
    )?;
    let text = find(&objs, "ConfigMap", "-aggregator")?["data"]["aggregator.toml"]
        .as_str()
        .context("toml")?;
    let cfg: toml::Table = text.parse()?;
    let policy = cfg["policy"].as_table().context("[policy]")?;
    assert_eq!(policy["degrade_confidence"].as_float(), Some(0.9));
    assert_eq!(
        policy["min_action_confidence"].as_float(),
        Some(1.0),
        "a whole number stays a float"
    );
    assert_eq!(policy["blast_radius"].as_float(), Some(0.1));
    assert_eq!(policy["peer_min_group"].as_integer(), Some(6));
    Ok(())
}

#[tokio::test]
async fn the_eks_values_render_and_are_stored_by_the_apiserver() -> anyhow::Result<()> {
    let (_server, admin, discovery) = apiserver_with_crds().await?;
    // The namespace comes from the chart (not created beforehand), labelled for Pod Security.
    let objs = render(
        "eks",
        "gw-eks",
        &[
            "--kube-version",
            "1.20.2",
            "--set",
            "namespace.create=true",
            "--set",
            "namespace.labels.team=platform",
            "--set",
            "agent.seLinuxOptions.type=control_t",
        ],
    )?;
    assert_eq!(objs[0]["kind"], "Namespace", "helm orders the Namespace first");
    for o in &objs {
        create(&admin, &discovery, o, false).await?;
    }
    let ns = Api::<k8s_openapi::api::core::v1::Namespace>::all(admin.clone())
        .get("gw-eks")
        .await?;
    let labels = ns.metadata.labels.unwrap_or_default();
    assert_eq!(
        labels.get("pod-security.kubernetes.io/enforce").map(String::as_str),
        Some("privileged")
    );
    assert_eq!(labels.get("team").map(String::as_str), Some("platform"));
    let ds = Api::<k8s_openapi::api::apps::v1::DaemonSet>::namespaced(admin.clone(), "gw-eks")
        .get("eks-graywatch-agent")
        .await?;
    let pod = ds.spec.and_then(|s| s.template.spec).context("pod spec")?;
    let se = pod.containers[0]
        .security_context
        .as_ref()
        .and_then(|s| s.se_linux_options.as_ref())
        .context("seLinuxOptions stored")?;
    assert_eq!(se.type_.as_deref(), Some("control_t"));
    let terms = pod
        .affinity
        .and_then(|a| a.node_affinity)
        .and_then(|n| n.required_during_scheduling_ignored_during_execution)
        .context("required node affinity stored")?
        .node_selector_terms;
    let expr = &terms[0].match_expressions.as_ref().context("expressions")?[0];
    assert_eq!(expr.key, "eks.amazonaws.com/compute-type");
    assert_eq!(expr.operator, "NotIn");
    assert_eq!(
        expr.values.as_deref(),
        Some(&["fargate".to_string(), "hybrid".to_string()][..])
    );

    // Other Pod Security levels, and the default affinity can be dropped or replaced.
    let objs = render(
        "eks",
        "gw-eks",
        &[
            "--set",
            "namespace.create=true",
            "--set",
            "namespace.podSecurity=baseline",
            "--set",
            "agent.affinity.nodeAffinity=null",
        ],
    )?;
    assert_eq!(
        find(&objs, "Namespace", "gw-eks")?["metadata"]["labels"]["pod-security.kubernetes.io/enforce"],
        "baseline"
    );
    assert!(find(&objs, "DaemonSet", "-agent")?["spec"]["template"]["spec"]["affinity"].is_null());
    // Without the uninstall hook: no cleanup object at all.
    let objs = render("eks", "gw-eks", &["--set", "cleanup.enabled=false"])?;
    assert!(
        !objs
            .iter()
            .any(|o| o["metadata"]["name"].as_str().is_some_and(|n| n.ends_with("-cleanup"))),
        "cleanup objects rendered with cleanup.enabled=false"
    );
    // The values schema refuses what must not be: the unconfined SELinux type, unknown levels.
    for (set, reason) in [
        ("agent.seLinuxOptions.type=super_t", "agent.seLinuxOptions.type"),
        ("namespace.podSecurity=open", "namespace.podSecurity"),
        ("cleanup.holdLeaseSeconds=0", "cleanup.holdLeaseSeconds"),
    ] {
        let err = render_text("eks", "gw-eks", &["--set", set])?.expect_err(set);
        assert!(err.contains(reason), "{set}: {err}");
    }
    Ok(())
}

/// The uninstall hook's ServiceAccount runs the aggregator's real `cleanup` code against a real
/// apiserver with RBAC enforced, in dry-run mode (where the aggregator itself may write nothing):
/// everything there is to undo is undone, and calls outside cleanup's needs are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cleanup_hook_rbac_allows_exactly_what_cleanup_needs() -> anyhow::Result<()> {
    use graywatch_aggregator::{
        actuate::Actuator,
        cleanup,
        config::{CleanupArgs, FileConfig},
        core::{karpenter::exclusion_edits, model::PoolEdits, plan::PoolChange},
    };
    let (server, admin, discovery) = apiserver_with_crds().await?;
    let v = &DRY_RUN_KARPENTER;
    create_namespace(&admin, v.namespace).await?;
    let objs = v.render("1.20.2")?;
    for o in &objs {
        create(&admin, &discovery, o, false).await?;
    }
    let text = find(&objs, "ConfigMap", "-aggregator")?["data"]["aggregator.toml"]
        .as_str()
        .context("toml")?;
    let mut cfg = FileConfig::from_toml(text)?;
    // What the Job's POD_NAME / POD_NAMESPACE give it.
    cfg.identity = "gw-cleanup-x7k2p".into();
    cfg.namespace = v.namespace.into();
    cfg.validate()?;

    // Left behind by an earlier direct-taint run (made by the admin): taint, conditions, an
    // excluded NodePool with its snapshot; plus someone else's taint.
    let node = "ip-10-0-1-17.eu-west-1.compute.internal";
    let nodes: Api<Node> = Api::all(admin.clone());
    let n: Node = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Node", "metadata": {"name": node},
        "spec": {"taints": [{"key": "graywatch.io/degraded", "value": "gray-failure", "effect": "NoSchedule"},
                            {"key": "example.com/maintenance", "value": "x", "effect": "NoSchedule"}]}}))?;
    nodes.create(&PostParams::default(), &n).await?;
    let status = json!({
        "apiVersion": "v1", "kind": "Node", "metadata": {"name": node},
        "status": {"conditions": [
            {"type": "graywatch.io/Healthy", "status": "False", "reason": "NetworkLatency", "message": "x",
             "lastTransitionTime": "2026-01-01T00:00:00Z", "lastHeartbeatTime": "2026-01-01T00:00:00Z"},
            {"type": "graywatch.io/NetworkLatencyHealthy", "status": "False", "reason": "Degraded", "message": "x",
             "lastTransitionTime": "2026-01-01T00:00:00Z", "lastHeartbeatTime": "2026-01-01T00:00:00Z"}]},
    });
    nodes
        .patch_status(node, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&status))
        .await?;
    let reqs = json!([{"key": "kubernetes.io/arch", "operator": "In", "values": ["amd64"]}]);
    let pool = json!({
        "apiVersion": "karpenter.sh/v1", "kind": "NodePool", "metadata": {"name": "default"},
        "spec": {"template": {"spec": {"nodeClassRef": {"group": "karpenter.k8s.aws", "kind": "EC2NodeClass", "name": "default"},
                  "requirements": reqs}}},
    });
    let pools: Api<DynamicObject> = Api::all_with(admin.clone(), &nodepool_ar());
    pools
        .create(&PostParams::default(), &serde_json::from_value(pool)?)
        .await?;
    let excluded = vec![("topology.kubernetes.io/zone".to_string(), "eu-west-1a".to_string())];
    Actuator::new(admin.clone(), &cfg)
        .change_pool(&PoolChange::Exclude {
            pool: "default".into(),
            excluded: excluded.clone(),
            remove: PoolEdits::default(),
            add: exclusion_edits(&excluded, 1),
        })
        .await?;

    // The hook's ServiceAccount runs the cleanup.
    let hook = server.impersonating(&v.sa_user("cleanup")).await?;
    let report = cleanup::run(
        hook.clone(),
        &cfg,
        &CleanupArgs {
            hold_lease_seconds: 300,
            node_readiness_rule: Vec::new(),
            ..CleanupArgs::default()
        },
    )
    .await;
    assert!(report.ok(), "{}", report.summary());
    assert_eq!(report.taints_removed, [node]);
    assert_eq!(report.pools_restored, ["default"]);
    assert_eq!(report.snapshots_deleted, ["graywatch-nodepool-default"]);
    assert_eq!(
        report.conditions_removed.get(node).map(Vec::len),
        Some(2),
        "{}",
        report.summary()
    );
    let after = nodes.get(node).await?;
    let taints: Vec<String> = after
        .spec
        .and_then(|s| s.taints)
        .unwrap_or_default()
        .into_iter()
        .map(|t| t.key)
        .collect();
    // Ours gone; the foreign one (and any the node lifecycle controller added) kept.
    assert!(!taints.iter().any(|t| t == "graywatch.io/degraded"), "{taints:?}");
    assert!(taints.iter().any(|t| t == "example.com/maintenance"), "{taints:?}");
    let conditions: Vec<String> = after
        .status
        .and_then(|s| s.conditions)
        .unwrap_or_default()
        .into_iter()
        .map(|c| c.type_)
        .collect();
    assert!(
        !conditions.iter().any(|c| c.starts_with("graywatch.io/")),
        "{conditions:?}"
    );
    assert_eq!(
        pools.get("default").await?.data["spec"]["template"]["spec"]["requirements"],
        reqs
    );
    let lease = Api::<Lease>::namespaced(admin.clone(), v.namespace)
        .get(&format!("{}-aggregator", v.fullname()))
        .await?;
    assert_eq!(
        lease.spec.and_then(|s| s.holder_identity).as_deref(),
        Some("gw-cleanup-x7k2p")
    );

    // Nothing beyond that.
    let no_dry = DeleteParams {
        dry_run: true,
        ..DeleteParams::default()
    };
    let forbidden = [
        (
            "nodes delete",
            allowed(
                "nodes delete",
                Api::<Node>::all(hook.clone()).delete(node, &no_dry).await.map(drop),
            ),
        ),
        (
            "secrets list",
            allowed(
                "secrets",
                Api::<Secret>::namespaced(hook.clone(), v.namespace)
                    .list(&ListParams::default())
                    .await,
            ),
        ),
        (
            "configmaps get",
            allowed(
                "cm get",
                Api::<ConfigMap>::namespaced(hook.clone(), v.namespace)
                    .get_opt("anything")
                    .await,
            ),
        ),
        (
            "configmaps list (other ns)",
            allowed(
                "cm list default",
                Api::<ConfigMap>::namespaced(hook.clone(), "default")
                    .list(&ListParams::default())
                    .await,
            ),
        ),
        (
            "other lease get",
            allowed(
                "other lease",
                Api::<Lease>::namespaced(hook.clone(), v.namespace)
                    .get_opt("someone-else")
                    .await,
            ),
        ),
        (
            "nodepools delete",
            allowed(
                "nodepools delete",
                Api::<DynamicObject>::all_with(hook.clone(), &nodepool_ar())
                    .delete("default", &no_dry)
                    .await
                    .map(drop),
            ),
        ),
        (
            "nodeclaims list",
            allowed(
                "nodeclaims list",
                Api::<DynamicObject>::all_with(hook.clone(), &nodeclaim_ar())
                    .list(&ListParams::default())
                    .await,
            ),
        ),
        (
            "pods list",
            allowed("pods", Api::<Pod>::all(hook.clone()).list(&ListParams::default()).await),
        ),
    ];
    for (what, ok) in forbidden {
        assert!(!ok, "the cleanup hook may {what}");
    }
    // Idempotent under the same RBAC: a second run finds nothing and still succeeds.
    let again = cleanup::run(
        hook,
        &cfg,
        &CleanupArgs {
            hold_lease_seconds: 300,
            node_readiness_rule: Vec::new(),
            ..CleanupArgs::default()
        },
    )
    .await;
    assert!(again.ok(), "{}", again.summary());
    assert!(again.taints_removed.is_empty() && again.conditions_removed.is_empty() && again.pools_restored.is_empty());

    // Mode nrc: the hook deletes exactly the chart's NodeReadinessRules (the Job's
    // --node-readiness-rule flags), no other rule.
    let nrc = &NRC;
    create_namespace(&admin, nrc.namespace).await?;
    let nrc_objs = nrc.render("1.20.2")?;
    for o in &nrc_objs {
        create(&admin, &discovery, o, false).await?;
    }
    let rules: Api<DynamicObject> = Api::all_with(admin.clone(), &cleanup::node_readiness_rule_resource());
    let other = json!({
        "apiVersion": "readiness.node.x-k8s.io/v1alpha1", "kind": "NodeReadinessRule",
        "metadata": {"name": "cni-ready"},
        "spec": {"conditions": [{"type": "example.net/CNIReady", "requiredStatus": "True"}],
                 "taint": {"key": "readiness.k8s.io/cni", "effect": "NoSchedule"},
                 "enforcementMode": "continuous", "nodeSelector": {}}});
    rules
        .create(&PostParams::default(), &serde_json::from_value(other)?)
        .await?;
    let text = find(&nrc_objs, "ConfigMap", "-aggregator")?["data"]["aggregator.toml"]
        .as_str()
        .context("toml")?;
    let mut nrc_cfg = FileConfig::from_toml(text)?;
    nrc_cfg.identity = "nrc-cleanup-4b7zq".into();
    nrc_cfg.namespace = nrc.namespace.into();
    let nrc_hook = server.impersonating(&nrc.sa_user("cleanup")).await?;
    let names = nrc_rule_names(nrc)?;
    let report = cleanup::run(
        nrc_hook.clone(),
        &nrc_cfg,
        &CleanupArgs {
            hold_lease_seconds: 300,
            node_readiness_rule: names.clone(),
            ..CleanupArgs::default()
        },
    )
    .await;
    assert!(report.ok(), "{}", report.summary());
    assert_eq!(report.rules_deleted, names);
    for n in &names {
        assert!(rules.get_opt(n).await?.is_none(), "{n} deleted");
    }
    assert!(
        !allowed(
            "other rule delete",
            Api::<DynamicObject>::all_with(nrc_hook, &cleanup::node_readiness_rule_resource())
                .delete("cni-ready", &no_dry)
                .await
                .map(drop)
        ),
        "the hook may delete someone else's NodeReadinessRule"
    );
    assert!(rules.get_opt("cni-ready").await?.is_some());
    Ok(())
}

/// The release the mode-change test upgrades through every transition.
const MODE_CHANGE: Variant = Variant {
    release: "mc",
    namespace: "gw-mc",
    set: &[],
};

/// `helm --kubeconfig <the RBAC apiserver's admin> <args>`: helm's stdout.
fn helm_on(server: &graywatch_k8s_testkit::TestApiserver, args: &[&str]) -> anyhow::Result<String> {
    let helm = graywatch_chart_tests::helm_binary()?;
    let out = std::process::Command::new(&helm)
        .arg("--kubeconfig")
        .arg(server.kubeconfig_path())
        .args(args)
        .output()
        .with_context(|| format!("running {}", helm.display()))?;
    anyhow::ensure!(
        out.status.success(),
        "helm {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

/// The mode-change hook objects Helm rendered (with `lookup` against the live release) for the
/// release's latest revision.
fn mode_change_hooks(server: &graywatch_k8s_testkit::TestApiserver, v: &Variant) -> anyhow::Result<Vec<Value>> {
    let text = helm_on(server, &["get", "hooks", v.release, "-n", v.namespace])?;
    Ok(graywatch_chart_tests::parse_objects(&text)?
        .into_iter()
        .filter(|o| {
            o["metadata"]["name"]
                .as_str()
                .is_some_and(|n| n.ends_with("-mode-change"))
        })
        .collect())
}

/// What the mode-change hook's roles must grant for a scope ("taint" or "all").
fn expected_mode_change_grants(v: &Variant, scope: &str) -> (Grants, Grants) {
    let mut cluster = g("", "nodes", "", &["get", "list", "patch"]);
    let mut ns = g(
        "apps",
        "deployments",
        &format!("{}-aggregator", v.fullname()),
        &["get", "patch"],
    );
    ns.extend(g("", "pods", "", &["list", "watch"]));
    ns.extend(g("coordination.k8s.io", "leases", "", &["create"]));
    ns.extend(g(
        "coordination.k8s.io",
        "leases",
        &format!("{}-aggregator", v.fullname()),
        &["get", "update"],
    ));
    if scope == "all" {
        cluster.extend(g("", "nodes/status", "", &["patch"]));
        cluster.extend(g("karpenter.sh", "nodepools", "", &["get", "patch"]));
        ns.extend(g("", "configmaps", "", &["list", "delete"]));
    }
    (cluster, ns)
}

/// The hook objects: pre-upgrade, RBAC before the Job, all deleted after success; the Job runs
/// `cleanup` with the scope, the Deployment to stop and the reason, on the running (old) config.
/// Returns the Job's arguments parsed as the binary's `CleanupArgs`.
fn check_mode_change_hook(
    hooks: &[Value],
    v: &Variant,
    scope: &str,
    from: &str,
    to: &str,
) -> anyhow::Result<graywatch_aggregator::config::CleanupArgs> {
    use graywatch_aggregator::config::{CleanupArgs, Only};
    let name = format!("{}-mode-change", v.fullname());
    let kinds: BTreeSet<&str> = hooks.iter().filter_map(|o| o["kind"].as_str()).collect();
    assert_eq!(
        kinds,
        BTreeSet::from([
            "ClusterRole",
            "ClusterRoleBinding",
            "Job",
            "Role",
            "RoleBinding",
            "ServiceAccount"
        ])
    );
    for h in hooks {
        let a = &h["metadata"]["annotations"];
        assert_eq!(h["metadata"]["name"], name.as_str());
        assert_eq!(a["helm.sh/hook"], "pre-upgrade");
        assert_eq!(a["helm.sh/hook-delete-policy"], "before-hook-creation,hook-succeeded");
        let weight: i32 = a["helm.sh/hook-weight"].as_str().context("weight")?.parse()?;
        assert_eq!(weight < 0, h["kind"] != "Job", "{} weight {weight}", h["kind"]);
    }
    let (cluster, ns) = expected_mode_change_grants(v, scope);
    assert_eq!(grants(find(hooks, "ClusterRole", "-mode-change")?)?, cluster, "{scope}");
    let role = find(hooks, "Role", "-mode-change")?;
    assert_eq!(role["metadata"]["namespace"], v.namespace);
    assert_eq!(grants(role)?, ns, "{scope}");
    for kind in ["ClusterRoleBinding", "RoleBinding"] {
        let b = find(hooks, kind, "-mode-change")?;
        assert_eq!(b["roleRef"]["name"], name.as_str());
        assert_eq!(b["subjects"][0]["name"], name.as_str());
        assert_eq!(b["subjects"][0]["namespace"], v.namespace);
    }
    let job = find(hooks, "Job", "-mode-change")?;
    let pod = &job["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], name.as_str());
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        pod["volumes"][0]["configMap"]["name"],
        format!("{}-aggregator", v.fullname()),
        "the running aggregator's config"
    );
    // The Job's pods must not match the Deployment's selector (it waits for those to be gone).
    assert_eq!(
        job["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"],
        "mode-change"
    );
    let c = container(job, "mode-change")?;
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    let args = str_list(&c["args"]);
    assert_eq!(args.first(), Some(&"--config=/etc/graywatch/aggregator.toml"));
    let sub = args
        .iter()
        .position(|a| *a == "cleanup")
        .context("no cleanup subcommand")?;
    assert_eq!(
        args[sub + 1..],
        [
            format!("--only={scope}").as_str(),
            &format!("--stop-deployment={}-aggregator", v.fullname()),
            "--stop-timeout-seconds=300",
            "--hold-lease-seconds=15",
            &format!("--from-mode={from}"),
            &format!("--to-mode={to}"),
        ]
    );
    // Each flag is one of CleanupArgs' (the binary's parser); parsed as it would be.
    let fields = struct_fields(&read_source("aggregator/src/config.rs")?, "CleanupArgs")?;
    let mut parsed = CleanupArgs::default();
    for a in &args[sub + 1..] {
        let (flag, value) = a.trim_start_matches("--").split_once('=').context("flag=value")?;
        assert!(fields.contains(&flag.replace('-', "_")), "{flag} not in CleanupArgs");
        match flag {
            "only" => {
                parsed.only = match value {
                    "taint" => Only::Taint,
                    "all" => Only::All,
                    other => anyhow::bail!("--only={other}"),
                }
            }
            "stop-deployment" => parsed.stop_deployment = Some(value.into()),
            "stop-timeout-seconds" => parsed.stop_timeout_seconds = value.parse()?,
            "hold-lease-seconds" => parsed.hold_lease_seconds = value.parse()?,
            "from-mode" => parsed.from_mode = Some(value.into()),
            "to-mode" => parsed.to_mode = Some(value.into()),
            other => anyhow::bail!("unexpected flag {other}"),
        }
    }
    Ok(parsed)
}

/// Deletes a rendered object if it exists (Helm's before-hook-creation).
async fn delete_if_present(client: &Client, discovery: &kube::discovery::Discovery, obj: &Value) -> anyhow::Result<()> {
    let api_version = obj["apiVersion"].as_str().context("apiVersion")?;
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    let gvk = GroupVersionKind::gvk(group, version, obj["kind"].as_str().context("kind")?);
    let (ar, caps) = discovery.resolve_gvk(&gvk).context("resolve")?;
    let api: Api<DynamicObject> = match caps.scope {
        kube::discovery::Scope::Namespaced => Api::namespaced_with(
            client.clone(),
            obj["metadata"]["namespace"].as_str().context("ns")?,
            &ar,
        ),
        kube::discovery::Scope::Cluster => Api::all_with(client.clone(), &ar),
    };
    match api
        .delete(
            obj["metadata"]["name"].as_str().context("name")?,
            &DeleteParams::default(),
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// `helm upgrade` through every mode transition against a real apiserver with RBAC (the
/// previous mode comes from `lookup` of the live ConfigMap, which `helm template` cannot show):
/// the mode-change hook renders for direct-taint → nrc (scope taint) and nrc / direct-taint →
/// dry-run (scope all) only. Where it renders, its objects are created and its ServiceAccount
/// runs the real cleanup with the Job's arguments: the aggregator Deployment goes to 0 and
/// nothing is removed while one of its pods exists, then exactly the scope's writes are made,
/// the Lease is released, and calls outside the scope are refused. The next `helm upgrade`
/// puts the chart's replica count back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mode_changes_render_the_hook_only_when_a_mode_leaves_something_behind() -> anyhow::Result<()> {
    use graywatch_aggregator::{cleanup, config::FileConfig};
    use k8s_openapi::api::apps::v1::Deployment;
    let (server, admin, discovery) = apiserver_with_crds().await?;
    let v = &MODE_CHANGE;
    create_namespace(&admin, v.namespace).await?;
    let chart = graywatch_chart_tests::chart_dir().display().to_string();
    let base = |verb: &str| -> Vec<String> {
        [verb, v.release, chart.as_str(), "-n", v.namespace]
            .iter()
            .map(|s| (*s).to_string())
            .collect()
    };
    // `helm template` (no cluster) never renders it: every_mode_renders_* sees pre-delete hooks
    // only. A first install has no previous mode either.
    let mut install = base("install");
    install.extend(["--set".into(), "mode=dry-run".into()]);
    helm_on(&server, &install.iter().map(String::as_str).collect::<Vec<_>>())?;
    assert!(mode_change_hooks(&server, v)?.is_empty(), "hook on a first install");

    let deployments: Api<Deployment> = Api::namespaced(admin.clone(), v.namespace);
    let dep_name = format!("{}-aggregator", v.fullname());
    let configs: Api<ConfigMap> = Api::namespaced(admin.clone(), v.namespace);
    let nodes: Api<Node> = Api::all(admin.clone());
    let node = "ip-10-0-3-41.eu-west-1.compute.internal";
    nodes
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node}}))?,
        )
        .await?;
    let mut from = "dry-run";
    for (to, scope) in [
        ("nrc", None),
        ("nrc", None),
        ("direct-taint", None),
        ("direct-taint", None),
        ("nrc", Some("taint")),
        ("dry-run", Some("all")),
        ("dry-run", None),
        ("direct-taint", None),
        ("dry-run", Some("all")),
        ("nrc", None),
    ] {
        let transition = format!("{from} → {to}");
        // The config the hook's Job would mount: Helm runs pre-upgrade hooks before it updates.
        let running = configs.get(&dep_name).await?.data.unwrap_or_default();
        let running = running.get("aggregator.toml").context("aggregator.toml")?.clone();
        let mut upgrade = base("upgrade");
        // The hook is not run by Helm here (no Job controller): it is checked and run below.
        upgrade.extend(["--no-hooks".into(), "--set".into(), format!("mode={to}")]);
        // The simulated fleet is not authenticated: acting modes need the loud override.
        upgrade.extend([
            "--set".into(),
            "security.insecureAllowActingWithoutIdentity=true".into(),
        ]);
        helm_on(&server, &upgrade.iter().map(String::as_str).collect::<Vec<_>>())?;
        // Whatever the hook did to the Deployment, the upgrade applies the chart's replicas.
        let replicas = deployments.get(&dep_name).await?.spec.and_then(|s| s.replicas);
        assert_eq!(replicas, Some(2), "{transition}: replicas after the upgrade");
        let hooks = mode_change_hooks(&server, v)?;
        let Some(scope) = scope else {
            assert!(hooks.is_empty(), "{transition}: unexpected mode-change hook {hooks:?}");
            from = to;
            continue;
        };
        let args = check_mode_change_hook(&hooks, v, scope, from, to).with_context(|| transition.clone())?;
        for o in hooks.iter().filter(|o| o["kind"] != "Job") {
            delete_if_present(&admin, &discovery, o).await?;
            create(&admin, &discovery, o, false).await?;
        }

        // What the mode being left wrote (as the admin): our taint and conditions, a foreign taint.
        nodes
            .patch(
                node,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"taints": [
                    {"key": "graywatch.io/degraded", "value": "gray-failure", "effect": "NoSchedule"},
                    {"key": "example.com/maintenance", "value": "x", "effect": "NoSchedule"}]}})),
            )
            .await?;
        let status = json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node},
            "status": {"conditions": [{"type": "graywatch.io/Healthy", "status": "False", "reason": "NetworkLatency",
                "message": "x", "lastTransitionTime": "2026-01-01T00:00:00Z", "lastHeartbeatTime": "2026-01-01T00:00:00Z"}]}});
        nodes
            .patch_status(node, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&status))
            .await?;
        // One pod of the old aggregator (no controllers here: the test plays its ReplicaSet).
        let selector = deployments.get(&dep_name).await?.spec.context("spec")?.selector;
        let old_pod = format!("{dep_name}-5c8d7-q2x4z");
        let pods: Api<Pod> = Api::namespaced(admin.clone(), v.namespace);
        pods.create(
            &PostParams::default(),
            &serde_json::from_value(json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": old_pod, "labels": selector.match_labels},
                "spec": {"containers": [{"name": "aggregator", "image": "x"}]}}))?,
        )
        .await?;

        let mut cfg = FileConfig::from_toml(&running)?;
        cfg.identity = "mc-graywatch-mode-change-q8x2z".into();
        cfg.namespace = v.namespace.into();
        let hook = server.impersonating(&v.sa_user("mode-change")).await?;
        let run = tokio::spawn({
            let hook = hook.clone();
            async move { cleanup::run(hook, &cfg, &args).await }
        });
        let scaled = kube::runtime::wait::await_condition(deployments.clone(), &dep_name, |d: Option<&Deployment>| {
            d.and_then(|d| d.spec.as_ref()?.replicas) == Some(0)
        });
        tokio::time::timeout(std::time::Duration::from_secs(60), scaled).await??;
        assert!(
            !run.is_finished(),
            "{transition}: the cleanup ended while an aggregator pod exists"
        );
        let taints = |n: &Node| -> Vec<String> {
            n.spec
                .as_ref()
                .and_then(|s| s.taints.as_ref())
                .map(|ts| ts.iter().map(|t| t.key.clone()).collect())
                .unwrap_or_default()
        };
        assert!(
            taints(&nodes.get(node).await?).contains(&"graywatch.io/degraded".to_string()),
            "{transition}: removed while an old replica could still write"
        );
        pods.delete(&old_pod, &DeleteParams::default()).await?;
        let report = run.await?;
        assert!(report.ok(), "{transition}: {}", report.summary());
        assert_eq!(report.taints_removed, [node], "{transition}");
        assert_eq!(report.reason.as_deref(), Some(transition.as_str()));
        assert_eq!(report.stopped.as_ref().map(|s| s.previous_replicas), Some(2));
        assert!(report.lease_released, "{transition}");
        let after = nodes.get(node).await?;
        assert_eq!(taints(&after), ["example.com/maintenance"], "{transition}");
        let ours: Vec<String> = after
            .status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .into_iter()
            .map(|c| c.type_)
            .filter(|t| t.starts_with("graywatch.io/"))
            .collect();
        // Going to nrc the conditions stay (NRC taints from them); to dry-run nothing of ours.
        let want: &[&str] = if scope == "taint" {
            &["graywatch.io/Healthy"]
        } else {
            &[]
        };
        assert_eq!(ours, want, "{transition}");
        let lease = Api::<Lease>::namespaced(admin.clone(), v.namespace)
            .get(&format!("{}-aggregator", v.fullname()))
            .await?;
        assert_eq!(
            lease.spec.and_then(|s| s.holder_identity),
            None,
            "{transition}: lease released"
        );
        assert_eq!(
            deployments.get(&dep_name).await?.spec.and_then(|s| s.replicas),
            Some(0),
            "{transition}: left at 0 for Helm's apply"
        );

        // Nothing beyond the scope.
        let dry = PatchParams {
            dry_run: true,
            ..PatchParams::default()
        };
        let no_dry = DeleteParams {
            dry_run: true,
            ..DeleteParams::default()
        };
        let scale = Patch::Merge(json!({"spec": {"replicas": 0}}));
        let mut forbidden = vec![
            (
                "another Deployment patch",
                allowed(
                    "dep patch",
                    Api::<Deployment>::namespaced(hook.clone(), v.namespace)
                        .patch("someone-else", &dry, &scale)
                        .await,
                ),
            ),
            (
                "deployments list",
                allowed(
                    "dep list",
                    Api::<Deployment>::namespaced(hook.clone(), v.namespace)
                        .list(&ListParams::default())
                        .await,
                ),
            ),
            (
                "deployment delete",
                allowed(
                    "dep delete",
                    Api::<Deployment>::namespaced(hook.clone(), v.namespace)
                        .delete(&dep_name, &no_dry)
                        .await
                        .map(drop),
                ),
            ),
            (
                "pods list (other ns)",
                allowed(
                    "pods default",
                    Api::<Pod>::namespaced(hook.clone(), "default")
                        .list(&ListParams::default())
                        .await,
                ),
            ),
            (
                "pods delete",
                allowed(
                    "pods delete",
                    Api::<Pod>::namespaced(hook.clone(), v.namespace)
                        .delete("x", &no_dry)
                        .await
                        .map(drop),
                ),
            ),
            (
                "secrets list",
                allowed(
                    "secrets",
                    Api::<Secret>::namespaced(hook.clone(), v.namespace)
                        .list(&ListParams::default())
                        .await,
                ),
            ),
            (
                "nodes delete",
                allowed(
                    "nodes delete",
                    Api::<Node>::all(hook.clone()).delete(node, &no_dry).await.map(drop),
                ),
            ),
            (
                "other lease get",
                allowed(
                    "other lease",
                    Api::<Lease>::namespaced(hook.clone(), v.namespace)
                        .get_opt("someone-else")
                        .await,
                ),
            ),
        ];
        if scope == "taint" {
            forbidden.extend([
                (
                    "nodes/status patch",
                    allowed(
                        "status",
                        Api::<Node>::all(hook.clone())
                            .patch_status(node, &dry, &Patch::Merge(json!({})))
                            .await,
                    ),
                ),
                (
                    "configmaps list",
                    allowed(
                        "cm list",
                        Api::<ConfigMap>::namespaced(hook.clone(), v.namespace)
                            .list(&ListParams::default())
                            .await,
                    ),
                ),
                (
                    "nodepools get",
                    allowed(
                        "pools",
                        Api::<DynamicObject>::all_with(hook.clone(), &nodepool_ar())
                            .get_opt("default")
                            .await,
                    ),
                ),
            ]);
        }
        for (what, ok) in forbidden {
            assert!(!ok, "{transition}: the mode-change hook may {what}");
        }
        from = to;
    }

    // The kube calls of cleanup.rs and stop.rs are the resources of the widest scope's roles
    // (NodeReadinessRules excepted: only the uninstall hook deletes those).
    let mut used = kube_resources_in(&[
        workspace_root().join("aggregator/src/cleanup.rs"),
        workspace_root().join("aggregator/src/stop.rs"),
    ])?;
    used.insert((String::new(), "configmaps".into()));
    used.remove(&("readiness.node.x-k8s.io".to_string(), "nodereadinessrules".to_string()));
    let (cluster, ns) = expected_mode_change_grants(v, "all");
    let granted: BTreeSet<(String, String)> = cluster
        .into_iter()
        .chain(ns)
        .map(|(g, r, _, _)| (g, r.split('/').next().unwrap_or_default().to_string()))
        .collect();
    assert_eq!(
        used, granted,
        "cleanup's and stop's kube calls and the mode-change hook's roles disagree"
    );
    Ok(())
}
