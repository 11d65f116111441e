//! (f) browse: file-level access on a data set like (d), a million small files in
//! directories of 1000, against restic on the same Garage and data: `ls` of one
//! directory, `cat` of one file (`restic dump`), `find` of one name, `diff` of two
//! snapshots that differ in 1% of the files, and reading a 1 GiB file through our
//! `mount` against our `cat` of it. Each operation runs once, cold (page cache dropped
//! before it, as for every run of the bench).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::{Bench, Ours, Res, change_one_percent, measured, simple};

/// One operation: our wall time, restic's (when it has one), and the goal.
struct Row {
    what: String,
    ours: f64,
    theirs: Option<f64>,
    goal: &'static str,
}

fn snapshot_id(json: &serde_json::Value) -> Res<String> {
    json["snapshot_id"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| format!("no snapshot id in {json}"))
}

/// restic's snapshot ids, oldest first.
fn restic_ids(b: &Bench, prefix: &str) -> Res<Vec<String>> {
    let o = b
        .restic(prefix, &["snapshots", "--json"])
        .stdout(Stdio::piped())
        .output()
        .map_err(|e| e.to_string())?;
    let v: serde_json::Value =
        serde_json::from_slice(&o.stdout).map_err(|e| format!("restic snapshots --json: {e}"))?;
    Ok(v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s["id"].as_str().map(str::to_string))
        .collect())
}

fn ours_once(b: &Bench, ours: &Ours, args: &[&str]) -> Res<f64> {
    Ok(ours.run(b, args, Stdio::null())?.wall)
}

fn theirs_once(b: &Bench, prefix: &str, args: &[&str]) -> Res<f64> {
    Ok(simple(
        b,
        prefix,
        b.restic(prefix, args),
        &format!("restic {args:?}"),
    )?
    .wall)
}

