//! Typed vectors per `Encoding`, decoded from an `EmbeddingBatch`'s packed buffer, and the
//! windows of chunked texts (`TRUNCATION_POLICY_CHUNK`).
//!
//! ```
//! use akidb_embed_client::encoding::{decode_rows, Vectors};
//! use akidb_embed_client::pb;
//! let batch = pb::EmbeddingBatch {
//!     vectors: vec![0x80u8, 0x7f].into(),
//!     dimensions: 8,
//!     encoding: pb::Encoding::Binary as i32,
//!     ..Default::default()
//! };
//! let rows = decode_rows(&batch).unwrap();
//! assert_eq!(rows.len(), 2);
//! assert_eq!(rows[0], Vectors::Binary(vec![-128])); // packed bits 0x00, minus 128
//! assert!(!rows[0].bits().unwrap().get(0));
//! ```
use std::fmt;

use crate::pb;

/// One row in its encoding. Values follow sentence-transformers' `quantize_embeddings`.
#[derive(Debug, Clone, PartialEq)]
pub enum Vectors {
    /// `dimensions` float32 values.
    Float32(Vec<f32>),
    /// `dimensions` IEEE half-precision values, as their bit patterns (`f16_to_f32`).
    Float16(Vec<u16>),
    /// `dimensions` buckets minus 128 (`dequantize` with the model's ranges).
    Int8(Vec<i8>),
    /// `dimensions` buckets, 0..=255.
    Uint8(Vec<u8>),
    /// `ceil(dimensions / 8)` bytes of packed sign bits, each byte minus 128.
    Binary(Vec<i8>),
    /// The same bits as unsigned bytes.
    Ubinary(Vec<u8>),
}

/// Sign bits of one vector: bit `i` is true when dimension `i` was > 0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitVector {
    /// Packed, first dimension in the most significant bit (numpy `packbits`).
    pub bytes: Vec<u8>,
    pub dimensions: usize,
}

impl BitVector {
    pub fn get(&self, index: usize) -> bool {
        index < self.dimensions && self.bytes[index / 8] & (0x80 >> (index % 8)) != 0
    }

    /// Dimensions whose signs differ (the distance binary indexes use).
    pub fn hamming(&self, other: &BitVector) -> u32 {
        self.bytes
            .iter()
            .zip(&other.bytes)
            .map(|(a, b)| (a ^ b).count_ones())
            .sum()
    }
}

/// Why a batch could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// An encoding number this client does not know (a newer server).
    UnknownEncoding(i32),
    /// The buffer is not a whole number of rows.
    Length { bytes: usize, row_bytes: usize },
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::UnknownEncoding(value) => write!(f, "unknown encoding {}", value),
            DecodeError::Length { bytes, row_bytes } => {
                write!(
                    f,
                    "{} bytes are not whole rows of {} bytes",
                    bytes, row_bytes
                )
            }
        }
    }
}

impl std::error::Error for DecodeError {}

/// The batch's encoding; UNSPECIFIED reads as float32.
pub fn encoding_of(batch: &pb::EmbeddingBatch) -> Result<pb::Encoding, DecodeError> {
    match pb::Encoding::from_i32(batch.encoding) {
        Some(pb::Encoding::Unspecified) => Ok(pb::Encoding::Float32),
        Some(encoding) => Ok(encoding),
        None => Err(DecodeError::UnknownEncoding(batch.encoding)),
    }
}

/// Bytes of one row of `dimensions` values in `encoding`.
pub fn row_bytes(encoding: pb::Encoding, dimensions: usize) -> usize {
    match encoding {
        pb::Encoding::Unspecified | pb::Encoding::Float32 => 4 * dimensions,
        pb::Encoding::Float16 => 2 * dimensions,
        pb::Encoding::Int8 | pb::Encoding::Uint8 => dimensions,
        pb::Encoding::Binary | pb::Encoding::Ubinary => (dimensions + 7) / 8,
    }
}

/// Every row of the batch, typed by its encoding.
pub fn decode_rows(batch: &pb::EmbeddingBatch) -> Result<Vec<Vectors>, DecodeError> {
    let encoding = encoding_of(batch)?;
    let dimensions = batch.dimensions as usize;
    let width = row_bytes(encoding, dimensions);
    let data: &[u8] = &batch.vectors;
    if width == 0 {
        return if data.is_empty() {
            Ok(Vec::new())
        } else {
            Err(DecodeError::Length {
                bytes: data.len(),
                row_bytes: 0,
            })
        };
    }
    if data.len() % width != 0 {
        return Err(DecodeError::Length {
            bytes: data.len(),
            row_bytes: width,
        });
    }
    Ok(data
        .chunks_exact(width)
        .map(|row| decode_row(encoding, row))
        .collect())
}

