//! Decodes arbitrary bytes as strait frames; every frame that decodes must re-encode to
//! something that decodes to the same frame. Run: `cargo +nightly fuzz run wire_decode`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    strait::wire::fuzz_round_trip(data);
});
