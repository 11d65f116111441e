//! The PostgreSQL blueprint's own commands against a real PostgreSQL on loopback.
//!
//! `blueprints/postgresql-blueprint.yaml` is parsed and each MultiContainerRun phase is
//! played as Kanister would: the init command (mkfifo in the shared volume), then the
//! background (pg_dump / psql) and output (datamover-client) commands at once, as the
//! exact argument lists of the YAML. The only substitutions are the Go-template
//! expressions (the ActionSet's object, the artifacts of the previous action) and the
//! shared volume's directory (a temporary directory here). The environment the
//! podOverride gives the containers (the `datamover-postgresql` Secret's libpq variables,
//! the `datamover-client` ConfigMap and credential) is set from the test's own server and
//! database. A database with real tables is dumped through the FIFO into
//! `backup_stream`, restored with `restore_stream` into a new database, and the two
//! databases are compared; then the delete action removes the snapshot.
//!
//! PostgreSQL comes from Debian's package (`scripts/ensure-postgresql.sh`, which the test
//! command runs and which exports `POSTGRES_BIN_DIR`); the test starts its own cluster in
//! a temporary directory on a free port of 127.0.0.1, as user `postgres` when run as root.
//! Without PostgreSQL the test says so and passes, unless `CI` is set.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use datamover_tests::blueprint::{
    add_output_artifacts, kube_task_command, load, multi_container_phase, phase_outputs, run_ok,
    run_phase,
};
use datamover_tests::{Server, Storage, bin_dir, free_port, random_bytes};

const CLIENT_ID: &str = "shop-db";

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The directory with initdb, pg_ctl, postgres, pg_dump and psql.
fn postgres_bin_dir() -> Option<PathBuf> {
    let ok = |d: &Path| {
        ["initdb", "pg_ctl", "postgres", "pg_dump", "psql"]
            .iter()
            .all(|b| d.join(b).exists())
    };
    if let Some(d) = std::env::var_os("POSTGRES_BIN_DIR").map(PathBuf::from) {
        return ok(&d).then_some(d);
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|d| ok(d))
        .collect();
    found.sort();
    found.pop()
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// A command that runs as the cluster's owner: `postgres` when we are root (PostgreSQL
/// refuses to run as root), ourselves otherwise.
fn as_owner(program: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"])
            .arg(program)
            .current_dir("/");
        c
    } else {
        Command::new(program)
    }
}

/// A throw-away PostgreSQL cluster on 127.0.0.1, password authentication over TCP.
struct Postgres {
    bin: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
    password: String,
}

impl Postgres {
    fn start(bin: PathBuf) -> Postgres {
        let dir = tempfile::Builder::new().prefix("dm-pg-").tempdir().unwrap();
        let password = hex(&random_bytes(std::process::id() as u64 ^ 0x9e37, 16));
        std::fs::write(dir.path().join("pwfile"), &password).unwrap();
        if is_root() {
            let pg = nix::unistd::User::from_name("postgres")
                .unwrap()
                .expect("user postgres (Debian's postgresql package creates it)");
            nix::unistd::chown(dir.path(), Some(pg.uid), Some(pg.gid)).unwrap();
            nix::unistd::chown(&dir.path().join("pwfile"), Some(pg.uid), Some(pg.gid)).unwrap();
        }
        let data = dir.path().join("data");
        run_ok(
            as_owner(&bin.join("initdb"))
                .arg("-D")
                .arg(&data)
                .args([
                    "-U",
                    "postgres",
                    "--encoding=UTF8",
                    "--no-locale",
                    "--auth-local=trust",
                    "--auth-host=scram-sha-256",
                ])
                .arg(format!("--pwfile={}", dir.path().join("pwfile").display())),
            120,
            "initdb",
        );
        let port = free_port();
        let opts = format!(
            "-c listen_addresses=127.0.0.1 -p {port} -k {} -c fsync=off -c max_connections=20",
            dir.path().display()
        );
        run_ok(
            as_owner(&bin.join("pg_ctl"))
                .arg("-D")
                .arg(&data)
                .args(["-o", opts.as_str(), "-l"])
                .arg(dir.path().join("postgres.log"))
                .args(["-w", "-t", "60", "start"]),
            90,
            "pg_ctl start",
        );
        Postgres {
            bin,
            dir,
            port,
            password,
        }
    }

