//! `cargo xtask image`: an OCI image from scratch, the static x86-64
//! binary and the packaged rules (monitor mode) in one layer, no base
//! image, written as `target/dist/filter-agent-VERSION-image.tar`. The
//! archive is both an OCI image layout (`oci-layout`, `index.json`,
//! `blobs/`), which containerd, podman and skopeo read, and Docker's own
//! save format (`manifest.json` over the same blobs), which every `docker
//! load` reads, Debian 12's Docker 20.10 included.

use std::{fs, path::PathBuf};

use anyhow::Context as _;
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

use crate::{
    package::{self, VERSION},
    util::workspace_root,
};

/// The image's name, as the DaemonSet in packaging/kubernetes names it.
pub fn name() -> String {
    format!("filter-agent:{VERSION}")
}

/// Builds the binaries (`cargo xtask package`'s) and the image archive;
/// returns its path.
pub fn build() -> anyhow::Result<PathBuf> {
    let binaries = package::binaries()?;
    let rules = fs::read(workspace_root().join("packaging/debian/rules.toml"))?;
    let layer = layer(&fs::read(&binaries[0])?, &rules)?;
    let archive = archive(&layer, package::AMD64.debian)?;
    let path = workspace_root()
        .join("target/dist")
        .join(format!("filter-agent-{VERSION}-image.tar"));
    fs::write(&path, archive)?;
    println!("image: {} ({})", path.display(), name());
    Ok(path)
}

/// The one layer: `/usr/sbin/filter-agent`, `/etc/filter-agent/rules.toml`
/// and the directories the agent writes to when nothing is mounted there.
fn layer(binary: &[u8], rules: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut tar = tar::Builder::new(Vec::new());
    let mut add = |path: &str, mode: u32, data: Option<&[u8]>| {
        let mut header = tar::Header::new_ustar();
        header.set_mode(mode);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(0);
        match data {
            Some(data) => {
                header.set_entry_type(tar::EntryType::Regular);
                header.set_size(data.len() as u64);
                tar.append_data(&mut header, path, data)
            }
            None => {
                header.set_entry_type(tar::EntryType::Directory);
                header.set_size(0);
                tar.append_data(&mut header, path, std::io::empty())
            }
        }
    };
    for dir in [
        "etc/",
        "etc/filter-agent/",
        "run/",
        "run/filter-agent/",
        "usr/",
        "usr/sbin/",
    ] {
        add(dir, 0o755, None)?;
    }
    add("tmp/", 0o1777, None)?;
    add("etc/filter-agent/rules.toml", 0o644, Some(rules))?;
    add("usr/sbin/filter-agent", 0o755, Some(binary))?;
    Ok(tar.into_inner()?)
}

