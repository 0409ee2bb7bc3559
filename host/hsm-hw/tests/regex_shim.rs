//! The `regex` stand-in (`host/hsm-hw/regex-lite`, patched in for the
//! whole workspace): it serves `tss-esapi` alone, and `tss-esapi` still
//! reads TCTI strings as it did with the full engine.

/// The workspace's `Cargo.lock`.
fn lock() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../Cargo.lock"))
        .expect("read Cargo.lock")
}

/// Every package in `lock` that depends on `regex`.
fn dependents_of_regex(lock: &str) -> Vec<String> {
    let mut out = Vec::new();
    for package in lock.split("[[package]]") {
        let name = package
            .lines()
            .find_map(|l| l.strip_prefix("name = \""))
            .and_then(|l| l.strip_suffix('"'));
        let Some(deps) = package.split("dependencies = [").nth(1) else {
            continue;
        };
        let deps = deps.split(']').next().unwrap_or_default();
        // `"regex"` or `"regex 1.x.y"` (when two versions are locked).
        if deps
            .lines()
            .map(|l| l.trim().trim_end_matches(',').trim_matches('"'))
            .any(|d| d == "regex" || d.starts_with("regex "))
            && let Some(name) = name
        {
            out.push(name.to_owned());
        }
    }
    out
}

#[test]
fn only_tss_esapi_gets_the_small_engine() {
    let lock = lock();
    assert_eq!(
        dependents_of_regex(&lock),
        ["tss-esapi"],
        "a crate other than tss-esapi depends on `regex`, which this workspace patches to \
         regex-lite (\\d \\w \\s \\b and (?i) ASCII-only, no \\p{{..}}, slower): a patch \
         replaces the package under any name, so drop the patch (the key daemon then links \
         the full engine again) or move that crate to regex-automata"
    );
    // Its patterns were read for what regex-lite lacks at this version; a
    // new one must be read again before it is locked.
    assert!(
        lock.contains("name = \"tss-esapi\"\nversion = \"7.7.0\"\n"),
        "tss-esapi is no longer 7.7.0: read its tcti_ldr.rs patterns for \\d \\w \\s \\b (?i) \
         \\p{{..}} (regex-lite, patched in for `regex`, treats them differently), then update \
         this check"
    );
}

#[cfg(feature = "tpm")]
#[test]
fn tcti_strings_read_as_before() {
    use std::str::FromStr as _;
    use tss_esapi::TctiNameConf;
    for (given, meant) in [
        (
            "swtpm:host=127.0.0.1,port=40123",
            "swtpm:host=127.0.0.1,port=40123",
        ),
        (
            "swtpm:port=40123,host=127.0.0.1",
            "swtpm:host=127.0.0.1,port=40123",
        ),
        ("swtpm:port=40123", "swtpm:host=localhost,port=40123"),
        ("swtpm", "swtpm:host=localhost,port=2321"),
        (
            "mssim:host=tpm.example,port=2321",
            "mssim:host=tpm.example,port=2321",
        ),
        ("device:/dev/tpmrm0", "device:/dev/tpmrm0"),
        ("device", "device:/dev/tpm0"),
        (
            "tabrmd:bus_name=com.example.Tabrmd,bus_type=session",
            "tabrmd:bus_name=com.example.Tabrmd,bus_type=session",
        ),
    ] {
        let conf = TctiNameConf::from_str(given).unwrap_or_else(|e| panic!("{given}: {e}"));
        let back = std::ffi::CString::try_from(conf).expect("as a C string");
        assert_eq!(back.to_str().unwrap(), meant, "{given}");
    }
    for bad in [
        "",
        "tpm:/dev/tpm0",
        "swtpm:port=tcp",
        "swtpm:port=99999",
        "tabrmd:bus_name=nodots",
        "devices:/dev/tpm0",
    ] {
        assert!(TctiNameConf::from_str(bad).is_err(), "{bad:?} was accepted");
    }
}
