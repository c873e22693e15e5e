//! The container image, built and run for real: `.ci/image.sh` (what `make
//! image` runs) packages the release binary on `scratch`; podman loads the
//! OCI archive and runs it. Every program `portcullis init` needs, the
//! users, and name resolution must be inside, since there is nothing else.
//! Skipped LOUDLY when not root or when buildah and podman cannot be
//! installed.

#[allow(dead_code)]
#[path = "intercept/backend.rs"]
mod backend;
mod common;
mod netns;
#[path = "image/podman.rs"]
mod podman;

use std::net::SocketAddr;
use std::time::Duration;

use backend::Backend;
use netns::Netns;
use podman::{image, root, text};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The image prints the packaged binary's version, runs as 1500:1500, is
/// named as the chart's default image, and its archive names itself for
/// containerd (kind) and docker loaders too.
#[test]
fn image_runs_the_release_binary_as_uid_1500_under_the_charts_name() {
    let Some(img) = image("image_runs_the_release_binary_as_uid_1500_under_the_charts_name") else {
        return;
    };
    let host = std::process::Command::new(&img.binary)
        .arg("--version")
        .output()
        .unwrap();
    let out = img.run(&[], &["--version"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), text(&host.stdout));
    assert!(text(&out.stdout).starts_with("portcullis "));

    let inspect = |format: &str| {
        let out = img.podman(&["image", "inspect", "--format", format, &img.name]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        text(&out.stdout).trim().to_string()
    };
    assert_eq!(inspect("{{.Config.User}}"), "1500:1500");
    assert_eq!(
        inspect("{{json .Config.Entrypoint}}"),
        r#"["/usr/local/bin/portcullis"]"#
    );

    // The chart's default image: values.yaml image.repository, tag = appVersion.
    let read = |p: &str| std::fs::read_to_string(root().join(p)).unwrap();
    let values: serde_json::Value =
        serde_norway::from_str(&read("charts/portcullis/values.yaml")).unwrap();
    let chart: serde_json::Value =
        serde_norway::from_str(&read("charts/portcullis/Chart.yaml")).unwrap();
    let want = format!(
        "{}:{}",
        values["image"]["repository"].as_str().unwrap(),
        chart["appVersion"].as_str().unwrap()
    );
    assert_eq!(img.name, want, "make image and the chart disagree");
    let version = text(&out.stdout).trim().replace("portcullis ", "");
    assert!(
        want.ends_with(&format!(":{version}")),
        "{want} vs {version}"
    );
    assert!(
        img.archive
            .ends_with(format!("image/portcullis-{version}.oci.tar")),
        "{}",
        img.archive.display()
    );

    // Names for the other loaders: containerd/kind and docker.
    let member = |name: &str| {
        let out = std::process::Command::new("tar")
            .arg("-xOf")
            .arg(&img.archive)
            .arg(name)
            .output()
            .unwrap();
        assert!(out.status.success(), "{name} in the archive");
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let index = member("index.json");
    assert_eq!(
        index["manifests"][0]["annotations"]["io.containerd.image.name"],
        want.as_str()
    );
    assert_eq!(member("manifest.json")[0]["RepoTags"][0], want.as_str());

    let size = std::fs::metadata(&img.archive).unwrap().len();
    let unpacked = inspect("{{.Size}}");
    eprintln!(
        "image {}: archive {:.1} MiB, {:.1} MiB unpacked ({})",
        img.name,
        size as f64 / 1048576.0,
        unpacked.parse::<f64>().unwrap_or(0.0) / 1048576.0,
        img.build_note
    );
    assert!(size < 40 << 20, "the image grew to {size} bytes");
}

/// `init` from the image, in a network namespace made here (as the pod's
/// init container: root, NET_ADMIN and NET_RAW only, read-only root
/// filesystem), installs exactly what the host binary installs in another
/// fresh namespace, for each backend; `--cleanup` from the image removes
/// them as the host binary's does.
#[test]
fn init_from_the_image_installs_the_same_rules_as_the_host_binary() {
    let test = "init_from_the_image_installs_the_same_rules_as_the_host_binary";
    let Some(img) = image(test) else { return };
    for b in [Backend::Nft, Backend::IptablesNft, Backend::IptablesLegacy] {
        if netns::skip(&format!("{test} ({})", b.flag()), b.programs()) {
            continue;
        }
        let host = Netns::new("img-host");
        let out = host.run(&[img.binary.to_str().unwrap(), "init", "--backend", b.flag()]);
        assert!(out.status.success(), "host init: {}", text(&out.stderr));
        let want = b.snapshot(&host);

        let pod = Netns::new("img-pod");
        let network = format!("ns:/run/netns/{}", pod.name());
        let options = [
            "--user=0:0",
            "--cap-drop=ALL",
            "--cap-add=NET_ADMIN",
            "--cap-add=NET_RAW",
            "--read-only",
            "--read-only-tmpfs=false",
            "--network",
            &network,
        ];
        let out = img.run(&options, &["init", "--backend", b.flag()]);
        assert!(
            out.status.success(),
            "{}: init in the image: {}{}",
            b.flag(),
            text(&out.stdout),
            text(&out.stderr)
        );
        assert_eq!(b.snapshot(&pod), want, "{}: image vs host rules", b.flag());

        // Cleanup leaves what the host binary's cleanup leaves (iptables-nft
        // keeps its empty base chains), without a portcullis rule.
        let out = host.run(&[img.binary.to_str().unwrap(), "init", "--cleanup"]);
        assert!(out.status.success(), "host cleanup: {}", text(&out.stderr));
        let out = img.run(&options, &["init", "--cleanup"]);
        assert!(out.status.success(), "cleanup: {}", text(&out.stderr));
        let after = b.snapshot(&pod);
        assert_eq!(
            after,
            b.snapshot(&host),
            "{}: cleanup from the image",
            b.flag()
        );
        assert!(!after.contains("portcullis"), "{}: {after}", b.flag());
    }
}

/// A port free on loopback right now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A tiny HTTP/1.1 app: every request gets `200 hello from the app`.
async fn hello_app() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let body = "hello from the app";
                let _ = s
                    .write_all(
                        format!(
                            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                            body.len()
                        )
                        .as_bytes(),
                    )
                    .await;
            });
        }
    });
    addr
}

