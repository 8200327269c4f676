#!/usr/bin/env bash
# Gatehouse against nginx, proxying the same upstream on loopback, in alternating rounds:
#   upstream: nginx `return 200` (1 worker), a separate process;
#   nginx:    1 worker, reverse proxy with upstream keep-alive;
#   gatehouse: threads = 1, one route, the request_id plugin on.
# Usage: load-tests/compare-nginx.sh [rounds=2] [duration=10s] [connections=50]
# Needs nginx and wrk (apt-get install nginx-light wrk) and a release build; stops by itself.
set -euo pipefail
cd "$(dirname "$0")/.."

rounds=${1:-2}
duration=${2:-10s}
conns=${3:-50}
bin=target/release/gatehouse
for t in nginx wrk; do
  command -v "$t" >/dev/null || { echo "missing $t (apt-get install nginx-light wrk)" >&2; exit 1; }
done
[ -x "$bin" ] || cargo build --release

work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

up=18091 ngx=18092 gh=18093
mkdir -p "$work/up" "$work/ngx"
cat > "$work/up/nginx.conf" <<CONF
worker_processes 1; daemon off; pid $work/up/nginx.pid; error_log $work/up/error.log;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  client_body_temp_path $work/up; proxy_temp_path $work/up; fastcgi_temp_path $work/up;
  uwsgi_temp_path $work/up; scgi_temp_path $work/up;
  server { listen 127.0.0.1:$up; location / { return 200 "hello"; } } }
CONF
cat > "$work/ngx/nginx.conf" <<CONF
worker_processes 1; daemon off; pid $work/ngx/nginx.pid; error_log $work/ngx/error.log;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  client_body_temp_path $work/ngx; proxy_temp_path $work/ngx; fastcgi_temp_path $work/ngx;
  uwsgi_temp_path $work/ngx; scgi_temp_path $work/ngx;
  upstream up { server 127.0.0.1:$up; keepalive 256; keepalive_requests 1000000; }
  server { listen 127.0.0.1:$ngx;
    location / { proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection ""; } } }
CONF
cat > "$work/gatehouse.toml" <<CONF
[server]
threads = 1
plugins = ["rid"]
[plugins.rid]
kind = "request_id"
[upstreams.up]
peers = ["127.0.0.1:$up"]
[gateways.bench]
listen = ["127.0.0.1:$gh"]
[[routes]]
upstream = "up"
CONF

nginx -p "$work/up" -c "$work/up/nginx.conf" & pids+=($!)
nginx -p "$work/ngx" -c "$work/ngx/nginx.conf" & pids+=($!)
RUST_LOG=error "$bin" run -c "$work/gatehouse.toml" & pids+=($!)
for p in $up $ngx $gh; do
  for _ in $(seq 100); do (echo >/dev/tcp/127.0.0.1/$p) 2>/dev/null && break; sleep 0.1; done
done

run() { # name port
  local out rps p99
  out=$(wrk -t1 -c"$conns" -d"$duration" --latency "http://127.0.0.1:$2/" 2>&1)
  rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
  p99=$(awk '$1 == "99%" {print $2}' <<<"$out")
  echo "| $1 | $rps | $p99 |"
}

echo "wrk -t1 -c$conns -d$duration, loopback, $(nproc) cores, $rounds alternating rounds"
echo
echo "| front | req/s | p99 |"
echo "|---|---|---|"
for r in $(seq "$rounds"); do
  run "upstream direct (r$r)" $up
  run "nginx (r$r)" $ngx
  run "gatehouse (r$r)" $gh
done
