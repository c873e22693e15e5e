//! The first-line scanner must give the same verdict however the bytes
//! are split (the guard sees them in whatever reads the network gives),
//! and the sniff must never carry as opaque a buffer whose first line is
//! already a whole request line.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis::proxy::{classify_buffered, AppProtocol, LineScan, Verdict};

fn verdict(parts: &[&[u8]]) -> Verdict {
    let mut scan = LineScan::default();
    parts
        .iter()
        .find_map(|p| scan.feed(p))
        .unwrap_or_else(|| scan.at_end())
}

fuzz_target!(|data: &[u8]| {
    let Some((&cut, data)) = data.split_first() else {
        return;
    };
    let (a, b) = data.split_at(usize::from(cut).min(data.len()));
    assert_eq!(verdict(&[data]), verdict(&[a, b]));
    if LineScan::default().feed(data) == Some(Verdict::Request) {
        let (_, _, http) = classify_buffered(data);
        assert_ne!(http, Some(AppProtocol::Opaque));
    }
});
