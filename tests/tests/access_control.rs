//! Access control against the real server: live credentials (kubelet-style Secret
//! updates), rotation, revocation of in-flight backups, tenants, roles, hashed credentials.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use datamover_client::connect;
use datamover_client::settings::ClientSettings;
use datamover_proto::v1;
use datamover_tests::{Client, Server, Storage};

/// A Secret volume updated the way kubelet does it: a new timestamped directory, an
/// atomic swap of the `..data` symlink, key symlinks through `..data`, the old directory
/// removed.
struct KubeletSecret {
    dir: PathBuf,
    generation: u32,
}

impl KubeletSecret {
    fn new(dir: &Path) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        KubeletSecret {
            dir: dir.to_path_buf(),
            generation: 0,
        }
    }

    fn update(&mut self, files: &[(&str, &str)]) {
        self.generation += 1;
        let ts = format!(
            "..2026_11_22_00_00_{:02}.{}",
            self.generation,
            std::process::id()
        );
        let ts_dir = self.dir.join(&ts);
        std::fs::create_dir(&ts_dir).unwrap();
        for (k, v) in files {
            std::fs::write(ts_dir.join(k), v).unwrap();
        }
        let old = std::fs::read_link(self.dir.join("..data")).ok();
        let tmp = self.dir.join("..data_tmp");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&ts, &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.join("..data")).unwrap();
        for (k, _) in files {
            let link = self.dir.join(k);
            if std::fs::symlink_metadata(&link).is_err() {
                std::os::unix::fs::symlink(format!("..data/{k}"), &link).unwrap();
            }
        }
        for e in std::fs::read_dir(&self.dir).unwrap().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !name.starts_with('.') && !files.iter().any(|(k, _)| *k == name) {
                std::fs::remove_file(e.path()).unwrap();
            }
        }
        if let Some(old) = old {
            std::fs::remove_dir_all(self.dir.join(old)).unwrap();
        }
    }
}

