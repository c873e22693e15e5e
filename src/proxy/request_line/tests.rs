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
        b"GET admin/x\r\n",
        b"GET %2Fadmin/x\r\n",
        // Node serves RTSP and ICE versions as HTTP/1.
        b"GET /admin/x RTSP/1.1\r\n",
        b"SOURCE /admin/x ICE/1.0\r\n",
        // Python checks only the `HTTP/` prefix (`int('+1')` parses).
        b"GET /admin/x HTTP/+1.1\r\n",
        b"get http/abc\r\n",
        // Any last word: the JDK's server does not check the version.
        b"DELETE /admin/users XYZ\r\n",
        b"DELETE /admin/users HTTP/1.1 x\r\n",
        b"GET / HTTP/1.1 200\r\n",
        b"delete /admin/users x\r\n",
        b"PUT http://svc/admin 1\r\n",
        // Past a PROXY protocol header, which an app may skip.
        b"PROXY TCP4 10.9.9.9 10.0.0.1 1111 80\r\nGET /admin/x HTTP/1.1\r\n",
        b"PROXY TCP6 ::1 ::1 1111 80\r\nDELETE /admin/users XYZ\r\n",
        b"PROXY UNKNOWN\r\n\r\n GET / HTTP/1.1\r\n",
        // `PROXY` as a method (Go, the JDK and Netty serve any token): a
        // line that is not the PROXY header grammar is judged as a line.
        b"PROXY /admin/delete-all HTTP/1.1\r\n",
        b"PROXY /admin/delete-all\r\n",
        b"PROXY / HTTP/1.1\r\nDELETE /admin/users HTTP/1.1\r\n",
        b"PROXY TCP4 /admin HTTP/1.1\r\n",
        // A PROXY header spaced otherwise, or ending in a version: the JDK
        // splits on spaces only and reads `PROXY\tUNKNOWN` as the method.
        b"PROXY\tUNKNOWN /admin HTTP/1.1\r\n",
        b"PROXY\x0bUNKNOWN /admin HTTP/1.1\r\n",
        b"PROXY\tTCP4 /admin HTTP/1.1 a b\r\n",
        b"PROXY\xa0TCP4 /admin HTTP/1.1 a b\r\n",
        b"PROXY UNKNOWN HTTP/1.1\r\n",
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
        b"EHLO httpgw.example.com\r\n",
        b"NICK httpbot\r\n",
        // The version must be the last word: an access log line is not a request.
        b"127.0.0.1 - - [04/Dec/2026] \"GET /x HTTP/1.1\" 200 12\n",
        b"PROXY TCP4 10.9.9.9 10.0.0.1 1111 80\r\nget key\r\n",
        b"GET x y\r\n",
        b"CWD pub extra\r\n",
        // Not a PROXY header (two spaces), and no server reads a target in it.
        b"PROXY TCP4  /admin HTTP/1.1 a b\r\n",
        // One PROXY header only.
        b"PROXY TCP4 a\r\nPROXY TCP4 b\r\nGET / HTTP/1.1\r\n",
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
        (b"GET / HTT", Verdict::Request),
        (b"GET x HTT", Verdict::NotRequest),
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
fn a_binary_proxy_header_is_skipped() {
    let mut header = PROXY_V2_SIGNATURE.to_vec();
    // v2 PROXY, TCP over IPv4: 12 address bytes.
    header.extend_from_slice(&[0x21, 0x11, 0, 12]);
    header.extend_from_slice(&[10, 9, 9, 9, 10, 0, 0, 1, 4, 87, 0, 80]);
    let mut request = header.clone();
    request.extend_from_slice(b"GET /admin/x HTTP/1.1\r\n");
    assert_eq!(whole(&request), Some(Verdict::Request));
    assert_eq!(drip(&request), Some(Verdict::Request));
    let mut scan = LineScan::default();
    assert_eq!(scan.feed(&header), None);
    assert_eq!(scan.line_start(), header.len());
    let mut other = header;
    other.extend_from_slice(b"get key\r\n");
    assert_eq!(whole(&other), Some(Verdict::NotRequest));
    // A start like the signature that is not one is read as text.
    assert_eq!(whole(b"\r\n\r\nGET / HTTP/1.1\r\n"), Some(Verdict::Request));
    assert_eq!(whole(b"\r\n\r\n\0\r\nQUIX"), Some(Verdict::NotRequest));
}

