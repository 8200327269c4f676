#!/usr/bin/env bash
# Gatehouse against nginx (and against bare Pingora, the framework's own ceiling), side by side
# on this machine, in alternating rounds with the same client settings. Traffic stays on
# loopback; every run stops by itself.
#
#   load-tests/run.sh [all|plain|routes|large|idle|selection|plugins|cache|ops|aggregate|tls|fleet]   (default: all, ~13 minutes)
#   ROUNDS=2 DURATION=8s CONNS="50 200" load-tests/run.sh plain
#
# Fronts, each with one worker: the upstream directly (the ceiling), nginx as a reverse proxy
# with upstream keep-alive, bare Pingora (load-tests/bare-pingora), bare Pingora doing the
# per-request work any gateway must do through Pingora's API (X-Forwarded-*, Host, timeouts:
# `--gateway-work`), Gatehouse, and Gatehouse with `forwarded_headers = []` (the same work as bare
# Pingora; `plain` only). Paired per-round ratios of the like-for-like fronts follow the table.
# The upstream is a
# separate nginx (`return 200`, 5-byte body; a 1 MB file for `large`). Prints a markdown table
# (req/s, p50, p99, proxy CPU µs per request from /proc, ratios to nginx) and writes it to
# load-tests/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

scenario=${1:-all}
ROUNDS=${ROUNDS:-2}
DURATION=${DURATION:-8s}
CONNS=${CONNS:-"50 200"}
case "$scenario" in all|plain|routes|large|idle|selection|plugins|cache|ops|aggregate|tls|fleet) ;; *) echo "unknown scenario $scenario" >&2; exit 2;; esac

. load-tests/setup.sh
setup_kit nginx:nginx-light wrk:wrk python3:python3 openssl:openssl curl:curl redis-server:redis-server

UP=18301 NGX=18302 BARE=18303 GH=18304 NGX10K=18305 GH10K=18306 UP2=18307 GHRR=18308 GHHASH=18309
GHPLUG=18310 BAREGW=18311 GHFWD=18312 NGX10=18313 GH10=18314
NGXC=18315 GHC=18316 NGXZ=18317 GHZ=18318 GHOPS=18319 NGXLOG=18320 GHAGG=18321
NGXEC=18322 NGXRSA=18323 GHEC=18324 GHRSA=18325
REDIS=18326 GHFL=18327 GHFL2=18328
hz=$(getconf CLK_TCK)
# CPU cycles per request from the hardware counters, where perf can read them (not in every
# VM): unlike req/s, they barely move with what the neighbours do.
perf_ok=0
if command -v perf >/dev/null && perf stat -x, -e cycles -- true 2>&1 | grep -q '^[0-9]'; then
  perf_ok=1
fi
head -c 1048576 /dev/zero | tr '\0' 'x' > "$work/1m.bin"
# API-like JSON (repeated keys, varying values) for the cache and gzip runs: 1 KB and 100 KB.
python3 - "$work" <<'PY'
import sys
for name, size in (("1k.json", 1000), ("100k.json", 100_000)):
    items, i = [], 0
    while sum(len(x) + 1 for x in items) + 2 < size - 60:
        items.append('{"id":%d,"name":"user %d","score":%d}' % (i, i * 7919 % 10007, i * i % 1013))
        i += 1
    body = "[" + ",".join(items) + "]"
    open(f"{sys.argv[1]}/{name}", "w").write(body + " " * (size - len(body)))
PY

nginx_conf() { # dir port body...
  local dir=$1 port=$2; shift 2
  mkdir -p "$dir"
  cat > "$dir/nginx.conf" <<CONF
worker_processes 1; daemon off; pid $dir/nginx.pid; error_log $dir/error.log;
events { worker_connections 30000; }
http { access_log off; keepalive_requests 1000000; keepalive_timeout 300s;
  client_body_temp_path $dir; proxy_temp_path $dir; fastcgi_temp_path $dir;
  uwsgi_temp_path $dir; scgi_temp_path $dir;
  $*
}
CONF
}

# nginx proxies as Gatehouse does: upstream keep-alive and the same X-Forwarded-* headers
# (Gatehouse always sets them), so both fronts do the same work per request.
NGX_PROXY='proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection ""; proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for; proxy_set_header X-Forwarded-Proto $scheme; proxy_set_header X-Forwarded-Host $host;'

routes_locations() { # n [first] -> nginx locations proxying to the upstream
  for i in $(seq "${2:-0}" $((${2:-0} + $1 - 1))); do
    echo "location /svc$i/ { $NGX_PROXY }"
  done
}
routes_toml() { # n [first] -> gatehouse routes
  for i in $(seq "${2:-0}" $((${2:-0} + $1 - 1))); do
    printf '[[routes]]\npath = "/svc%d"\nupstream = "up"\n' "$i"
  done
}
gatehouse_conf() { # port routes [upstream policy lines, with a second peer] [server lines]
  local peers="\"127.0.0.1:$UP\""
  [ -n "${3:-}" ] && peers="$peers, \"127.0.0.1:$UP2\""
  cat <<CONF
[server]
threads = 1
upstream_keepalive_pool = 256
${4:-}
[upstreams.up]
peers = [$peers]
${3:-}
[gateways.bench]
listen = ["127.0.0.1:$1"]
$2
CONF
}

upstream="upstream up { server 127.0.0.1:$UP; keepalive 256; keepalive_requests 1000000; }"
nginx_conf "$work/up" $UP "server { listen 127.0.0.1:$UP; listen 127.0.0.1:$UP2; location = /1m { alias $work/1m.bin; } location ~ ^/(1k|100k)\$ { alias $work/\$1.json; default_type application/json; add_header Cache-Control \"max-age=3600\"; } location = /users/1 { default_type application/json; return 200 '{\"data\":{\"id\":1,\"name\":\"Ada Lovelace\"}}'; } location = /orders { default_type application/json; return 200 '{\"data\":[{\"id\":101,\"product_id\":11},{\"id\":102,\"product_id\":12}]}'; } location = /products { default_type application/json; return 200 '{\"data\":[{\"id\":11,\"name\":\"Keyboard\"},{\"id\":12,\"name\":\"Mouse\"}]}'; } location / { return 200 hello; } }"
nginx_conf "$work/ngx" $NGX "$upstream server { listen 127.0.0.1:$NGX; location / { $NGX_PROXY proxy_buffers 64 16k; } }"
gatehouse_conf $GH "$(printf '[[routes]]\nupstream = "up"\n')" > "$work/gh.toml"
# Gatehouse doing what bare Pingora does (forward only, Host kept): the like-for-like pair.
gatehouse_conf $GHFWD "$(printf 'forwarded_headers = []\n[[routes]]\nupstream = "up"\n')" > "$work/ghfwd.toml"

