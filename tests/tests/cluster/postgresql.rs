//! The PostgreSQL blueprint in the cluster: a real PostgreSQL pod (an image made from
//! Debian's PostgreSQL, the one the local blueprint tests install), and the blueprint's
//! MultiContainerRun phases as the pods Kanister creates: pg_dump into a FIFO read by
//! `datamover-client backup_stream`, then `restore_stream` into psql, compared. Through
//! the phases as Kanister runs them and, when `KANISTER_CONTROLLER` is set, through real
//! ActionSets.

use std::path::{Path, PathBuf};
use std::process::Command;

use datamover_tests::blueprint::run_ok;
use datamover_tests::cluster::{Cluster, Images, host_image, poll};

use crate::kanister::{ActionSpec, Artifacts, Object, Runner, kanister_controller};
use crate::setup::{ready, server_and_app, turn};

/// The blueprint's database image name; here it holds Debian's PostgreSQL programs.
const PG_IMAGE: &str = "postgres:16";

fn postgres_bin_dir() -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|d| {
            ["initdb", "postgres", "pg_dump", "psql"]
                .iter()
                .all(|b| d.join(b).exists())
        })
        .collect();
    found.sort();
    found.pop()
}

/// psql inside the database pod, as the superuser over its socket, in `db`.
fn try_psql(cluster: &Cluster, ns: &str, db: &str, sql: &str) -> Result<String, String> {
    let o = cluster.kubectl_output(
        &[
            "exec",
            "-n",
            ns,
            "shop-db-0",
            "--",
            "psql",
            "-h",
            "/tmp",
            "-U",
            "postgres",
            "-d",
            db,
            "-tA",
            "-c",
            sql,
        ],
        None,
        120,
    );
    if !o.status.success() {
        return Err(format!(
            "psql {sql}: {}",
            String::from_utf8_lossy(&o.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&o.stdout).trim().to_string())
}

fn psql(cluster: &Cluster, ns: &str, sql: &str) -> String {
    try_psql(cluster, ns, "shop", sql).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn the_postgresql_blueprint_dumps_and_restores_a_database_pod_through_a_fifo() {
    let _turn = turn();
    let Some(bin) = postgres_bin_dir_or_skip("cluster: PostgreSQL blueprint") else {
        return;
    };
    let Some((cluster, images)) = ready("cluster: PostgreSQL blueprint") else {
        return;
    };
    postgresql_round_trip(cluster, images, &bin, Runner::Phases, "dm-pg");
}

#[test]
fn real_kanister_runs_the_postgresql_blueprint() {
    let _turn = turn();
    let test = "cluster: real Kanister, PostgreSQL blueprint";
    if kanister_controller(test).is_none() {
        return;
    }
    let Some(bin) = postgres_bin_dir_or_skip(test) else {
        return;
    };
    let Some((cluster, images)) = ready(test) else {
        return;
    };
    postgresql_round_trip(cluster, images, &bin, Runner::Kanister, "dm-k10pg");
}

fn postgres_bin_dir_or_skip(test: &str) -> Option<PathBuf> {
    let bin = postgres_bin_dir();
    if bin.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "PostgreSQL is not installed; CI must run {test}"
        );
        eprintln!("SKIPPED {test}: PostgreSQL is not installed (scripts/ensure-postgresql.sh)");
    }
    bin
}

/// A PostgreSQL StatefulSet `shop-db` with a database `shop` and its Secret
/// `datamover-postgresql`; dump, change, restore and delete through the blueprint.
fn postgresql_round_trip(
    cluster: &'static Cluster,
    images: &Images,
    bin: &Path,
    runner: Runner,
    prefix: &str,
) {
    let pg = nix::unistd::User::from_name("postgres")
        .ok()
        .flatten()
        .expect("user postgres (Debian's postgresql package makes it)");
    let (uid, gid) = (pg.uid.as_raw(), pg.gid.as_raw());
    let bins = |names: &[&str]| -> Vec<String> {
        names
            .iter()
            .map(|n| bin.join(n).display().to_string())
            .collect()
    };
    let version_dir = bin.parent().expect("version dir").display().to_string();
    let share = version_dir.replace("/usr/lib/postgresql", "/usr/share/postgresql");
    let mut programs = bins(&["postgres", "pg_dump", "psql"]);
    programs.push("/usr/bin/mkfifo".into());
    let programs: Vec<&str> = programs.iter().map(String::as_str).collect();
    host_image(
        PG_IMAGE,
        &programs,
        &[&format!("{version_dir}/lib"), &share, "/usr/share/zoneinfo"],
        &[("postgres", uid)],
        &format!("{}:/usr/bin", bin.display()),
    );
    cluster.load_images(&[PG_IMAGE]);

    let setup = server_and_app(cluster, images, prefix, "shop-db", "datamover-client");
    let app = &setup.app;

    // The database's files, made on the node by initdb, on a local volume.
    let db_dir = cluster.volume_dir(&format!("{}-pgdata", app.as_str()));
    nix::unistd::chown(&db_dir, Some(pg.uid), Some(pg.gid)).expect("chown");
    let pgdata = db_dir.join("data");
    let pwfile = db_dir.join("pwfile");
    std::fs::write(&pwfile, "shop-db-password").expect("write");
    nix::unistd::chown(&pwfile, Some(pg.uid), Some(pg.gid)).expect("chown");
    run_ok(
        Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(bin.join("initdb"))
            .arg("-D")
            .arg(&pgdata)
            .args([
                "-U",
                "postgres",
                "--encoding=UTF8",
                "--no-locale",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
            ])
            .arg(format!("--pwfile={}", pwfile.display()))
            .current_dir("/"),
        120,
        "initdb",
    );
    append(
        &pgdata.join("pg_hba.conf"),
        "host all all 0.0.0.0/0 scram-sha-256\n",
    );
    cluster.local_pvc(app.as_str(), "pgdata", &db_dir);
    cluster.apply(&format!(
        r#"apiVersion: apps/v1
kind: StatefulSet
metadata: {{name: shop-db, namespace: {ns}}}
spec:
  serviceName: shop-db
  replicas: 1
  selector: {{matchLabels: {{app: shop-db}}}}
  template:
    metadata: {{labels: {{app: shop-db}}}}
    spec:
      securityContext: {{runAsUser: {uid}, runAsGroup: {gid}}}
      containers:
      - name: postgres
        image: {PG_IMAGE}
        imagePullPolicy: Never
        command: [postgres, -D, /pg/data, -c, "listen_addresses=*", -k, /tmp, -c, fsync=off]
        ports: [{{containerPort: 5432}}]
        volumeMounts: [{{name: pgdata, mountPath: /pg}}]
      volumes: [{{name: pgdata, persistentVolumeClaim: {{claimName: pgdata}}}}]
---
apiVersion: v1
kind: Service
metadata: {{name: shop-db, namespace: {ns}}}
spec:
  selector: {{app: shop-db}}
  ports: [{{port: 5432}}]
---
apiVersion: v1
kind: Secret
metadata: {{name: datamover-postgresql, namespace: {ns}}}
stringData:
  PGHOST: shop-db.{ns}.svc
  PGPORT: "5432"
  PGUSER: postgres
  PGPASSWORD: shop-db-password
  PGDATABASE: shop
"#,
        ns = app.as_str(),
    ));
    poll("the PostgreSQL pod ready", 180, || {
        try_psql(cluster, app.as_str(), "postgres", "select 1").ok()
    });
    try_psql(cluster, app.as_str(), "postgres", "create database shop")
        .unwrap_or_else(|e| panic!("{e}"));
    psql(
        cluster,
        app.as_str(),
        "create table orders(id int primary key, item text); \
        insert into orders select g, 'item-' || g from generate_series(1, 5000) g",
    );
    let before = psql(
        cluster,
        app.as_str(),
        "select count(*), md5(string_agg(item, ',' order by id)) from orders",
    );

    let statefulset = Object::StatefulSet {
        namespace: app.as_str(),
        name: "shop-db",
    };
    let none = Artifacts::new();
    let spec = |action, object, artifacts| ActionSpec {
        blueprint: "postgresql-blueprint.yaml",
        action,
        object,
        options: &[],
        artifacts,
    };
    let out = runner.run(cluster, &spec("backup", statefulset.clone(), &none));
    assert!(
        out.get("pgDump")
            .is_some_and(|a| a.get("snapshot_id").is_some_and(|id| id.len() == 64)),
        "{out:?}"
    );

    psql(
        cluster,
        app.as_str(),
        "delete from orders where id > 100; update orders set item = 'changed'",
    );
    runner.run(cluster, &spec("restore", statefulset, &out));
    let after = psql(
        cluster,
        app.as_str(),
        "select count(*), md5(string_agg(item, ',' order by id)) from orders",
    );
    assert_eq!(
        before, after,
        "the restored table differs from the dumped one"
    );
    runner.run(
        cluster,
        &spec("delete", Object::Namespace(app.as_str()), &out),
    );
}

fn append(path: &Path, text: &str) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .expect("open");
    f.write_all(text.as_bytes()).expect("append");
}
