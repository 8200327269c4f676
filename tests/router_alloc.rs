//! Route lookup allocates nothing per request, with 10 or 10,000 routes: checked with a
//! counting allocator around real lookups (no timing here; speed is in `cargo bench`).
use std::alloc::{GlobalAlloc, Layout, System};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

use gatehouse::router::Router;
use http::{HeaderMap, Method};

struct Counting;

static ALLOCS: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

pub fn many_routes(n: usize) -> String {
    let mut s = String::from(
        "[upstreams.u]\npeers = [\"127.0.0.1:1\"]\n[gateways.g]\nlisten = [\"127.0.0.1:1\"]\n",
    );
    for i in 0..n {
        let host = if i % 3 == 0 {
            format!("host = \"svc{i}.example.com\"\n")
        } else {
            String::new()
        };
        s.push_str(&format!(
            "[[routes]]\n{host}path = \"/api/v{}/svc{i}/items\"\nupstream = \"u\"\n",
            i % 7
        ));
    }
    s.push_str("[[routes]]\nhost = \"*.tenants.example.com\"\nupstream = \"u\"\n");
    s.push_str("[[routes]]\npath = \"~ ^/re/[0-9]+$\"\nupstream = \"u\"\n");
    s
}

#[test]
fn lookups_do_not_allocate() {
    for n in [10, 10_000] {
        let cfg = gatehouse::config::load_str(Path::new("t.toml"), &many_routes(n)).unwrap();
        let routes = &cfg.gateways[0].routes;
        let router = Router::new(routes);
        let headers = HeaderMap::new();
        let lookups: Vec<(Option<&str>, String)> = vec![
            (Some("svc0.example.com"), "/api/v0/svc0/items/42".into()),
            (
                Some("x"),
                format!("/api/v{}/svc{}/items", (n - 2) % 7, n - 2),
            ),
            (Some("a.tenants.example.com"), "/anything".into()),
            (None, "/re/123".into()),
            (None, "/nothing/here".into()),
        ];
        // Warm up: the regex engine makes its per-thread match cache on first use.
        for (host, path) in &lookups {
            router.find(routes, *host, path, &Method::GET, &headers);
        }
        let before = ALLOCS.load(Ordering::Relaxed);
        let mut found = 0;
        for _ in 0..100 {
            for (host, path) in &lookups {
                if router
                    .find(routes, *host, path, &Method::GET, &headers)
                    .is_some()
                {
                    found += 1;
                }
            }
        }
        let allocs = ALLOCS.load(Ordering::Relaxed) - before;
        assert_eq!(found, 400, "{n} routes");
        assert_eq!(allocs, 0, "{n} routes: {allocs} allocations in 500 lookups");
    }
}