start() { "$@" & pids+=($!); }
start nginx -p "$work/up" -c "$work/up/nginx.conf"
one_route="$(printf '[[routes]]\nupstream = "up"\n')"
start nginx -p "$work/ngx" -c "$work/ngx/nginx.conf"
start "$bare" 127.0.0.1:$BARE 127.0.0.1:$UP 1
start "$bare" 127.0.0.1:$BAREGW 127.0.0.1:$UP 1 --gateway-work
RUST_LOG=error start "$gh" run -c "$work/gh.toml"
RUST_LOG=error start "$gh" run -c "$work/ghfwd.toml"
ports="$UP $NGX $BARE $BAREGW $GH $GHFWD"
if [ "$scenario" = all ] || [ "$scenario" = routes ]; then
  # 10 routes (/svc7770 ... /svc7779) and 10,000 (/svc0 ... /svc9999): /svc7777/items matches
  # in both.
  ports="$ports $NGX10 $GH10 $NGX10K $GH10K"
  nginx_conf "$work/ngx10" $NGX10 "$upstream server { listen 127.0.0.1:$NGX10; $(routes_locations 10 7770) location / { $NGX_PROXY proxy_buffers 64 16k; } }"
  gatehouse_conf $GH10 "$(routes_toml 10 7770)" > "$work/gh10.toml"
  start nginx -p "$work/ngx10" -c "$work/ngx10/nginx.conf"
  RUST_LOG=error start "$gh" run -c "$work/gh10.toml"
  nginx_conf "$work/ngx10k" $NGX10K "$upstream server { listen 127.0.0.1:$NGX10K; $(routes_locations 10000) location / { $NGX_PROXY proxy_buffers 64 16k; } }"
  gatehouse_conf $GH10K "$(routes_toml 10000)" > "$work/gh10k.toml"
  start nginx -p "$work/ngx10k" -c "$work/ngx10k/nginx.conf"
  RUST_LOG=error start "$gh" run -c "$work/gh10k.toml"
fi
if [ "$scenario" = all ] || [ "$scenario" = selection ]; then
  ports="$ports $UP2 $GHRR $GHHASH"
  gatehouse_conf $GHRR "$one_route" 'selection = "round_robin"' > "$work/ghrr.toml"
  gatehouse_conf $GHHASH "$one_route" 'selection = "consistent_hash"
hash_key = "header:x-user"
health_check = { kind = "http", path = "/", interval = "1s" }' > "$work/ghhash.toml"
  RUST_LOG=error start "$gh" run -c "$work/ghrr.toml"
  RUST_LOG=error start "$gh" run -c "$work/ghhash.toml"
  cat > "$work/users.lua" <<'LUA'
math.randomseed(42)
request = function()
  return wrk.format(nil, nil, { ["x-user"] = "user-" .. math.random(1, 10000) })
end
LUA
fi
if [ "$scenario" = all ] || [ "$scenario" = cache ]; then
  # Cache hits: nginx proxy_cache on tmpfs (same 256 MiB bound) against Gatehouse's cache,
  # and gzip level 6 of 100 KB JSON by each (no cache: compressing every answer).
  ports="$ports $NGXC $GHC $NGXZ $GHZ"
  cdir=/dev/shm; [ -d "$cdir" ] || cdir=$work
  cdir=$(mktemp -d "$cdir/gh-ngx-cache.XXXX"); chmod 777 "$cdir"
  nginx_conf "$work/ngxc" $NGXC "$upstream proxy_cache_path $cdir levels=1:2 keys_zone=c:16m max_size=256m inactive=1h; server { listen 127.0.0.1:$NGXC; location / { $NGX_PROXY proxy_cache c; proxy_cache_lock on; add_header X-Cache-Status \$upstream_cache_status; } }"
  gatehouse_conf $GHC "$(printf '[[routes]]\nupstream = "up"\ncache = { ttl = "1h" }\n')" > "$work/ghc.toml"
  nginx_conf "$work/ngxz" $NGXZ "$upstream server { listen 127.0.0.1:$NGXZ; location / { $NGX_PROXY proxy_buffers 64 16k; gzip on; gzip_comp_level 6; gzip_min_length 1024; gzip_types application/json; gzip_proxied any; } }"
  gatehouse_conf $GHZ "$(printf '[[routes]]\nupstream = "up"\ncompression = { algorithms = ["gzip"], level = 6 }\n')" > "$work/ghz.toml"
  start nginx -p "$work/ngxc" -c "$work/ngxc/nginx.conf"
  RUST_LOG=error start "$gh" run -c "$work/ghc.toml"
  start nginx -p "$work/ngxz" -c "$work/ngxz/nginx.conf"
  RUST_LOG=error start "$gh" run -c "$work/ghz.toml"
  printf 'wrk.headers["Accept-Encoding"] = "gzip"\n' > "$work/gzip.lua"
  trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null; rm -rf "$work" "$cdir"' EXIT
fi
if [ "$scenario" = all ] || [ "$scenario" = ops ]; then
  # The plain route with the operations features on: the JSON access log to a file (one line
  # per request, written by its own thread) and the admin listener scraped every second, against
  # the same route without them. nginx with a JSON access_log (buffered) beside its plain run.
  ports="$ports $GHOPS $NGXLOG"
  gatehouse_conf $GHOPS "$one_route" "" "admin = \"127.0.0.1:$((GHOPS + 100))\"
