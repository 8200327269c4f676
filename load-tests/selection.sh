#!/usr/bin/env bash
# Cost of upstream policies: gatehouse with consistent_hash (by X-User, 10,000 users) and
# active HTTP health checks, against plain round robin without checks, same upstreams
# (2 nginx peers), alternating rounds. wrk -t1, 1 gatehouse worker each.
# Usage: load-tests/selection.sh [rounds=2] [duration=10s] [connections=50]
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

up1=18191 up2=18192 rr=18193 hash=18194
cat > "$work/nginx.conf" <<CONF
worker_processes 1; daemon off; pid $work/nginx.pid; error_log $work/error.log;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  client_body_temp_path $work; proxy_temp_path $work; fastcgi_temp_path $work;
  uwsgi_temp_path $work; scgi_temp_path $work;
  server { listen 127.0.0.1:$up1; listen 127.0.0.1:$up2; location / { return 200 "hello"; } } }
CONF
gh_conf() { # port selection extra
  cat <<CONF
[server]
threads = 1
[upstreams.up]
peers = ["127.0.0.1:$up1", "127.0.0.1:$up2"]
selection = "$2"
$3
[gateways.bench]
listen = ["127.0.0.1:$1"]
[[routes]]
upstream = "up"
CONF
}
gh_conf $rr round_robin "" > "$work/rr.toml"
gh_conf $hash consistent_hash 'hash_key = "header:x-user"
health_check = { kind = "http", path = "/", interval = "1s" }' > "$work/hash.toml"
cat > "$work/users.lua" <<'LUA'
math.randomseed(42)
request = function()
  return wrk.format(nil, nil, { ["x-user"] = "user-" .. math.random(1, 10000) })
end
LUA

nginx -p "$work" -c "$work/nginx.conf" & pids+=($!)
RUST_LOG=error "$bin" run -c "$work/rr.toml" & pids+=($!)
RUST_LOG=error "$bin" run -c "$work/hash.toml" & pids+=($!)
for p in $up1 $up2 $rr $hash; do
  for _ in $(seq 100); do (echo >/dev/tcp/127.0.0.1/$p) 2>/dev/null && break; sleep 0.1; done
done

run() { # name port
  local out rps p99
  out=$(wrk -t1 -c"$conns" -d"$duration" --latency -s "$work/users.lua" "http://127.0.0.1:$2/" 2>&1)
  rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
  p99=$(awk '$1 == "99%" {print $2}' <<<"$out")
  echo "| $1 | $rps | $p99 |"
}

echo "wrk -t1 -c$conns -d$duration, random X-User of 10,000, loopback, $(nproc) cores"
echo
echo "| gatehouse | req/s | p99 |"
echo "|---|---|---|"
for r in $(seq "$rounds"); do
  run "round_robin, no health checks (r$r)" $rr
  run "consistent_hash + http health checks (r$r)" $hash
done
