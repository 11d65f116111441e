//! The MySQL blueprint in the cluster: a real MariaDB pod (an image made from Debian's
//! MariaDB, the one the local blueprint test installs, under the blueprint's image name),
//! and the blueprint's MultiContainerRun phases: mysqldump into a FIFO read by
//! `datamover-client backup_stream`, then `restore_stream` into mysql, compared. Through
//! the phases as Kanister runs them and, when `KANISTER_CONTROLLER` is set, through real
//! ActionSets.

use std::path::PathBuf;
use std::process::Command;

use datamover_tests::blueprint::run_ok;
use datamover_tests::cluster::{Cluster, Images, host_image, poll};

use crate::kanister::{ActionSpec, Artifacts, Object, Runner, kanister_controller};
use crate::setup::{ready, server_and_app, turn};

/// The blueprint's database image name; here it holds Debian's MariaDB programs.
const MYSQL_IMAGE: &str = "mysql:8.0";
/// The database's user in its pod.
const MYSQL_UID: u32 = 999;
const SOCKET: &str = "/tmp/mysqld.sock";

/// Debian's MariaDB server, or `None` (said; a failure under CI).
fn mariadbd_or_skip(test: &str) -> Option<PathBuf> {
    let d = PathBuf::from("/usr/sbin/mariadbd");
    let tools = ["mariadb-install-db", "mysqldump", "mysql"];
    let have = d.exists()
        && tools
            .iter()
            .all(|t| PathBuf::from("/usr/bin").join(t).exists());
    if !have {
        assert!(
            std::env::var_os("CI").is_none(),
            "MariaDB is not installed; CI must run {test} (scripts/ensure-mariadb.sh)"
        );
        eprintln!("SKIPPED {test}: MariaDB is not installed (scripts/ensure-mariadb.sh)");
        return None;
    }
    Some(d)
}

