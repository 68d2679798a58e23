//! Exit codes, documented in `--help`: 0 success, 1 local error, 2 usage, 3 some block
//! changes refused by the guest, 20 + the gRPC status code for the bridge's answers.

use tonic::Code;

/// A local error: config, files, endpoint.
pub const LOCAL: u8 = 1;
/// The call worked, but the guest refused some block changes.
pub const PARTIAL: u8 = 3;
/// Added to a gRPC status code.
pub const STATUS_BASE: u8 = 20;

/// The exit code for gRPC status `code`.
pub fn for_status(code: Code) -> u8 {
    // Codes are 1..=16; OK never gets here.
    STATUS_BASE + u8::try_from(code as i32).unwrap_or(2)
}

/// The status's name as gRPC spells it, for error lines.
pub fn name(code: Code) -> &'static str {
    match code {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_to_twenty_plus_their_code() {
        assert_eq!(for_status(Code::InvalidArgument), 23);
        assert_eq!(for_status(Code::NotFound), 25);
        assert_eq!(for_status(Code::PermissionDenied), 27);
        assert_eq!(for_status(Code::FailedPrecondition), 29);
        assert_eq!(for_status(Code::Aborted), 30);
        assert_eq!(for_status(Code::Unavailable), 34);
        assert_eq!(for_status(Code::Unauthenticated), 36);
    }
}
