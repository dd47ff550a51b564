//! Bounded fuzzing (proptest, fixed case counts so it runs in `cargo xtask test`) of the agent's
//! parsers of untrusted text that earlier property tests did not cover: tracefs `format`
//! files, /proc/self/mountinfo, cgroup paths, ring-buffer records, and the config file + flags.
//! Each property: no panic on arbitrary or near-valid input, and accepted input keeps the
//! parser's own invariants.

use clap::Parser;
use graywatch_agent::{
    cgroups::{find_unified_mount, parse_pod_cgroup},
    config::{Cli, Config, FileConfig},
    signals::memory_pressure::decode_oom_event,
    tracefs::EventFormat,
};
use proptest::prelude::*;

/// Cases per property (bounded; the closing report states the run lengths).
const CASES: u32 = 2000;

/// `GRAYWATCH_FUZZ_CASES` (set by `cargo xtask fuzz`) overrides [`CASES`].
fn cases() -> u32 {
    std::env::var("GRAYWATCH_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(CASES)
}

fn tracefs_line() -> impl Strategy<Value = String> {
    prop_oneof![
        "\\PC{0,80}",
        ("[a-z_ \\*\\[\\]0-9]{0,30}", "[0-9-]{0,6}", "[0-9-]{0,6}", "[0-9-]{0,3}").prop_map(
            |(decl, off, size, signed)| format!("\tfield:{decl};\toffset:{off};\tsize:{size};\tsigned:{signed};")
        ),
        "print fmt: \\PC{0,40}".prop_map(|s| s),
    ]
}

fn mountinfo_line() -> impl Strategy<Value = String> {
    prop_oneof![
        "\\PC{0,100}",
        (
            "[0-9]{1,3}",
            "[/a-z]{1,20}",
            "[/a-z,]{0,20}",
            "(cgroup2|cgroup|tmpfs|proc)",
            "[a-z,=]{0,20}",
            "( - )?"
        )
            .prop_map(|(id, mnt, opts, fs, sopts, sep)| format!(
                "{id} 1 0:26 / {mnt} rw,{opts} shared:4{sep} - {fs} {fs} {sopts}"
            )),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    #[test]
    fn tracefs_format_never_panics(lines in proptest::collection::vec(tracefs_line(), 0..12)) {
        let text = lines.join("\n");
        if let Ok(f) = EventFormat::parse("fuzz", "fuzz/format", &text) {
            for name in f.fields.keys() {
                // Every parsed field can be looked up by its name.
                prop_assert!(f.field(name).is_ok());
            }
            let _ = f.symbolic_names("x");
        }
    }

    #[test]
    fn mountinfo_never_panics(lines in proptest::collection::vec(mountinfo_line(), 0..8)) {
        let text = lines.join("\n");
        if let Some((path, _layout)) = find_unified_mount(&text) {
            // Without escapes the mount point is verbatim from the input.
            if !text.contains('\\') {
                prop_assert!(text.contains(&*path.to_string_lossy()));
            }
        }
    }

    #[test]
    fn cgroup_paths_never_panic(
        path in "(/?(kubepods|kubepods\\.slice|kubepods-burstable\\.slice|besteffort|pod[0-9a-f_\\-]{0,40}(\\.slice)?|cri-containerd-[0-9a-f]{0,64}\\.scope|docker-[0-9a-f]{0,64}\\.scope|\\PC{0,10})){0,6}",
    ) {
        if let Some(p) = parse_pod_cgroup(&path) {
            // A pod uid is reported with dashes, never underscores, and is not empty.
            prop_assert!(!p.uid.is_empty());
            prop_assert!(!p.uid.contains('_'));
        }
    }

    #[test]
    fn ring_buffer_records_of_any_length(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = decode_oom_event(&bytes);
    }

    #[test]
    fn config_file_never_panics(text in "\\PC{0,200}") {
        let _ = toml::from_str::<FileConfig>(&text);
    }

    #[test]
    fn config_merge_never_panics_and_names_the_field(
        key in "(node_name|interval|output|listen|tracefs|cgroup_scope|kube|aggregator|aggregator_ca_file|aggregator_token_file|aggregator_tls_server_name|aggregator_client_cert_file|bogus)",
        value in "(\"[\\PC&&[^\"\\\\]]{0,30}\"|[0-9]{1,5}|true|\"http://a:1\"|\"https://a:1\"|\"0s\"|\"1ms\"|\"off\")",
        flags in proptest::collection::vec("--(interval|listen|aggregator|aggregator-ca-file|node-name|cgroup-scope)=[\\PC&&[^ ]]{0,20}", 0..3),
    ) {
        let text = format!("{key} = {value}\n");
        let Ok(file) = toml::from_str::<FileConfig>(&text) else {
            return Ok(());
        };
        let mut args = vec!["graywatch-agent".to_string(), "--node-name".into(), "n1".into()];
        args.extend(flags);
        let Ok(cli) = Cli::try_parse_from(&args) else {
            return Ok(());
        };
        match Config::merge(&cli, file) {
            Ok(c) => {
                prop_assert!(!c.node_name.is_empty());
                // https:// needs a CA and a CA needs https://.
                prop_assert_eq!(
                    c.aggregator.as_deref().is_some_and(|u| u.starts_with("https://")),
                    c.aggregator_security.ca_file.is_some()
                );
            }
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }
}
