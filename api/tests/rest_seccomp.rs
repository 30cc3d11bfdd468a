//! The REST server runs under the `api` seccomp policy of resources/seccomp/x86_64.json: a
//! syscall outside it kills the test process (SIGSYS), so passing means the policy suffices.

mod support;

use std::io::Write;

use support::{read_reply, TestServer};

fn api_filter() -> seccompiler::BpfProgram {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../resources/seccomp/x86_64.json"
    );
    let policy = std::fs::File::open(path).unwrap();
    let mut filters =
        seccompiler::compile_from_json(policy, seccompiler::TargetArch::x86_64).unwrap();
    filters.remove("api").expect("an api filter")
}

#[test]
fn the_server_lives_within_the_api_policy() {
    let filter = api_filter();
    let server = TestServer::start_with("seccomp", move || {
        seccompiler::apply_filter(&filter).unwrap();
    });
    server.ok("PUT", "/machine-config", Some(r#"{"vcpus":2}"#));
    server.ok("PUT", "/boot-source", Some(r#"{"kernel":"/k"}"#));
    server.fails(
        "PUT",
        "/machine-config",
        Some(r#"{"cpus":2}"#),
        400,
        "unknown field",
    );
    server.fails("GET", "/nope", None, 404, "/nope");
    server.fails("GET", "/rng", None, 405, "PUT");
    let big = "x".repeat(api::rest::MAX_BODY_BYTES + 1);
    server.fails("PUT", "/rng", Some(&big), 413, "65536");
    server.ok(
        "PUT",
        "/actions",
        Some(r#"{"action_type":"InstanceStart"}"#),
    );
    server.fails("PUT", "/rng", Some("{}"), 409, "started");
    assert_eq!(server.get_json("/vm/config")["machine"]["vcpus"], 2);
    server.get_json("/metrics");

    let mut half = server.connect();
    half.write_all(b"GET / HT").unwrap();
    let mut garbage = server.connect();
    garbage.write_all(b"HELLO\r\n\r\n").unwrap();
    assert_eq!(read_reply(&mut garbage).status, 400);
    let mut expect = server.connect();
    expect
        .write_all(b"PUT /logger HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n")
        .unwrap();
    assert_eq!(read_reply(&mut expect).status, 100);
    expect.write_all(b"{}").unwrap();
    // The logger is configured before InstanceStart only.
    assert_eq!(read_reply(&mut expect).status, 409);
    let crowd: Vec<_> = (0..api::rest::MAX_CONNECTIONS + 2)
        .map(|_| server.connect())
        .collect();
    drop(crowd);
    server.still_serves();
    drop(half);
    // Dropping the server stops it and joins the thread: the thread's exit is filtered too.
}