/// Two sidecars from the image (host network, CA and rules mounted
/// read-only, running as 1500): a request through the pair arrives over
/// mTLS and is allowed by the mounted rule; a plaintext client of the
/// server sidecar is refused; a name given with --add-host resolves inside
/// the image (nsswitch and /etc/hosts work: `await` connects by name).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_pair_from_the_image_serves_mtls_and_refuses_plaintext() {
    let Some(img) = image("sidecar_pair_from_the_image_serves_mtls_and_refuses_plaintext") else {
        return;
    };
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let ca = common::Ca::root(dir.path(), "ca", common::TD);
    let rules = dir.path().join("rules");
    std::fs::create_dir(&rules).unwrap();
    std::fs::write(
        rules.join("mesh.yaml"),
        "rules:\n  - name: client-may-say-hello\n    action: allow\n    from:\n      identities: [\"spiffe://cluster.local/ns/default/sa/client\"]\n    http:\n      paths: [\"/hello\"]\n",
    )
    .unwrap();
    // The sidecar runs as 1500: it must reach the files, and it alone
    // (besides root) may read the key.
    for d in [dir.path(), &ca.dir, &rules] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    std::os::unix::fs::chown(&ca.files.key, Some(1500), Some(1500)).unwrap();
    let app = hello_app().await;
    let (inbound, admin_b, admin_a, upstream) =
        (free_port(), free_port(), free_port(), free_port());
    let mounts = [
        "--network=host".to_string(),
        format!("--volume={}:/ca:ro", ca.dir.display()),
        format!("--volume={}:/rules:ro", rules.display()),
    ];
    let mounts: Vec<&str> = mounts.iter().map(String::as_str).collect();
    let tag = std::process::id();
    let common_args = |sa: &str, admin: u16| {
        vec![
            "run".to_string(),
            "--ca-cert=/ca/ca.crt".into(),
            "--ca-key=/ca/ca.key".into(),
            "--trust-bundle=/ca/ca.crt".into(),
            format!("--service-account={sa}"),
            "--rules-dir=/rules".into(),
            format!("--admin-listen=127.0.0.1:{admin}"),
            format!("--outbound-listen=127.0.0.1:{}", free_port()),
        ]
    };
    let mut b_args = common_args("server", admin_b);
    b_args.push(format!("--inbound-listen=127.0.0.1:{inbound}"));
    b_args.push(format!("--inbound-target={app}"));
    let mut a_args = common_args("client", admin_a);
    a_args.push(format!("--inbound-listen=127.0.0.1:{}", free_port()));
    a_args.push(format!(
        "--upstream=127.0.0.1:{upstream}=127.0.0.1:{inbound}={}",
        common::id("server")
    ));
    fn argv(v: &[String]) -> Vec<&str> {
        v.iter().map(String::as_str).collect()
    }
    let b = img.start(&format!("portcullis-test-b-{tag}"), &mounts, &argv(&b_args));
    let a = img.start(&format!("portcullis-test-a-{tag}"), &mounts, &argv(&a_args));
    for (c, admin) in [(&b, admin_b), (&a, admin_a)] {
        let addr: SocketAddr = ([127, 0, 0, 1], admin).into();
        // Bounded twice: the timeout keeps the container's log for the message.
        let ready = tokio::time::timeout(
            Duration::from_secs(30),
            common::eventually("sidecar ready", Duration::from_secs(60), || async move {
                matches!(common::http_get(addr, "/ready").await, Ok((200, _)))
            }),
        )
        .await;
        assert!(ready.is_ok(), "{} never ready:\n{}", c.name, c.logs());
    }

    // Through the pair: mTLS between the sidecars, the rule allows /hello.
    let upstream_addr: SocketAddr = ([127, 0, 0, 1], upstream).into();
    let (status, body) = common::http_get(upstream_addr, "/hello").await.unwrap();
    assert_eq!(
        (status, body.as_str()),
        (200, "hello from the app"),
        "{}",
        b.logs()
    );
    let (status, _) = common::http_get(upstream_addr, "/other").await.unwrap();
    assert_eq!(status, 403, "no rule allows /other");
    let metrics = common::http_get(([127, 0, 0, 1], admin_b).into(), "/metrics")
        .await
        .unwrap()
        .1;
    assert!(
        common::metric_value(
            &metrics,
            "portcullis_http_requests_total",
            &[("direction", "inbound"), ("status_code", "200")]
        ) >= 1.0,
        "{metrics}"
    );

    // Plaintext straight to the server sidecar: closed without an answer.
    let mut s = TcpStream::connect(("127.0.0.1", inbound)).await.unwrap();
    s.write_all(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(15), s.read_to_end(&mut got)).await;
    assert!(read.is_ok(), "the plaintext connection was left open");
    assert!(
        !String::from_utf8_lossy(&got).contains("hello from the app"),
        "plaintext reached the app: {}",
        String::from_utf8_lossy(&got)
    );

    // Name resolution inside the image: `await` reaches A's admin by a
    // name only /etc/hosts knows, and fails on a name nothing knows.
    let host = format!("--add-host=portcullis-test-host-{tag}:127.0.0.1");
    let url = format!("--admin=http://portcullis-test-host-{tag}:{admin_a}");
    let out = img.run(
        &["--network=host", &host],
        &["await", &url, "--timeout=20s"],
    );
    assert!(
        out.status.success(),
        "await by name: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let out = img.run(
        &["--network=host"],
        &[
            "await",
            "--admin=http://no-such-name.invalid:1",
            "--timeout=1s",
        ],
    );
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("no-such-name.invalid"), "{err}");
    drop(a);
    drop(b);
}
