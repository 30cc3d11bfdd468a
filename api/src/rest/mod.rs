//! The REST API: HTTP/1.1 over a unix socket, served on the `api` thread. The thread only
//! parses and forwards: [`parse_request`] turns method, path and body into a [`VmmRequest`],
//! the caller's handler (a round trip to the `vmm` thread) answers it, and [`serve`] writes the
//! answer back. HTTP parsing is dbs-uhttp's (Firecracker's micro_http as published on
//! crates.io); this module owns routing, status codes and the connection loop.

mod error;
mod response;
mod router;
mod server;

pub use dbs_uhttp::Method;
pub use error::HttpError;
pub use response::{encode_final_response, encode_response};
pub use router::{parse_request, MAX_RESOURCE_ID_LEN};
pub use server::{serve, serve_with_idle_timeout, ServerError, IDLE_TIMEOUT, MAX_CONNECTIONS};

/// Largest request body accepted (413 above it). Config bodies are a few hundred bytes; the
/// cap bounds what one client can make the VMM buffer.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