access_log = { path = \"$work/gh-access.log\", format = \"json\" }" > "$work/ghops.toml"
  RUST_LOG=error start "$gh" run -c "$work/ghops.toml"
  nginx_conf "$work/ngxlog" $NGXLOG "$upstream log_format j escape=json '{\"time\":\"\$time_iso8601\",\"request_id\":\"\$request_id\",\"client_ip\":\"\$remote_addr\",\"method\":\"\$request_method\",\"host\":\"\$host\",\"path\":\"\$request_uri\",\"status\":\$status,\"request_bytes\":\$request_length,\"response_bytes\":\$bytes_sent,\"duration\":\$request_time,\"upstream_time\":\"\$upstream_response_time\",\"peer\":\"\$upstream_addr\",\"user_agent\":\"\$http_user_agent\",\"referer\":\"\$http_referer\"}'; server { listen 127.0.0.1:$NGXLOG; access_log $work/ngx-access.log j buffer=64k; location / { $NGX_PROXY proxy_buffers 64 16k; } }"
  start nginx -p "$work/ngxlog" -c "$work/ngxlog/nginx.conf"
fi
if [ "$scenario" = all ] || [ "$scenario" = aggregate ]; then
  # A screen that needs a user, their orders (after the user: they take its id) and the
  # products: one aggregate request, against the three proxied requests a client would
  # otherwise send one after the other. Same gateway, same upstream.
  ports="$ports $GHAGG"
  gatehouse_conf $GHAGG "$(printf '[[routes]]\npath = "~ ^/screen/(?P<id>[0-9]+)$"\n[routes.aggregate.parts]\nuser = "up:/users/{id}"\norders = "up:/orders?user={user.data.id}"\nproducts = "up:/products"\n[[routes]]\nupstream = "up"\n')" > "$work/ghagg.toml"
  RUST_LOG=error start "$gh" run -c "$work/ghagg.toml"
  printf 'local p = {"/users/1", "/orders?user=1", "/products"}\nlocal i = 0\nrequest = function()\n  i = i %% 3 + 1\n  return wrk.format("GET", p[i])\nend\n' > "$work/three.lua"
fi
if [ "$scenario" = all ] || [ "$scenario" = tls ]; then
  # TLS termination with the same certificates (ECDSA P-256, RSA 2048) on both fronts, each
  # proxying to the upstream over plain HTTP. nginx keeps a shared session cache as production
  # configs do; Gatehouse has OpenSSL's (Pingora's defaults, session tickets on).
  ports="$ports $NGXEC $NGXRSA $GHEC $GHRSA"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$work/ec.key" \
    -out "$work/ec.crt" -days 30 -subj /CN=localhost -addext subjectAltName=DNS:localhost 2>/dev/null
  openssl req -x509 -newkey rsa:2048 -nodes -keyout "$work/rsa.key" -out "$work/rsa.crt" \
    -days 30 -subj /CN=localhost -addext subjectAltName=DNS:localhost 2>/dev/null
  chmod 644 "$work"/*.key
  # TLS 1.2 and 1.3 on both (nginx 1.22's default lacks 1.3, which Gatehouse offers).
  tls_server() { echo "server { listen 127.0.0.1:$1 ssl; ssl_protocols TLSv1.2 TLSv1.3; ssl_certificate $work/$2.crt; ssl_certificate_key $work/$2.key; location / { $NGX_PROXY } }"; }
  nginx_conf "$work/ngxtls" $NGXEC "$upstream ssl_session_cache shared:SSL:10m; $(tls_server $NGXEC ec) $(tls_server $NGXRSA rsa)"
  start nginx -p "$work/ngxtls" -c "$work/ngxtls/nginx.conf"
  for alg in ec rsa; do
    port=$GHEC; [ $alg = rsa ] && port=$GHRSA
    gatehouse_conf $port "$(printf 'tls = { cert = "%s", key = "%s" }\n[[routes]]\nupstream = "up"\n' "$work/$alg.crt" "$work/$alg.key")" > "$work/gh$alg.toml"
    RUST_LOG=error start "$gh" run -c "$work/gh$alg.toml"
  done
  # A new connection per request: wrk resumes the TLS session of the one before (TLS 1.3
  # with a fresh X25519 exchange, psk_dhe_ke, as OpenSSL clients do).
  printf 'wrk.headers["Connection"] = "close"\n' > "$work/close.lua"
fi
if [ "$scenario" = all ] || [ "$scenario" = plugins ]; then
  # One gateway, two routes: /plain with no plugin, /secure with the issue's stack. The rate
  # limit is set high enough never to refuse: we measure its bookkeeping, not refusals.
  ports="$ports $GHPLUG"
  key="$root/tests/fixtures/jose/rfc7515-a2-rs256.key.pem"
  b64url() { base64 -w0 | tr '+/' '-_' | tr -d '='; }
  jwt_head=$(printf '{"alg":"RS256","typ":"JWT"}' | b64url)
  jwt_body=$(printf '{"sub":"bench","iss":"bench","exp":%d}' $(( $(date +%s) + 86400 )) | b64url)
  jwt_sig=$(printf '%s.%s' "$jwt_head" "$jwt_body" | openssl dgst -sha256 -sign "$key" -binary | b64url)
  token="$jwt_head.$jwt_body.$jwt_sig"
  gatehouse_conf $GHPLUG "$(cat <<ROUTES
[plugins.rid]
kind = "request_id"
[plugins.ip]
kind = "ip_filter"
allow = ["127.0.0.0/8"]
[plugins.jwt]
kind = "jwt_auth"
algorithms = ["RS256"]
public_key_file = "$root/tests/fixtures/jose/rfc7515-a2-rs256.pub.pem"
issuer = "bench"
[plugins.rl]
kind = "rate_limit"
key = "client_ip"
rate = "10000000/s"
[[routes]]
path = "/plain"
upstream = "up"
[[routes]]
path = "/secure"
upstream = "up"
plugins = ["rid", "ip", "jwt", "rl"]
ROUTES
)" > "$work/ghplug.toml"
  RUST_LOG=error start "$gh" run -c "$work/ghplug.toml"
  printf 'wrk.headers["Authorization"] = "Bearer %s"\n' "$token" > "$work/jwt.lua"
fi
if [ "$scenario" = all ] || [ "$scenario" = fleet ]; then
  # Rate limits counted in Redis against the same limit counted in the process: one gateway,
  # three routes, 10,000 API keys (x-user), limits high enough never to refuse (the cost of
  # counting, not of refusals). A second replica for the overshoot runs (run_fleet).
  ports="$ports $REDIS $GHFL $GHFL2"
  start redis-server --port $REDIS --bind 127.0.0.1 --save "" --appendonly no --dir "$work"
  fleet_toml() { # port
    gatehouse_conf "$1" "$(cat <<ROUTES
[stores.shared]
url = "redis://127.0.0.1:$REDIS"
[plugins.local]
kind = "rate_limit"
key = "header:x-user"
rate = "10000000/s"
[plugins.redis]
kind = "rate_limit"
key = "header:x-user"
rate = "10000000/s"
store = "shared"
[plugins.approx]
kind = "rate_limit"
key = "header:x-user"
rate = "10000000/s"
store = "shared"
sync_every = "100ms"
[plugins.hot-exact]
kind = "rate_limit"
key = "route"
rate = "100/s"
spread = false
store = "shared"
[plugins.hot-approx]
kind = "rate_limit"
key = "route"
rate = "100/s"
spread = false
store = "shared"
sync_every = "100ms"
replicas = 2
[[routes]]
path = "/local"
upstream = "up"
plugins = ["local"]
[[routes]]
path = "/redis"
upstream = "up"
plugins = ["redis"]
[[routes]]
path = "/approx"
upstream = "up"
plugins = ["approx"]
[[routes]]
path = "/hot-exact"
upstream = "up"
plugins = ["hot-exact"]
[[routes]]
path = "/hot-approx"
upstream = "up"
plugins = ["hot-approx"]
ROUTES
)"
  }
  fleet_toml $GHFL > "$work/ghfl.toml"
  fleet_toml $GHFL2 > "$work/ghfl2.toml"
  RUST_LOG=error start "$gh" run -c "$work/ghfl.toml"
  RUST_LOG=error start "$gh" run -c "$work/ghfl2.toml"
  cat > "$work/users.lua" <<'LUA'
math.randomseed(42)
request = function()
  return wrk.format(nil, nil, { ["x-user"] = "user-" .. math.random(1, 10000) })
end
LUA
fi
for p in $ports; do
  for _ in $(seq 300); do (: </dev/tcp/127.0.0.1/$p) 2>/dev/null && break; sleep 0.1; done
  if ! (: </dev/tcp/127.0.0.1/$p) 2>/dev/null; then
    echo "nothing listens on 127.0.0.1:$p after 30 s: a front did not start (see its output above)" >&2
    exit 1
  fi
done

size=$(python3 -c "import urllib.request,sys; print(len(urllib.request.urlopen('http://127.0.0.1:$UP/1m').read()))" 2>&1 || true)
if [ "$size" != 1048576 ]; then
  echo "upstream /1m answered $size bytes, not 1 MiB" >&2
  cat "$work/up/nginx.conf" >&2
  exit 1
fi

# The process doing the proxying on a port (nginx: its worker, not the master).
pid_of() {
  local pid
  pid=$(ss -ltnpH "sport = :$1" | grep -o 'pid=[0-9]*' | head -1 | cut -d= -f2)
  local child
  child=$(pgrep -P "$pid" 2>/dev/null | head -1 || true)
  echo "${child:-$pid}"
}
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

rows="$work/rows"
: > "$rows"
measure() { # scenario front port conns path [wrk script]
  local pid c0 c1 out reqs rps p50 p99 cpu
  pid=$(pid_of "$3")
  c0=$(cpu_ticks "$pid")
  local pp="" cyc="-"
  if [ "$perf_ok" = 1 ]; then
    perf stat -x, -e cycles -p "$pid" -o "$work/perf.out" -- sleep "$DURATION" 2>/dev/null &
    pp=$!
  fi
  out=$(wrk -t1 -c"$4" -d"$DURATION" --latency ${6:+-s "$6"} "${SCHEME:-http}://127.0.0.1:$3$5" 2>&1)
  c1=$(cpu_ticks "$pid")
  reqs=$(awk '/requests in/ {print $1}' <<<"$out")
  rps=$(awk '/Requests\/sec/ {printf "%.0f", $2}' <<<"$out")
  p50=$(awk '$1 == "50%" {print $2}' <<<"$out")
  p99=$(awk '$1 == "99%" {print $2}' <<<"$out")
  if [ -n "$pp" ]; then
    wait "$pp" || true
    cyc=$(awk -F, -v n="$reqs" '$3 == "cycles" && $1 ~ /^[0-9]+$/ && n > 0 { printf "%.0f", $1 / n }' "$work/perf.out")
    cyc=${cyc:--}
  fi
  cpu=$(awk -v t=$((c1 - c0)) -v hz="$hz" -v n="$reqs" 'BEGIN { if (n > 0) printf "%.1f", t * 1e6 / hz / n; else print "-" }')
  # A front answering errors would look fast: such runs are marked in the table.
  local bad
  bad=$(awk '/Non-2xx or 3xx responses/ {print $NF}' <<<"$out")
  if [ -n "$bad" ]; then
    echo "  warning: $2 answered $bad non-2xx responses" >&2
  fi
  # The round ($r of the caller's loop) pairs like-for-like fronts below.
  echo "$1|$2|$4|$rps|$p50|$p99|$cpu|${r:-1}|$bad|$cyc" >> "$rows"
  echo "  $1 $2 c$4: $rps req/s, p99 $p99, $cpu µs/req, $cyc cycles/req" >&2
}

# Full TLS handshakes (no session reuse), each with one request: `openssl s_time -new`. One
# client process, which may be what limits the rate (an ECDSA verify costs the client more
# than the signature costs the server): the front's CPU per handshake does not depend on it.
measure_full() { # scenario front port
  local pid c0 c1 t0 t1 out n first failed="" bad=""
  # s_time's request (HTTP/1.0, no Host) must get a 200 like wrk's: an error answer would
  # look fast, and s_time does not look at the status.
  first=$(printf 'GET / HTTP/1.0\r\n\r\n' | timeout 5 openssl s_client -quiet -connect "127.0.0.1:$3" 2>/dev/null | head -1 || true)
  case "$first" in
    "HTTP/1."?" 200"*) ;;
    *) failed=1; echo "  warning: $2 answered s_time's request with '${first%$'\r'}'" >&2 ;;
  esac
  pid=$(pid_of "$3")
  c0=$(cpu_ticks "$pid")
  t0=$(date +%s.%N)
  out=$(openssl s_time -connect "127.0.0.1:$3" -new -www / -time "${DURATION%s}" 2>&1 || true)
  t1=$(date +%s.%N)
  c1=$(cpu_ticks "$pid")
  n=$(awk '/connections in .* real seconds/ {print $1; exit}' <<<"$out")
  [ -n "$failed" ] && bad=${n:-0}
  local rate cpu
  rate=$(awk -v n="${n:-0}" -v a="$t0" -v b="$t1" 'BEGIN { printf "%.0f", n / (b - a) }')
  cpu=$(awk -v t=$((c1 - c0)) -v hz="$hz" -v n="${n:-0}" 'BEGIN { if (n > 0) printf "%.1f", t * 1e6 / hz / n; else print "-" }')
  echo "$1|$2|1|$rate|-|-|$cpu|${r:-1}|$bad|-" >> "$rows"
  echo "  $1 $2: $rate handshakes/s, $cpu µs/handshake" >&2
}

run_plain() {
  for c in $CONNS; do
    for r in $(seq "$ROUNDS"); do
      measure plain "upstream direct" $UP "$c" /
      measure plain nginx $NGX "$c" /
      # Like-for-like pairs run back to back.
      measure plain "bare pingora" $BARE "$c" /
      measure plain "gatehouse, forwarded_headers = []" $GHFWD "$c" /
      measure plain "bare pingora + X-Forwarded/Host/timeouts" $BAREGW "$c" /
      measure plain gatehouse $GH "$c" /
    done
  done
}
run_routes() {
  for r in $(seq "$ROUNDS"); do
    measure routes "nginx, 10 locations" $NGX10 50 /svc7777/items
    measure routes "nginx, 10,000 locations" $NGX10K 50 /svc7777/items
    measure routes "gatehouse, 10 routes" $GH10 50 /svc7777/items
    measure routes "gatehouse, 10,000 routes" $GH10K 50 /svc7777/items
  done
}
run_large() {
  for r in $(seq "$ROUNDS"); do
    measure large "upstream direct" $UP 50 /1m
    measure large nginx $NGX 50 /1m
    measure large "bare pingora" $BARE 50 /1m
    measure large gatehouse $GH 50 /1m
  done
}
run_selection() { # the cost of upstream policies; no nginx equivalent (nginx has no active checks)
  for r in $(seq "$ROUNDS"); do
    measure selection "gatehouse, round_robin" $GHRR 50 / "$work/users.lua"
    measure selection "gatehouse, consistent_hash + http health checks" $GHHASH 50 / "$work/users.lua"
  done
}
run_plugins() { # request_id + ip_filter + jwt_auth (RS256) + rate_limit against the plain route
  for r in $(seq "$ROUNDS"); do
    measure plugins "gatehouse, plain route" $GHPLUG 50 /plain "$work/jwt.lua"
    measure plugins "gatehouse, rid+ip_filter+jwt_auth RS256+rate_limit" $GHPLUG 50 /secure "$work/jwt.lua"
  done
}
run_cache() {
  # Both caches warm and answering hits before anything is measured.
  for path in /1k /100k; do
    for _ in 1 2; do
      curl -s -o /dev/null "http://127.0.0.1:$NGXC$path"; curl -s -o /dev/null "http://127.0.0.1:$GHC$path"
    done
    n=$(curl -sI "http://127.0.0.1:$NGXC$path" | tr -d '\r' | awk -F': ' 'tolower($1) == "x-cache-status" {print $2}')
    g=$(curl -sI "http://127.0.0.1:$GHC$path" | tr -d '\r' | awk -F': ' 'tolower($1) == "x-cache-status" {print $2}')
    if [ "$n" != HIT ] || [ "$g" != HIT ]; then
      echo "caches not warm on $path: nginx says '$n', gatehouse says '$g'" >&2
      exit 1
    fi
  done
  z=$(curl -s -H 'Accept-Encoding: gzip' -o /dev/null -w '%{size_download}' "http://127.0.0.1:$GHZ/100k")
  zn=$(curl -s -H 'Accept-Encoding: gzip' -o /dev/null -w '%{size_download}' "http://127.0.0.1:$NGXZ/100k")
  echo "  gzip 6 of 100 KB JSON: gatehouse $z bytes, nginx $zn bytes" >&2
  for r in $(seq "$ROUNDS"); do
    measure cache-1k "nginx proxy_cache hit" $NGXC 50 /1k
    measure cache-1k "gatehouse cache hit" $GHC 50 /1k
    measure cache-1k "gatehouse, no cache" $GH 50 /1k
    measure cache-100k "nginx proxy_cache hit" $NGXC 50 /100k
    measure cache-100k "gatehouse cache hit" $GHC 50 /100k
    measure cache-100k "gatehouse, no cache" $GH 50 /100k
    measure gzip-100k "nginx gzip 6" $NGXZ 50 /100k "$work/gzip.lua"
    measure gzip-100k "gatehouse gzip 6" $GHZ 50 /100k "$work/gzip.lua"
  done
}
run_ops() { # metrics + JSON access log + scrapes against the plain route; nginx likewise
  ( for _ in $(seq 600); do curl -s -o /dev/null "http://127.0.0.1:$((GHOPS + 100))/metrics" || true; sleep 1; done ) &
  local scraper=$!
  for r in $(seq "$ROUNDS"); do
    # Each pair back to back, its order turned every round (A B, then B A): a neighbour's
    # load that grows or fades during a round weighs on both sides alike.
    if [ $((r % 2)) = 1 ]; then
      measure ops nginx $NGX 50 /
      measure ops "nginx, JSON access_log" $NGXLOG 50 /
      measure ops "gatehouse, plain" $GH 50 /
      measure ops "gatehouse, JSON access log + /metrics scraped" $GHOPS 50 /
    else
      measure ops "gatehouse, JSON access log + /metrics scraped" $GHOPS 50 /
      measure ops "gatehouse, plain" $GH 50 /
      measure ops "nginx, JSON access_log" $NGXLOG 50 /
      measure ops nginx $NGX 50 /
    fi
  done
  kill "$scraper" 2>/dev/null || true
  echo "  access log lines: gatehouse $(wc -l < "$work/gh-access.log"), nginx $(wc -l < "$work/ngx-access.log")" >&2
}
run_aggregate() { # one 3-part aggregate request against three proxied requests
  for r in $(seq "$ROUNDS"); do
    if [ $((r % 2)) = 1 ]; then
      measure aggregate "gatehouse, aggregate of 3 parts" $GHAGG 50 /screen/1
      measure aggregate "gatehouse, 3 proxied requests" $GHAGG 50 / "$work/three.lua"
    else
      measure aggregate "gatehouse, 3 proxied requests" $GHAGG 50 / "$work/three.lua"
      measure aggregate "gatehouse, aggregate of 3 parts" $GHAGG 50 /screen/1
    fi
  done
}
run_tls() { # keep-alive requests, resumed handshakes, full handshakes; nginx and Gatehouse
  for r in $(seq "$ROUNDS"); do
    for alg in ecdsa rsa; do
      local n=$NGXEC g=$GHEC
      [ $alg = rsa ] && n=$NGXRSA g=$GHRSA
      # Each pair back to back, its order turned every round.
      local order="nginx:$n gatehouse:$g"
      [ $((r % 2)) = 0 ] && order="gatehouse:$g nginx:$n"
      for f in $order; do SCHEME=https measure "tls-keepalive-$alg" "${f%%:*}" "${f#*:}" 50 /; done
      for f in $order; do SCHEME=https measure "tls-resumed-$alg" "${f%%:*}" "${f#*:}" 50 / "$work/close.lua"; done
      for f in $order; do measure_full "tls-full-$alg" "${f%%:*}" "${f#*:}"; done
    done
  done
}
script_calls() { redis-cli -p $REDIS info commandstats | awk -F'[=,]' '/^cmdstat_eval(sha)?:/ {n += $2} END {print n + 0}'; }

run_fleet() { # rate limits in Redis against the same limits in the process; overshoot
  local before after reqs
  for c in $CONNS; do
    for r in $(seq "$ROUNDS"); do
      measure fleet "gatehouse, local limit" $GHFL "$c" /local "$work/users.lua"
      before=$(script_calls)
      rc0=$(cpu_ticks "$(pid_of $REDIS)")
      measure fleet "gatehouse, Redis store" $GHFL "$c" /redis "$work/users.lua"
      rc1=$(cpu_ticks "$(pid_of $REDIS)")
      after=$(script_calls)
      reqs=$(tail -1 "$rows" | awk -F'|' -v d="${DURATION%s}" '{printf "%.0f", $4 * d}')
      echo "  Redis script calls per request: $(awk -v a="$after" -v b="$before" -v n="$reqs" 'BEGIN { printf "%.3f", (a - b) / n }')" >&2
      echo "calls|Redis store c$c|$((after - before))|$reqs" >> "$work/calls"
      echo "redis|Redis store c$c|$((rc1 - rc0))|$reqs" >> "$work/redis-cpu"
      before=$(script_calls)
      measure fleet "gatehouse, Redis store, sync_every 100ms" $GHFL "$c" /approx "$work/users.lua"
      after=$(script_calls)
      reqs=$(tail -1 "$rows" | awk -F'|' -v d="${DURATION%s}" '{printf "%.0f", $4 * d}')
      echo "calls|Redis store, sync_every 100ms c$c|$((after - before))|$reqs" >> "$work/calls"
    done
  done
  # Overshoot: one key limited to 100/s, offered 1,000/s (10x) for 5 s over two replicas.
  for route in hot-exact hot-approx; do
    python3 - "$GHFL" "$GHFL2" "/$route" "$work/overshoot" <<'PY'
import http.client, sys, threading, time
a, b, path, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
RATE, SECS = 500, 5.0          # per replica: 2 x 500 = 1,000 req/s, 10x the limit
ok = [0, 0]
def run(i, port):
    c = http.client.HTTPConnection("127.0.0.1", port)
    t0 = time.monotonic()
    n = 0
    while True:
        due = t0 + n / RATE
        now = time.monotonic()
        if due - t0 >= SECS:
            break
        if due > now:
            time.sleep(due - now)
        c.request("GET", path)
        r = c.getresponse()
        r.read()
        if r.status == 200:
            ok[i] += 1
        n += 1
th = [threading.Thread(target=run, args=(i, p)) for i, p in enumerate((a, b))]
[t.start() for t in th]
[t.join() for t in th]
# 100/s as a quota (spread = false): what two sliding windows of 1 s allow in 5 s is about
# 5 x 100, plus what the first window's count still weighs at the start.
open(out, "a").write(f"{path}|{ok[0] + ok[1]}|{ok[0]}|{ok[1]}\n")
PY
    sleep 2
  done
}

run_idle() { # memory per client connection: silent, trickling a head, idle keep-alive
  # 10,000 connections (IDLE_CONNS) held 6 s each way against a fresh process of each front
  # (an allocator keeps what an earlier mode freed), its RSS sampled every 100 ms
  # (load-tests/idle.py), a normal request every 500 ms meanwhile.
  local n=${IDLE_CONNS:-10000} port=18330
  ulimit -n $((n * 2 + 1000)) 2>/dev/null || true
  for name in nginx bare-pingora gatehouse; do
    for mode in silent trickle keepalive; do
      port=$((port + 1))
      local p
      case $name in
        nginx)
          nginx_conf "$work/idle$port" $port "$upstream server { listen 127.0.0.1:$port; location / { $NGX_PROXY } }"
          nginx -p "$work/idle$port" -c "$work/idle$port/nginx.conf" & p=$! ;;
        bare-pingora) "$bare" 127.0.0.1:$port 127.0.0.1:$UP 1 & p=$! ;;
        gatehouse)
          gatehouse_conf $port "$one_route" > "$work/idle$port.toml"
          RUST_LOG=error "$gh" run -c "$work/idle$port.toml" & p=$! ;;
      esac
      for _ in $(seq 100); do (: </dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.1; done
      sleep 0.5
      local line
      line=$(python3 load-tests/idle.py $port "$(pid_of $port)" "$n" "$mode" 6)
      # idle.py: mode conns before peak kib_per_conn normal_ms
      set -- $line
      echo "idle|$name, $mode|$2|-|-|-|$5|1||-" >> "$rows"
      echo "  idle $name $mode: $3 -> $4 KiB for $2 connections ($5 KiB each); slowest normal request $6 ms" >&2
      echo "$name|$mode|$2|$3|$4|$5|$6" >> "$work/idle.rows"
      if [ $name = nginx ]; then
        # Its workers outlive a killed master (and keep the port).
        nginx -p "$work/idle$port" -c "$work/idle$port/nginx.conf" -s stop 2>/dev/null || true
      else
        kill -9 $p 2>/dev/null || true
      fi
      wait $p 2>/dev/null || true
      sleep 1
    done
  done
}

case "$scenario" in
  all) run_plain; run_routes; run_large; run_selection; run_plugins; run_cache; run_ops; run_aggregate; run_tls; run_fleet; run_idle ;;
  *) "run_$scenario" ;;
esac

# Median of the rounds per (scenario, front, conns), then ratios to nginx of the same group.
table=$(python3 - "$rows" <<'PY'
import sys, statistics
rows = [l.rstrip("\n").split("|") for l in open(sys.argv[1]) if l.strip()]
groups = {}
for sc, front, c, rps, p50, p99, cpu, rnd, bad, cyc in rows:
    groups.setdefault((sc, front, c), []).append((rps, p50, p99, cpu, rnd, bad, cyc))
def num(v):
    try: return float(v)
    except ValueError: return None
def med(vals):
    xs = [num(v) for v in vals if num(v) is not None]
    return statistics.median(xs) if xs else None
def ms(v):
    if v in ("-", None): return None
    v = v.strip()
    for suf, k in (("us", 0.001), ("ms", 1.0), ("s", 1000.0)):
        if v.endswith(suf): return float(v[: -len(suf)]) * k
    return None
print("| scenario | front | conns | req/s | p50 ms | p99 ms | CPU µs/req | kcycles/req | req/s ÷ base | CPU ÷ base |")
print("|---|---|---|---|---|---|---|---|---|---|")
base = {}
for (sc, front, c), v in groups.items():
    if front.startswith("nginx") or front in ("gatehouse, plain route", "gatehouse, local limit"):
        base.setdefault((sc, c), (med([x[0] for x in v]), med([x[3] for x in v])))
for (sc, front, c), v in groups.items():
    if sc == "idle":
        print(f"| {sc} | {front} | {c} | | | | {v[0][3]} KiB/conn | | | |")
        continue
    rps, cpu = med([x[0] for x in v]), med([x[3] for x in v])
    lat = lambda i: [ms(x[i]) for x in v if ms(x[i]) is not None]
    p50 = statistics.median(lat(1)) if lat(1) else float("nan")
    p99 = statistics.median(lat(2)) if lat(2) else float("nan")
    b = base.get((sc, c), (None, None))
    r1 = f"{rps / b[0]:.2f}" if b[0] and rps else ""
    r2 = f"{cpu / b[1]:.2f}" if b[1] and cpu else ""
    cpu_s = f"{cpu:.1f}" if cpu is not None else "-"
    cyc = med([x[6] for x in v])
    cyc_s = f"{cyc / 1000:.1f}" if cyc else "-"
    # A front answering errors would look fast: such runs are marked.
    errors = sum(int(x[5]) for x in v if x[5].isdigit())
    if errors:
        front = f"{front} (NOT 2xx: {errors})"
    print(f"| {sc} | {front} | {c} | {rps:.0f} | {p50:.2f} | {p99:.2f} | {cpu_s} | {cyc_s} | {r1} | {r2} |")
print()
# Like-for-like pairs, from the same rounds: the ratio of each round, then their median (rounds
# alternate, so a pair ran seconds apart; the median of pair ratios shrugs off a noisy round).
pairs = [("plain", "gatehouse, forwarded_headers = []", "bare pingora", "Gatehouse forwarding only ÷ bare Pingora (same work)"),
         ("plain", "gatehouse", "bare pingora + X-Forwarded/Host/timeouts", "Gatehouse ÷ bare Pingora + X-Forwarded-* (same work)"),
         ("plain", "gatehouse", "bare pingora", "Gatehouse (default X-Forwarded-*) ÷ bare Pingora (forwards only)"),
         ("routes", "gatehouse, 10,000 routes", "gatehouse, 10 routes", "Gatehouse 10,000 routes ÷ 10 routes"),
         ("routes", "nginx, 10,000 locations", "nginx, 10 locations", "nginx 10,000 locations ÷ 10 locations"),
         ("cache-1k", "gatehouse cache hit", "nginx proxy_cache hit", "Gatehouse cache hits ÷ nginx proxy_cache hits, 1 KB"),
         ("cache-1k", "gatehouse cache hit", "gatehouse, no cache", "Gatehouse cache hits ÷ Gatehouse uncached, 1 KB"),
         ("cache-100k", "gatehouse cache hit", "nginx proxy_cache hit", "Gatehouse cache hits ÷ nginx proxy_cache hits, 100 KB"),
         ("cache-100k", "gatehouse cache hit", "gatehouse, no cache", "Gatehouse cache hits ÷ Gatehouse uncached, 100 KB"),
         ("gzip-100k", "gatehouse gzip 6", "nginx gzip 6", "Gatehouse gzip 6 ÷ nginx gzip 6, 100 KB JSON"),
         ("ops", "gatehouse, JSON access log + /metrics scraped", "gatehouse, plain", "Gatehouse with JSON access log + scrapes ÷ without"),
         ("ops", "nginx, JSON access_log", "nginx", "nginx with JSON access_log ÷ without"),
         ("ops", "gatehouse, JSON access log + /metrics scraped", "nginx, JSON access_log", "Gatehouse ÷ nginx, both with JSON access logs"),
         ("fleet", "gatehouse, Redis store", "gatehouse, local limit", "Rate limit counted in Redis ÷ in the process"),
         ("fleet", "gatehouse, Redis store, sync_every 100ms", "gatehouse, local limit", "Rate limit in Redis, approximate mode ÷ in the process")]
for alg, name in (("ecdsa", "ECDSA P-256"), ("rsa", "RSA 2048")):
    pairs += [(f"tls-keepalive-{alg}", "gatehouse", "nginx", f"Gatehouse ÷ nginx, keep-alive requests over TLS, {name}"),
              (f"tls-resumed-{alg}", "gatehouse", "nginx", f"Gatehouse ÷ nginx, resumed handshakes (one request each), {name}"),
              (f"tls-full-{alg}", "gatehouse", "nginx", f"Gatehouse ÷ nginx, full handshakes (one request each), {name}")]
lines = []
for scenario, a, b, label in pairs:
    for (sc, front, c), v in groups.items():
        if sc != scenario or front != a or (sc, b, c) not in groups:
            continue
        # Paired by round; a round where either front answered errors is left out.
        w = {y[4]: y for y in groups[(sc, b, c)] if not y[5]}
        both = [(x, w[x[4]]) for x in v if not x[5] and x[4] in w]
        rr = [num(x[0]) / num(y[0]) for x, y in both if num(x[0]) and num(y[0])]
        cr = [num(x[3]) / num(y[3]) for x, y in both if num(x[3]) and num(y[3])]
        yr = [num(x[6]) / num(y[6]) for x, y in both if num(x[6]) and num(y[6])]
        if rr:
            per = ", ".join(f"{r:.2f}" for r in rr)
            cpu_r = f"{statistics.median(cr):.3f}" if cr else "n/a"
            cyc_r = f", cycles/req {statistics.median(yr):.3f}" if yr else ""
            lines.append(f"- {label}, c{c}: req/s {statistics.median(rr):.3f} (rounds: {per}), "
                         f"CPU/req {cpu_r}{cyc_r}")
# Aggregation: a screen is one aggregate request, or three proxied requests.
agg = groups.get(("aggregate", "gatehouse, aggregate of 3 parts", "50"))
three = groups.get(("aggregate", "gatehouse, 3 proxied requests", "50"))
if agg and three:
    w = {y[4]: y for y in three if not y[5]}
    rr = [num(x[0]) / (num(w[x[4]][0]) / 3) for x in agg if not x[5] and x[4] in w and num(x[0]) and num(w[x[4]][0])]
    if rr:
        a_p99 = statistics.median([ms(x[2]) for x in agg if ms(x[2]) is not None])
        t_p99 = statistics.median([ms(x[2]) for x in three if ms(x[2]) is not None])
        lines.append(f"- Screens per second, one aggregate request ÷ three proxied requests (req/s ÷ 3), c50: "
                     f"{statistics.median(rr):.3f} (rounds: {', '.join(f'{r:.2f}' for r in rr)}); "
                     f"p99 of a screen: aggregate {a_p99:.2f} ms, three in a row at most {3 * t_p99:.2f} ms "
                     f"(3 × the p99 of one, {t_p99:.2f} ms)")
if lines:
    print("Paired ratios (median of per-round ratios):")
    print()
    print("\n".join(lines))
PY
)
mkdir -p load-tests/results
out="load-tests/results/$(date -u +%Y%m%d-%H%M%S)-$scenario.md"
{
  echo "# load-tests/run.sh $scenario — $(date -u +%Y-%m-%dT%H:%MZ)"
  echo
  echo "$(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo); wrk -t1, $DURATION per run, $ROUNDS alternating rounds (medians); one worker per front; upstream: nginx return 200 (5 bytes) or a 1 MB file."
  echo "CPU µs/req: utime+stime of the proxying process (nginx: its worker) over the run ÷ requests. kcycles/req: its CPU cycles (perf stat, user + kernel) ÷ requests, where perf can read them."
  echo "Base of the ratios: nginx in its scenario; for plugins, the same gateway's plain route."
  echo
  echo "$table"
  if [ -s "$work/calls" ]; then
    echo
    echo "Redis script calls per request (INFO commandstats, EVALSHA + EVAL, ÷ requests):"
    echo
    awk -F'|' '{c[$2] += $3; n[$2] += $4} END {for (k in c) printf "- %s: %.3f\n", k, c[k] / n[k]}' "$work/calls" | sort
  fi
  if [ -s "$work/redis-cpu" ]; then
    echo
    echo "Redis' own CPU per request (utime + stime of redis-server ÷ requests; it shares the cores with the gateway, wrk and the upstream here):"
    echo
    awk -F'|' -v hz="$hz" '{c[$2] += $3; n[$2] += $4} END {for (k in c) printf "- %s: %.1f µs\n", k, c[k] * 1e6 / hz / n[k]}' "$work/redis-cpu" | sort
  fi
  if [ -s "$work/idle.rows" ]; then
    echo
    echo "Memory per client connection (load-tests/idle.py): connections held 6 s against a fresh process; RSS before, at the peak, and the growth per connection; the slowest of the normal requests made every 500 ms meanwhile:"
    echo
    echo "| front | connections | mode | RSS before | RSS peak | KiB per connection | slowest normal request |"
    echo "|---|---|---|---|---|---|---|"
    awk -F'|' '{printf "| %s | %s | %s | %.1f MB | %.1f MB | %s | %s ms |\n", $1, $3, $2, $4 / 1024, $5 / 1024, $6, $7}' "$work/idle.rows"
  fi
  if [ -s "$work/overshoot" ]; then
    echo
    echo "Overshoot: one key limited to 100/s (spread = false), offered 1,000 req/s (10×) for 5 s over two replicas sharing Redis; about 500 is the limit's share of 5 s:"
    echo
    awk -F'|' '{printf "- %s: %d served (%d + %d), %.2f× of 500\n", $1, $2, $3, $4, $2 / 500}' "$work/overshoot"
  fi
} > "$out"
echo
cat "$out"
echo
echo "written to $out"
