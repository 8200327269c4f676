//! Route lookup cost with 10 and 10,000 routes: `cargo bench --bench router`.
//! Prints ns per lookup; the 10,000-route table should cost about the same as the 10-route one.
use std::hint::black_box;
use std::path::Path;
use std::time::Instant;

use gatehouse::router::Router;
use http::{HeaderMap, Method};

fn many_routes(n: usize) -> String {
    let mut s = String::from(
        "[upstreams.u]\npeers = [\"127.0.0.1:1\"]\n[gateways.g]\nlisten = [\"127.0.0.1:1\"]\n",
    );
    for i in 0..n {
        s.push_str(&format!(
            "[[routes]]\npath = \"/api/v{}/svc{i}/items\"\nupstream = \"u\"\n",
            i % 7
        ));
    }
    s
}

fn main() {
    let headers = HeaderMap::new();
    for n in [10usize, 1_000, 10_000] {
        let cfg = match gatehouse::config::load_str(Path::new("bench.toml"), &many_routes(n)) {
            Ok(c) => c,
            Err(e) => panic!("{e}"),
        };
        let routes = &cfg.gateways[0].routes;
        let router = Router::new(routes);
        let paths: Vec<String> = (0..n.min(64))
            .map(|i| format!("/api/v{}/svc{}/items/123", (i * 13 % n) % 7, i * 13 % n))
            .collect();
        let iters = 2_000_000usize;
        let start = Instant::now();
        for i in 0..iters {
            let p = &paths[i % paths.len()];
            black_box(router.find(routes, Some("api.example.com"), p, &Method::GET, &headers));
        }
        let ns = start.elapsed().as_nanos() as f64 / iters as f64;
        println!("{n:>6} routes: {ns:.0} ns/lookup");
    }
}