/// Reads `file` of a snapshot through our mount; the wall time of `cat` of it there.
fn through_mount(b: &Bench, ours: &Ours, tag: &str, file: &str, bytes: u64) -> Res<f64> {
    let dir = b.work.join("browse-mount");
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let mut mount = ours
        .client
        .command(&["mount", &dir.display().to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("mount: {e}"))?;
    let path = dir.join(tag).join("latest").join(file);
    let deadline = Instant::now() + Duration::from_secs(60);
    let ready = loop {
        if std::fs::metadata(&path).is_ok_and(|m| m.len() == bytes) {
            break Ok(());
        }
        if let Ok(Some(s)) = mount.try_wait() {
            break Err(format!("mount exited early ({s}): is /dev/fuse there?"));
        }
        if Instant::now() > deadline {
            break Err(format!("{} did not appear in 60 s", path.display()));
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let timed = ready.and_then(|()| {
        b.quiesce()?;
        let mut cat = Command::new("cat");
        cat.arg(&path).stdout(Stdio::null());
        measured(cat, "cat through the mount").map(|(wall, _, _)| wall)
    });
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(mount.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = mount.wait();
    timed
}

pub fn browse_scenarios(b: &Bench, root: &Path, files: &[PathBuf]) -> Res<String> {
    let ours = Ours::start(b, "browse-dm".into());
    let prefix = "browse-restic";
    let root_s = root.display().to_string();
    let mut init = b.restic(prefix, &["init"]);
    init.stdout(Stdio::null());
    simple(b, prefix, init, "restic init")?;
    eprintln!("browse: first backups");
    let id1 = snapshot_id(&ours.client.ok(&["backup_files", &root_s, "browse"]))?;
    simple(
        b,
        prefix,
        b.restic(prefix, &["backup", &root_s]),
        "restic backup",
    )?;
    change_one_percent(files, 7)?;
    eprintln!("browse: backups after 1% of the files changed");
    let id2 = snapshot_id(&ours.client.ok(&["backup_files", &root_s, "browse"]))?;
    simple(
        b,
        prefix,
        b.restic(prefix, &["backup", &root_s]),
        "restic backup",
    )?;
    let r = restic_ids(b, prefix)?;
    let [r1, r2] = r.as_slice() else {
        return Err(format!("restic has {} snapshots, not 2", r.len()));
    };
    // A directory and a file in the middle of the tree.
    let n = files.len();
    let file = files
        .get(n / 2)
        .ok_or("no files")?
        .strip_prefix(root)
        .map_err(|e| e.to_string())?
        .to_path_buf();
    let dir = file.parent().ok_or("file at the top")?.to_path_buf();
    let (file, dir) = (file.display().to_string(), dir.display().to_string());
    let name = Path::new(&file)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    eprintln!("browse: ls, cat, find, diff");
    let mut rows = vec![
        Row {
            what: format!("ls of one directory ({dir}, 1000 entries)"),
            ours: ours_once(b, &ours, &["ls", &id1, &dir])?,
            theirs: Some(theirs_once(
                b,
                prefix,
                &["ls", r1, &format!("{root_s}/{dir}")],
            )?),
            goal: "< 0.5 s and ≤ 0.2×",
        },
        Row {
            what: format!("cat of one file ({file}; restic dump)"),
            ours: ours_once(b, &ours, &["cat", &id1, &file])?,
            theirs: Some(theirs_once(
                b,
                prefix,
                &["dump", r1, &format!("{root_s}/{file}")],
            )?),
            goal: "< 0.5 s and ≤ 0.2×",
        },
        Row {
            what: format!("find of one name ({name}) in one snapshot"),
            ours: ours_once(b, &ours, &["find", &id1, &name])?,
            theirs: Some(theirs_once(b, prefix, &["find", "--snapshot", r1, &name])?),
            goal: "≤ 0.5×",
        },
        Row {
            what: "diff of the two snapshots (1% of the files changed)".into(),
            ours: ours_once(b, &ours, &["diff", &id1, &id2])?,
            theirs: Some(theirs_once(b, prefix, &["diff", r1, r2])?),
            goal: "≤ 0.5×",
        },
    ];
    // A 1 GiB file: our cat of it, and reading it through our mount.
    let big_dir = b.work.join("browse-big");
    std::fs::create_dir_all(&big_dir).map_err(|e| e.to_string())?;
    let big = big_dir.join("big.bin");
    let gib = 1u64 << 30;
    {
        use rand::{RngCore, SeedableRng};
        use std::io::Write;
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let mut f =
            std::io::BufWriter::new(std::fs::File::create(&big).map_err(|e| e.to_string())?);
        let mut buf = vec![0u8; 1 << 20];
        for _ in 0..1024 {
            rng.fill_bytes(&mut buf);
            f.write_all(&buf).map_err(|e| e.to_string())?;
        }
        f.flush().map_err(|e| e.to_string())?;
    }
    let big_s = big_dir.display().to_string();
    let big_id = snapshot_id(&ours.client.ok(&["backup_files", &big_s, "big"]))?;
    eprintln!("browse: 1 GiB through cat and through the mount");
    let cat = ours_once(b, &ours, &["cat", &big_id, "big.bin"])?;
    match through_mount(b, &ours, "big", "big.bin", gib) {
        Ok(mounted) => rows.push(Row {
            what: format!(
                "read a 1 GiB file through `mount` (ours: mount; theirs: our `cat`, {cat:.2} s)"
            ),
            ours: mounted,
            theirs: Some(cat),
            goal: "speed ≥ 0.7× cat (ratio ≤ 1.43)",
        }),
        Err(e) => rows.push(Row {
            what: format!("read a 1 GiB file through `mount`: not measured ({e})"),
            ours: f64::NAN,
            theirs: Some(cat),
            goal: "speed ≥ 0.7× cat",
        }),
    }
    b.discard(&big_dir);

    let mut out = format!(
        "### (f) browse: file-level access on {n} files\n\n\
         Snapshots of the data set, then of it with 1% of the files changed, by both tools; \
         each operation once, cold. Ratio: our wall time over restic's.\n\n\
         | operation | datamover s | restic s | ratio | goal |\n| --- | --- | --- | --- | --- |\n"
    );
    for r in rows {
        let (theirs, ratio) = match r.theirs {
            Some(t) => (format!("{t:.2}"), format!("{:.2}", r.ours / t)),
            None => ("—".into(), "—".into()),
        };
        out.push_str(&format!(
            "| {} | {:.2} | {theirs} | {ratio} | {} |\n",
            r.what, r.ours, r.goal
        ));
    }
    Ok(out)
}
