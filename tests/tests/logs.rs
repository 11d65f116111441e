//! Log lines are plain text when stderr is not a terminal (a pipe, a file, what
//! `kubectl logs` shows): no colour escapes, from the real server and client binaries.

use datamover_tests::{Server, Storage};

const TOKEN: &str = "logs-token";

#[test]
fn logs_carry_no_colour_escapes_when_stderr_is_not_a_terminal() {
    // The server's stderr is a file: its start-up INFO lines.
    let server = Server::start(Storage::Filesystem, &[("logs", TOKEN)]);
    let client = server.client("logs", TOKEN);
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("a.txt"), b"a").unwrap();
    // A socket, which the client skips with a WARN line on its stderr, a pipe here.
    let _socket = std::os::unix::net::UnixListener::bind(src.join("a.sock")).unwrap();
    let run = client.run(&["backup_files", src.to_str().unwrap(), "logs"]);
    assert!(run.success(), "{}", run.stderr);
    assert!(
        run.stderr.contains("WARN") && run.stderr.contains("skipping a socket"),
        "no warning: {:?}",
        run.stderr
    );
    assert!(
        !run.stderr.contains("\x1b["),
        "colour escapes in the client's log: {:?}",
        run.stderr
    );
    let log = server.log();
    assert!(log.contains(" INFO "), "no INFO line: {log:?}");
    assert!(
        !log.contains("\x1b["),
        "colour escapes in the server's log: {log:?}"
    );
}