/// Runs `args` until it succeeds (or `limit` passes); returns how long that took.
fn time_until_ok(client: &Client, args: &[&str], limit: Duration) -> Duration {
    let start = Instant::now();
    loop {
        if client.run(args).success() {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < limit,
            "{args:?} never succeeded within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn time_until_code(client: &Client, args: &[&str], code: i32, limit: Duration) -> Duration {
    let start = Instant::now();
    loop {
        if client.run(args).code == code {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < limit,
            "{args:?} never exited {code} within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

const TWO_S: Duration = Duration::from_millis(2000);

#[test]
fn live_credentials_follow_kubelet_updates_rotation_and_revocation() {
    let server = Server::start(Storage::Filesystem, &[]);
    let mut secret = KubeletSecret::new(&server.root.path().join("etc/client_credentials"));
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("f"), b"data").unwrap();

    // Added by a symlink swap: usable within 2 s.
    secret.update(&[("c1", "tok1")]);
    let c1 = server.client("c1", "tok1");
    let t = time_until_ok(
        &c1,
        &["backup_files", src.to_str().unwrap(), "t"],
        Duration::from_secs(10),
    );
    assert!(t <= TWO_S, "c1 usable after {t:?}");
    secret.update(&[("c1", "tok1"), ("c2", "tok2")]);
    let c2 = server.client("c2", "tok2");
    let t = time_until_ok(
        &c2,
        &["backup_files", src.to_str().unwrap(), "t"],
        Duration::from_secs(10),
    );
    assert!(t <= TWO_S, "c2 usable after {t:?}");

    // Rotation: the old token stops, the new one works.
    secret.update(&[("c1", "tok1-rotated"), ("c2", "tok2")]);
    let t = time_until_code(&c1, &["list"], 3, Duration::from_secs(10));
    assert!(t <= TWO_S, "old token still accepted after {t:?}");
    let c1_new = server.client("c1", "tok1-rotated");
    c1_new.ok(&["list"]);

    // Revocation during a streaming backup: it fails within 2 s and commits nothing.
    let fifo = work.path().join("slow.fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let mut writer = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "(head -c 2000000 /dev/urandom; sleep 30) > '{}'",
            fifo.display()
        ))
        .spawn()
        .unwrap();
    let mut backup = c2
        .command(&["backup_stream", fifo.to_str().unwrap(), "revoked-stream"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        backup.try_wait().unwrap().is_none(),
        "the backup ended before the revocation"
    );
    let revoked_at = Instant::now();
    secret.update(&[("c1", "tok1-rotated")]);
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(s) = backup.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "the revoked backup kept running");
        std::thread::sleep(Duration::from_millis(20));
    };
    let took = revoked_at.elapsed();
    let _ = writer.kill();
    let _ = writer.wait();
    let out = backup.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("revoked"), "{stderr}");
    assert!(
        took <= TWO_S + Duration::from_millis(500),
        "revoked backup stopped after {took:?}"
    );
    assert_eq!(c2.run(&["list"]).code, 3, "a removed client can still call");
    // Re-admitted, c2 finds no snapshot from the aborted backup.
    secret.update(&[("c1", "tok1-rotated"), ("c2", "tok2")]);
    time_until_ok(&c2, &["list"], Duration::from_secs(10));
    assert_eq!(c2.ok(&["list", "revoked-stream"])["count"], 0);
    assert!(server.log().contains("removed"), "reload not logged");
    assert!(!server.log().contains("tok2"), "a credential was logged");
}

#[test]
fn plain_edits_and_a_directory_appearing_later() {
    let server = Server::start(Storage::Filesystem, &[("p", "one")]);
    let dir = server.root.path().join("etc/client_credentials");
    let c = server.client("p", "one");
    c.ok(&["list"]);
    std::fs::write(dir.join("p"), "two\n").unwrap();
    let t = time_until_code(&c, &["list"], 3, Duration::from_secs(10));
    assert!(t <= TWO_S, "in-place edit took {t:?}");
    server.client("p", "two").ok(&["list"]);

    std::fs::remove_dir_all(&dir).unwrap();
    time_until_code(
        &server.client("p", "two"),
        &["list"],
        3,
        Duration::from_secs(10),
    );
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("late"), "late-token").unwrap();
    let t = time_until_ok(
        &server.client("late", "late-token"),
        &["list"],
        Duration::from_secs(10),
    );
    assert!(t <= TWO_S, "a re-created directory took {t:?}");
}

fn settings(server: &Server, id: &str, token: &str) -> ClientSettings {
    server.client_settings(id, token)
}

/// Which of `ids` the server says `id` must send.
async fn missing(server: &Server, id: &str, token: &str, ids: Vec<Bytes>) -> Vec<u32> {
    let mut conn = connect::connect(&settings(server, id, token))
        .await
        .unwrap();
    let session = conn
        .api
        .begin_backup(v1::BeginBackupRequest {
            tag: "probe".into(),
            kind: v1::SnapshotKind::Files as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .session_id;
    conn.api
        .find_missing(v1::FindMissingRequest {
            session_id: session,
            ids,
        })
        .await
        .unwrap()
        .into_inner()
        .missing
}

#[test]
fn tenants_cannot_see_each_other() {
    let server = Server::start(Storage::Filesystem, &[("a", "ta"), ("b", "tb")]);
    let (a, b) = (server.client("a", "ta"), server.client("b", "tb"));
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    std::fs::create_dir(&src).unwrap();
    let secret_content = b"only tenant a holds this content";
    std::fs::write(src.join("secret"), secret_content).unwrap();
    let snap = a.ok(&["backup_files", src.to_str().unwrap(), "a-tag"]);
    let sid = snap["snapshot_id"].as_str().unwrap().to_string();

    assert_eq!(b.ok(&["list"])["count"], 0);
    let target = work.path().join("stolen");
    let r = b.run(&["restore_files", target.to_str().unwrap(), &sid]);
    assert_eq!(r.code, 4, "{}", r.stderr);
    assert!(!target.exists());
    assert_eq!(
        b.run(&["restore_files", target.to_str().unwrap(), "a-tag"])
            .code,
        4
    );
    assert_eq!(b.run(&["delete", &sid]).code, 4);
    assert_eq!(a.ok(&["list"])["count"], 1, "b deleted a's snapshot");

    // Chunk probing: b learns nothing about a's content, by b's own id or by a's id.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let ka = connect::connect(&settings(&server, "a", "ta"))
            .await
            .unwrap()
            .key;
        let kb = connect::connect(&settings(&server, "b", "tb"))
            .await
            .unwrap()
            .key;
        let id_a = Bytes::copy_from_slice(&ka.id(secret_content).0);
        let id_b = Bytes::copy_from_slice(&kb.id(secret_content).0);
        assert_ne!(id_a, id_b, "chunk ids are not keyed per tenant");
        assert_eq!(
            missing(&server, "a", "ta", vec![id_a.clone()]).await,
            Vec::<u32>::new()
        );
        assert_eq!(
            missing(&server, "b", "tb", vec![id_b, id_a]).await,
            vec![0, 1]
        );
    });
}