/// mysql inside the database pod, as root over its socket, in `db` (or none).
fn try_mysql(cluster: &Cluster, ns: &str, db: Option<&str>, sql: &str) -> Result<String, String> {
    let socket = format!("--socket={SOCKET}");
    let mut args = vec![
        "exec",
        "-n",
        ns,
        "shop-db-0",
        "--",
        "mysql",
        "--no-defaults",
        &socket,
        "--user=root",
        "--batch",
        "--skip-column-names",
        "--execute",
        sql,
    ];
    if let Some(db) = db {
        args.push(db);
    }
    let o = cluster.kubectl_output(&args, None, 120);
    if !o.status.success() {
        return Err(format!(
            "mysql {sql}: {}",
            String::from_utf8_lossy(&o.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&o.stdout).trim().to_string())
}

fn mysql(cluster: &Cluster, ns: &str, sql: &str) -> String {
    try_mysql(cluster, ns, Some("shop"), sql).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn the_mysql_blueprint_dumps_and_restores_a_database_pod_through_a_fifo() {
    let _turn = turn();
    let test = "cluster: MySQL blueprint";
    if mariadbd_or_skip(test).is_none() {
        return;
    }
    let Some((cluster, images)) = ready(test) else {
        return;
    };
    mysql_round_trip(cluster, images, Runner::Phases, "dm-my");
}

#[test]
fn real_kanister_runs_the_mysql_blueprint() {
    let _turn = turn();
    let test = "cluster: real Kanister, MySQL blueprint";
    if kanister_controller(test).is_none() || mariadbd_or_skip(test).is_none() {
        return;
    }
    let Some((cluster, images)) = ready(test) else {
        return;
    };
    mysql_round_trip(cluster, images, Runner::Kanister, "dm-k10my");
}

/// A MariaDB StatefulSet `shop-db` with a database `shop` and the Secret
/// `datamover-mysql`; dump, change, restore and delete through the blueprint.
fn mysql_round_trip(cluster: &'static Cluster, images: &Images, runner: Runner, prefix: &str) {
    host_image(
        MYSQL_IMAGE,
        &[
            "/usr/sbin/mariadbd",
            "/usr/bin/mysql",
            "/usr/bin/mysqldump",
            "/usr/bin/mkfifo",
            "/bin/sh",
        ],
        &["/usr/share/mysql"],
        &[("mysql", MYSQL_UID)],
        "/usr/sbin:/usr/bin:/bin",
    );
    cluster.load_images(&[MYSQL_IMAGE]);

    let setup = server_and_app(cluster, images, prefix, "shop-db", "datamover-client");
    let app = setup.app.as_str();

    // The database's files, made on the node by mariadb-install-db, on a local volume
    // owned by the pod's user.
    let db_dir = cluster.volume_dir(&format!("{app}-mysql"));
    let data = db_dir.join("data");
    run_ok(
        Command::new("mariadb-install-db")
            .arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            .args([
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
                "--user=root",
            ])
            .current_dir("/"),
        300,
        "mariadb-install-db",
    );
    run_ok(
        Command::new("chown")
            .args(["-R", &format!("{MYSQL_UID}:{MYSQL_UID}")])
            .arg(&db_dir),
        60,
        "chown of the database's files",
    );
    cluster.local_pvc(app, "mysql-data", &db_dir);
    cluster.apply(&format!(
        r#"apiVersion: apps/v1
kind: StatefulSet
metadata: {{name: shop-db, namespace: {app}}}
spec:
  serviceName: shop-db
  replicas: 1
  selector: {{matchLabels: {{app: shop-db}}}}
  template:
    metadata: {{labels: {{app: shop-db}}}}
    spec:
      securityContext: {{runAsUser: {MYSQL_UID}, runAsGroup: {MYSQL_UID}}}
      containers:
      - name: mysql
        image: {MYSQL_IMAGE}
        imagePullPolicy: Never
        command: [mariadbd, --no-defaults, --datadir=/db/data, --socket={SOCKET},
                  --pid-file=/tmp/mysqld.pid, --port=3306, --bind-address=0.0.0.0,
                  --skip-name-resolve, --innodb-buffer-pool-size=32M]
        ports: [{{containerPort: 3306}}]
        volumeMounts: [{{name: data, mountPath: /db}}]
      volumes: [{{name: data, persistentVolumeClaim: {{claimName: mysql-data}}}}]
---
apiVersion: v1
kind: Service
metadata: {{name: shop-db, namespace: {app}}}
spec:
  selector: {{app: shop-db}}
  ports: [{{port: 3306}}]
---
apiVersion: v1
kind: Secret
metadata: {{name: datamover-mysql, namespace: {app}}}
stringData:
  MYSQL_HOST: shop-db.{app}.svc
  MYSQL_TCP_PORT: "3306"
  MYSQL_USER: dm
  MYSQL_PWD: shop-db-password
  MYSQL_DATABASE: shop
"#
    ));
    poll("the MariaDB pod ready", 180, || {
        try_mysql(cluster, app, None, "select 1").ok()
    });
    try_mysql(
        cluster,
        app,
        None,
        "CREATE USER 'dm'@'%' IDENTIFIED BY 'shop-db-password'; \
         GRANT ALL ON *.* TO 'dm'@'%'; CREATE DATABASE shop",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    mysql(
        cluster,
        app,
        "SET SESSION max_recursive_iterations = 10000; \
         CREATE TABLE orders(id INT PRIMARY KEY, item TEXT); \
         INSERT INTO orders WITH RECURSIVE g(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM g \
         WHERE n < 5000) SELECT n, CONCAT('item-', n) FROM g",
    );
    let checksum = "SELECT COUNT(*), MD5(GROUP_CONCAT(item ORDER BY id SEPARATOR ',')) FROM orders";
    let before = mysql(cluster, app, checksum);
    assert!(before.starts_with("5000\t"), "{before}");

    let statefulset = Object::StatefulSet {
        namespace: app,
        name: "shop-db",
    };
    let none = Artifacts::new();
    let spec = |action, object, artifacts| ActionSpec {
        blueprint: "mysql-blueprint.yaml",
        action,
        object,
        options: &[],
        artifacts,
    };
    let out = runner.run(cluster, &spec("backup", statefulset.clone(), &none));
    assert!(
        out.get("mysqlDump")
            .is_some_and(|a| a.get("snapshot_id").is_some_and(|id| id.len() == 64)),
        "{out:?}"
    );

    mysql(
        cluster,
        app,
        "DELETE FROM orders WHERE id > 100; UPDATE orders SET item = 'changed'",
    );
    runner.run(cluster, &spec("restore", statefulset, &out));
    let after = mysql(cluster, app, checksum);
    assert_eq!(
        before, after,
        "the restored table differs from the dumped one"
    );
    runner.run(cluster, &spec("delete", Object::Namespace(app), &out));
}