fn decode_row(encoding: pb::Encoding, row: &[u8]) -> Vectors {
    match encoding {
        pb::Encoding::Unspecified | pb::Encoding::Float32 => Vectors::Float32(
            row.chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
        ),
        pb::Encoding::Float16 => Vectors::Float16(
            row.chunks_exact(2)
                .map(|b| u16::from_le_bytes([b[0], b[1]]))
                .collect(),
        ),
        pb::Encoding::Int8 => Vectors::Int8(row.iter().map(|&b| b as i8).collect()),
        pb::Encoding::Uint8 => Vectors::Uint8(row.to_vec()),
        pb::Encoding::Binary => Vectors::Binary(row.iter().map(|&b| b as i8).collect()),
        pb::Encoding::Ubinary => Vectors::Ubinary(row.to_vec()),
    }
}

/// IEEE half precision (bit pattern) to f32, exactly.
pub fn f16_to_f32(bits: u16) -> f32 {
    let sign = if bits & 0x8000 != 0 { -1.0f32 } else { 1.0 };
    let exponent = ((bits >> 10) & 0x1f) as i32;
    let mantissa = (bits & 0x3ff) as f32;
    match exponent {
        0 => sign * mantissa * 2f32.powi(-24),
        31 if mantissa == 0.0 => sign * f32::INFINITY,
        31 => f32::NAN,
        _ => sign * (1.0 + mantissa / 1024.0) * 2f32.powi(exponent - 15),
    }
}

impl Vectors {
    /// Values of this row (bits for the binary encodings, not bytes).
    pub fn dimensions(&self, batch_dimensions: usize) -> usize {
        match self {
            Vectors::Float32(v) => v.len(),
            Vectors::Float16(v) => v.len(),
            Vectors::Int8(v) => v.len(),
            Vectors::Uint8(v) => v.len(),
            Vectors::Binary(_) | Vectors::Ubinary(_) => batch_dimensions,
        }
    }

    /// The sign bits of a binary / ubinary row.
    pub fn bits(&self) -> Option<BitVector> {
        let bytes: Vec<u8> = match self {
            Vectors::Binary(v) => v.iter().map(|&b| (b as u8) ^ 0x80).collect(),
            Vectors::Ubinary(v) => v.clone(),
            _ => return None,
        };
        let dimensions = bytes.len() * 8;
        Some(BitVector { bytes, dimensions })
    }

    /// float32 values: exact for float32 / float16; int8 / uint8 dequantised with the
    /// model's ranges (ListModels) as `min + bucket * step`; None for the bit encodings or
    /// without ranges of the right size.
    pub fn to_f32(&self, ranges: Option<&pb::QuantizationRanges>) -> Option<Vec<f32>> {
        match self {
            Vectors::Float32(v) => Some(v.clone()),
            Vectors::Float16(v) => Some(v.iter().map(|&b| f16_to_f32(b)).collect()),
            Vectors::Int8(v) => dequantize(v.iter().map(|&q| q as f64 + 128.0), v.len(), ranges),
            Vectors::Uint8(v) => dequantize(v.iter().map(|&q| q as f64), v.len(), ranges),
            Vectors::Binary(_) | Vectors::Ubinary(_) => None,
        }
    }
}

fn dequantize(
    buckets: impl Iterator<Item = f64>,
    len: usize,
    ranges: Option<&pb::QuantizationRanges>,
) -> Option<Vec<f32>> {
    let ranges = ranges?;
    if ranges.min.len() != len || ranges.max.len() != len {
        return None;
    }
    Some(
        buckets
            .zip(ranges.min.iter().zip(&ranges.max))
            .map(|(q, (&lo, &hi))| {
                let step = (hi - lo) / 255.0;
                let step = if step == 0.0 { 1.0 } else { step };
                (q * step as f64 + lo as f64) as f32
            })
            .collect(),
    )
}

/// One window of a chunked text: `&text[byte_start..byte_end]` in Rust, code points
/// `char_start..char_end` in Python.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk {
    pub index: u32,
    pub char_start: u32,
    pub char_end: u32,
    pub byte_start: u32,
    pub byte_end: u32,
}

/// Per row, its window (empty unless the request chunked).
pub fn chunks(batch: &pb::EmbeddingBatch) -> Vec<Chunk> {
    (0..batch.chunk_index.len())
        .map(|i| Chunk {
            index: batch.chunk_index[i],
            char_start: batch.char_start[i],
            char_end: batch.char_end[i],
            byte_start: batch.byte_start[i],
            byte_end: batch.byte_end[i],
        })
        .collect()
}

