//! Oversized requests against the release-like `qga-bridge` binary: refused before the
//! guest is asked, without the bridge's memory growing with them.

use qga_fake_agent::FakeAgent;
use qga_proto::v1::{
    MemoryBlockChange, SetMemoryBlocksRequest, guest_memory_client::GuestMemoryClient,
};
use qga_testkit::BridgeProcess;
use serde_json::json;
use tonic::Code;

/// A `/proc/PID/status` field in KiB.
fn status_kib(pid: u32, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    text.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("status field")
}

/// One JSON-RPC `guest-set-memory-blocks` of about 4 MB (118,000 entries, under
/// `max_request_bytes`): the request that took the bridge to a gigabyte before entries
/// were bounded while decoding.
fn four_megabyte_set() -> String {
    let entries: Vec<String> = (0..118_000u64)
        .map(|i| format!(r#"{{"phys-index":{i},"online":true}}"#))
        .collect();
    format!(
        r#"{{"jsonrpc":"2.0","id":1,"method":"guest-set-memory-blocks","params":{{"vm":"vm","mem-blks":[{}]}}}}"#,
        entries.join(",")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_huge_sets_are_refused_before_the_guest_and_cost_no_memory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("vm.sock");
    let agent = FakeAgent::start(&socket, 4).expect("fake agent");
    let bridge = BridgeProcess::start(&BridgeProcess::vms_table([("vm", &*socket)]), &[])
        .expect("bridge starts");
    let http = reqwest_like::Client::new(bridge.jsonrpc_url());
    // Idle means up, warmed by ordinary traffic (threads and allocator arenas in place),
    // and serving nothing now.
    let warm: Vec<_> = (0..8)
        .map(|i| {
            let http = http.clone();
            let body = json!({"jsonrpc": "2.0", "id": i, "method": "guest-set-memory-blocks",
                "params": {"vm": "vm", "mem-blks": [{"phys-index": i % 4, "online": true}]}});
            tokio::task::spawn_blocking(move || http.post(&body.to_string()))
        })
        .collect();
    for call in warm {
        let reply = call.await.expect("joins").expect("answered");
        assert!(reply.get("result").is_some(), "{reply}");
    }
    let idle = status_kib(bridge.pid(), "VmRSS:");

    let body = four_megabyte_set();
    assert!(body.len() > 3_500_000 && body.len() < 4 * 1024 * 1024);
    let calls: Vec<_> = (0..8)
        .map(|_| {
            let http = http.clone();
            let body = body.clone();
            tokio::task::spawn_blocking(move || http.post(&body))
        })
        .collect();
    for call in calls {
        let reply = call.await.expect("joins").expect("answered");
        assert_eq!(reply["error"]["code"], -32602, "{reply}");
        let message = reply["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains("more than 4096"), "{message}");
    }

    eprintln!(
        "bridge RSS after the JSON-RPC sets: peak {} KiB",
        status_kib(bridge.pid(), "VmHWM:")
    );
    // gRPC: about 2 million entries in one 4 MiB message is refused before decoding.
    let mut grpc = GuestMemoryClient::connect(bridge.grpc_url())
        .await
        .expect("grpc")
        .max_encoding_message_size(8 << 20);
    let blocks = vec![
        MemoryBlockChange {
            phys_index: 0,
            online: false,
        };
        2_000_000
    ];
    let err = grpc
        .set_memory_blocks(SetMemoryBlocksRequest {
            vm: "vm".into(),
            blocks,
        })
        .await
        .expect_err("too large");
    assert!(
        matches!(err.code(), Code::OutOfRange | Code::ResourceExhausted),
        "{err}"
    );

    assert_eq!(
        agent.control().calls("guest-set-memory-blocks"),
        8,
        "the warm-up only"
    );
    let peak = status_kib(bridge.pid(), "VmHWM:");
    eprintln!("bridge RSS: idle {idle} KiB, peak {peak} KiB");
    assert!(
        peak < idle + 50 * 1024,
        "peak RSS {peak} KiB, idle {idle} KiB"
    );
    // Still serving.
    let ok = http
        .post(
            &json!({"jsonrpc":"2.0","id":2,"method":"guest-ping","params":{"vm":"vm"}}).to_string(),
        )
        .expect("ping");
    assert_eq!(ok["result"], json!({}), "{ok}");
}

/// A minimal blocking HTTP/1.1 JSON client, so the test sends exactly the bytes it means.
mod reqwest_like {
    use std::{
        io::{Read, Write},
        net::TcpStream,
    };

    use serde_json::Value;

    #[derive(Debug, Clone)]
    pub struct Client {
        addr: String,
    }

    impl Client {
        pub fn new(url: String) -> Self {
            Self {
                addr: url.trim_start_matches("http://").to_string(),
            }
        }

        /// POSTs `body` and parses the response body as JSON.
        pub fn post(&self, body: &str) -> std::io::Result<Value> {
            let mut s = TcpStream::connect(&self.addr)?;
            write!(
                s,
                "POST / HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n",
                self.addr,
                body.len()
            )?;
            s.write_all(body.as_bytes())?;
            let mut out = Vec::new();
            s.read_to_end(&mut out)?;
            let text = String::from_utf8_lossy(&out);
            let json = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
            serde_json::from_str(json).map_err(std::io::Error::other)
        }
    }
}
