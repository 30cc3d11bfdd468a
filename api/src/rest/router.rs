//! From method, path and body to a [`VmmRequest`]. Each endpoint is one arm of the match in
//! [`parse_request`]; a new one (`PUT /network-interfaces/{id}`, `PUT /fs/{tag}`) is one more.

use std::path::PathBuf;

use dbs_uhttp::Method::{self, Get, Patch, Put};
use percent_encoding::percent_decode_str;
use serde::de::DeserializeOwned;
use serde::Deserialize;

use super::HttpError;
use crate::config::{check_port_name, FsConfig, NetConfig};
use crate::request::{Action, VmStateChange, VmmRequest};

/// Longest id in `PUT /pmem/{id}` and `PUT /network-interfaces/{id}`.
pub const MAX_RESOURCE_ID_LEN: usize = 64;

/// `PUT /ports/{name}`: the name is in the path.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PortSocket {
    socket: PathBuf,
}

/// Routes one request. `path` is the request target as sent (percent-encoded); `body` is
/// ignored by endpoints that take none.
pub fn parse_request(
    method: Method,
    path: &str,
    body: Option<&[u8]>,
) -> Result<VmmRequest, HttpError> {
    let segments = decode_segments(path)?;
    let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
    let body = Body { path, bytes: body };
    let only = |allowed: &'static [Method]| {
        if allowed.contains(&method) {
            Ok(())
        } else {
            Err(HttpError::MethodNotAllowed {
                method,
                path: path.to_string(),
                allowed,
            })
        }
    };
    match segments.as_slice() {
        [] => only(&[Get]).map(|()| VmmRequest::GetInfo),
        ["vm", "config"] => only(&[Get]).map(|()| VmmRequest::GetConfig),
        ["metrics"] => {
            only(&[Get, Put])?;
            if method == Get {
                Ok(VmmRequest::GetMetrics)
            } else {
                body.json().map(VmmRequest::PutMetrics)
            }
        }
        ["machine-config"] => only(&[Put]).and_then(|()| body.json().map(VmmRequest::PutMachine)),
        ["boot-source"] => only(&[Put]).and_then(|()| body.json().map(VmmRequest::PutBoot)),
        ["pmem", id] => {
            only(&[Put])?;
            check_resource_id("pmem", id)?;
            let config = body.json()?;
            Ok(VmmRequest::PutPmem {
                id: id.to_string(),
                config,
            })
        }
        ["network-interfaces", id] => {
            only(&[Put])?;
            check_resource_id("network interface", id)?;
            let config: NetConfig = body.json()?;
            if config.id.as_deref().is_some_and(|body_id| body_id != *id) {
                return Err(HttpError::BadRequest(format!(
                    "the body's id {:?} is not the path's {id:?}",
                    config.id.as_deref().unwrap_or_default()
                )));
            }
            Ok(VmmRequest::PutNet {
                id: id.to_string(),
                config,
            })
        }
        ["fs", tag] => {
            only(&[Put])?;
            let config: FsConfig = body.json()?;
            Ok(VmmRequest::PutFs {
                tag: tag.to_string(),
                config,
            })
        }
        ["console"] => only(&[Put]).and_then(|()| body.json().map(VmmRequest::PutConsole)),
        ["ports", name] => {
            only(&[Put])?;
            check_port_name("port", name).map_err(|e| HttpError::BadRequest(e.to_string()))?;
            let PortSocket { socket } = body.json()?;
            Ok(VmmRequest::PutPort {
                name: name.to_string(),
                socket,
            })
        }
        ["serial"] => only(&[Put]).and_then(|()| body.json().map(VmmRequest::PutSerial)),
        ["rng"] => only(&[Put]).and_then(|()| body.json().map(VmmRequest::PutRng)),
        ["logger"] => only(&[Put]).and_then(|()| body.json().map(VmmRequest::PutLogger)),
        ["actions"] => {
            only(&[Put])?;
            body.json()
                .map(|a: Action| VmmRequest::Action(a.action_type))
        }
        ["vm"] => {
            only(&[Patch])?;
            body.json()
                .map(|c: VmStateChange| VmmRequest::SetState(c.state))
        }
        _ => Err(HttpError::NotFound(format!("no such endpoint: {path:?}"))),
    }
}

/// The path's segments, percent-decoded: `/` is none, `/pmem/a%20b` is `["pmem", "a b"]`.
fn decode_segments(path: &str) -> Result<Vec<String>, HttpError> {
    let Some(rest) = path.strip_prefix('/') else {
        return Err(HttpError::NotFound(format!(
            "no such endpoint: {path:?} (paths start with '/')"
        )));
    };
    if rest.is_empty() {
        return Ok(Vec::new());
    }
    rest.split('/')
        .map(|segment| {
            percent_decode_str(segment)
                .decode_utf8()
                .map(|s| s.into_owned())
                .map_err(|_| {
                    HttpError::BadRequest(format!(
                        "path {path:?} is not UTF-8 once percent-decoded"
                    ))
                })
        })
        .collect()
}

/// An id in the path (`/pmem/{id}`, `/network-interfaces/{id}`) names the resource in later
/// requests: 1 to 64 of `A-Z a-z 0-9 _ - .`.
fn check_resource_id(what: &str, id: &str) -> Result<(), HttpError> {
    let fine = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.');
    if id.is_empty() || id.len() > MAX_RESOURCE_ID_LEN || !id.chars().all(fine) {
        return Err(HttpError::BadRequest(format!(
            "invalid {what} id {id:?}: 1 to {MAX_RESOURCE_ID_LEN} letters, digits, '_', '-' or '.'"
        )));
    }
    Ok(())
}

/// A request body, read as the JSON an endpoint expects.
struct Body<'a> {
    path: &'a str,
    bytes: Option<&'a [u8]>,
}

impl Body<'_> {
    fn json<T: DeserializeOwned>(&self) -> Result<T, HttpError> {
        let path = self.path;
        match self.bytes {
            None | Some([]) => Err(HttpError::BadRequest(format!(
                "{path} needs a JSON body (Content-Length and the JSON document)"
            ))),
            Some(bytes) => {
                // serde_path_to_error names the field a wrong type or value is in, which
                // serde_json's own message does not.
                let mut json = serde_json::Deserializer::from_slice(bytes);
                let value = serde_path_to_error::deserialize(&mut json).map_err(|e| {
                    let field = e.path().to_string();
                    let inner = e.into_inner();
                    HttpError::BadRequest(if field == "." {
                        format!("invalid body for {path}: {inner}")
                    } else {
                        format!("invalid body for {path}: {field}: {inner}")
                    })
                })?;
                json.end()
                    .map_err(|e| HttpError::BadRequest(format!("invalid body for {path}: {e}")))?;
                Ok(value)
            }
        }
    }
}
