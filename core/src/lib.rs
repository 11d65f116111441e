//! # datamover-core: the data model shared by client and server
//!
//! - [`chunk`]: content-defined chunking (FastCDC) and keyed BLAKE3 chunk ids. The client
//!   cuts and identifies chunks; the server checks every received chunk against its id.
//! - [`catalog`]: a snapshot's tree as a stream of length-delimited
//!   [`Node`](datamover_proto::v1::Node) messages in walk order. The catalog is itself
//!   chunked and deduplicated like file data, so an unchanged tree costs nothing to store
//!   and a tree of millions of files is never held in memory whole.
//! - [`paths`]: the walk order, and the checks that keep a restore inside its target.
//! - [`select`]: which paths a partial restore or a `find` selects (a subtree, include
//!   and exclude globs), the same on both sides.
//!
//! Storage, encryption and the repository layout are the server's alone
//! (`datamover-repo`); the client never links them.

pub mod catalog;
pub mod chunk;
pub mod fuzz;
pub mod paths;
pub mod select;