#[test]
fn control_bytes_are_noticed_and_the_verdict_stays() {
    let mut scan = LineScan::default();
    assert_eq!(scan.feed(b"0032git-upload-pack /p.git\0host=x\0"), None);
    assert!(scan.saw_control());
    assert_eq!(scan.feed(b"\n"), Some(Verdict::NotRequest));
    assert_eq!(scan.feed(b"GET / HTTP/1.1\r\n"), Some(Verdict::NotRequest));
}

/// A first line longer than any common server reads is not a request, and
/// the scan ends there: an opaque stream of token bytes with no line end
/// is not scanned to its end. Blank lines before the line do not count.
#[test]
fn a_first_line_past_the_longest_servers_read_is_not_a_request() {
    let mut scan = LineScan::default();
    let token = vec![b'Z'; MAX_FIRST_LINE];
    assert_eq!(
        scan.feed(&token),
        None,
        "up to the limit it could still be one"
    );
    assert_eq!(scan.feed(b"Z"), Some(Verdict::NotRequest));

    let mut long = b"GET /".to_vec();
    long.resize(MAX_FIRST_LINE - b" HTTP/1.1\n".len(), b'a');
    long.extend_from_slice(b" HTTP/1.1\n");
    assert_eq!(long.len(), MAX_FIRST_LINE);
    assert_eq!(
        whole(&long),
        Some(Verdict::Request),
        "a line just within it"
    );

    let mut after_blank_lines = vec![b'\n'; MAX_FIRST_LINE];
    after_blank_lines.extend_from_slice(b"GET / HTTP/1.1\r\n");
    assert_eq!(whole(&after_blank_lines), Some(Verdict::Request));
}

/// What a reader got through a `FirstLineGuard`: the bytes handed on, and
/// whether it ended by tripping on a request line.
async fn through_guard(pieces: &[Vec<u8>], chunked: bool) -> (Vec<u8>, bool) {
    use bytes::BytesMut;
    use std::future::poll_fn;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let (mut writer, reader) = tokio::io::duplex(1 << 16);
    let mut guard = FirstLineGuard::new(reader);
    let mut got = Vec::new();
    let mut buf = BytesMut::new();
    // One piece per read, so both paths see the same boundaries.
    for piece in pieces.iter().map(Some).chain([None]) {
        match piece {
            Some(p) => writer.write_all(p).await.unwrap(),
            None => writer.shutdown().await.unwrap(),
        }
        let want = piece.map_or(0, |p| p.len());
        let mut read_now = 0;
        loop {
            let read = if chunked {
                poll_fn(|cx| guard.poll_read_chunk(cx, &mut buf, 4096))
                    .await
                    .map(|c| c.to_vec())
            } else {
                let mut b = vec![0u8; 4096];
                guard.read(&mut b).await.map(|n| b[..n].to_vec())
            };
            match read {
                Err(e) => {
                    assert!(RequestLineInOpaque::is(&e), "{e}");
                    return (got, true);
                }
                Ok(bytes) if bytes.is_empty() => return (got, false),
                Ok(bytes) => {
                    read_now += bytes.len();
                    got.extend(bytes);
                }
            }
            if read_now >= want {
                break;
            }
        }
    }
    unreachable!("the end of the stream is read last")
}

/// The copy loop reads through the guard in chunks, other readers through
/// `poll_read`: for any bytes cut anywhere, both must hand on the same
/// bytes and trip on the same request lines.
#[tokio::test]
async fn chunked_and_byte_reads_through_the_guard_agree() {
    use rand::{rngs::StdRng, Rng, SeedableRng};
    let words: [&[u8]; 10] = [
        b"GET",
        b" ",
        b"/a",
        b"HTTP/1.1",
        b"\r\n",
        b"\n",
        b"PROXY TCP4 1 2 3 4",
        b"x",
        b"\0",
        b"PRI * HTTP/2.0",
    ];
    let mut rng = StdRng::seed_from_u64(7);
    let mut tripped = 0;
    for _ in 0..2_000 {
        let bytes: Vec<u8> = (0..rng.gen_range(1..8))
            .flat_map(|_| words[rng.gen_range(0..words.len())].to_vec())
            .collect();
        let mut pieces = Vec::new();
        let mut rest = &bytes[..];
        while !rest.is_empty() {
            let n = rng.gen_range(1..=rest.len());
            pieces.push(rest[..n].to_vec());
            rest = &rest[n..];
        }
        let by_chunk = through_guard(&pieces, true).await;
        let by_byte = through_guard(&pieces, false).await;
        assert_eq!(by_chunk, by_byte, "{:?}", String::from_utf8_lossy(&bytes));
        tripped += by_chunk.1 as usize;
    }
    assert!(
        tripped > 100,
        "too few request lines among the cases: {tripped}"
    );
}
