//! gRPC message framing: each message is a 5-byte prefix (compressed flag, u32
//! big-endian length) and the protobuf bytes. Frames and HTTP/2 DATA frames are
//! independent: one DATA frame may hold parts of several messages and a message
//! may span many DATA frames.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::Message;

use super::status::{Code, Status};

pub const PREFIX_LEN: usize = 5;

/// Frames `message` for the wire.
pub fn encode<M: Message>(message: &M, max_message_size: usize) -> Result<Bytes, Status> {
    let len = message.encoded_len();
    if len > max_message_size || len > u32::MAX as usize {
        return Err(Status::new(
            Code::ResourceExhausted,
            format!(
                "request message is {} bytes, over the {} byte limit: send fewer or shorter texts per call",
                len, max_message_size
            ),
        ));
    }
    let mut buf = BytesMut::with_capacity(PREFIX_LEN + len);
    buf.put_u8(0); // not compressed: this client never negotiates compression
    buf.put_u32(len as u32);
    message
        .encode(&mut buf)
        .map_err(|e| Status::internal(format!("encoding the request: {}", e)))?;
    Ok(buf.freeze())
}

/// Decodes one message's protobuf bytes.
pub fn decode<M: Message + Default>(payload: Bytes) -> Result<M, Status> {
    M::decode(payload).map_err(|e| Status::internal(format!("malformed response message: {}", e)))
}

/// Reassembles messages from the chunks HTTP/2 hands over.
pub struct Decoder {
    buf: BytesMut,
    max_message_size: usize,
}

impl Decoder {
    pub fn new(max_message_size: usize) -> Decoder {
        Decoder {
            buf: BytesMut::new(),
            max_message_size,
        }
    }

    pub fn push(&mut self, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
    }

    /// The next complete message's payload, or `None` until more bytes arrive.
    pub fn next_message(&mut self) -> Result<Option<Bytes>, Status> {
        if self.buf.len() < PREFIX_LEN {
            return Ok(None);
        }
        let compressed = self.buf[0];
        let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
        match compressed {
            0 => {}
            1 => {
                return Err(Status::internal(
                    "server sent a compressed message, but this client accepts none",
                ))
            }
            other => {
                return Err(Status::internal(format!(
                    "invalid compressed flag {} in message prefix",
                    other
                )))
            }
        }
        if len > self.max_message_size {
            return Err(Status::new(
                Code::ResourceExhausted,
                format!(
                    "response message is {} bytes, over the client's {} byte limit",
                    len, self.max_message_size
                ),
            ));
        }
        if self.buf.len() < PREFIX_LEN + len {
            // Reserve once for the whole message rather than growing per chunk.
            self.buf.reserve(PREFIX_LEN + len - self.buf.len());
            return Ok(None);
        }
        self.buf.advance(PREFIX_LEN);
        Ok(Some(self.buf.split_to(len).freeze()))
    }

    /// Bytes of an incomplete message are buffered (an error at end of stream).
    pub fn has_partial(&self) -> bool {
        !self.buf.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb;

    fn request(n: usize) -> pb::EmbedRequest {
        pb::EmbedRequest {
            model: "m".into(),
            texts: (0..n).map(|i| format!("text {}", i)).collect(),
            options: None,
        }
    }

    #[test]
    fn prefix_is_flag_and_big_endian_length() {
        let msg = request(3);
        let framed = encode(&msg, usize::MAX).unwrap();
        let len = msg.encoded_len();
        assert_eq!(framed[0], 0);
        assert_eq!(&framed[1..5], &(len as u32).to_be_bytes());
        assert_eq!(framed.len(), PREFIX_LEN + len);
    }

    #[test]
    fn reassembles_messages_split_at_every_byte() {
        let a = request(2);
        let b = request(50);
        let empty = pb::EmbedRequest::default(); // zero-length payload is legal
        let mut wire = Vec::new();
        for m in [&a, &empty, &b] {
            wire.extend_from_slice(&encode(m, usize::MAX).unwrap());
        }
        for chunk_size in [1usize, 2, 3, 5, 7, 64, wire.len()] {
            let mut d = Decoder::new(usize::MAX);
            let mut out: Vec<pb::EmbedRequest> = Vec::new();
            for chunk in wire.chunks(chunk_size) {
                d.push(chunk);
                while let Some(p) = d.next_message().unwrap() {
                    out.push(decode(p).unwrap());
                }
            }
            assert_eq!(
                out,
                vec![a.clone(), empty.clone(), b.clone()],
                "chunk {}",
                chunk_size
            );
            assert!(!d.has_partial());
        }
    }

    #[test]
    fn partial_message_is_reported() {
        let wire = encode(&request(4), usize::MAX).unwrap();
        let mut d = Decoder::new(usize::MAX);
        d.push(&wire[..wire.len() - 1]);
        assert!(d.next_message().unwrap().is_none());
        assert!(d.has_partial());
    }

    #[test]
    fn rejects_oversized_and_compressed() {
        let wire = encode(&request(100), usize::MAX).unwrap();
        let mut d = Decoder::new(10);
        d.push(&wire);
        assert_eq!(
            d.next_message().unwrap_err().code(),
            Code::ResourceExhausted
        );

        let mut d = Decoder::new(usize::MAX);
        d.push(&[1, 0, 0, 0, 0]);
        assert_eq!(d.next_message().unwrap_err().code(), Code::Internal);

        assert_eq!(
            encode(&request(100), 10).unwrap_err().code(),
            Code::ResourceExhausted
        );
    }

    #[test]
    fn garbage_payload_is_internal() {
        let err = decode::<pb::EmbedRequest>(Bytes::from_static(&[0xff, 0xff, 0xff])).unwrap_err();
        assert_eq!(err.code(), Code::Internal);
    }
}
