//! The MySQL blueprint's own commands against a real MariaDB on loopback.
//!
//! As `postgresql_blueprint.rs` does for PostgreSQL: `blueprints/mysql-blueprint.yaml` is
//! parsed and its MultiContainerRun phases are played as their pods would run them
//! (`mkfifo`, then `mysqldump` into the FIFO while `backup_stream` reads it; then
//! `restore_stream` into the FIFO while `mysql` reads it), against a MariaDB server the
//! test starts in a temporary directory (Debian's mariadb-server-core, installed by
//! `scripts/ensure-mariadb.sh`). The restored database must equal the original.
//! Without MariaDB the test says so and passes, unless `CI` is set.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use datamover_tests::blueprint::{
    add_output_artifacts, kube_task_command, load, multi_container_phase, phase_outputs, run_ok,
    run_phase,
};
use datamover_tests::{Server, Storage, bin_dir, free_port, random_bytes};

const CLIENT_ID: &str = "shop-db";

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn mariadbd() -> Option<PathBuf> {
    let dir = std::env::var_os("MARIADB_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/sbin"));
    let d = dir.join("mariadbd");
    let tools = ["mariadb-install-db", "mysqldump", "mysql"]
        .iter()
        .all(|t| which(t).is_some());
    (d.exists() && tools).then_some(d)
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(name))
            .find(|f| f.exists())
    })
}

/// A throw-away MariaDB server on 127.0.0.1 with a password-authenticated user.
struct MariaDb {
    dir: tempfile::TempDir,
    child: Option<Child>,
    port: u16,
    password: String,
}

