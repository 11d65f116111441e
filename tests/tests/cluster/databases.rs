//! The PostgreSQL blueprint in the cluster: a real PostgreSQL pod (an image made from
//! Debian's PostgreSQL, the one the local blueprint tests install), and the blueprint's
//! MultiContainerRun phases as the pods Kanister creates: pg_dump into a FIFO read by
//! `datamover-client backup_stream`, then `restore_stream` into psql, compared.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use datamover_tests::blueprint::{load, run_ok};
use datamover_tests::cluster::{Cluster, host_image, poll};

use crate::kanister::run_action;
use crate::setup::{TestServer, ready, turn};

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

/// psql inside the database pod.
fn psql(cluster: &Cluster, ns: &str, sql: &str) -> String {
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
            "shop",
            "-tA",
            "-c",
            sql,
        ],
        None,
        120,
    );
    assert!(
        o.status.success(),
        "psql {sql}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

#[test]
fn the_postgresql_blueprint_dumps_and_restores_a_database_pod_through_a_fifo() {
    let _turn = turn();
    let Some(bin) = postgres_bin_dir() else {
        assert!(
            std::env::var_os("CI").is_none(),
            "PostgreSQL is not installed; CI must run this test"
        );
        eprintln!(
            "SKIPPED cluster: PostgreSQL blueprint: PostgreSQL is not installed (scripts/ensure-postgresql.sh)"
        );
        return;
    };
    let Some((cluster, images)) = ready("cluster: PostgreSQL blueprint") else {
        return;
    };
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

    let server_ns = cluster.namespace("dm-pg-server");
    let app = cluster.namespace("dm-pg-app");
    let server = TestServer::create(
        cluster,
        &server_ns,
        "datamover",
        &images.server,
        &[("shop-db", "shop-db-token-0123456789")],
    );
    let data = server.wait_ready(cluster, 180);
    server.client_config(
        cluster,
        app.as_str(),
        "datamover-client",
        "shop-db",
        "shop-db-token-0123456789",
        &data,
    );

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
        let o = cluster.kubectl_output(
            &[
                "exec",
                "-n",
                app.as_str(),
                "shop-db-0",
                "--",
                "psql",
                "-h",
                "/tmp",
                "-U",
                "postgres",
                "-tA",
                "-c",
                "select 1",
            ],
            None,
            30,
        );
        o.status.success().then_some(())
    });
    let o = cluster.kubectl_output(
        &[
            "exec",
            "-n",
            app.as_str(),
            "shop-db-0",
            "--",
            "psql",
            "-h",
            "/tmp",
            "-U",
            "postgres",
            "-c",
            "create database shop",
        ],
        None,
        60,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
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

    let bp = load("postgresql-blueprint.yaml");
    let mut values: BTreeMap<String, String> = BTreeMap::new();
    values.insert(".StatefulSet.Namespace".into(), app.as_str().into());
    values.insert(".StatefulSet.Name".into(), "shop-db".into());
    run_action(cluster, &bp, "backup", &mut values);
    assert!(
        values.contains_key(".ArtifactsIn.pgDump.KeyValue.snapshot_id"),
        "{values:?}"
    );

    psql(
        cluster,
        app.as_str(),
        "delete from orders where id > 100; update orders set item = 'changed'",
    );
    run_action(cluster, &bp, "restore", &mut values);
    let after = psql(
        cluster,
        app.as_str(),
        "select count(*), md5(string_agg(item, ',' order by id)) from orders",
    );
    assert_eq!(
        before, after,
        "the restored table differs from the dumped one"
    );
    values.insert(".Object.metadata.name".into(), app.as_str().into());
    run_action(cluster, &bp, "delete", &mut values);
}

fn append(path: &Path, text: &str) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .expect("open");
    f.write_all(text.as_bytes()).expect("append");
}
