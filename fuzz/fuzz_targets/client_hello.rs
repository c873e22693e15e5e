//! The first bytes of a connection: TLS record walking, ClientHello
//! classification (mesh TLS by ALPN, other TLS, plain) and the HTTP/1 vs
//! HTTP/2 sniff, as `detect` and `sniff_http` run them.
//!
//! Checked beyond "does not panic": the record walk never claims more bytes
//! than it was given, and walks the same records again when given only them.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis::proxy::classify_buffered;

fuzz_target!(|data: &[u8]| {
    let (complete, _hello, _http) = classify_buffered(data);
    assert!(complete <= data.len());
    if complete > 0 && complete < data.len() {
        let (again, _, _) = classify_buffered(&data[..complete]);
        assert_eq!(again, complete);
    }
});
