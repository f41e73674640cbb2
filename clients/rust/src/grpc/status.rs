//! gRPC status codes and the error every call returns.
//!
//! Maps what can end a call onto a `Status`: `grpc-status` / `grpc-message` in
//! trailers (or in a trailers-only response), non-200 HTTP responses (gRPC's
//! HTTP-to-status table), HTTP/2 stream resets and connection errors.

use std::fmt;

use http::HeaderMap;
use percent_encoding::percent_decode;

/// The canonical gRPC status codes (`google.rpc.Code`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Code {
    Ok = 0,
    Cancelled = 1,
    Unknown = 2,
    InvalidArgument = 3,
    DeadlineExceeded = 4,
    NotFound = 5,
    AlreadyExists = 6,
    PermissionDenied = 7,
    ResourceExhausted = 8,
    FailedPrecondition = 9,
    Aborted = 10,
    OutOfRange = 11,
    Unimplemented = 12,
    Internal = 13,
    Unavailable = 14,
    DataLoss = 15,
    Unauthenticated = 16,
}

impl Code {
    /// The code for a number on the wire; numbers outside the table are `Unknown`
    /// (as the gRPC spec asks).
    pub fn from_u32(value: u32) -> Code {
        match value {
            0 => Code::Ok,
            1 => Code::Cancelled,
            2 => Code::Unknown,
            3 => Code::InvalidArgument,
            4 => Code::DeadlineExceeded,
            5 => Code::NotFound,
            6 => Code::AlreadyExists,
            7 => Code::PermissionDenied,
            8 => Code::ResourceExhausted,
            9 => Code::FailedPrecondition,
            10 => Code::Aborted,
            11 => Code::OutOfRange,
            12 => Code::Unimplemented,
            13 => Code::Internal,
            14 => Code::Unavailable,
            15 => Code::DataLoss,
            16 => Code::Unauthenticated,
            _ => Code::Unknown,
        }
    }

    pub fn as_u32(self) -> u32 {
        self as u32
    }

    /// The name as the gRPC spec writes it, e.g. `NOT_FOUND`.
    pub fn name(self) -> &'static str {
        match self {
            Code::Ok => "OK",
            Code::Cancelled => "CANCELLED",
            Code::Unknown => "UNKNOWN",
            Code::InvalidArgument => "INVALID_ARGUMENT",
            Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
            Code::NotFound => "NOT_FOUND",
            Code::AlreadyExists => "ALREADY_EXISTS",
            Code::PermissionDenied => "PERMISSION_DENIED",
            Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
            Code::FailedPrecondition => "FAILED_PRECONDITION",
            Code::Aborted => "ABORTED",
            Code::OutOfRange => "OUT_OF_RANGE",
            Code::Unimplemented => "UNIMPLEMENTED",
            Code::Internal => "INTERNAL",
            Code::Unavailable => "UNAVAILABLE",
            Code::DataLoss => "DATA_LOSS",
            Code::Unauthenticated => "UNAUTHENTICATED",
        }
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A call's outcome other than success: the server's status code and message, or
/// one the client derived (connection lost, deadline passed, malformed response).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    code: Code,
    message: String,
}

impl Status {
    pub fn new(code: Code, message: impl Into<String>) -> Status {
        Status {
            code,
            message: message.into(),
        }
    }

    pub fn code(&self) -> Code {
        self.code
    }

    pub fn message(&self) -> &str {
        &self.message
    }

    pub fn is_ok(&self) -> bool {
        self.code == Code::Ok
    }

    pub(crate) fn internal(message: impl Into<String>) -> Status {
        Status::new(Code::Internal, message)
    }

    pub(crate) fn unavailable(message: impl Into<String>) -> Status {
        Status::new(Code::Unavailable, message)
    }

    pub(crate) fn deadline_exceeded() -> Status {
        Status::new(
            Code::DeadlineExceeded,
            "deadline exceeded before the call completed",
        )
    }

