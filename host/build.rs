//! Link settings for the `edgeward` binary (link.rs).

include!("link.rs");

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=link.rs");
    let dir = std::path::PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    edgeward_link_args("cargo:rustc-link-arg-bins=", &dir.join("edgeward.order"));
}
