//! Reading a server pod's `/etc/server/data` without `pods/exec`: the server serves the
//! same content on its plaintext probe listener as `GET /server-data` (it is the public
//! fingerprint of its certificate, not a secret), and the controller fetches it from a
//! ready pod's IP.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::Error;

/// The most a server-data response may hold.
const MAX_RESPONSE: u64 = 16 * 1024;

/// Where the controller gets a pod's server data from (a fake in tests).
#[async_trait]
pub trait ServerDataSource: Send + Sync {
    /// The content of `/etc/server/data` of the pod at `ip`, trimmed.
    async fn fetch(&self, ip: &str, port: i32) -> Result<String, Error>;
}

/// `GET /server-data` over plain HTTP/1.0 on the pod's probe port.
pub struct HttpServerData {
    pub timeout: Duration,
}

impl Default for HttpServerData {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(3),
        }
    }
}

#[async_trait]
impl ServerDataSource for HttpServerData {
    async fn fetch(&self, ip: &str, port: i32) -> Result<String, Error> {
        let fail = |reason: String| Error::ServerData {
            addr: format!("{ip}:{port}"),
            reason,
        };
        let ip: IpAddr = ip.parse().map_err(|_| fail("not an IP address".into()))?;
        let port = u16::try_from(port).map_err(|_| fail("bad port".into()))?;
        let addr = SocketAddr::new(ip, port);
        let exchange = async {
            let mut stream = tokio::net::TcpStream::connect(addr).await?;
            let request = format!("GET /server-data HTTP/1.0\r\nHost: {addr}\r\n\r\n");
            stream.write_all(request.as_bytes()).await?;
            let mut response = Vec::new();
            stream.take(MAX_RESPONSE).read_to_end(&mut response).await?;
            Ok::<_, std::io::Error>(response)
        };
        let response = tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| fail("timed out".into()))?
            .map_err(|e| fail(e.to_string()))?;
        parse_response(&response).map_err(fail)
    }
}

/// The body of a `200` response, trimmed and checked to be printable ASCII.
pub fn parse_response(response: &[u8]) -> Result<String, String> {
    let text = std::str::from_utf8(response).map_err(|_| "response is not UTF-8".to_string())?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| "truncated HTTP response".to_string())?;
    let status = head.lines().next().unwrap_or_default();
    let code = status.split_whitespace().nth(1).unwrap_or_default();
    if code != "200" {
        return Err(format!("server answered {status:?} (not written yet?)"));
    }
    let data = body.trim();
    if data.is_empty() || !data.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("server data is empty or not printable".into());
    }
    Ok(data.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_200_and_refuses_the_rest() {
        let ok = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nabcdef0123\n";
        assert_eq!(parse_response(ok).unwrap(), "abcdef0123");
        let not_yet = b"HTTP/1.1 503 Service Unavailable\r\n\r\nnot written\n";
        assert!(parse_response(not_yet).unwrap_err().contains("503"));
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n\r\n\n").is_err());
        assert!(parse_response(b"garbage").is_err());
    }

    #[tokio::test]
    async fn fetches_over_http_from_a_local_listener() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let n = s.read(&mut buf).await.unwrap();
            let req = String::from_utf8_lossy(&buf[..n]).to_string();
            s.write_all(b"HTTP/1.1 200 OK\r\n\r\n00ff\n").await.unwrap();
            req
        });
        let data = HttpServerData::default()
            .fetch("127.0.0.1", i32::from(port))
            .await
            .unwrap();
        assert_eq!(data, "00ff");
        assert!(server.await.unwrap().starts_with("GET /server-data "));
    }
}
