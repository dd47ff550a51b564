//! The evaluation datasets shipped in the repository as `datasets/<name>.tar.xz` (see
//! datasets/README.md), unpacked on first use into a cache directory; `GRAYWATCH_DATASETS`
//! (a directory holding `<name>/`) overrides them.

use std::{
    fs::File,
    io::{BufReader, Read},
    path::{Path, PathBuf},
};

use super::EvalError;

/// Environment variable naming a directory that holds the datasets unpacked (`<dir>/<name>/`).
pub const DATASETS_ENV: &str = "GRAYWATCH_DATASETS";

/// The directory of dataset `name` (e.g. `nab-dev`, `ms-cloud-monitoring`):
/// `$GRAYWATCH_DATASETS/<name>` when that variable is set, else `<workspace>/datasets/<name>.tar.xz`
/// unpacked below `cache_dir` (once per archive content; concurrent callers are safe).
pub fn locate(name: &str, workspace: &Path, cache_dir: &Path) -> Result<PathBuf, EvalError> {
    if let Some(dir) = std::env::var_os(DATASETS_ENV) {
        return Ok(PathBuf::from(dir).join(name));
    }
    unpack(
        &workspace.join("datasets").join(format!("{name}.tar.xz")),
        name,
        cache_dir,
    )
}

/// Unpacks `archive` (a tar.xz whose top directory is `name/`) into
/// `cache_dir/<name>-<content hash>/` unless it is there already; returns `.../<name>`.
pub fn unpack(archive: &Path, name: &str, cache_dir: &Path) -> Result<PathBuf, EvalError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| EvalError::Io { path, source }
    };
    let mut bytes = Vec::new();
    File::open(archive)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(io(archive))?;
    let done = cache_dir.join(format!("{name}-{:016x}", fnv1a(&bytes)));
    let dir = done.join(name);
    if dir.is_dir() {
        return Ok(dir);
    }
    std::fs::create_dir_all(cache_dir).map_err(io(cache_dir))?;
    // Unpack next to the final place, then rename: a reader never sees a half-unpacked tree.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let tmp = cache_dir.join(format!(".{name}-{}-{nanos}.tmp", std::process::id()));
    let result = (|| {
        let xz = xz2::read::XzDecoder::new(BufReader::new(bytes.as_slice()));
        let mut tar = tar::Archive::new(xz);
        tar.set_preserve_permissions(false);
        tar.set_preserve_mtime(false);
        tar.unpack(&tmp).map_err(io(archive))?;
        if !tmp.join(name).is_dir() {
            return Err(EvalError::Io {
                path: archive.to_path_buf(),
                source: std::io::Error::other(format!("the archive has no top directory {name}/")),
            });
        }
        match std::fs::rename(&tmp, &done) {
            Ok(()) => Ok(()),
            // Another process unpacked the same archive first: use theirs.
            Err(_) if dir.is_dir() => Ok(()),
            Err(e) => Err(EvalError::Io {
                path: done.clone(),
                source: e,
            }),
        }
    })();
    if tmp.exists() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result.map(|()| dir)
}

/// 64-bit FNV-1a: names the unpacked copy after the archive's content.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn archive_of(dir_name: &str, files: &[(&str, &str)]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for (path, text) in files {
            let mut header = tar::Header::new_gnu();
            header.set_size(text.len() as u64);
            header.set_mode(0o444);
            header.set_cksum();
            builder
                .append_data(&mut header, format!("{dir_name}/{path}"), text.as_bytes())
                .expect("append");
        }
        let tar = builder.into_inner().expect("tar");
        let mut xz = xz2::write::XzEncoder::new(Vec::new(), 6);
        std::io::Write::write_all(&mut xz, &tar).expect("compress");
        xz.finish().expect("finish")
    }

    #[test]
    fn unpacks_once_and_reuses_the_copy() {
        let root = std::env::temp_dir().join(format!("graywatch-datasets-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).expect("dir");
        let archive = root.join("tiny.tar.xz");
        std::fs::write(
            &archive,
            archive_of("tiny", &[("data/a.csv", "t,v\n1,2\n"), ("LICENSE", "MIT")]),
        )
        .expect("write");
        let cache = root.join("cache");
        let dir = unpack(&archive, "tiny", &cache).expect("unpack");
        assert_eq!(
            std::fs::read_to_string(dir.join("data/a.csv")).expect("csv"),
            "t,v\n1,2\n"
        );
        // The copy is reused: a file added to it survives a second call.
        std::fs::write(dir.join("marker"), "x").expect("marker");
        assert_eq!(unpack(&archive, "tiny", &cache).expect("again"), dir);
        assert!(dir.join("marker").exists());
        // New archive content → a new copy.
        std::fs::write(&archive, archive_of("tiny", &[("data/a.csv", "t,v\n1,3\n")])).expect("write");
        let fresh = unpack(&archive, "tiny", &cache).expect("fresh");
        assert_ne!(fresh, dir);
        assert_eq!(
            std::fs::read_to_string(fresh.join("data/a.csv")).expect("csv"),
            "t,v\n1,3\n"
        );
        // Wrong top directory, missing and corrupt archives are errors naming the archive.
        let err = unpack(&archive, "other", &cache).expect_err("wrong top dir");
        assert!(err.to_string().contains("tiny.tar.xz"), "{err}");
        assert!(unpack(&root.join("missing.tar.xz"), "tiny", &cache).is_err());
        std::fs::write(&archive, b"not xz").expect("write");
        assert!(unpack(&archive, "tiny", &cache).is_err());
        // No temporary directories are left behind.
        let leftovers = std::fs::read_dir(&cache)
            .expect("cache")
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .count();
        assert_eq!(leftovers, 0);
        let _ = std::fs::remove_dir_all(&root);
    }
}
