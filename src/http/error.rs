//! The HTTP error type: every failure answers `{"error": {"code", "message"}}` with the status
//! code grpc-gateway would use for the same gRPC code.

use crate::error::{Error, Kind};
use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
// One error shape for every JSON door; it lives below them.
pub use crate::json::{ErrorBody, ErrorDetail};

/// An HTTP failure.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    /// Ask HTTP/1.1 clients not to reuse the connection (the request body was left unread).
    close_connection: bool,
}

impl ApiError {
    /// An error with an explicit status and code name.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            close_connection: false,
        }
    }

    /// Marks a response sent without reading the whole request body: the server will not read
    /// the rest, so the connection cannot carry another request, and `Connection: close` tells
    /// the client not to try (otherwise a pooled connection fails on its next use).
    pub fn closing_connection(mut self) -> ApiError {
        self.close_connection = true;
        self
    }

    /// 400 INVALID_ARGUMENT.
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            Kind::InvalidArgument.code_name(),
            message,
        )
    }

    /// 404 NOT_FOUND.
    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "NOT_FOUND", message)
    }

    /// The JSON body.
    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                code: self.code.to_owned(),
                message: self.message.clone(),
            },
        }
    }
}

impl From<Error> for ApiError {
    fn from(error: Error) -> ApiError {
        let kind = error.kind();
        let status = match (&error, kind) {
            (Error::PayloadTooLarge { .. }, _) => StatusCode::PAYLOAD_TOO_LARGE,
            (_, Kind::InvalidArgument) => StatusCode::BAD_REQUEST,
            (_, Kind::ResourceExhausted) => StatusCode::TOO_MANY_REQUESTS,
            (_, Kind::NotFound) => StatusCode::NOT_FOUND,
            (_, Kind::Unavailable) => StatusCode::SERVICE_UNAVAILABLE,
            (_, Kind::Unauthenticated) => StatusCode::UNAUTHORIZED,
            (_, Kind::PermissionDenied) => StatusCode::FORBIDDEN,
            (_, Kind::AlreadyExists | Kind::Aborted) => StatusCode::CONFLICT,
            (_, Kind::Unimplemented) => StatusCode::NOT_IMPLEMENTED,
        };
        ApiError::new(status, kind.code_name(), error.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body())).into_response();
        if self.close_connection {
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}
