#!/usr/bin/env bash
# Stop exactly the daemons tests/peers/up.sh started, by their pid files (never by name).
# A pid counts only while its command line still is what we started (pids get reused).
# Env: PEERS_STATE (default /tmp/auth-email-peers); PURGE=1 also deletes the state folder
#      (mail, queue, CA, logs).
set -uo pipefail
W=${PEERS_STATE:-/tmp/auth-email-peers}
log() { printf '[peers-down %s] %s\n' "$(date +%T)" "$*" >&2; }
[ -d "$W" ] || { log "nothing to do: no $W"; exit 0; }

exec 9>"$W/.lock"
flock -w 600 9 || { log "timed out waiting for $W/.lock"; exit 1; }

# pid of a pid file, if that process is alive and still what we started
our_pid() { # pidfile cmdline-substring
  local pid
  [ -s "$1" ] || return 1
  pid=$(tr -d ' \n' <"$1")
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "$2" || return 1
  echo "$pid"
}

# The Postfix and Dovecot masters take their own children down on SIGTERM. All three are
# signalled at once and waited for together (each takes a second or two to finish).
pids=()
for spec in "postfix|$W/postfix/queue/pid/master.pid|master" \
  "dovecot|$W/run/dovecot/master.pid|dovecot" \
  "oidc-provider|$W/pids/oidc-provider.pid|server.mjs"; do
  IFS='|' read -r name pf want <<<"$spec"
  if pid=$(our_pid "$pf" "$want"); then
    log "$name: SIGTERM $pid"
    kill -TERM "$pid" && pids+=("$pid")
  else
    [ -e "$pf" ] && log "$name: not running (stale pid file)" && rm -f "$pf"
  fi
done
for _ in $(seq 1 100); do
  left=()
  for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && left+=("$pid"); done
  [ ${#left[@]} -eq 0 ] && break
  sleep 0.1
done
for pid in "${pids[@]}"; do
  if kill -0 "$pid" 2>/dev/null; then log "pid $pid still alive after 10 s: SIGKILL"; kill -KILL "$pid"; fi
done
# the masters remove their own pid files on exit; clear whatever is left
rm -f "$W/postfix/queue/pid/master.pid" "$W/run/dovecot/master.pid" "$W/pids/"*.pid

if [ "${PURGE:-0}" = 1 ]; then
  log "purging $W"
  rm -rf "$W"
fi
exit 0
