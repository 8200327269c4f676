//! Links libmodsecurity 3 (Debian: libmodsecurity-dev; `scripts/bootstrap.sh` installs it).
fn main() {
    println!("cargo:rustc-link-lib=dylib=modsecurity");
    println!("cargo:rerun-if-changed=build.rs");
}
