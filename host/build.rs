//! Link settings for the `edgeward` binary (link.rs).

include!("link.rs");

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=link.rs");
    edgeward_link_args("cargo:rustc-link-arg-bins=");
}