/// The image archive around `layer`, for `arch` (Debian's and OCI's name).
fn archive(layer: &[u8], arch: &str) -> anyhow::Result<Vec<u8>> {
    let layer_digest = digest(layer);
    let config = serde_json::to_vec(&json!({
        "architecture": arch,
        "os": "linux",
        "created": "1970-01-01T00:00:00Z",
        "config": {
            "Entrypoint": ["/usr/sbin/filter-agent"],
            "Labels": {
                "org.opencontainers.image.title": "filter-agent",
                "org.opencontainers.image.version": VERSION,
                "org.opencontainers.image.description":
                    "stateless XDP packet filter and ephemeral-port guard",
            },
        },
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
        "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "cargo xtask image"}],
    }))?;
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": descriptor("application/vnd.oci.image.config.v1+json", &config),
        "layers": [descriptor("application/vnd.oci.image.layer.v1.tar", layer)],
    }))?;
    let mut reference = descriptor("application/vnd.oci.image.manifest.v1+json", &manifest);
    reference["platform"] = json!({"architecture": arch, "os": "linux"});
    reference["annotations"] = json!({
        "io.containerd.image.name": format!("docker.io/library/{}", name()),
        "org.opencontainers.image.ref.name": VERSION,
    });
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [reference],
    }))?;
    let blob = |bytes: &[u8]| format!("blobs/sha256/{}", &digest(bytes)["sha256:".len()..]);
    let docker = serde_json::to_vec(&json!([{
        "Config": blob(&config),
        "RepoTags": [name()],
        "Layers": [blob(layer)],
    }]))?;
    let mut tar = tar::Builder::new(Vec::new());
    let files: [(String, &[u8]); 6] = [
        ("oci-layout".into(), br#"{"imageLayoutVersion":"1.0.0"}"#),
        ("index.json".into(), &index),
        ("manifest.json".into(), &docker),
        (blob(&config), &config),
        (blob(&manifest), &manifest),
        (blob(layer), layer),
    ];
    for dir in ["blobs/", "blobs/sha256/"] {
        let mut header = directory_header();
        tar.append_data(&mut header, dir, std::io::empty())?;
    }
    for (path, data) in &files {
        let mut header = tar::Header::new_ustar();
        header.set_mode(0o644);
        header.set_mtime(0);
        header.set_size(data.len() as u64);
        tar.append_data(&mut header, path, *data)
            .with_context(|| format!("writing {path} into the image archive"))?;
    }
    Ok(tar.into_inner()?)
}

fn directory_header() -> tar::Header {
    let mut header = tar::Header::new_ustar();
    header.set_entry_type(tar::EntryType::Directory);
    header.set_mode(0o755);
    header.set_mtime(0);
    header.set_size(0);
    header
}

/// An OCI content descriptor of `bytes`.
fn descriptor(media_type: &str, bytes: &[u8]) -> Value {
    json!({"mediaType": media_type, "digest": digest(bytes), "size": bytes.len()})
}

fn digest(bytes: &[u8]) -> String {
    let hash = Sha256::digest(bytes);
    let hex: String = hash.iter().map(|byte| format!("{byte:02x}")).collect();
    format!("sha256:{hex}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_archive_is_an_oci_layout_and_a_docker_save_over_the_same_blobs() {
        let layer = layer(b"\x7fELF", b"[filter]\n").unwrap();
        let bytes = archive(&layer, "amd64").unwrap();
        let mut files = std::collections::BTreeMap::new();
        for entry in tar::Archive::new(bytes.as_slice()).entries().unwrap() {
            let mut entry = entry.unwrap();
            let path = entry.path().unwrap().display().to_string();
            let mut data = Vec::new();
            std::io::Read::read_to_end(&mut entry, &mut data).unwrap();
            files.insert(path, data);
        }
        let json = |path: &str| -> Value { serde_json::from_slice(&files[path]).unwrap() };
        let blob = |digest: &Value| {
            let digest = digest.as_str().unwrap();
            let data = &files[&format!("blobs/sha256/{}", &digest[7..])];
            assert_eq!(super::digest(data), digest, "a blob's name is its digest");
            data.clone()
        };
        let index = json("index.json");
        let manifest: Value =
            serde_json::from_slice(&blob(&index["manifests"][0]["digest"])).unwrap();
        let config: Value = serde_json::from_slice(&blob(&manifest["config"]["digest"])).unwrap();
        assert_eq!(blob(&manifest["layers"][0]["digest"]), layer);
        assert_eq!(
            config["rootfs"]["diff_ids"][0],
            manifest["layers"][0]["digest"]
        );
        let docker = json("manifest.json");
        assert_eq!(docker[0]["RepoTags"][0], name());
        assert_eq!(
            files[docker[0]["Layers"][0].as_str().unwrap()],
            layer,
            "Docker's manifest names the same layer"
        );
        let entries: Vec<String> = tar::Archive::new(layer.as_slice())
            .entries()
            .unwrap()
            .map(|entry| entry.unwrap().path().unwrap().display().to_string())
            .collect();
        assert!(
            entries.contains(&"usr/sbin/filter-agent".to_owned()),
            "{entries:?}"
        );
    }
}
