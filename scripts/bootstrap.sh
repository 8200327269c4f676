#!/usr/bin/env bash
# Installs what building and testing Gatehouse needs, when it is missing, on Debian or Ubuntu:
# cmake (Pingora's zlib-ng build), pkg-config, the OpenSSL and libmodsecurity headers, a C
# compiler, and systemd-analyze (the unit file tests); with `test`, chromium (the status page test),
# logrotate (the logrotate snippet's test), openssl (the OCSP stapling test), redis-server
# (the fleet tests) and modsecurity-crs (the OWASP Core Rule Set, for the WAF tests).
# Safe to run every time: it does nothing when all is there.
set -euo pipefail

need=()
command -v cmake >/dev/null 2>&1 || need+=(cmake)
command -v pkg-config >/dev/null 2>&1 || need+=(pkg-config)
command -v cc >/dev/null 2>&1 || need+=(build-essential)
[ -f /usr/include/openssl/ssl.h ] || need+=(libssl-dev)
# The waf plugin's engine: libmodsecurity 3 (plugins/modsec links it).
[ -f /usr/include/modsecurity/modsecurity.h ] || need+=(libmodsecurity-dev)
# The tests check the systemd unit with systemd-analyze (the package installs, it starts nothing).
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
# `bootstrap.sh test`: what only the tests use, the browser the status page is checked in and
# logrotate (in /usr/sbin, which a user's PATH may lack).
if [ "${1:-}" = test ]; then
  command -v chromium >/dev/null 2>&1 || need+=(chromium)
  command -v logrotate >/dev/null 2>&1 || [ -x /usr/sbin/logrotate ] || need+=(logrotate)
  # The fleet tests start real Redis servers, Clusters and Sentinels (redis-cli comes with it).
  command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
  # The OWASP Core Rule Set, as Debian packages it, for the WAF tests.
  [ -d /usr/share/modsecurity-crs/rules ] || need+=(modsecurity-crs)
  # The OCSP stapling test signs a response with the openssl command.
  command -v openssl >/dev/null 2>&1 || need+=(openssl)
fi

if [ ${#need[@]} -gt 0 ]; then
  echo "bootstrap: installing ${need[*]}" >&2
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
command -v cargo >/dev/null 2>&1 || { echo "bootstrap: cargo not found; install Rust from rustup" >&2; exit 1; }