    /// libpq's environment for database `db`: what the `datamover-postgresql` Secret holds.
    fn env(&self, db: &str) -> Vec<(String, String)> {
        vec![
            ("PGHOST".into(), "127.0.0.1".into()),
            ("PGPORT".into(), self.port.to_string()),
            ("PGUSER".into(), "postgres".into()),
            ("PGPASSWORD".into(), self.password.clone()),
            ("PGDATABASE".into(), db.into()),
        ]
    }

    fn psql(&self, db: &str, sql: &str) -> String {
        run_ok(
            Command::new(self.bin.join("psql"))
                .envs(self.env(db))
                .args([
                    "--no-psqlrc",
                    "--set=ON_ERROR_STOP=1",
                    "--tuples-only",
                    "--no-align",
                    "--command",
                    sql,
                ]),
            120,
            "psql",
        )
    }

    /// The database as pg_dump sees it, without the random `\restrict` keys that
    /// recent pg_dump versions put in every dump.
    fn dump(&self, db: &str) -> String {
        run_ok(
            Command::new(self.bin.join("pg_dump"))
                .envs(self.env(db))
                .args(["--no-owner", "--no-privileges"]),
            120,
            "pg_dump",
        )
        .lines()
        .filter(|l| !l.starts_with("\\restrict ") && !l.starts_with("\\unrestrict "))
        .map(|l| format!("{l}\n"))
        .collect()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = as_owner(&self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-m", "immediate", "-w", "-t", "30", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// The shop database: several tables of several types, a few thousand rows, an index,
/// a view, a foreign key, text with quotes, newlines and non-ASCII characters.
const SCHEMA: &str = r#"
CREATE TABLE customers (
    id serial PRIMARY KEY,
    name text NOT NULL,
    email text UNIQUE,
    created timestamptz NOT NULL,
    balance numeric(12,2),
    active boolean NOT NULL,
    tags text[],
    profile jsonb
);
INSERT INTO customers (name, email, created, balance, active, tags, profile)
SELECT 'customer ' || i || E' \'quoted\'\nsecond line ü€',
       'user' || i || '@example.com',
       timestamptz '2024-01-01 00:00:00+00' + i * interval '37 minutes',
       (i * 3.17)::numeric(12,2),
       i % 3 = 0,
       ARRAY['tag' || (i % 5), 'all'],
       jsonb_build_object('n', i, 'hash', md5(i::text), 'nested', jsonb_build_object('even', i % 2 = 0))
FROM generate_series(1, 3000) AS i;

CREATE TABLE orders (
    id bigserial PRIMARY KEY,
    customer_id integer NOT NULL REFERENCES customers(id),
    amount double precision,
    day date,
    payload bytea,
    note text
);
INSERT INTO orders (customer_id, amount, day, payload, note)
SELECT 1 + (i * 7) % 3000,
       i / 7.0,
       date '2023-06-01' + (i % 400),
       decode(md5(i::text) || md5((i * 31)::text), 'hex'),
       CASE WHEN i % 10 = 0 THEN NULL ELSE repeat('x', i % 50) END
FROM generate_series(1, 5000) AS i;
CREATE INDEX orders_by_customer ON orders (customer_id, day);
CREATE VIEW big_spenders AS
    SELECT c.id, c.name, sum(o.amount) AS total
    FROM customers c JOIN orders o ON o.customer_id = c.id
    GROUP BY c.id, c.name HAVING sum(o.amount) > 1000;
"#;

/// Content checksums of each table, in key order.
const CHECKSUMS: &str = r#"
SELECT 'customers', count(*), md5(string_agg(t::text, '|' ORDER BY id)) FROM customers t
UNION ALL
SELECT 'orders', count(*), md5(string_agg(t::text, '|' ORDER BY id)) FROM orders t
UNION ALL
SELECT 'big_spenders', count(*), md5(string_agg(t::text, '|' ORDER BY id)) FROM big_spenders t
"#;

#[test]
fn postgresql_blueprint_dumps_through_a_fifo_and_restores_into_a_new_database() {
    let Some(pg_bin) = postgres_bin_dir() else {
        assert!(
            std::env::var_os("CI").is_none(),
            "PostgreSQL not installed, but CI is set: run scripts/ensure-postgresql.sh"
        );
        eprintln!("PostgreSQL not available (scripts/ensure-postgresql.sh): test skipped");
        return;
    };
    let blueprint = load("postgresql-blueprint.yaml");
    assert_eq!(blueprint["kind"], "Blueprint");

    let pg = Postgres::start(pg_bin.clone());
    pg.psql("postgres", "CREATE DATABASE shop");
    pg.psql("shop", SCHEMA);
    let token = hex(&random_bytes(std::process::id() as u64 ^ 0xdb, 24));
    let server = Server::start(Storage::Filesystem, &[(CLIENT_ID, token.as_str())]);
    let client = server.client(CLIENT_ID, &token);
    let path = format!(
        "{}:{}:{}",
        bin_dir().display(),
        pg_bin.display(),
        std::env::var("PATH").unwrap_or_else(|_| "/usr/bin:/bin".into())
    );

    // The ActionSet's object: StatefulSet shop/postgresql.
    let mut values: BTreeMap<String, String> = BTreeMap::new();
    values.insert(".StatefulSet.Namespace".into(), "shop".into());
    values.insert(".StatefulSet.Name".into(), "postgresql".into());
    // The delete ActionSet's object: Namespace shop (no metadata.namespace).
    values.insert(".Object.metadata.name".into(), "shop".into());

    // backup: pg_dump -> FIFO -> backup_stream.
    let shared = tempfile::tempdir().unwrap();
    let backup = multi_container_phase(&blueprint, "backup", &values, shared.path());
    let out = run_phase(&backup, &path, &pg.env("shop"), &client.env);
    assert!(
        std::fs::metadata(shared.path().join("dump.fifo"))
            .map(|m| std::os::unix::fs::FileTypeExt::is_fifo(&m.file_type()))
            .unwrap_or(false),
        "the init command made a FIFO"
    );
    let outputs = phase_outputs(&out);
    assert_eq!(outputs["tag"], "shop-postgresql-postgresql");
    assert!(
        outputs["bytes"].parse::<u64>().unwrap() > 500_000,
        "{outputs:?}"
    );
    add_output_artifacts(&blueprint, "backup", &backup.name, &outputs, &mut values);
    let snapshot = values[".ArtifactsIn.pgDump.KeyValue.snapshot_id"].clone();
    assert_eq!(snapshot, outputs["snapshot_id"]);

    // restore: restore_stream -> FIFO -> psql, into a new database.
    pg.psql("postgres", "CREATE DATABASE shop_restored");
    let shared = tempfile::tempdir().unwrap();
    let restore = multi_container_phase(&blueprint, "restore", &values, shared.path());
    let out = run_phase(&restore, &path, &pg.env("shop_restored"), &client.env);
    assert_eq!(phase_outputs(&out)["snapshot_id"], snapshot);

    // Equal: every table's rows, and the whole schema as pg_dump sees it.
    let original = pg.psql("shop", CHECKSUMS);
    let restored = pg.psql("shop_restored", CHECKSUMS);
    assert!(original.contains("customers|3000|"), "{original}");
    assert!(original.contains("orders|5000|"), "{original}");
    assert_eq!(original, restored);
    assert_eq!(pg.dump("shop"), pg.dump("shop_restored"));

    // delete: the snapshot is gone.
    let argv = kube_task_command(&blueprint, "delete", &values);
    assert_eq!(argv[0], "datamover-client");
    let args: Vec<&str> = argv[1..].iter().map(String::as_str).collect();
    let deleted = run_ok(&mut client.command(&args), 60, "delete");
    assert!(deleted.contains(&snapshot), "{deleted}");
    let list = client.ok(&["list", "shop-postgresql-postgresql"]);
    assert_eq!(list["count"], 0, "{list}");
}
