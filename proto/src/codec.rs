//! The gRPC codec of `datamover-v1`: prost's, except that each message's buffer is
//! sized once, before it is encoded.
//!
//! tonic's prost encoder writes a message into a buffer that starts small and doubles
//! as it fills. For our 4 MiB batches (chunks going up, restore items coming down) that
//! meant about six reallocations per message, each copying what was written so far
//! into fresh memory the kernel had to fault in and zero: about as many bytes copied
//! again as the message holds, and most of the server's page faults during a restore.
//! Reserving the encoded length first makes it one allocation, reused by the heap from
//! message to message. Decoding is prost's, unchanged: tonic reserves a message's
//! length from its header already.

use std::marker::PhantomData;

use prost::Message;
use tonic::Status;
use tonic::codec::{Codec, EncodeBuf, Encoder, ProstCodec};

/// prost encoding with the buffer reserved for the whole message first.
#[derive(Debug, Clone)]
pub struct SizedCodec<T, U> {
    _pd: PhantomData<(T, U)>,
}

impl<T, U> Default for SizedCodec<T, U> {
    fn default() -> Self {
        SizedCodec { _pd: PhantomData }
    }
}

impl<T, U> Codec for SizedCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = SizedEncoder<T>;
    type Decoder = <ProstCodec<T, U> as Codec>::Decoder;

    fn encoder(&mut self) -> Self::Encoder {
        SizedEncoder { _pd: PhantomData }
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::default().decoder()
    }
}

/// Encodes a prost message into a buffer reserved for its encoded length.
#[derive(Debug, Clone, Default)]
pub struct SizedEncoder<T> {
    _pd: PhantomData<T>,
}

impl<T: Message> Encoder for SizedEncoder<T> {
    type Item = T;
    type Error = Status;

    fn encode(&mut self, item: T, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        buf.reserve(item.encoded_len());
        item.encode(buf)
            .map_err(|e| Status::internal(format!("cannot encode a message: {e}")))
    }
}