impl MariaDb {
    fn start(mariadbd: &Path) -> MariaDb {
        let dir = tempfile::Builder::new()
            .prefix("dm-mariadb-")
            .tempdir()
            .unwrap();
        let root = nix::unistd::geteuid().is_root();
        let user = |c: &mut Command| {
            if root {
                // MariaDB refuses to run as root unless told to explicitly.
                c.arg("--user=root");
            }
        };
        let data = dir.path().join("data");
        let mut install = Command::new("mariadb-install-db");
        install
            .arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            .args(["--auth-root-authentication-method=normal", "--skip-test-db"]);
        user(&mut install);
        run_ok(&mut install, 300, "mariadb-install-db");
        let port = free_port();
        let socket = dir.path().join("sock");
        let mut server = Command::new(mariadbd);
        server
            .arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            .arg(format!("--socket={}", socket.display()))
            .arg(format!("--pid-file={}", dir.path().join("pid").display()))
            .arg(format!(
                "--log-error={}",
                dir.path().join("error.log").display()
            ))
            .arg(format!("--port={port}"))
            .args([
                "--bind-address=127.0.0.1",
                "--skip-name-resolve",
                "--innodb-buffer-pool-size=32M",
            ]);
        user(&mut server);
        let child = server
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start mariadbd");
        let password = hex(&random_bytes(std::process::id() as u64 ^ 0x3306, 16));
        let mut db = MariaDb {
            dir,
            child: Some(child),
            port,
            password,
        };
        // Wait for the socket, then make the test's user (root over the socket).
        let deadline = Instant::now() + Duration::from_secs(120);
        let sql = format!(
            "CREATE USER 'dm'@'127.0.0.1' IDENTIFIED BY '{}'; GRANT ALL ON *.* TO 'dm'@'127.0.0.1';",
            db.password
        );
        loop {
            let ok = Command::new("mysql")
                .arg("--no-defaults")
                .arg(format!("--socket={}", socket.display()))
                .args(["--user=root", "--execute", sql.as_str()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                break;
            }
            if let Some(c) = db.child.as_mut()
                && let Ok(Some(s)) = c.try_wait()
            {
                panic!(
                    "mariadbd exited with {s}:\n{}",
                    std::fs::read_to_string(db.dir.path().join("error.log")).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "mariadbd not ready in 120 s:\n{}",
                std::fs::read_to_string(db.dir.path().join("error.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        db
    }

    /// What the `datamover-mysql` Secret holds, for database `db`.
    fn env(&self, db: &str) -> Vec<(String, String)> {
        vec![
            ("MYSQL_HOST".into(), "127.0.0.1".into()),
            ("MYSQL_TCP_PORT".into(), self.port.to_string()),
            ("MYSQL_USER".into(), "dm".into()),
            ("MYSQL_PWD".into(), self.password.clone()),
            ("MYSQL_DATABASE".into(), db.into()),
        ]
    }

    fn sql(&self, db: &str, sql: &str) -> String {
        let mut c = Command::new("mysql");
        c.envs(self.env(db))
            .arg(format!("--port={}", self.port))
            .args([
                "--host=127.0.0.1",
                "--user=dm",
                "--batch",
                "--skip-column-names",
                "--execute",
                sql,
            ]);
        if !db.is_empty() {
            c.arg(db);
        }
        run_ok(&mut c, 120, "mysql")
    }

    fn dump(&self, db: &str) -> String {
        run_ok(
            Command::new("mysqldump")
                .envs(self.env(db))
                .arg(format!("--port={}", self.port))
                .args([
                    "--host=127.0.0.1",
                    "--user=dm",
                    "--skip-comments",
                    "--skip-dump-date",
                    "--routines",
                    "--triggers",
                    "--no-tablespaces",
                    db,
                ]),
            120,
            "mysqldump",
        )
    }
}

impl Drop for MariaDb {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

const SCHEMA: &str = r#"
CREATE TABLE customers (
    id INT AUTO_INCREMENT PRIMARY KEY,
    name VARCHAR(200) NOT NULL,
    email VARCHAR(200) UNIQUE,
    created DATETIME(6) NOT NULL,
    balance DECIMAL(12,2),
    active BOOLEAN NOT NULL,
    profile JSON
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;
INSERT INTO customers (name, email, created, balance, active, profile)
SELECT CONCAT('customer ', seq, ' \'quoted\'\nsecond line ü€'),
       CONCAT('user', seq, '@example.com'),
       TIMESTAMPADD(MINUTE, seq * 37, '2024-01-01 00:00:00.123456'),
       seq * 3.17,
       seq % 3 = 0,
       JSON_OBJECT('n', seq, 'hash', MD5(seq))
FROM seq_1_to_3000;
CREATE TABLE orders (
    id BIGINT AUTO_INCREMENT PRIMARY KEY,
    customer_id INT NOT NULL,
    amount DOUBLE,
    day DATE,
    payload VARBINARY(64),
    note TEXT,
    FOREIGN KEY (customer_id) REFERENCES customers(id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;
INSERT INTO orders (customer_id, amount, day, payload, note)
SELECT 1 + (seq * 7) % 3000, seq / 7.0, DATE_ADD('2023-06-01', INTERVAL seq % 400 DAY),
       UNHEX(CONCAT(MD5(seq), MD5(seq * 31))),
       IF(seq % 10 = 0, NULL, REPEAT('x', seq % 50))
FROM seq_1_to_5000;
CREATE INDEX orders_by_customer ON orders (customer_id, day);
CREATE VIEW big_spenders AS
    SELECT c.id, c.name, SUM(o.amount) AS total
    FROM customers c JOIN orders o ON o.customer_id = c.id
    GROUP BY c.id, c.name HAVING SUM(o.amount) > 1000;
"#;

const CHECKSUMS: &str = "
SELECT 'customers', COUNT(*), MD5(GROUP_CONCAT(CONCAT_WS(',', id, name, email, created, balance, active, profile) ORDER BY id SEPARATOR '|')) FROM customers
UNION ALL
SELECT 'orders', COUNT(*), MD5(GROUP_CONCAT(CONCAT_WS(',', id, customer_id, amount, day, HEX(payload), IFNULL(note, 'NULL')) ORDER BY id SEPARATOR '|')) FROM orders
UNION ALL
SELECT 'big_spenders', COUNT(*), MD5(GROUP_CONCAT(CONCAT_WS(',', id, total) ORDER BY id SEPARATOR '|')) FROM big_spenders";

#[test]
fn mysql_blueprint_dumps_through_a_fifo_and_restores_into_a_new_database() {
    let Some(mariadbd) = mariadbd() else {
        assert!(
            std::env::var_os("CI").is_none(),
            "MariaDB not installed, but CI is set: run scripts/ensure-mariadb.sh"
        );
        eprintln!("MariaDB not available (scripts/ensure-mariadb.sh): test skipped");
        return;
    };
    let blueprint = load("mysql-blueprint.yaml");
    let db = MariaDb::start(&mariadbd);
    db.sql("", "CREATE DATABASE shop; CREATE DATABASE shop_restored");
    db.sql("shop", SCHEMA);
    let token = hex(&random_bytes(std::process::id() as u64 ^ 0x5e, 24));
    let server = Server::start(Storage::Filesystem, &[(CLIENT_ID, token.as_str())]);
    let client = server.client(CLIENT_ID, &token);
    let path = format!(
        "{}:{}",
        bin_dir().display(),
        std::env::var("PATH").unwrap_or_else(|_| "/usr/bin:/bin".into())
    );

    let mut values: BTreeMap<String, String> = BTreeMap::new();
    values.insert(".StatefulSet.Namespace".into(), "shop".into());
    values.insert(".StatefulSet.Name".into(), "mysql".into());
    // The delete ActionSet's object: Namespace shop (no metadata.namespace).
    values.insert(".Object.metadata.name".into(), "shop".into());

    let shared = tempfile::tempdir().unwrap();
    let backup = multi_container_phase(&blueprint, "backup", &values, shared.path());
    let out = run_phase(&backup, &path, &db.env("shop"), &client.env);
    let outputs = phase_outputs(&out);
    assert_eq!(outputs["tag"], "shop-mysql-mysql");
    add_output_artifacts(&blueprint, "backup", &backup.name, &outputs, &mut values);
    let snapshot = values[".ArtifactsIn.mysqlDump.KeyValue.snapshot_id"].clone();

    let shared = tempfile::tempdir().unwrap();
    let restore = multi_container_phase(&blueprint, "restore", &values, shared.path());
    run_phase(&restore, &path, &db.env("shop_restored"), &client.env);

    let checks = format!("SET SESSION group_concat_max_len = 100000000; {CHECKSUMS}");
    let original = db.sql("shop", &checks);
    assert!(original.contains("customers\t3000\t"), "{original}");
    assert!(original.contains("orders\t5000\t"), "{original}");
    assert_eq!(original, db.sql("shop_restored", &checks));
    assert_eq!(db.dump("shop"), db.dump("shop_restored"));

    let argv = kube_task_command(&blueprint, "delete", &values);
    let args: Vec<&str> = argv[1..].iter().map(String::as_str).collect();
    let deleted = run_ok(&mut client.command(&args), 60, "delete");
    assert!(deleted.contains(&snapshot), "{deleted}");
}
