//! The image under test, built once per test run by `.ci/image.sh` (what
//! `make image` runs) from the release binary, which `make test` builds
//! first (`make build`): cargo cannot build it from inside `cargo test`,
//! which holds the build lock. When the release binary is missing or older
//! than the sources, the binary built for these tests is packaged instead,
//! and the test says so. `podman load` then puts the OCI archive into a
//! storage of its own under the target directory (vfs driver: works on any
//! filesystem, touches nothing else on the machine).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

/// The built and loaded image.
pub struct Image {
    /// The release binary inside the image (and run on the host to compare).
    pub binary: PathBuf,
    pub archive: PathBuf,
    /// `ghcr.io/portcullis/portcullis:<version>`, as loaded.
    pub name: String,
    /// What .ci/image.sh printed about the build (sizes).
    pub build_note: String,
    store: PathBuf,
}

static IMAGE: OnceLock<Result<Image, String>> = OnceLock::new();

/// The image, or None — after saying why LOUDLY — when this machine
/// cannot build or run images (not root, or buildah/podman not installable).
pub fn image(test: &str) -> Option<&'static Image> {
    match IMAGE.get_or_init(build) {
        Ok(image) => Some(image),
        Err(why) => {
            let _ = writeln!(
                std::io::stderr(),
                "\n!!!!!!!!!! SKIPPED {test}: {why} !!!!!!!!!!\n"
            );
            None
        }
    }
}

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The target directory this test binary was built into.
fn target_dir() -> PathBuf {
    let bin = Path::new(env!("CARGO_BIN_EXE_portcullis"));
    bin.parent().and_then(Path::parent).unwrap().to_path_buf()
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn have(tool: &str) -> bool {
    super::netns::find(tool).is_some()
}

/// Installs buildah, podman and runc from Debian when one is missing.
fn tools() -> Result<(), String> {
    let wanted = ["buildah", "podman", "runc"];
    if wanted.iter().all(|t| have(t)) {
        return Ok(());
    }
    eprintln!("image tests: installing buildah, podman and runc (apt-get)");
    let apt = |args: &[&str]| {
        Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    };
    let install = ["install", "-y", "-qq", "--no-install-recommends"];
    let args: Vec<&str> = install.iter().chain(wanted.iter()).copied().collect();
    if !apt(&args) {
        apt(&["update", "-qq"]);
        apt(&args);
    }
    match wanted.iter().find(|t| !have(t)) {
        Some(t) => Err(format!(
            "{t} is missing and could not be installed (apt-get install buildah podman runc)"
        )),
        None => Ok(()),
    }
}

/// The release binary when it is newer than every source file, else the
/// one cargo built for this test run.
fn packaged_binary(target: &Path) -> PathBuf {
    let release = target.join("release/portcullis");
    let built = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let newest_source = ["src", "Cargo.lock", "deploy/portcullis.yaml"]
        .iter()
        .flat_map(|p| walk(&root().join(p)))
        .filter_map(|p| built(&p))
        .max();
    match (built(&release), newest_source) {
        (Some(bin), Some(src)) if bin >= src => release,
        _ => {
            let _ = writeln!(
                std::io::stderr(),
                "\n!!!!!!!!!! image tests: {} is missing or older than the sources (run `make build`); packaging the test build instead !!!!!!!!!!\n",
                release.display()
            );
            PathBuf::from(env!("CARGO_BIN_EXE_portcullis"))
        }
    }
}

/// Every file under `p` (or `p` itself).
fn walk(p: &Path) -> Vec<PathBuf> {
    match std::fs::read_dir(p) {
        Ok(entries) => entries.flatten().flat_map(|e| walk(&e.path())).collect(),
        Err(_) => vec![p.to_path_buf()],
    }
}

fn build() -> Result<Image, String> {
    if !super::netns::is_root() {
        return Err("needs root (podman with network namespaces)".into());
    }
    tools()?;
    let target = target_dir();
    let binary = packaged_binary(&target);
    let out = Command::new("bash")
        .arg(root().join(".ci/image.sh"))
        .arg(&binary)
        .env("CARGO_TARGET_DIR", &target)
        .output()
        .expect("running .ci/image.sh");
    assert!(out.status.success(), ".ci/image.sh: {}", text(&out.stderr));
    let archive = PathBuf::from(text(&out.stdout).trim());
    let build_note = text(&out.stderr).trim().to_string();
    let store = target.join("image/test-storage");
    let _ = std::fs::remove_dir_all(&store);
    let mut image = Image {
        binary,
        archive,
        name: String::new(),
        build_note,
        store,
    };
    let out = image.podman(&["load", "-i", image.archive.to_str().unwrap()]);
    let loaded = text(&out.stdout);
    assert!(out.status.success(), "podman load: {}", text(&out.stderr));
    image.name = loaded
        .lines()
        .find_map(|l| l.strip_prefix("Loaded image: "))
        .unwrap_or_else(|| panic!("podman load named no image: {loaded}"))
        .trim()
        .to_string();
    Ok(image)
}

/// `--ulimit` values within this process's hard limits (podman's defaults
/// exceed them on small machines, and runc then refuses to start).
fn ulimits() -> Vec<String> {
    use nix::sys::resource::{getrlimit, Resource};
    let (_, files) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    let (_, procs) = getrlimit(Resource::RLIMIT_NPROC).unwrap();
    let files = files.min(65536);
    let procs = procs.min(4096);
    vec![
        "--ulimit".into(),
        format!("nofile={files}:{files}"),
        "--ulimit".into(),
        format!("nproc={procs}:{procs}"),
    ]
}

impl Image {
    /// A podman command on the test storage.
    pub fn podman_command(&self) -> Command {
        let mut cmd = Command::new("podman");
        cmd.arg("--root")
            .arg(self.store.join("root"))
            .arg("--runroot")
            .arg(self.store.join("run"))
            .args(["--storage-driver", "vfs", "--runtime", "runc"])
            .args(["--cgroup-manager", "cgroupfs", "--events-backend", "file"]);
        cmd
    }

    pub fn podman(&self, args: &[&str]) -> Output {
        self.podman_command()
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("running podman")
    }

    /// `podman run --rm OPTIONS IMAGE ARGS`: the image's entrypoint is the
    /// portcullis binary, so `args` are its arguments.
    pub fn run(&self, options: &[&str], args: &[&str]) -> Output {
        let mut cmd = self.podman_command();
        cmd.args(["run", "--rm"]).args(ulimits()).args(options);
        cmd.arg(&self.name).args(args);
        cmd.stdin(Stdio::null()).output().expect("running podman")
    }

    /// Starts a detached container named `name`; removed on drop.
    pub fn start(&self, name: &str, options: &[&str], args: &[&str]) -> Container<'_> {
        let mut cmd = self.podman_command();
        cmd.args(["run", "-d", "--name", name]).args(ulimits());
        cmd.args(options).arg(&self.name).args(args);
        let out = cmd.stdin(Stdio::null()).output().expect("running podman");
        assert!(
            out.status.success(),
            "podman run {name}: {}",
            text(&out.stderr)
        );
        Container {
            image: self,
            name: name.to_string(),
        }
    }
}

/// A detached container, removed (killed) on drop.
pub struct Container<'a> {
    image: &'a Image,
    pub name: String,
}

impl Container<'_> {
    /// The container's output so far (for failure messages).
    pub fn logs(&self) -> String {
        let out = self.image.podman(&["logs", &self.name]);
        format!("{}{}", text(&out.stdout), text(&out.stderr))
    }
}

impl Drop for Container<'_> {
    fn drop(&mut self) {
        let _ = self.image.podman(&["rm", "-f", "-t", "0", &self.name]);
    }
}
