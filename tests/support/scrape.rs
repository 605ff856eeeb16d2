//! Fetch a daemon's Prometheus page the way a scraper does (plain HTTP/1.0, no client library).

use std::io::{Read, Write};

/// The whole HTTP response (status line, headers, body) of `GET /metrics` at `addr`.
pub fn scrape(addr: &str) -> String {
    let mut stream = std::net::TcpStream::connect(addr).expect("connect to metrics");
    write!(stream, "GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").expect("request");
    let mut body = String::new();
    stream.read_to_string(&mut body).expect("response");
    body
}