#[test]
fn roles_and_shared_tenants() {
    let root = tempfile::tempdir().unwrap();
    let config = root.path().join("etc/config");
    std::fs::create_dir_all(&config).unwrap();
    std::fs::write(config.join("tenants"), "ap=team\nrd=team\nfu=team\n").unwrap();
    std::fs::write(config.join("roles"), "ap=append\nrd=read\nfu=full\n").unwrap();
    let server = Server::start_in(
        root,
        Storage::Filesystem,
        &[("ap", "t-ap"), ("rd", "t-rd"), ("fu", "t-fu")],
    );
    let (ap, rd, fu) = (
        server.client("ap", "t-ap"),
        server.client("rd", "t-rd"),
        server.client("fu", "t-fu"),
    );
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("f"), b"team data").unwrap();

    let snap = ap.ok(&["backup_files", src.to_str().unwrap(), "team"]);
    let sid = snap["snapshot_id"].as_str().unwrap().to_string();
    // An unchanged second backup by the append client still works (it reads the parent).
    assert_eq!(
        ap.ok(&["backup_files", src.to_str().unwrap(), "team"])["files_unchanged"],
        1
    );

    let out = work.path().join("out");
    let r = ap.run(&["restore_files", out.to_str().unwrap(), "team"]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(r.stderr.contains("role append"), "{}", r.stderr);
    assert!(!out.exists());
    let r = ap.run(&["delete", &sid]);
    assert_eq!(r.code, 3, "{}", r.stderr);

    let r = rd.run(&["backup_files", src.to_str().unwrap(), "team"]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(r.stderr.contains("role read"), "{}", r.stderr);
    assert_eq!(rd.run(&["delete", &sid]).code, 3);
    rd.ok(&["restore_files", out.to_str().unwrap(), "team"]);
    assert_eq!(std::fs::read(out.join("f")).unwrap(), b"team data");
    assert_eq!(rd.ok(&["list"])["count"], 2);

    let d = fu.ok(&["delete", &sid]);
    assert_eq!(d["snapshot_id"], sid.as_str());
    assert_eq!(fu.ok(&["list"])["count"], 1);
    let r = fu.run(&["delete", "team"]);
    assert_eq!(r.code, 2, "a tag must not delete: {}", r.stderr);
    assert!(r.stderr.contains("snapshot id"), "{}", r.stderr);
}

#[test]
fn hashed_credentials() {
    use argon2::password_hash::{PasswordHasher, SaltString};
    let salt = SaltString::encode_b64(b"datamover-salt-1").unwrap();
    let phc = argon2::Argon2::default()
        .hash_password(b"hashed-secret", &salt)
        .unwrap()
        .to_string();
    assert!(phc.starts_with("$argon2id$"));
    let server = Server::start(Storage::Filesystem, &[("h", &phc)]);
    server.client("h", "hashed-secret").ok(&["list"]);
    server.client("h", "hashed-secret").ok(&["list"]);
    assert_eq!(server.client("h", "wrong").run(&["list"]).code, 3);
    assert_eq!(
        server.client("h", &phc).run(&["list"]).code,
        3,
        "the hash itself must not work as a token"
    );
}
