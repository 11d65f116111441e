//! Retention against the real server: a dry run reports, a real run deletes per tag, and
//! what is kept still restores.

use datamover_tests::{Server, Storage};

#[test]
fn forget_keeps_the_policy_per_tag_and_dry_run_changes_nothing() {
    let server = Server::start(Storage::Filesystem, &[("r", "tok")]);
    let client = server.client("r", "tok");
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    std::fs::create_dir(&src).unwrap();
    let mut ids = Vec::new();
    for i in 0..5 {
        std::fs::write(src.join("f"), format!("version {i}")).unwrap();
        ids.push(
            client.ok(&["backup_files", src.to_str().unwrap(), "db"])["snapshot_id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    client.ok(&["backup_files", src.to_str().unwrap(), "other"]);

    let dry = client.ok(&["forget", "--tag", "db", "--keep-last", "2", "--dry-run"]);
    assert_eq!(dry["removed"], 3, "{dry}");
    assert_eq!(dry["dry_run"], true);
    assert_eq!(
        client.ok(&["list"])["count"],
        6,
        "a dry run deleted something"
    );

    let real = client.ok(&["forget", "--keep-last", "2"]);
    assert_eq!(real["removed"], 3, "{real}");
    let removed: Vec<&str> = real["removed_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(
        removed,
        ids[..3].iter().map(String::as_str).collect::<Vec<_>>()
    );
    assert_eq!(client.ok(&["list", "db"])["count"], 2);
    assert_eq!(
        client.ok(&["list", "other"])["count"],
        1,
        "the policy applies per tag"
    );

    let out = work.path().join("out");
    client.ok(&["restore_files", out.to_str().unwrap(), "db"]);
    assert_eq!(std::fs::read_to_string(out.join("f")).unwrap(), "version 4");

    let r = client.run(&["forget", "--dry-run"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
}
