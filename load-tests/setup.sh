# Sourced by run.sh and profile.sh: installs the Debian packages named for the commands that
# are missing, builds both proxies in release mode, and gives a scratch folder whose processes
# (listed in `pids`) are stopped, and which is removed, on exit.
#   setup_kit CMD:PACKAGE ...
setup_kit() {
  local need=() spec
  for spec in "$@"; do
    command -v "${spec%%:*}" >/dev/null || need+=("${spec#*:}")
  done
  if [ ${#need[@]} -gt 0 ]; then
    local sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
    $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
  fi
  scripts/bootstrap.sh
  cargo build --release -q -p gatehouse -p bare-pingora
  gh=target/release/gatehouse
  bare=target/release/bare-pingora
  work=$(mktemp -d)
  # nginx workers run as nobody when started by root: they must be able to read files in it.
  chmod 755 "$work"
  pids=()
  trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null; rm -rf "$work"' EXIT
}
