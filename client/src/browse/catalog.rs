//! A snapshot's catalog read in part: its marks (`CatalogIndex`) say where nodes begin in
//! its chunks, so a [`Cursor`] starts at the nearest mark before a path and skips whole
//! directory trees by jumping past them, instead of reading the catalog from its start.
//! Snapshots without marks (taken before they were recorded) are read from the start.

use std::cmp::Ordering;

use bytes::Bytes;
use datamover_core::catalog::CatalogDecoder;
use datamover_core::paths::walk_order;
use datamover_core::select::is_within;
use datamover_proto::v1::{self, Node};

use crate::ClientError;
use crate::connect::Api;

/// A snapshot and its catalog's marks.
pub struct Catalog {
    api: Api,
    pub snapshot: v1::Snapshot,
    chunks: u32,
    marks: Vec<v1::CatalogMark>,
}

impl Catalog {
    /// The catalog of `spec` (an id, a unique prefix of one, or a tag: its latest
    /// snapshot).
    pub async fn open(api: &Api, spec: &str) -> Result<Catalog, ClientError> {
        let r = api
            .clone()
            .catalog_index(v1::CatalogIndexRequest {
                snapshot: spec.to_string(),
            })
            .await
            .map_err(|s| match s.code() {
                tonic::Code::NotFound => ClientError::NotFound(format!(
                    "no snapshot with tag or id '{spec}' for this client: run `datamover-client list` to see what there is"
                )),
                _ => ClientError::from_status(s),
            })?
            .into_inner();
        let snapshot = r
            .snapshot
            .ok_or_else(|| ClientError::Server("the server sent no snapshot".into()))?;
        let sorted = r.marks.windows(2).all(|w| {
            w[0].chunk < w[1].chunk && walk_order(&w[0].path, &w[1].path) == Ordering::Less
        });
        if !sorted || r.marks.iter().any(|m| m.chunk >= r.chunks) {
            return Err(ClientError::Corrupt(format!(
                "the catalog index of snapshot {} is inconsistent: run verify on the server's repository",
                snapshot.id
            )));
        }
        Ok(Catalog {
            api: api.clone(),
            snapshot,
            chunks: r.chunks,
            marks: r.marks,
        })
    }

    /// Whether the catalog can be sought (it has marks).
    pub fn is_indexed(&self) -> bool {
        !self.marks.is_empty()
    }

    /// A cursor at the catalog's first node.
    pub fn cursor(&self) -> Cursor<'_> {
        Cursor {
            catalog: self,
            decoder: CatalogDecoder::new(),
            stream: None,
            next_chunk: 0,
            skip_offset: 0,
            within: None,
            peeked: None,
            jumps: 0,
        }
    }

    /// A cursor at or before the first node at or after `path` in walk order: nodes
    /// before `path` may come first (the caller skips them).
    pub fn cursor_at(&self, path: &[u8]) -> Cursor<'_> {
        let mut c = self.cursor();
        let i = self
            .marks
            .partition_point(|m| walk_order(&m.path, path) != Ordering::Greater);
        if let Some(m) = i.checked_sub(1).and_then(|i| self.marks.get(i)) {
            c.next_chunk = m.chunk;
            c.skip_offset = m.offset as usize;
        }
        c
    }

    /// The node at `path`, if the snapshot has one.
    pub async fn find(&self, path: &[u8]) -> Result<Option<Node>, ClientError> {
        let mut c = self.cursor_at(path);
        while let Some(n) = c.next().await? {
            match walk_order(&n.path, path) {
                Ordering::Less => continue,
                Ordering::Equal => return Ok(Some(n)),
                Ordering::Greater => return Ok(None),
            }
        }
        Ok(None)
    }

    /// The last mark inside the tree of `dir`: from there, the nodes left in the tree
    /// are within one chunk's reach of its end.
    fn last_mark_in_tree(&self, dir: &[u8]) -> Option<&v1::CatalogMark> {
        let i = self.marks.partition_point(|m| {
            walk_order(&m.path, dir) != Ordering::Greater || is_within(&m.path, dir)
        });
        i.checked_sub(1)
            .and_then(|i| self.marks.get(i))
            .filter(|m| is_within(&m.path, dir))
    }
}

