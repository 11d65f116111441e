//! A snapshot's catalog: length-delimited `Node` messages, one after another.

use bytes::{Buf, BytesMut};
use datamover_proto::v1::Node;
use prost::Message;
use thiserror::Error;

/// The largest encoded node accepted (a file of 64 GiB in 64 KiB chunks has ~1 M ids).
pub const MAX_NODE_BYTES: usize = 64 * 1024 * 1024;

#[derive(Debug, Error)]
pub enum CatalogError {
    #[error("the snapshot catalog is corrupt: {0}")]
    Corrupt(String),
    #[error("the snapshot catalog ends in the middle of an entry")]
    Truncated,
}

/// Appends `node` to `out` in catalog form.
pub fn encode_node(node: &Node, out: &mut Vec<u8>) {
    // Encoding into a Vec cannot run out of capacity.
    node.encode_length_delimited(out)
        .unwrap_or_else(|_| unreachable!("Vec<u8> grows as needed"));
}

/// Decodes catalog bytes arriving in pieces of any size.
#[derive(Default)]
pub struct CatalogDecoder {
    buf: BytesMut,
}

impl CatalogDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete node, if the bytes pushed so far hold one.
    pub fn next_node(&mut self) -> Result<Option<Node>, CatalogError> {
        if self.buf.is_empty() {
            return Ok(None);
        }
        let mut peek = &self.buf[..];
        let len = match prost::encoding::decode_varint(&mut peek) {
            Ok(len) => len as usize,
            // An incomplete varint: up to 10 bytes may be needed.
            Err(_) if self.buf.len() < 10 => return Ok(None),
            Err(e) => return Err(CatalogError::Corrupt(e.to_string())),
        };
        if len > MAX_NODE_BYTES {
            return Err(CatalogError::Corrupt(format!("entry of {len} bytes")));
        }
        let header = self.buf.len() - peek.len();
        if peek.len() < len {
            return Ok(None);
        }
        self.buf.advance(header);
        let body = self.buf.split_to(len);
        Node::decode(body.freeze())
            .map(Some)
            .map_err(|e| CatalogError::Corrupt(e.to_string()))
    }

    /// Call at the end of the input: fails if a partial node is left.
    pub fn finish(&self) -> Result<(), CatalogError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(CatalogError::Truncated)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_in_small_pieces() {
        let mut bytes = Vec::new();
        let nodes: Vec<Node> = (0..50)
            .map(|i| Node {
                path: format!("dir/file{i}").into_bytes().into(),
                size: i,
                chunks: vec![vec![i as u8; 32].into(); (i % 3) as usize],
                ..Default::default()
            })
            .collect();
        for n in &nodes {
            encode_node(n, &mut bytes);
        }
        let mut dec = CatalogDecoder::new();
        let mut out = Vec::new();
        for piece in bytes.chunks(7) {
            dec.push(piece);
            while let Some(n) = dec.next_node().unwrap() {
                out.push(n);
            }
        }
        dec.finish().unwrap();
        assert_eq!(out, nodes);
    }

    #[test]
    fn truncated_is_reported() {
        let mut bytes = Vec::new();
        encode_node(
            &Node {
                path: b"x".to_vec().into(),
                ..Default::default()
            },
            &mut bytes,
        );
        let mut dec = CatalogDecoder::new();
        dec.push(&bytes[..bytes.len() - 1]);
        assert!(dec.next_node().unwrap().is_none());
        assert!(dec.finish().is_err());
    }
}
