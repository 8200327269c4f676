#!/usr/bin/env bash
# User-space instructions per request, by callgrind: figures that do not move with the host's
# neighbours (req/s here moves 2x within minutes). Each front runs twice under valgrind, for
# 300 and for 1300 keep-alive requests over 5 connections; the difference of the two totals
# divided by 1000 is the cost of one request, start-up and shutdown cancelled out.
#
#   load-tests/profile.sh            # about 4 minutes on 2 cores, after the release build
#   BASELINE=/path/to/gatehouse load-tests/profile.sh
#                                    # also profiles an earlier build's binary (say, from a git
#                                    # worktree of the last release), for the cost of a change
#
# Fronts: bare Pingora (only forwards), bare Pingora + X-Forwarded-*/Host/timeouts, Gatehouse
# (one route, defaults), Gatehouse with forwarded_headers = [] (the same work as bare Pingora),
# Gatehouse with the JSON access log and the admin listener on.
# Writes a markdown table to load-tests/results/DATE-profile.md; the callgrind files stay in
# $KEEP when it is set (for callgrind_annotate).
set -euo pipefail
cd "$(dirname "$0")/.."

. load-tests/setup.sh
setup_kit valgrind:valgrind nginx:nginx-light python3:python3
UP=18351 FRONT=18352

mkdir -p "$work/up"
cat > "$work/up/nginx.conf" <<CONF
worker_processes 1; daemon off; pid $work/up/nginx.pid; error_log $work/up/error.log;
events { worker_connections 1024; }
http { access_log off; keepalive_requests 1000000;
  client_body_temp_path $work; proxy_temp_path $work; fastcgi_temp_path $work;
  uwsgi_temp_path $work; scgi_temp_path $work;
  server { listen 127.0.0.1:$UP; location / { return 200 hello; }
    location /1k { add_header Cache-Control "max-age=3600"; return 200 "$(head -c 1024 /dev/zero | tr '\\0' x)"; } } }
CONF
nginx -p "$work/up" -c "$work/up/nginx.conf" & pids+=($!)
for _ in $(seq 100); do (: </dev/tcp/127.0.0.1/$UP) 2>/dev/null && break; sleep 0.1; done

gh_conf() { # extra gateway lines
  cat <<CONF
[server]
threads = 1
[upstreams.up]
peers = ["127.0.0.1:$UP"]
[gateways.bench]
listen = ["127.0.0.1:$FRONT"]
$1
[[routes]]
upstream = "up"
CONF
}
gh_conf "" > "$work/gh.toml"
gh_conf "forwarded_headers = []" > "$work/ghfwd.toml"
# 1 KB answers from the response cache: every measured request is a hit.
{ gh_conf ""; echo 'cache = { ttl = "60s" }'; } > "$work/ghcache.toml"
# The defaults with the operations features on: JSON access log (its writer thread's work
# counts too: callgrind counts every thread) and the admin listener.
gh_conf "" | sed "s|^threads = 1|threads = 1\naccess_log = { path = \"$work/access.log\", format = \"json\" }\nadmin = \"127.0.0.1:$((FRONT + 1))\"|" > "$work/ghops.toml"

cat > "$work/client.py" <<'PY'
import http.client, sys, time
port, n = int(sys.argv[1]), int(sys.argv[2])
path = sys.argv[3] if len(sys.argv) > 3 else "/"
deadline = time.time() + 60
while True:  # wait for the front (valgrind starts slowly), at most a minute
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        c.request("GET", path); c.getresponse().read(); c.close()
        break
    except OSError:
        if time.time() > deadline:
            sys.exit("front did not come up")
        time.sleep(0.3)
conns = [http.client.HTTPConnection("127.0.0.1", port, timeout=30) for _ in range(5)]
for i in range(n):
    c = conns[i % 5]
    c.request("GET", path)
    r = c.getresponse(); r.read()
    if r.status != 200:
        sys.exit(f"status {r.status}")
PY

