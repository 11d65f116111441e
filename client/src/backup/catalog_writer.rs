//! The catalog as a backup writes it: encoded nodes cut into content-defined chunks, and
//! the marks that make it seekable (where the first node of each chunk begins, and its
//! path), which the server keeps with the snapshot.

use std::collections::VecDeque;

use bytes::Bytes;
use datamover_core::catalog::encode_node;
use datamover_core::chunk::{ChunkId, ChunkerParams};
use datamover_proto::v1::{CatalogMark, Node};

/// Cutting a buffer holding more than one maximal chunk and keeping the last (possibly
/// short) piece gives exactly the cuts of the whole stream, so unchanged trees dedup.
#[derive(Default)]
pub(super) struct CatalogWriter {
    buf: Vec<u8>,
    pub(super) ids: Vec<ChunkId>,
    /// Offset in the whole catalog stream of `buf[0]`.
    base: u64,
    /// Nodes that begin in `buf`: their stream offsets and paths, in order. Bounded by
    /// the buffer, which is cut once it holds four maximal chunks.
    starts: VecDeque<(u64, Bytes)>,
    /// Chunks cut so far: the index of the next one.
    cut: u32,
    pub(super) marks: Vec<CatalogMark>,
}

impl CatalogWriter {
    pub(super) fn add(&mut self, node: &Node, p: ChunkerParams) -> Vec<Vec<u8>> {
        self.starts
            .push_back((self.base + self.buf.len() as u64, node.path.clone()));
        encode_node(node, &mut self.buf);
        if self.buf.len() < 4 * p.max_size as usize {
            return Vec::new();
        }
        self.cut(p, false)
    }

    pub(super) fn finish(&mut self, p: ChunkerParams) -> Vec<Vec<u8>> {
        self.cut(p, true)
    }

    fn cut(&mut self, p: ChunkerParams, all: bool) -> Vec<Vec<u8>> {
        let cuts: Vec<(usize, usize)> =
            fastcdc::v2020::FastCDC::new(&self.buf, p.min_size, p.avg_size, p.max_size)
                .map(|c| (c.offset, c.length))
                .collect();
        let keep = if all {
            cuts.len()
        } else {
            cuts.len().saturating_sub(1)
        };
        let mut out = Vec::with_capacity(keep);
        let mut end = 0;
        for (off, len) in cuts.into_iter().take(keep) {
            out.push(self.buf[off..off + len].to_vec());
            end = off + len;
            let (start, stop) = (self.base + off as u64, self.base + end as u64);
            if let Some((at, path)) = self.starts.front()
                && *at >= start
                && *at < stop
            {
                self.marks.push(CatalogMark {
                    chunk: self.cut,
                    // Below the chunk's length, a u32.
                    offset: (*at - start) as u32,
                    path: path.clone(),
                });
            }
            while self.starts.front().is_some_and(|(at, _)| *at < stop) {
                self.starts.pop_front();
            }
            self.cut += 1;
        }
        self.buf.drain(..end);
        self.base += end as u64;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datamover_core::catalog::CatalogDecoder;

    const P: ChunkerParams = ChunkerParams {
        min_size: 4096,
        avg_size: 16384,
        max_size: 65536,
    };

    fn nodes() -> Vec<Node> {
        (0..20000u64)
            .map(|i| Node {
                path: format!("dir{}/file-{i}", i % 37).into_bytes().into(),
                size: i,
                // Now and then a node longer than a chunk (a large file's chunk list).
                chunks: if i % 5000 == 7 {
                    (0..10_000u32)
                        .map(|c| Bytes::from(c.to_le_bytes().repeat(8)))
                        .collect()
                } else {
                    Vec::new()
                },
                ..Default::default()
            })
            .collect()
    }

    #[test]
    fn catalog_cuts_match_whole_stream() {
        let nodes = nodes();
        let mut whole = Vec::new();
        for n in &nodes {
            encode_node(n, &mut whole);
        }
        let expected: Vec<Vec<u8>> =
            fastcdc::v2020::FastCDC::new(&whole, P.min_size, P.avg_size, P.max_size)
                .map(|c| whole[c.offset..c.offset + c.length].to_vec())
                .collect();
        let mut w = CatalogWriter::default();
        let mut got = Vec::new();
        for n in &nodes {
            got.extend(w.add(n, P));
        }
        got.extend(w.finish(P));
        assert_eq!(got, expected);
    }

    #[test]
    fn each_mark_is_where_its_node_begins() {
        let nodes = nodes();
        let mut w = CatalogWriter::default();
        let mut chunks = Vec::new();
        for n in &nodes {
            chunks.extend(w.add(n, P));
        }
        chunks.extend(w.finish(P));
        assert!(w.marks.len() > 10, "{} marks", w.marks.len());
        assert!(
            w.marks.len() < chunks.len(),
            "a chunk inside a large node has no mark"
        );
        for m in &w.marks {
            // Decoding from the mark gives the node it names, then the rest in order.
            let mut d = CatalogDecoder::new();
            d.push(&chunks[m.chunk as usize][m.offset as usize..]);
            for c in &chunks[m.chunk as usize + 1..] {
                d.push(c);
            }
            let first = d.next_node().expect("decodes").expect("a node");
            assert_eq!(first.path, m.path);
            let i = nodes.iter().position(|n| n.path == m.path).expect("known");
            assert_eq!(first, nodes[i]);
        }
        // Marks are in chunk order, one at most per chunk.
        assert!(w.marks.windows(2).all(|p| p[0].chunk < p[1].chunk));
    }
}
