//! The REST server over a real unix socket, driven with raw HTTP/1.1 bytes, in front of a fake
//! VMM with the real lifecycle.

mod support;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use support::{read_reply, send, TestServer};

pub fn configure(server: &TestServer) {
    server.ok(
        "PUT",
        "/machine-config",
        Some(r#"{"vcpus":2,"memory_mib":512}"#),
    );
    server.ok(
        "PUT",
        "/boot-source",
        Some(r#"{"kernel":"/k","cmdline":"console=hvc0"}"#),
    );
    server.ok(
        "PUT",
        "/pmem/rootfs",
        Some(r#"{"file":"/img","model":"virtio"}"#),
    );
    server.ok("PUT", "/console", Some(r#"{"socket":"/run/c.sock"}"#));
    server.ok(
        "PUT",
        "/ports/agent.channel.0",
        Some(r#"{"socket":"/run/a.sock"}"#),
    );
    server.ok("PUT", "/serial", Some(r#""off""#));
    server.ok("PUT", "/rng", Some("{}"));
    server.ok("PUT", "/logger", Some(r#"{"level":"debug"}"#));
    server.ok("PUT", "/metrics", Some(r#"{"metrics_path":"/run/m.json"}"#));
}

#[test]
fn every_route_through_the_lifecycle() {
    let server = TestServer::start("lifecycle");
    let info = server.get_json("/");
    assert_eq!(info["state"], "Not started");
    assert_eq!(info["app_name"], "chapeau");
    configure(&server);

    let config = server.get_json("/vm/config");
    assert_eq!(config["machine"]["vcpus"], 2);
    assert_eq!(config["boot"]["cmdline"], "console=hvc0");
    assert_eq!(config["pmem"][0]["model"], "virtio");
    assert_eq!(config["console"]["socket"], "/run/c.sock");
    assert_eq!(config["ports"][0]["name"], "agent.channel.0");
    assert_eq!(config["serial"], "off");
    assert_eq!(config["rng"]["source"], "/dev/urandom");
    // A config GET /vm/config shows is one --config reads.
    api::VmConfig::from_json(&config.to_string()).unwrap();

    server.ok(
        "PUT",
        "/actions",
        Some(r#"{"action_type":"InstanceStart"}"#),
    );
    assert_eq!(server.state(), "Running");
    server.fails(
        "PUT",
        "/machine-config",
        Some("{}"),
        409,
        "the VM has started",
    );
    server.fails(
        "PUT",
        "/ports/x",
        Some(r#"{"socket":"/x"}"#),
        409,
        "pre-boot",
    );
    server.fails(
        "PUT",
        "/actions",
        Some(r#"{"action_type":"InstanceStart"}"#),
        409,
        "already started",
    );
    server.fails(
        "PUT",
        "/logger",
        Some(r#"{"level":"info"}"#),
        409,
        "started",
    );

    server.ok("PATCH", "/vm", Some(r#"{"state":"Paused"}"#));
    assert_eq!(server.state(), "Paused");
    server.fails(
        "PATCH",
        "/vm",
        Some(r#"{"state":"Paused"}"#),
        409,
        "already paused",
    );
    server.ok("PATCH", "/vm", Some(r#"{"state":"Resumed"}"#));
    server.fails(
        "PATCH",
        "/vm",
        Some(r#"{"state":"Resumed"}"#),
        409,
        "not paused",
    );
    server.ok(
        "PUT",
        "/actions",
        Some(r#"{"action_type":"SendCtrlAltDel"}"#),
    );
    assert_eq!(server.get_json("/metrics")["api_requests"], 1);

    server.ok("PUT", "/actions", Some(r#"{"action_type":"Shutdown"}"#));
    assert_eq!(server.state(), "Stopped");
}

#[test]
fn invalid_values_and_a_missing_boot_source_are_named() {
    let server = TestServer::start("start");
    server.fails(
        "PUT",
        "/actions",
        Some(r#"{"action_type":"InstanceStart"}"#),
        400,
        "no boot source",
    );
    server.ok("PUT", "/boot-source", Some(r#"{"kernel":"/k"}"#));
    // A value the VM cannot have is refused where it is given, and changes nothing.
    server.fails(
        "PUT",
        "/machine-config",
        Some(r#"{"vcpus":0}"#),
        400,
        "machine.vcpus 0",
    );
    assert_eq!(server.get_json("/vm/config")["machine"]["vcpus"], 1);
    assert_eq!(server.state(), "Not started");
    server.fails(
        "PUT",
        "/actions",
        Some(r#"{"action_type":"SendCtrlAltDel"}"#),
        409,
        "not running",
    );
    server.fails(
        "PATCH",
        "/vm",
        Some(r#"{"state":"Paused"}"#),
        409,
        "not running",
    );
}

#[test]
fn bad_bodies_are_400_naming_the_problem() {
    let server = TestServer::start("bodies");
    server.fails(
        "PUT",
        "/machine-config",
        Some(r#"{"vcpus":2,"cpus":1}"#),
        400,
        "unknown field `cpus`",
    );
    server.fails(
        "PUT",
        "/machine-config",
        Some(r#"{"vcpus":"two"}"#),
        400,
        "invalid type: string \"two\"",
    );
    server.fails(
        "PUT",
        "/machine-config",
        Some(r#"{"vcpus":300}"#),
        400,
        "invalid value: integer `300`",
    );
    server.fails(
        "PUT",
        "/boot-source",
        Some("{\"kernel\":"),
        400,
        "invalid body for /boot-source: kernel: EOF",
    );
    server.fails(
        "PUT",
        "/boot-source",
        Some("{}"),
        400,
        "missing field `kernel`",
    );
    server.fails(
        "PUT",
        "/boot-source",
        None,
        400,
        "/boot-source needs a JSON body",
    );
    server.fails(
        "PUT",
        "/console",
        Some(r#""pty""#),
        400,
        "unknown variant `pty`",
    );
    server.fails(
        "PUT",
        "/ports/a",
        Some(r#"{"socket":"/s","mode":1}"#),
        400,
        "unknown field `mode`",
    );
    server.fails(
        "PUT",
        "/ports/a%20b",
        Some(r#"{"socket":"/s"}"#),
        400,
        "a port name cannot contain ' '",
    );
    server.fails(
        "PUT",
        "/ports/a%2Fb",
        Some(r#"{"socket":"/s"}"#),
        400,
        "cannot contain '/'",
    );
    server.fails(
        "PUT",
        "/pmem/a:b",
        Some(r#"{"file":"/f"}"#),
        400,
        "invalid pmem id \"a:b\"",
    );
    server.fails(
        "PUT",
        "/actions",
        Some(r#"{"action_type":"Reboot"}"#),
        400,
        "unknown variant `Reboot`",
    );
    server.fails(
        "PATCH",
        "/vm",
        Some(r#"{"state":"Running"}"#),
        400,
        "unknown variant `Running`",
    );
    server.fails(
        "PUT",
        "/logger",
        Some(r#"{"level":"info"} x"#),
        400,
        "trailing characters",
    );
    server.fails(
        "PUT",
        "/metrics",
        Some(r#"{"interval_s":1}"#),
        400,
        "missing field `metrics_path`",
    );
}

#[test]
fn unknown_paths_404_and_wrong_methods_405() {
    let server = TestServer::start("routes");
    server.fails(
        "GET",
        "/machine",
        None,
        404,
        "no such endpoint: \"/machine\"",
    );
    server.fails("GET", "/vm/config/", None, 404, "\"/vm/config/\"");
    server.fails("PUT", "/pmem", Some("{}"), 404, "\"/pmem\"");
    server.fails("GET", "/vm/config?x=1", None, 404, "?x=1");

    let reply = server.call("GET", "/machine-config", None);
    assert_eq!(reply.status, 405);
    assert!(reply.head.contains("Allow: PUT\r\n"), "{reply:?}");
    assert_eq!(
        reply.fault(),
        "/machine-config does not accept GET; it accepts PUT"
    );
    let reply = server.call("DELETE", "/metrics", None);
    assert_eq!(reply.status, 405);
    assert!(reply.head.contains("Allow: GET, PUT\r\n"), "{reply:?}");
    server.fails("PUT", "/vm", Some("{}"), 405, "it accepts PATCH");
    server.fails("POST", "/", Some("{}"), 405, "it accepts GET");
    server.still_serves();
}

#[test]
fn bodies_over_the_cap_are_413() {
    let server = TestServer::start("cap");
    let big = format!(
        r#"{{"kernel":"/k","cmdline":"{}"}}"#,
        "a".repeat(api::rest::MAX_BODY_BYTES)
    );
    server.fails(
        "PUT",
        "/boot-source",
        Some(&big),
        413,
        "over the limit of 65536 bytes",
    );
    // Only the header is needed to refuse it.
    let mut stream = server.connect();
    stream
        .write_all(b"PUT /boot-source HTTP/1.1\r\nContent-Length: 4000000000\r\n\r\n")
        .unwrap();
    let reply = read_reply(&mut stream);
    assert_eq!(reply.status, 413);
    assert!(reply.fault().contains("4000000000 bytes"), "{reply:?}");
    // The connection is closed after it: what follows cannot be parsed.
    assert_eq!(stream.read(&mut [0u8; 1]).unwrap(), 0);
    server.still_serves();
}

#[test]
fn malformed_http_is_400_and_the_connection_closes() {
    let server = TestServer::start("http");
    for garbage in [
        &b"HELLO\r\n\r\n"[..],
        b"TRACE / HTTP/1.1\r\n\r\n",
        b"GET / HTTP/9.9\r\n\r\n",
        b"GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nbad header\r\n\r\n",
    ] {
        let mut stream = server.connect();
        stream.write_all(garbage).unwrap();
        let reply = read_reply(&mut stream);
        assert_eq!(reply.status, 400, "{reply:?}");
        assert!(
            reply.fault().starts_with("malformed HTTP request: "),
            "{reply:?}"
        );
        assert_eq!(stream.read(&mut [0u8; 1]).unwrap(), 0);
        server.still_serves();
    }
    // Endless headers are cut off.
    let mut stream = server.connect();
    stream.write_all(b"GET / HTTP/1.1\r\n").unwrap();
    let line = format!("X-Filler: {}\r\n", "f".repeat(1000));
    let mut writer = stream.try_clone().unwrap();
    let filler = std::thread::spawn(move || {
        // Until the server closes the connection.
        while writer.write_all(line.as_bytes()).is_ok() {}
    });
    let reply = read_reply(&mut stream);
    drop(stream);
    filler.join().unwrap();
    assert_eq!(reply.status, 400);
    assert!(reply.fault().contains("over 8192 bytes"), "{reply:?}");
    server.still_serves();
}

/// A client that sends its body after the head (as schemathesis does) still reads the answer
/// to a request the server refused from the head alone: the server drains instead of
/// resetting the connection, and says it closes.
#[test]
fn a_refused_request_whose_body_comes_later_still_gets_its_answer() {
    let server = TestServer::start("linger");
    let mut stream = server.connect();
    stream
        .write_all(b"QUERY / HTTP/1.1\r\nContent-Length: 4096\r\n\r\n")
        .unwrap();
    // The server has answered and shut its side by now; the body must still be taken.
    std::thread::sleep(Duration::from_millis(200));
    stream.write_all(&[b'x'; 4096]).unwrap();
    let reply = read_reply(&mut stream);
    assert_eq!(reply.status, 400, "{reply:?}");
    assert!(
        reply.fault().starts_with("malformed HTTP request: "),
        "{reply:?}"
    );
    assert!(reply.head.contains("Connection: close\r\n"), "{reply:?}");
    assert_eq!(stream.read(&mut [0u8; 1]).unwrap(), 0);
    server.still_serves();
}

#[test]
fn a_half_open_client_stalls_nobody() {
    let server = TestServer::start("half-open");
    let mut stalled = server.connect();
    stalled
        .write_all(b"PUT /machine-config HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"vcpus\"")
        .unwrap();
    let mut silent = server.connect();
    silent.write_all(b"GET /vm/con").unwrap();
    // Others are served while both wait.
    for _ in 0..3 {
        server.still_serves();
    }
    server.ok("PUT", "/machine-config", Some(r#"{"vcpus":3}"#));
    // The stalled one finishes later and is answered too.
    stalled.write_all(&[b' '; 100 - 8]).unwrap();
    let reply = read_reply(&mut stalled);
    assert_eq!(reply.status, 400, "{reply:?}");
    silent.write_all(b"fig HTTP/1.1\r\n\r\n").unwrap();
    assert_eq!(read_reply(&mut silent).status, 200);
}

#[test]
fn keep_alive_pipelining_and_many_clients() {
    let server = TestServer::start("clients");
    let mut stream = server.connect();
    // Two requests in one write, answered in order on the same connection.
    stream
        .write_all(b"GET / HTTP/1.1\r\n\r\nPUT /rng HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}")
        .unwrap();
    assert_eq!(read_reply(&mut stream).status, 200);
    assert_eq!(read_reply(&mut stream).status, 204);
    send(&mut stream, "GET", "/vm/config", None);
    assert_eq!(read_reply(&mut stream).status, 200);

    let mut clients: Vec<UnixStream> = (0..20).map(|_| server.connect()).collect();
    for client in &mut clients {
        send(client, "GET", "/", None);
    }
    for client in &mut clients {
        assert_eq!(read_reply(client).status, 200);
    }
}

#[test]
fn connections_over_the_limit_get_503() {
    let server = TestServer::start("full");
    let mut held: Vec<UnixStream> = (0..api::rest::MAX_CONNECTIONS)
        .map(|_| server.connect())
        .collect();
    // Make sure the server has accepted them all.
    for client in &mut held {
        send(client, "GET", "/", None);
        assert_eq!(read_reply(client).status, 200);
    }
    let mut extra = server.connect();
    let reply = read_reply(&mut extra);
    assert_eq!(reply.status, 503);
    assert!(
        reply.fault().contains("too many open connections"),
        "{reply:?}"
    );
    held.pop();
    // A slot frees once the server sees the close; retry until it has.
    let served = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(10));
        server.call("GET", "/", None).status == 200
    });
    assert!(served);
}

#[test]
fn expect_100_continue_is_honoured() {
    let server = TestServer::start("expect");
    let mut stream = server.connect();
    stream
        .write_all(b"PUT /rng HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n")
        .unwrap();
    assert_eq!(read_reply(&mut stream).status, 100);
    stream.write_all(b"{}").unwrap();
    assert_eq!(read_reply(&mut stream).status, 204);
}

/// Clients that hold a slot without using it (silent, stalled half-way through a request, or
/// trickling one in byte by byte) are closed after the idle timeout, so they cannot keep
/// others out for ever; a client that keeps sending requests is never cut.
#[test]
fn idle_clients_are_closed_and_free_their_slots() {
    let idle = Duration::from_millis(1500);
    let server = TestServer::start_with_idle_timeout("idle", idle);
    let mut active = server.connect();
    send(&mut active, "GET", "/", None);
    assert_eq!(read_reply(&mut active).status, 200);
    let mut trickler = server.connect();
    trickler.write_all(b"GET / HTTP/1.1\r\nX-Slow: ").unwrap();
    let mut idle_clients: Vec<UnixStream> = (2..api::rest::MAX_CONNECTIONS)
        .map(|i| {
            let mut client = server.connect();
            if i % 2 == 0 {
                client
                    .write_all(b"PUT /machine-config HTTP/1.1\r\nContent-Length: 100\r\n\r\n{")
                    .unwrap();
            }
            client
        })
        .collect();
    let start = Instant::now();
    // Every slot is taken: the next client is refused.
    let mut extra = server.connect();
    assert_eq!(read_reply(&mut extra).status, 503);

    // The active client goes on past the timeout; the trickler sends a byte each time.
    while start.elapsed() < idle * 2 {
        send(&mut active, "GET", "/", None);
        assert_eq!(
            read_reply(&mut active).status,
            200,
            "the active client was cut"
        );
        let _ = trickler.write_all(b"a");
        std::thread::sleep(Duration::from_millis(100));
    }
    // The others were closed: they read the end of the stream, never an answer.
    let mut byte = [0u8];
    for client in idle_clients.iter_mut().chain([&mut trickler]) {
        match client.read(&mut byte) {
            Ok(0) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            other => panic!("an idle client was not closed: {other:?}"),
        }
    }
    // Their slots are free: a new client is served, and so is the active one still.
    assert_eq!(server.call("GET", "/", None).status, 200);
    send(&mut active, "GET", "/vm/config", None);
    assert_eq!(read_reply(&mut active).status, 200);
}
