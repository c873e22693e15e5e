//! The stable error codes of `POST /v1/certify`. Sidecars, dashboards and
//! alerts key on these strings, so they never change meaning.

use hyper::StatusCode;

/// Why the identity service refused a request (or `Ok`, for the metric).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    Ok,
    NotFound,
    MethodNotAllowed,
    UnsupportedMediaType,
    PayloadTooLarge,
    IssuerUnavailable,
    BadRequest,
    MissingToken,
    BadCsr,
    CsrPolicy,
    TokenreviewUnavailable,
    TokenRejected,
    AudienceMismatch,
    NotBoundServiceAccount,
    IdentityMismatch,
    Internal,
}

impl Code {
    /// Every code, for creating metric series at zero and for parsing.
    pub const ALL: [Code; 16] = [
        Code::Ok,
        Code::NotFound,
        Code::MethodNotAllowed,
        Code::UnsupportedMediaType,
        Code::PayloadTooLarge,
        Code::IssuerUnavailable,
        Code::BadRequest,
        Code::MissingToken,
        Code::BadCsr,
        Code::CsrPolicy,
        Code::TokenreviewUnavailable,
        Code::TokenRejected,
        Code::AudienceMismatch,
        Code::NotBoundServiceAccount,
        Code::IdentityMismatch,
        Code::Internal,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Code::Ok => "ok",
            Code::NotFound => "not_found",
            Code::MethodNotAllowed => "method_not_allowed",
            Code::UnsupportedMediaType => "unsupported_media_type",
            Code::PayloadTooLarge => "payload_too_large",
            Code::IssuerUnavailable => "issuer_unavailable",
            Code::BadRequest => "bad_request",
            Code::MissingToken => "missing_token",
            Code::BadCsr => "bad_csr",
            Code::CsrPolicy => "csr_policy",
            Code::TokenreviewUnavailable => "tokenreview_unavailable",
            Code::TokenRejected => "token_rejected",
            Code::AudienceMismatch => "audience_mismatch",
            Code::NotBoundServiceAccount => "not_bound_service_account",
            Code::IdentityMismatch => "identity_mismatch",
            Code::Internal => "internal_error",
        }
    }

    /// The code a response body names, if it is one of ours.
    pub fn parse(s: &str) -> Option<Code> {
        Code::ALL.into_iter().find(|c| c.as_str() == s)
    }

    pub fn status(self) -> StatusCode {
        match self {
            Code::Ok => StatusCode::OK,
            Code::NotFound => StatusCode::NOT_FOUND,
            Code::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Code::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Code::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Code::BadRequest | Code::BadCsr | Code::CsrPolicy => StatusCode::BAD_REQUEST,
            Code::MissingToken | Code::TokenRejected | Code::AudienceMismatch => {
                StatusCode::UNAUTHORIZED
            }
            Code::NotBoundServiceAccount | Code::IdentityMismatch => StatusCode::FORBIDDEN,
            Code::IssuerUnavailable | Code::TokenreviewUnavailable => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Code::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl std::fmt::Display for Code {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_are_unique() {
        for c in Code::ALL {
            assert_eq!(Code::parse(c.as_str()), Some(c));
        }
        assert_eq!(Code::parse("nope"), None);
        let cases = [
            (Code::MissingToken, 401),
            (Code::NotBoundServiceAccount, 403),
            (Code::TokenreviewUnavailable, 503),
            (Code::CsrPolicy, 400),
            (Code::PayloadTooLarge, 413),
        ];
        for (c, s) in cases {
            assert_eq!(c.status().as_u16(), s, "{c}");
        }
    }
}