/// Row ranges per text: one row each, or `chunk_counts[i]` consecutive rows when chunked.
pub fn rows_per_text(batch: &pb::EmbeddingBatch, rows: usize) -> Vec<std::ops::Range<usize>> {
    if batch.chunk_counts.is_empty() {
        return (0..rows).map(|i| i..i + 1).collect();
    }
    let mut start = 0;
    batch
        .chunk_counts
        .iter()
        .map(|&count| {
            let range = start..start + count as usize;
            start = range.end;
            range
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(encoding: pb::Encoding, dimensions: u32, bytes: Vec<u8>) -> pb::EmbeddingBatch {
        pb::EmbeddingBatch {
            vectors: bytes.into(),
            dimensions,
            encoding: encoding as i32,
            ..Default::default()
        }
    }

    #[test]
    fn encoding_float32_and_unspecified_rows() {
        let values = [1.5f32, -2.0, 0.25, 8.0];
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        for encoding in [pb::Encoding::Float32, pb::Encoding::Unspecified] {
            let rows = decode_rows(&batch(encoding, 2, bytes.clone())).unwrap();
            assert_eq!(
                rows,
                vec![
                    Vectors::Float32(vec![1.5, -2.0]),
                    Vectors::Float32(vec![0.25, 8.0])
                ]
            );
        }
    }

    #[test]
    fn encoding_float16_converts_exactly() {
        // 1.0, -2.5, 65504 (max), 2^-24 (smallest subnormal)
        let halves = [0x3c00u16, 0xc100, 0x7bff, 0x0001];
        let bytes: Vec<u8> = halves.iter().flat_map(|v| v.to_le_bytes()).collect();
        let rows = decode_rows(&batch(pb::Encoding::Float16, 4, bytes)).unwrap();
        assert_eq!(rows[0], Vectors::Float16(halves.to_vec()));
        let values = rows[0].to_f32(None).unwrap();
        assert_eq!(values, vec![1.0, -2.5, 65504.0, 2f32.powi(-24)]);
        assert!(f16_to_f32(0x7c00).is_infinite() && f16_to_f32(0x7e00).is_nan());
    }

    #[test]
    fn encoding_int8_uint8_dequantize_with_ranges() {
        let ranges = pb::QuantizationRanges {
            dimensions: 2,
            normalized: true,
            min: vec![-1.0, 0.0],
            max: vec![1.0, 0.0],
            ..Default::default()
        };
        let int8 = decode_rows(&batch(pb::Encoding::Int8, 2, vec![0x80, 0x7f])).unwrap();
        assert_eq!(int8[0], Vectors::Int8(vec![-128, 127]));
        // bucket 0 -> min; step 0 counts as 1 (sentence-transformers).
        assert_eq!(int8[0].to_f32(Some(&ranges)).unwrap(), vec![-1.0, 255.0]);
        let uint8 = decode_rows(&batch(pb::Encoding::Uint8, 2, vec![255, 1])).unwrap();
        assert_eq!(uint8[0], Vectors::Uint8(vec![255, 1]));
        let values = uint8[0].to_f32(Some(&ranges)).unwrap();
        assert!((values[0] - 1.0).abs() < 1e-6 && values[1] == 1.0);
        assert_eq!(uint8[0].to_f32(None), None);
    }

    #[test]
    fn encoding_binary_bits_and_hamming() {
        // Dimensions 0 and 9 positive of 10: bytes 0b1000_0000, 0b0100_0000.
        let ubinary = decode_rows(&batch(pb::Encoding::Ubinary, 10, vec![0x80, 0x40])).unwrap();
        let binary = decode_rows(&batch(pb::Encoding::Binary, 10, vec![0x00, 0xc0])).unwrap();
        assert_eq!(ubinary[0], Vectors::Ubinary(vec![0x80, 0x40]));
        assert_eq!(binary[0], Vectors::Binary(vec![0, -64]));
        let (a, b) = (ubinary[0].bits().unwrap(), binary[0].bits().unwrap());
        assert_eq!(a, b);
        assert!(a.get(0) && a.get(9) && !a.get(1) && !a.get(8));
        let other = BitVector {
            bytes: vec![0x00, 0x40],
            dimensions: 16,
        };
        assert_eq!(a.hamming(&other), 1);
        assert_eq!(binary[0].dimensions(10), 10);
    }

    #[test]
    fn encoding_errors_and_empty_batches() {
        assert_eq!(
            decode_rows(&batch(pb::Encoding::Float32, 0, vec![])).unwrap(),
            vec![]
        );
        assert_eq!(
            decode_rows(&batch(pb::Encoding::Float32, 2, vec![0; 12])),
            Err(DecodeError::Length {
                bytes: 12,
                row_bytes: 8
            })
        );
        let mut unknown = batch(pb::Encoding::Float32, 2, vec![0; 8]);
        unknown.encoding = 99;
        assert_eq!(decode_rows(&unknown), Err(DecodeError::UnknownEncoding(99)));
    }

    #[test]
    fn encoding_chunks_group_rows_by_text() {
        let mut b = batch(pb::Encoding::Float32, 1, vec![0; 12]);
        b.chunk_counts = vec![2, 1];
        b.chunk_index = vec![0, 1, 0];
        b.char_start = vec![0, 4, 0];
        b.char_end = vec![6, 11, 3];
        b.byte_start = vec![0, 5, 0];
        b.byte_end = vec![7, 13, 3];
        assert_eq!(rows_per_text(&b, 3), vec![0..2, 2..3]);
        let text = "héllo wörld";
        let second = chunks(&b)[1];
        assert_eq!(second.index, 1);
        assert_eq!(
            &text[second.byte_start as usize..second.byte_end as usize],
            "o wörld"
        );
        let chars: String = text.chars().skip(4).take(7).collect();
        assert_eq!(chars, "o wörld");
        assert_eq!(
            rows_per_text(&batch(pb::Encoding::Float32, 1, vec![0; 8]), 2),
            vec![0..1, 1..2]
        );
    }
}
