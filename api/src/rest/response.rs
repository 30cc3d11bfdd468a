//! An answer as HTTP bytes: 204 for nothing to say, 200 with JSON, or the error's status with
//! `{"fault_message": "..."}`.

use dbs_uhttp::{Body, MediaType, Response, StatusCode, Version};

use super::HttpError;
use crate::request::VmmResponse;

/// The `Server` header.
const SERVER_NAME: &str = "chapeau";

/// The whole response (status line, headers, body) for `result`.
pub fn encode_response(version: Version, result: Result<VmmResponse, HttpError>) -> Vec<u8> {
    let json = match result {
        Ok(VmmResponse::Empty) => return encode(version, 204, None, &[]),
        Ok(VmmResponse::Info(info)) => serde_json::to_vec(&info),
        Ok(VmmResponse::Config(value) | VmmResponse::Metrics(value)) => serde_json::to_vec(&value),
        Ok(VmmResponse::VcpuThreadIds(ids)) => serde_json::to_vec(&ids),
        Err(error) => return encode_error(version, &error),
    };
    match json {
        Ok(json) => encode(version, 200, Some(json), &[]),
        Err(e) => encode_error(
            version,
            &HttpError::Internal(format!("cannot encode the answer as JSON: {e}")),
        ),
    }
}

/// The answer to a request after which the connection closes: dbs-uhttp always writes
/// `Connection: keep-alive`, which would tell the client to send its next request there.
pub fn encode_final_response(version: Version, error: HttpError) -> Vec<u8> {
    const KEEP_ALIVE: &[u8] = b"Connection: keep-alive\r\n";
    let bytes = encode_error(version, &error);
    match bytes
        .windows(KEEP_ALIVE.len())
        .position(|w| w == KEEP_ALIVE)
    {
        Some(at) => [
            &bytes[..at],
            b"Connection: close\r\n",
            &bytes[at + KEEP_ALIVE.len()..],
        ]
        .concat(),
        None => bytes,
    }
}

fn encode_error(version: Version, error: &HttpError) -> Vec<u8> {
    let body = serde_json::json!({ "fault_message": error.to_string() }).to_string();
    let allow = match error {
        HttpError::MethodNotAllowed { allowed, .. } => allowed,
        _ => &[][..],
    };
    encode(version, error.status(), Some(body.into_bytes()), allow)
}

fn encode(
    version: Version,
    status: u16,
    json: Option<Vec<u8>>,
    allow: &[dbs_uhttp::Method],
) -> Vec<u8> {
    // dbs-uhttp has no 409: write it as 501 (never ours otherwise) and patch the digits below.
    let code = match status {
        200 => StatusCode::OK,
        204 => StatusCode::NoContent,
        400 => StatusCode::BadRequest,
        404 => StatusCode::NotFound,
        405 => StatusCode::MethodNotAllowed,
        413 => StatusCode::PayloadTooLarge,
        503 => StatusCode::ServiceUnavailable,
        409 => StatusCode::NotImplemented,
        _ => StatusCode::InternalServerError,
    };
    let mut response = Response::new(version, code);
    response.set_server(SERVER_NAME);
    if !allow.is_empty() {
        response.set_allow(allow.to_vec());
    }
    if let Some(json) = json {
        response.set_content_type(MediaType::ApplicationJson);
        response.set_body(Body::new(json));
    }
    let mut bytes = Vec::new();
    // Writing into a Vec cannot fail.
    let _ = response.write_all(&mut bytes);
    if status == 409 {
        // The status line is "HTTP/1.x NNN ": the digits are bytes 9..12.
        if let Some(digits) = bytes.get_mut(9..12) {
            digits.copy_from_slice(b"409");
        }
    }
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conflict_is_409() {
        let bytes = encode_response(
            Version::Http11,
            Err(HttpError::Conflict("the VM is running".into())),
        );
        let text = String::from_utf8(bytes).unwrap();
        assert!(text.starts_with("HTTP/1.1 409 \r\n"), "{text}");
        assert!(
            text.ends_with(r#"{"fault_message":"the VM is running"}"#),
            "{text}"
        );
    }

    #[test]
    fn a_final_answer_says_the_connection_closes() {
        let text = String::from_utf8(encode_final_response(
            Version::Http11,
            HttpError::BadRequest("bad".into()),
        ))
        .unwrap();
        assert!(text.starts_with("HTTP/1.1 400 "), "{text}");
        assert!(text.contains("Connection: close\r\n"), "{text}");
        assert!(!text.contains("keep-alive"), "{text}");
    }

    #[test]
    fn empty_is_204_without_body() {
        let text =
            String::from_utf8(encode_response(Version::Http11, Ok(VmmResponse::Empty))).unwrap();
        assert!(text.starts_with("HTTP/1.1 204 \r\n"), "{text}");
        assert!(!text.contains("Content-Length"), "{text}");
    }
}
