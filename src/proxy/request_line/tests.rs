use super::*;

fn whole(bytes: &[u8]) -> Option<Verdict> {
    LineScan::default().feed(bytes)
}

/// The same bytes one at a time must give the same verdict.
fn drip(bytes: &[u8]) -> Option<Verdict> {
    let mut scan = LineScan::default();
    bytes.iter().find_map(|b| scan.feed(&[*b]))
}

#[test]
fn request_lines_however_spaced_or_named() {
    let requests: &[&[u8]] = &[
        b"GET / HTTP/1.1\r\n",
        b"GET / HTTP/1.1\n",
        b"\r\n\r\nGET / HTTP/1.1\r\n",
        b"\n \tGET / HTTP/1.1\r\n",
        b"GET\t/\tHTTP/1.1\r\n",
        b"GET\x0b/\x0cHTTP/1.0\r\n",
        b"GET\x1c/\x85HTTP/1.1\xa0\r\n",
        b"GET  /  HTTP/1.1 \r\n",
        b"GET / http/1.1\r\n",
        b"get / HTTP/1.1\r\n",
        b"foo / HTTP/1.1\r\n",
        b"M3!H~ / HTTP/1.1\r\n",
        b"AVERYLONGMETHODNAMEOFMORETHANTWENTYLETTERS / HTTP/1.1\r\n",
        b"GET HTTP/1.1\r\n",
        b"GET /a b c HTTP/1.1\r\n",
        b"GET /a\x00b HTTP/1.1\r\n",
        b"PRI * HTTP/2.0\r\n",
        // HTTP/0.9: no version, but Python and Node still read the headers.
        b"GET /path\r\n",
        b"GET *\r\n",
        b"POST http://example/\r\n",
    ];
    for line in requests {
        let text = String::from_utf8_lossy(line);
        assert_eq!(whole(line), Some(Verdict::Request), "{text:?}");
        assert_eq!(drip(line), Some(Verdict::Request), "dripped {text:?}");
    }
}

#[test]
fn other_first_lines() {
    let others: &[&[u8]] = &[
        b"get key\r\n",
        b"get /key\r\n",
        b"SET key value\r\n",
        b"get http/abc\r\n",
        b"PING\r\n",
        b"PING x\r\n",
        b"HELLO world\r\n",
        b"*1\r\n$4\r\nPING\r\n",
        b"SSH-2.0-OpenSSH_9.2\r\n",
        b"CONNECT {\"verbose\":false}\r\n",
        b"\x16\x03\x01\x02\x00",
        b"\x00\x01binary",
        b"GET:/ HTTP/1.1\r\n",
        b"{\"GET\": \"/ HTTP/1.1\"}\n",
    ];
    for line in others {
        let text = String::from_utf8_lossy(line);
        assert_eq!(whole(line), Some(Verdict::NotRequest), "{text:?}");
        assert_eq!(drip(line), Some(Verdict::NotRequest), "dripped {text:?}");
    }
}

#[test]
fn an_unended_line_is_judged_as_if_the_stream_ended() {
    let cases: &[(&[u8], Verdict)] = &[
        (b"GET /eof09", Verdict::Request),
        (b"GET / HTTP/1.1", Verdict::Request),
        (b"GET / HTT", Verdict::NotRequest),
        (b"get /key", Verdict::NotRequest),
        (b"GET", Verdict::NotRequest),
        (b"\r\n  ", Verdict::NotRequest),
        (b"", Verdict::NotRequest),
    ];
    for (bytes, want) in cases {
        let mut scan = LineScan::default();
        assert_eq!(
            scan.feed(bytes),
            None,
            "{:?}",
            String::from_utf8_lossy(bytes)
        );
        assert_eq!(scan.at_end(), *want, "{:?}", String::from_utf8_lossy(bytes));
    }
}

#[test]
fn control_bytes_are_noticed_and_the_verdict_stays() {
    let mut scan = LineScan::default();
    assert_eq!(scan.feed(b"0032git-upload-pack /p.git\0host=x\0"), None);
    assert!(scan.saw_control());
    assert_eq!(scan.feed(b"\n"), Some(Verdict::NotRequest));
    assert_eq!(scan.feed(b"GET / HTTP/1.1\r\n"), Some(Verdict::NotRequest));
}