/// Reads nodes in walk order from a position in the catalog.
pub struct Cursor<'a> {
    catalog: &'a Catalog,
    decoder: CatalogDecoder,
    stream: Option<tonic::Streaming<v1::ReadCatalogResponse>>,
    /// The chunk the stream starts at (or the next one it will send).
    next_chunk: u32,
    /// Bytes to drop from the next chunk (a mark's offset).
    skip_offset: usize,
    /// Nodes within this directory are skipped (see [`Cursor::skip_tree`]).
    within: Option<Bytes>,
    peeked: Option<Node>,
    jumps: u64,
}

impl Cursor<'_> {
    /// The next node, or `None` at the catalog's end.
    pub async fn next(&mut self) -> Result<Option<Node>, ClientError> {
        if let Some(n) = self.peeked.take() {
            return Ok(Some(n));
        }
        loop {
            let corrupt = |e: datamover_core::catalog::CatalogError| {
                ClientError::Corrupt(format!(
                    "the catalog of snapshot {} is damaged ({e}): run verify on the server's repository",
                    self.catalog.snapshot.id
                ))
            };
            if let Some(n) = self.decoder.next_node().map_err(corrupt)? {
                match &self.within {
                    Some(dir) if is_within(&n.path, dir) => continue,
                    Some(_) => self.within = None,
                    None => {}
                }
                return Ok(Some(n));
            }
            if self.next_chunk >= self.catalog.chunks && self.stream.is_none() {
                self.decoder.finish().map_err(corrupt)?;
                return Ok(None);
            }
            let data = self.next_chunk_data().await?;
            match data {
                Some(d) => {
                    let skip = std::mem::take(&mut self.skip_offset);
                    let piece = d.get(skip..).ok_or_else(|| {
                        ClientError::Corrupt(format!(
                            "a catalog mark of snapshot {} lies beyond its chunk: run verify on the server's repository",
                            self.catalog.snapshot.id
                        ))
                    })?;
                    self.decoder.push(piece);
                }
                None => {
                    self.decoder.finish().map_err(corrupt)?;
                    return Ok(None);
                }
            }
        }
    }

    /// Puts a node back: the next call returns it.
    pub fn push_back(&mut self, n: Node) {
        self.peeked = Some(n);
    }

    async fn next_chunk_data(&mut self) -> Result<Option<Bytes>, ClientError> {
        if self.stream.is_none() {
            if self.next_chunk >= self.catalog.chunks {
                return Ok(None);
            }
            let s = self
                .catalog
                .api
                .clone()
                .read_catalog(v1::ReadCatalogRequest {
                    snapshot_id: self.catalog.snapshot.id.clone(),
                    encoded: true,
                    first_chunk: self.next_chunk,
                    chunk_count: 0,
                })
                .await?
                .into_inner();
            self.stream = Some(s);
        }
        let Some(stream) = self.stream.as_mut() else {
            return Ok(None);
        };
        match stream.message().await? {
            Some(m) => {
                self.next_chunk += 1;
                Ok(Some(m.encoded))
            }
            None => {
                self.stream = None;
                if self.next_chunk < self.catalog.chunks {
                    return Err(ClientError::Server(format!(
                        "the server ended the catalog of snapshot {} early, at chunk {} of {}: retry",
                        self.catalog.snapshot.id, self.next_chunk, self.catalog.chunks
                    )));
                }
                Ok(None)
            }
        }
    }

    /// Skips the rest of the tree of directory `dir` (whose node was just read): the
    /// cursor jumps to the tree's last mark when that lies beyond the chunks read, and
    /// drops the tree's nodes from there.
    pub fn skip_tree(&mut self, dir: &[u8]) {
        self.peeked = self.peeked.take().filter(|n| !is_within(&n.path, dir));
        if let Some(m) = self.catalog.last_mark_in_tree(dir)
            && m.chunk > self.next_chunk
        {
            self.stream = None;
            self.decoder = CatalogDecoder::new();
            self.next_chunk = m.chunk;
            self.skip_offset = m.offset as usize;
            self.jumps += 1;
        }
        self.within = Some(Bytes::copy_from_slice(dir));
    }

    /// How many times the cursor jumped over part of the catalog.
    pub fn jumps(&self) -> u64 {
        self.jumps
    }
}