total() { # callgrind file -> total instructions
  awk '/^summary:/ {print $2; exit} /^totals:/ {print $2; exit}' "$1"
}
rows="$work/rows"
: > "$rows"
profile() { # label command... (PROFILE_PATH: the path asked, default /)
  local label=$1; shift
  local counts=()
  for n in 300 1300; do
    local out="$work/cg.$n"
    valgrind --tool=callgrind --callgrind-out-file="$out" "$@" >/dev/null 2>"$work/vg.err" &
    local vp=$!
    pids+=($vp)  # stopped by the cleanup trap too, should the client fail
    python3 "$work/client.py" $FRONT $n "${PROFILE_PATH:-/}"
    kill -INT $vp; wait $vp || true
    counts+=("$(total "$out")")
    if [ -n "${KEEP:-}" ]; then mkdir -p "$KEEP"; cp "$out" "$KEEP/$(echo "$label" | tr -c 'a-zA-Z0-9\n' '_').$n"; fi
  done
  local per
  per=$(( (counts[1] - counts[0]) / 1000 ))
  echo "$label|$per" >> "$rows"
  echo "  $label: $per instructions per request" >&2
}

profile "bare pingora (only forwards)" "$bare" 127.0.0.1:$FRONT 127.0.0.1:$UP 1
profile "bare pingora + X-Forwarded/Host/timeouts" "$bare" 127.0.0.1:$FRONT 127.0.0.1:$UP 1 --gateway-work
profile "gatehouse, forwarded_headers = []" "$gh" run -c "$work/ghfwd.toml"
profile "gatehouse (defaults: X-Forwarded-For/-Proto/-Host)" "$gh" run -c "$work/gh.toml"
profile "gatehouse (defaults) + JSON access log + admin" "$gh" run -c "$work/ghops.toml"
PROFILE_PATH=/1k profile "gatehouse, 1 KB cache hits" "$gh" run -c "$work/ghcache.toml"
if [ -n "${BASELINE:-}" ]; then
  profile "baseline gatehouse, forwarded_headers = []" "$BASELINE" run -c "$work/ghfwd.toml"
  profile "baseline gatehouse (defaults)" "$BASELINE" run -c "$work/gh.toml"
  PROFILE_PATH=/1k profile "baseline gatehouse, 1 KB cache hits" "$BASELINE" run -c "$work/ghcache.toml"
fi

mkdir -p load-tests/results
out="load-tests/results/$(date -u +%Y%m%d-%H%M%S)-profile.md"
{
  echo "# load-tests/profile.sh — $(date -u +%Y-%m-%dT%H:%MZ)"
  echo
  echo "callgrind, user-space instructions per request: (1300 − 300 keep-alive requests over 5 connections) ÷ 1000; one worker thread; upstream nginx return 200 (5 bytes)."
  echo
  echo "| front | instructions/request | ÷ bare pingora |"
  echo "|---|---|---|"
  base=$(head -1 "$rows" | cut -d'|' -f2)
  while IFS='|' read -r label per; do
    echo "| $label | $per | $(awk -v a="$per" -v b="$base" 'BEGIN { printf "%.3f", a / b }') |"
  done < "$rows"
  if [ -n "${BASELINE:-}" ]; then
    of() { awk -F'|' -v l="$1" '$1 == l { print $2; exit }' "$rows"; }
    echo
    echo "This build ÷ the baseline ($BASELINE):"
    echo
    for pair in "gatehouse, forwarded_headers = []|baseline gatehouse, forwarded_headers = []" \
                "gatehouse (defaults: X-Forwarded-For/-Proto/-Host)|baseline gatehouse (defaults)" \
                "gatehouse (defaults) + JSON access log + admin|baseline gatehouse (defaults)" \
                "gatehouse, 1 KB cache hits|baseline gatehouse, 1 KB cache hits"; do
      now=$(of "${pair%%|*}"); then=$(of "${pair#*|}")
      echo "- ${pair%%|*}: $now ÷ $then = $(awk -v a="$now" -v b="$then" 'BEGIN { printf "%.3f", a / b }')"
    done
  fi
} > "$out"
echo
cat "$out"
echo
echo "written to $out"
