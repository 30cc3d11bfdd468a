//! Why an HTTP request failed, and the status each reason maps to.

use dbs_uhttp::Method;

use crate::request::RequestError;

/// A failed request: the status it is answered with and the one-line `fault_message`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HttpError {
    /// Malformed HTTP or JSON, a wrong type, an unknown field, a bad value (400).
    #[error("{0}")]
    BadRequest(String),
    /// No endpoint at this path, or no such resource (404).
    #[error("{0}")]
    NotFound(String),
    /// The path exists but not with this method (405, with an `Allow` header).
    #[error("{path} does not accept {}; it accepts {}", .method.to_str(), method_list(.allowed))]
    MethodNotAllowed {
        method: Method,
        path: String,
        allowed: &'static [Method],
    },
    /// The VM is not in a state where this request makes sense (409).
    #[error("{0}")]
    Conflict(String),
    /// The body is over [`super::MAX_BODY_BYTES`] (413).
    #[error("request body of {size} bytes is over the limit of {limit} bytes")]
    PayloadTooLarge { size: usize, limit: usize },
    /// The VMM failed, not the caller (500).
    #[error("{0}")]
    Internal(String),
    /// Too many clients are connected (503).
    #[error("too many open connections (at most {0}); retry after closing one")]
    TooManyConnections(usize),
}

fn method_list(methods: &[Method]) -> String {
    methods
        .iter()
        .map(|m| m.to_str())
        .collect::<Vec<_>>()
        .join(", ")
}

impl HttpError {
    pub fn status(&self) -> u16 {
        match self {
            HttpError::BadRequest(_) => 400,
            HttpError::NotFound(_) => 404,
            HttpError::MethodNotAllowed { .. } => 405,
            HttpError::Conflict(_) => 409,
            HttpError::PayloadTooLarge { .. } => 413,
            HttpError::Internal(_) => 500,
            HttpError::TooManyConnections(_) => 503,
        }
    }
}

impl From<RequestError> for HttpError {
    fn from(error: RequestError) -> Self {
        match error {
            RequestError::BadRequest(m) => HttpError::BadRequest(m),
            RequestError::NotFound(m) => HttpError::NotFound(m),
            RequestError::Conflict(m) => HttpError::Conflict(m),
            RequestError::Internal(m) => HttpError::Internal(m),
        }
    }
}

/// What dbs-uhttp could not parse, in our terms: the body cap is a 413 naming the limit,
/// everything else a 400 with the parser's reason.
impl From<dbs_uhttp::RequestError> for HttpError {
    fn from(error: dbs_uhttp::RequestError) -> Self {
        match error {
            dbs_uhttp::RequestError::SizeLimitExceeded(limit, size) => {
                HttpError::PayloadTooLarge { size, limit }
            }
            dbs_uhttp::RequestError::InvalidHttpMethod(_) => HttpError::BadRequest(
                "malformed HTTP request: unsupported method (the API uses GET, PUT and PATCH)"
                    .into(),
            ),
            other => HttpError::BadRequest(format!("malformed HTTP request: {other}")),
        }
    }
}
