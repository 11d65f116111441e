//! Fuzz harnesses (see `datamover_core::fuzz`) for the client's inputs: `PROTOCOLS`,
//! `SERVER_URL`, `SERVER_DATA` and the credential file under `/etc/client-secret/`.

use datamover_client::settings::{ClientSettings, parse_server_url};
use datamover_core::fuzz::{self, LargestAlloc};
use datamover_proto::fingerprint::Fingerprint;
use datamover_proto::protocols;

#[global_allocator]
static ALLOC: LargestAlloc = LargestAlloc;

/// Fields of one input, separated by 0x1f.
fn fields(input: &[u8]) -> Vec<String> {
    input
        .split(|b| *b == 0x1f)
        .map(|f| String::from_utf8_lossy(f).into_owned())
        .collect()
}

#[test]
fn fuzz_protocols() {
    let seeds = vec![
        b"datamover-v1:51515".to_vec(),
        b"datamover-v1:1;s3:9000".to_vec(),
        b" kopia-v2 : 4000 , datamover-v1:0".to_vec(),
    ];
    fuzz::run("protocols", &seeds, |input| {
        let s = String::from_utf8_lossy(input);
        match protocols::parse(Some(&s)) {
            Ok(list) => {
                for p in list {
                    assert!(!p.name.is_empty(), "{s:?}");
                }
            }
            Err(e) => assert!(!e.to_string().is_empty()),
        }
    });
}

#[test]
fn fuzz_server_url_and_data() {
    let seeds = vec![
        b"https://dm.ns.svc:51515/\x1fab".to_vec(),
        b"[::1]:443\x1f0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef".to_vec(),
        b"host\x1fASNFZ4mrze8BI0VniavN7wEjRWeJq83vASNFZ4mrze8=".to_vec(),
    ];
    fuzz::run("server_url", &seeds, |input| {
        let f = fields(input);
        if let Ok((host, port)) = parse_server_url(&f[0], 51515) {
            assert!(!host.is_empty() || f[0].contains('['), "{:?}", f[0]);
            let _ = port;
        }
        if let Some(data) = f.get(1)
            && let Ok(fp) = Fingerprint::parse(data)
        {
            // Whatever parses is a whole SHA-256 and reads back.
            assert_eq!(Fingerprint::parse(&fp.to_hex()).ok(), Some(fp));
        }
    });
}

#[test]
fn fuzz_client_settings() {
    // The whole environment and the credential file, as a pod would give them.
    let root = tempfile::tempdir().expect("tempdir");
    let secret = root.path().join("etc/client-secret");
    std::fs::create_dir_all(&secret).expect("mkdir");
    let seeds = vec![
        b"datamover-v1:51515\x1fsrv:1\x1f\x1fclient-a\x1ftoken\n".to_vec(),
        b"datamover-v1:1\x1fhttps://x:2\x1f0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef\x1fb\x1f$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$aGFzaA".to_vec(),
    ];
    let root_s = root.path().display().to_string();
    fuzz::run("client_settings", &seeds, |input| {
        let f = fields(input);
        let get = |i: usize| f.get(i).cloned().unwrap_or_default();
        // One credential file, named by the input (a bad name stays unwritten).
        for e in std::fs::read_dir(&secret).expect("read_dir").flatten() {
            let _ = std::fs::remove_file(e.path());
        }
        let name = get(3);
        if !name.is_empty() && !name.contains(['/', '\0']) && name != "." && name != ".." {
            let content = input.rsplit(|b| *b == 0x1f).next().unwrap_or_default();
            let _ = std::fs::write(secret.join(&name), content);
        }
        let env = |k: &str| match k {
            "DATAMOVER_ROOT" => Some(root_s.clone()),
            "PROTOCOLS" => Some(get(0)),
            "SERVER_URL" => Some(get(1)),
            "SERVER_DATA" => Some(get(2)),
            "DATAMOVER_TOKEN_FILE" => Some(format!("{root_s}/no-token")),
            "DATAMOVER_HOSTNAME" => Some("fuzz".into()),
            _ => None,
        };
        if let Err(e) = ClientSettings::load(env) {
            assert!(!e.to_string().is_empty());
        }
    });
}