    /// The status in `grpc-status` / `grpc-message`, if `headers` carries one
    /// (trailers, or the headers of a trailers-only response).
    pub fn from_headers(headers: &HeaderMap) -> Option<Status> {
        let raw = headers.get("grpc-status")?;
        let code = match raw.to_str().ok().and_then(|s| s.trim().parse::<u32>().ok()) {
            Some(n) => Code::from_u32(n),
            None => {
                return Some(Status::new(
                    Code::Unknown,
                    format!("malformed grpc-status header: {:?}", raw),
                ))
            }
        };
        // grpc-message is percent-encoded UTF-8; a bad sequence must not lose the status.
        let message = headers
            .get("grpc-message")
            .map(|v| {
                percent_decode(v.as_bytes())
                    .decode_utf8_lossy()
                    .into_owned()
            })
            .unwrap_or_default();
        Some(Status::new(code, message))
    }

    /// gRPC's mapping for a response that is not HTTP 200 and carries no grpc-status.
    pub fn from_http_status(status: http::StatusCode) -> Status {
        let code = match status.as_u16() {
            400 => Code::Internal,
            401 => Code::Unauthenticated,
            403 => Code::PermissionDenied,
            404 => Code::Unimplemented,
            429 | 502 | 503 | 504 => Code::Unavailable,
            _ => Code::Unknown,
        };
        Status::new(code, format!("HTTP status {} from the server", status))
    }

    /// A stream reset or a broken connection, as a status.
    pub fn from_h2(err: &h2::Error) -> Status {
        if let Some(reason) = err.reason() {
            let code = if reason == h2::Reason::CANCEL {
                Code::Cancelled
            } else if reason == h2::Reason::REFUSED_STREAM {
                Code::Unavailable
            } else if reason == h2::Reason::ENHANCE_YOUR_CALM {
                Code::ResourceExhausted
            } else if reason == h2::Reason::INADEQUATE_SECURITY {
                Code::PermissionDenied
            } else if err.is_go_away() {
                Code::Unavailable
            } else {
                Code::Internal
            };
            return Status::new(code, format!("HTTP/2 error: {}", err));
        }
        // I/O errors and a closed connection: the server went away.
        Status::unavailable(format!("connection error: {}", err))
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for Status {}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn every_code_round_trips_through_its_number() {
        for n in 0..=16u32 {
            assert_eq!(Code::from_u32(n).as_u32(), n);
        }
        assert_eq!(Code::from_u32(17), Code::Unknown);
        assert_eq!(Code::from_u32(5).name(), "NOT_FOUND");
    }

    #[test]
    fn reads_status_and_percent_decodes_message() {
        let mut h = HeaderMap::new();
        h.insert("grpc-status", HeaderValue::from_static("5"));
        h.insert(
            "grpc-message",
            HeaderValue::from_static("model %22nope%22 not found: caf%C3%A9 100%25"),
        );
        let s = Status::from_headers(&h).expect("status present");
        assert_eq!(s.code(), Code::NotFound);
        assert_eq!(s.message(), "model \"nope\" not found: café 100%");
    }

    #[test]
    fn invalid_utf8_in_message_keeps_the_code() {
        let mut h = HeaderMap::new();
        h.insert("grpc-status", HeaderValue::from_static("3"));
        h.insert("grpc-message", HeaderValue::from_static("bad %FF byte"));
        let s = Status::from_headers(&h).unwrap();
        assert_eq!(s.code(), Code::InvalidArgument);
        assert_eq!(s.message(), "bad \u{FFFD} byte");
    }

    #[test]
    fn missing_or_malformed_status() {
        assert!(Status::from_headers(&HeaderMap::new()).is_none());
        let mut h = HeaderMap::new();
        h.insert("grpc-status", HeaderValue::from_static("x1"));
        assert_eq!(Status::from_headers(&h).unwrap().code(), Code::Unknown);
    }

    #[test]
    fn http_status_mapping_follows_the_spec() {
        use http::StatusCode;
        assert_eq!(
            Status::from_http_status(StatusCode::NOT_FOUND).code(),
            Code::Unimplemented
        );
        assert_eq!(
            Status::from_http_status(StatusCode::SERVICE_UNAVAILABLE).code(),
            Code::Unavailable
        );
        assert_eq!(
            Status::from_http_status(StatusCode::UNAUTHORIZED).code(),
            Code::Unauthenticated
        );
        assert_eq!(
            Status::from_http_status(StatusCode::IM_A_TEAPOT).code(),
            Code::Unknown
        );
    }
}
