//! `egress-proxy`: placeholder until the proxy lands.
fn main() {
    eprintln!("egress-proxy: not built yet");
    std::process::exit(1);
}
