//! Arbitrary bytes as one HTTP request: dbs-uhttp parses it, the router turns it into a
//! VmmRequest or an error, and the answer is encoded. Nothing may panic.
#![no_main]

use api::rest::{encode_response, parse_request, HttpError, MAX_BODY_BYTES};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let request = match dbs_uhttp::Request::try_from(data, Some(MAX_BODY_BYTES + 8192)) {
        Ok(request) => request,
        Err(error) => {
            encode_response(dbs_uhttp::Version::Http11, Err(HttpError::from(error)));
            return;
        }
    };
    let body = request.body.as_ref().map(|body| body.raw());
    let result = parse_request(request.method(), request.uri().get_abs_path(), body);
    let answer = result.map(|_| api::VmmResponse::Empty);
    encode_response(request.http_version(), answer);
});
