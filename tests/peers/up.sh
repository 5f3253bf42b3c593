#!/usr/bin/env bash
# Start the real third-party peers the end-to-end tests talk to, all on 127.0.0.1:
#   oidc-provider (node)  OAuth 2.0 server: auth code + PKCE, rotating refresh tokens, client
#                         credentials, device code, introspection, revocation, dynamic
#                         client registration; test-only /_test/ endpoints (op/server.mjs)
#   Dovecot 2.3           IMAP, POP3, submission, LMTP; SASL XOAUTH2/OAUTHBEARER checked by
#                         token introspection at the OAuth server (email == SASL user)
#   Postfix               private instance; Dovecot submission relays to it, it delivers
#                         example.test/example.net into Dovecot over LMTP
# TLS: a throwaway CA made here signs the server certificate Dovecot uses (STARTTLS and
# implicit TLS); its file is `ca_file` in peers.json.
#
# Idempotent: installs what is missing, starts what is not running; a rerun while everything
# runs changes nothing. Needs root (apt-get; Dovecot/Postfix drop privileges; doveadm).
# Daemons are started with </dev/null >>log 2>&1 (Dovecot keeps inherited fds open, which
# would make a caller that captures our output through a pipe wait forever).
#
# Env: PEERS_STATE     state folder (default /tmp/auth-email-peers): configs, pids, logs, mail
#      PEERS_PORT_BASE base port (default 24000); ports are base + offsets below
#      PEERS_SKIP_INSTALL=1  do not apt-get / npm install
#      PEERS_DEBUG=1   verbose Dovecot auth/mail logging
# Output: $PEERS_STATE/peers.json (ports, URLs, CA file, clients, ...).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
W=${PEERS_STATE:-/tmp/auth-email-peers}
BASE=${PEERS_PORT_BASE:-24000}
HOST=127.0.0.1
# Dovecot (IMAP, POP3, submission) listens on another loopback address: Dovecot treats a
# connection whose remote IP equals its local IP as secured and would accept a token sent in
# clear. From 127.0.0.1 to 127.0.0.2 it refuses authentication before TLS, as real providers do.
MAIL_HOST=${PEERS_MAIL_HOST:-127.0.0.2}
DEBUG=${PEERS_DEBUG:-0}

OP_PORT=$((BASE + 80))
IMAP_PORT=$((BASE + 143))
IMAPS_PORT=$((BASE + 993))
POP3_PORT=$((BASE + 110))
POP3S_PORT=$((BASE + 995))
SUBM_PORT=$((BASE + 587))       # Dovecot submission, STARTTLS
SUBMS_PORT=$((BASE + 465))      # Dovecot submission, implicit TLS
PF_SMTP_PORT=$((BASE + 25))     # Postfix inbound (relay target of Dovecot submission, no auth)
PF_SUBM_PORT=$((BASE + 588))    # Postfix submission, SASL via Dovecot (a second SMTP peer)
REDIRECT_PORT=$((BASE + 99))    # reserved: redirect URI of the static `mailproxy` client
REG_TOKEN=test-registration-token
DOMAINS="example.test example.net"

log() { printf '[peers-up %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
[ "$(id -u)" = 0 ] || die "must run as root (apt-get, privilege-dropping daemons, doveadm)"
case "$W" in /*) ;; *) die "PEERS_STATE must be an absolute path: $W" ;; esac
# unix socket paths (sun_path) are limited to 108 bytes; Dovecot nests a few levels below
[ ${#W} -le 60 ] || die "PEERS_STATE path too long for unix sockets (${#W} > 60 chars): $W"
T0=$(date +%s.%N)

mkdir -p "$W"
chmod 755 "$W"
# one up/down at a time (pytest sessions of several developers may share the state folder)
# (daemons are started with 9>&- so they do not inherit, and hold, this lock)
exec 9>"$W/.lock"
flock -w 300 9 || die "timed out waiting for $W/.lock (held by: $(fuser "$W/.lock" 2>&1))"

if [ -s "$W/port_base" ] && [ "$(cat "$W/port_base")" != "$BASE" ] && [ -e "$W/pids" ] \
  && [ -n "$(find "$W/pids" -name '*.pid' 2>/dev/null)" ]; then
  die "peers in $W were started with PEERS_PORT_BASE=$(cat "$W/port_base"); run down.sh first"
fi
echo "$BASE" >"$W/port_base"

# ------------------------------------------------------------------ install what is missing
APT_PKGS=(dovecot-core dovecot-imapd dovecot-pop3d dovecot-submissiond dovecot-lmtpd
  postfix chromium chromium-driver curl swaks openssl)
if [ "${PEERS_SKIP_INSTALL:-0}" != 1 ]; then
  missing=()
  for p in "${APT_PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  command -v node >/dev/null || missing+=(nodejs)
  command -v npm >/dev/null || missing+=(npm)
  if [ ${#missing[@]} -gt 0 ]; then
    log "apt-get install ${missing[*]}"
    # Postfix without system configuration: we run our own instance on our own ports
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    apt-get update -q >"$W/apt.log" 2>&1 || { tail -20 "$W/apt.log"; die "apt-get update failed"; }
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" \
      >>"$W/apt.log" 2>&1 || { tail -20 "$W/apt.log"; die "apt-get install failed"; }
  fi
  # npm ci from the committed lock when node_modules is missing or older than the lock
  if [ ! -f "$HERE/op/node_modules/oidc-provider/package.json" ] \
    || [ "$HERE/op/package-lock.json" -nt "$HERE/op/node_modules/.package-lock.json" ]; then
    log "npm ci in $HERE/op"
    (cd "$HERE/op" && npm ci --no-audit --no-fund --loglevel=error) >"$W/npm.log" 2>&1 \
      || { tail -20 "$W/npm.log"; die "npm ci failed"; }
  fi
fi
for c in dovecot doveadm postfix node openssl ss curl; do
  command -v "$c" >/dev/null || die "$c not installed (PEERS_SKIP_INSTALL=${PEERS_SKIP_INSTALL:-0})"
done
T_INSTALLED=$(date +%s.%N)

# ------------------------------------------------------------------ helpers
port_busy() { ss -Hltn "sport = :$1" | grep -q .; }
port_owner() { ss -Hltnp "sport = :$1" | sed 's/.*users://' | head -1; }
# a pid file counts only if the process is alive AND is what we started (pids get reused)
alive() { # pidfile cmdline-substring
  local pid
  [ -s "$1" ] || return 1
  pid=$(tr -d ' \n' <"$1")
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "$2"
}
wait_port() { # port name
  for _ in $(seq 1 150); do port_busy "$1" && return 0; sleep 0.1; done
  die "$2 did not open port $1 (see $W/logs)"
}
ensure_free() { # name ports...
  local name=$1 p
  shift
  for p in "$@"; do
    port_busy "$p" && die "port $p needed by $name is busy and not ours ($(port_owner "$p")); choose another PEERS_PORT_BASE"
  done
  return 0
}
# write $1 from stdin only if the content changed; returns 0 when it changed
write_if_changed() {
  local tmp
  tmp=$(mktemp "$1.XXXXXX")
  cat >"$tmp"
  if [ -f "$1" ] && cmp -s "$tmp" "$1"; then rm -f "$tmp"; return 1; fi
  mv "$tmp" "$1"
  chmod 644 "$1"
  return 0
}

id vmail >/dev/null 2>&1 || useradd --system --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin vmail
mkdir -p "$W"/{pids,logs,run,op,tls,dovecot,postfix,mail,lib/dovecot}
chmod 755 "$W/run" "$W/logs"
chown vmail:vmail "$W/mail"
# raise the fd limit inherited by the daemons (benchmarks hold ~1000 IMAP connections)
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

# ------------------------------------------------------------------ throwaway CA + server cert
TLS=$W/tls
TLS_NEW=0
if ! [ -s "$TLS/ca.pem" ] || ! [ -s "$TLS/server.pem" ] \
  || ! openssl verify -CAfile "$TLS/ca.pem" "$TLS/server.pem" >/dev/null 2>&1 \
  || ! openssl x509 -checkend 86400 -noout -in "$TLS/server.pem" >/dev/null 2>&1 \
  || ! openssl x509 -noout -ext subjectAltName -in "$TLS/server.pem" 2>/dev/null | grep -q "IP Address:$MAIL_HOST"; then
  log "making a throwaway CA and server certificate in $TLS"
  rm -f "$TLS"/*
  openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -sha256 \
    -subj "/O=Auth-Email tests/CN=Auth-Email throwaway test CA $(date +%s)" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -addext "subjectKeyIdentifier=hash" \
    -keyout "$TLS/ca.key" -out "$TLS/ca.pem" 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj "/O=Auth-Email tests/CN=mail.example.test" \
    -keyout "$TLS/server.key" -out "$TLS/server.csr" 2>/dev/null
  cat >"$TLS/server.ext" <<EOF
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = DNS:mail.example.test,DNS:localhost,IP:127.0.0.1,IP:$MAIL_HOST
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
EOF
  openssl x509 -req -in "$TLS/server.csr" -CA "$TLS/ca.pem" -CAkey "$TLS/ca.key" \
    -set_serial "0x$(openssl rand -hex 16)" -days 825 -sha256 -extfile "$TLS/server.ext" \
    -out "$TLS/server.pem" 2>/dev/null
  cat "$TLS/server.pem" "$TLS/ca.pem" >"$TLS/server-chain.pem"
  chmod 600 "$TLS/ca.key" "$TLS/server.key"
  chmod 644 "$TLS/ca.pem" "$TLS/server.pem" "$TLS/server-chain.pem"
  TLS_NEW=1
fi

# ------------------------------------------------------------------ OAuth server
OP_PID=$W/pids/oidc-provider.pid
if alive "$OP_PID" server.mjs && curl -fsS --max-time 3 "http://$HOST:$OP_PORT/healthz" >/dev/null 2>&1; then
  log "oidc-provider already running (pid $(cat "$OP_PID"))"
else
  if alive "$OP_PID" server.mjs; then die "oidc-provider pid $(cat "$OP_PID") alive but not answering on $OP_PORT; run down.sh"; fi
  rm -f "$OP_PID"
  ensure_free oidc-provider "$OP_PORT"
  log "starting oidc-provider on $HOST:$OP_PORT"
  # node writes its pid file once listening; setsid detaches it from our session
  (cd "$HERE/op" && OP_HOST=$HOST OP_PORT=$OP_PORT OP_STATE=$W/op OP_PIDFILE=$OP_PID \
    OP_REDIRECT_URIS="http://$HOST:$REDIRECT_PORT/callback http://localhost:$REDIRECT_PORT/callback" \
    OP_REGISTRATION_TOKEN=$REG_TOKEN \
    exec setsid node server.mjs </dev/null >>"$W/logs/oidc-provider.log" 2>&1 9>&- &)
  OP_STARTED=1 # waited for below, after Dovecot and Postfix (node takes a second to start)
fi

# ------------------------------------------------------------------ Dovecot
DC=$W/dovecot/dovecot.conf
DC_CHANGED=0
DBG=$([ "$DEBUG" = 1 ] && echo yes || echo no)
write_if_changed "$W/dovecot/oauth2.conf.ext" <<EOF && DC_CHANGED=1
# Bearer tokens are checked by RFC 7662 introspection at the OAuth server; Dovecot POSTs
# token=...&client_id=dovecot&client_secret=... and wants {"active":true,"email":<SASL user>}.
introspection_mode = post
introspection_url = http://$HOST:$OP_PORT/token/introspection
client_id = dovecot
client_secret = dovecot-secret
username_attribute = email
active_attribute = active
active_value = true
issuers = http://$HOST:$OP_PORT
timeout_msecs = 10000
max_parallel_connections = 50
debug = $DBG
EOF

write_if_changed "$DC" <<EOF && DC_CHANGED=1
# Private Dovecot instance for the Auth-Email end-to-end tests (dovecot -c $DC)
instance_name = auth-email-peers
base_dir = $W/run/dovecot
state_dir = $W/lib/dovecot
log_path = $W/logs/dovecot.log
info_log_path = $W/logs/dovecot.log
protocols = imap pop3 submission lmtp
listen = $MAIL_HOST
hostname = mail.example.test
postmaster_address = postmaster@example.test
default_internal_user = dovecot
default_login_user = dovenull

# as strict as real providers: no authentication (not even XOAUTH2) before TLS
ssl = required
ssl_cert = <$TLS/server-chain.pem
ssl_key = <$TLS/server.key
ssl_dh = </usr/share/dovecot/dh.pem
disable_plaintext_auth = yes

auth_mechanisms = xoauth2 oauthbearer
auth_verbose = yes
auth_debug = $DBG
mail_debug = $DBG
# answer failed logins at once so negative tests stay fast (default 2 secs)
auth_failure_delay = 0
passdb {
  driver = oauth2
  mechanisms = xoauth2 oauthbearer
  args = $W/dovecot/oauth2.conf.ext
}
userdb {
  driver = static
  args = uid=vmail gid=vmail home=$W/mail/%d/%n allow_all_users=yes
}
mail_location = maildir:~/Maildir
namespace inbox {
  inbox = yes
  mailbox Drafts {
    special_use = \Drafts
    auto = subscribe
  }
  mailbox Sent {
    special_use = \Sent
    auto = subscribe
  }
  mailbox Trash {
    special_use = \Trash
    auto = subscribe
  }
}

# Benchmarks hold ~1000 IMAP connections from one user and IP.
default_process_limit = 2100
default_client_limit = 8000
protocol imap {
  mail_max_userip_connections = 2000
}
protocol pop3 {
  mail_max_userip_connections = 2000
  pop3_uidl_format = %08Xu%08Xv
}
service imap-login {
  # high-performance mode: few login processes, each serving many (TLS-proxied) connections
  service_count = 0
  process_min_avail = 2
  process_limit = 64
  client_limit = 1000
  inet_listener imap {
    address = $MAIL_HOST
    port = $IMAP_PORT
  }
  inet_listener imaps {
    address = $MAIL_HOST
    port = $IMAPS_PORT
    ssl = yes
  }
}
service imap {
  process_limit = 2100
}
service pop3-login {
  service_count = 0
  process_min_avail = 1
  process_limit = 64
  client_limit = 1000
  inet_listener pop3 {
    address = $MAIL_HOST
    port = $POP3_PORT
  }
  inet_listener pop3s {
    address = $MAIL_HOST
    port = $POP3S_PORT
    ssl = yes
  }
}
service pop3 {
  process_limit = 2100
}
service submission-login {
  service_count = 0
  process_min_avail = 1
  process_limit = 64
  client_limit = 1000
  inet_listener submission {
    address = $MAIL_HOST
    port = $SUBM_PORT
  }
  inet_listener submissions {
    address = $MAIL_HOST
    port = $SUBMS_PORT
    ssl = yes
  }
}
service submission {
  process_limit = 2100
}
service lmtp {
  unix_listener lmtp {
    mode = 0666
  }
}
# Anvil's auth penalty delays every login from an IP that failed before (up to 15 s); all
# tests come from 127.0.0.1, so negative tests would slow down later positive ones.
service anvil {
  unix_listener anvil-auth-penalty {
    mode = 0
  }
}
service auth {
  # Postfix smtpd_sasl_type = dovecot (second SMTP peer)
  unix_listener auth-postfix {
    mode = 0666
  }
}
# Dovecot submission relays accepted mail to the private Postfix instance
submission_relay_host = $HOST
submission_relay_port = $PF_SMTP_PORT
submission_relay_trusted = no
EOF

DC_PID=$W/run/dovecot/master.pid
if alive "$DC_PID" dovecot; then
  if [ "$DC_CHANGED" = 1 ] || [ "$TLS_NEW" = 1 ]; then
    log "dovecot running (pid $(cat "$DC_PID")), config changed: reload"
    doveadm -c "$DC" reload
  else
    log "dovecot already running (pid $(cat "$DC_PID"))"
  fi
else
  rm -f "$DC_PID"
  ensure_free dovecot "$IMAP_PORT" "$IMAPS_PORT" "$POP3_PORT" "$POP3S_PORT" "$SUBM_PORT" "$SUBMS_PORT"
  log "starting dovecot"
  dovecot -c "$DC" </dev/null >>"$W/logs/dovecot-start.log" 2>&1 9>&- \
    || { tail -20 "$W/logs/dovecot-start.log" >&2; die "dovecot start failed"; }
  for p in "$IMAP_PORT" "$IMAPS_PORT" "$POP3_PORT" "$POP3S_PORT" "$SUBM_PORT" "$SUBMS_PORT"; do
    wait_port "$p" dovecot
  done
fi

# ------------------------------------------------------------------ Postfix
PF=$W/postfix
mkdir -p "$PF/conf" "$PF/queue" "$PF/data"
chown postfix:postfix "$PF/data" # the master refuses to start otherwise
PF_CHANGED=0
write_if_changed "$PF/conf/main.cf" <<EOF && PF_CHANGED=1
# Private Postfix instance for the Auth-Email end-to-end tests (postfix -c $PF/conf)
compatibility_level = 3.6
queue_directory = $PF/queue
data_directory = $PF/data
mail_owner = postfix
setgid_group = postdrop
# must sit under maillog_file_prefixes, or Postfix starts silently and logs nothing
maillog_file = $W/logs/postfix.log
maillog_file_prefixes = $W/logs
myhostname = mx.example.test
mydomain = example.test
myorigin = example.test
inet_interfaces = $HOST
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
mydestination =
alias_maps =
alias_database =
smtp_dns_support_level = disabled
# every address of these domains is delivered into Dovecot over LMTP
virtual_mailbox_domains = $DOMAINS
virtual_mailbox_maps =
virtual_transport = lmtp:unix:$W/run/dovecot/lmtp
smtpd_relay_restrictions = permit_mynetworks, permit_sasl_authenticated, reject_unauth_destination
smtpd_banner = \$myhostname ESMTP
biff = no
# benchmarks: no per-client limits, no slowing down of a busy queue
default_process_limit = 300
smtpd_client_connection_count_limit = 0
in_flow_delay = 0s
EOF
write_if_changed "$PF/conf/master.cf" <<EOF && PF_CHANGED=1
# service type  private unpriv  chroot  wakeup  maxproc command + args
$HOST:$PF_SMTP_PORT inet n - n - - smtpd
$HOST:$PF_SUBM_PORT inet n - n - - smtpd
  -o syslog_name=postfix/submission
  -o smtpd_sasl_auth_enable=yes
  -o smtpd_sasl_type=dovecot
  -o smtpd_sasl_path=$W/run/dovecot/auth-postfix
  -o smtpd_client_restrictions=permit_sasl_authenticated,reject
  -o smtpd_relay_restrictions=permit_sasl_authenticated,reject
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
EOF
PF_PID=$PF/queue/pid/master.pid
if alive "$PF_PID" master; then
  if [ "$PF_CHANGED" = 1 ]; then
    log "postfix running (pid $(tr -d ' ' <"$PF_PID")), config changed: reload"
    postfix -c "$PF/conf" reload >>"$W/logs/postfix-start.log" 2>&1
  else
    log "postfix already running (pid $(tr -d ' ' <"$PF_PID"))"
  fi
else
  rm -f "$PF_PID"
  ensure_free postfix "$PF_SMTP_PORT" "$PF_SUBM_PORT"
  log "starting postfix"
  if [ ! -e "$PF/.permissions-set" ]; then
    postfix -c "$PF/conf" set-permissions </dev/null >>"$W/logs/postfix-start.log" 2>&1 || true
    touch "$PF/.permissions-set"
  fi
  postfix -c "$PF/conf" start </dev/null >>"$W/logs/postfix-start.log" 2>&1 9>&- \
    || { tail -20 "$W/logs/postfix-start.log" >&2; die "postfix start failed"; }
  wait_port "$PF_SMTP_PORT" postfix
  wait_port "$PF_SUBM_PORT" postfix
  for _ in $(seq 1 50); do [ -s "$PF_PID" ] && break; sleep 0.1; done
fi
alive "$PF_PID" master || die "postfix master not running (see $W/logs/postfix*.log)"
# Postfix pads its pid file with spaces; keep a normalised copy next to the others
tr -d ' ' <"$PF_PID" >"$W/pids/postfix.pid"
tr -d ' ' <"$DC_PID" >"$W/pids/dovecot.pid"

if [ "${OP_STARTED:-0}" = 1 ]; then
  for _ in $(seq 1 150); do
    [ -s "$OP_PID" ] && curl -fsS --max-time 1 "http://$HOST:$OP_PORT/healthz" >/dev/null 2>&1 && break
    sleep 0.1
  done
  alive "$OP_PID" server.mjs || { tail -20 "$W/logs/oidc-provider.log" >&2; die "oidc-provider did not start"; }
fi

# ------------------------------------------------------------------ a seeded default mailbox
# alice@example.test is the `mailbox` of the static client; tests make their own mailboxes.
SEED_USER=alice@example.test
if ! doveadm -c "$DC" -f flow mailbox status -u "$SEED_USER" messages INBOX 2>/dev/null | grep -q 'messages=[1-9]'; then
  log "seeding $SEED_USER INBOX"
  for i in 1 2 3; do
    printf 'From: Seeder <seed@example.test>\r\nTo: <%s>\r\nSubject: Seed message %s\r\nDate: %s\r\nMessage-ID: <seed-%s@example.test>\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nSeed message number %s.\r\n' \
      "$SEED_USER" "$i" "$(date -R)" "$i" "$i" | doveadm -c "$DC" save -u "$SEED_USER" -m INBOX
  done
fi

# ------------------------------------------------------------------ peers.json
I=http://$HOST:$OP_PORT
export W BASE HOST MAIL_HOST I OP_PORT IMAP_PORT IMAPS_PORT POP3_PORT POP3S_PORT SUBM_PORT SUBMS_PORT \
  PF_SMTP_PORT PF_SUBM_PORT REDIRECT_PORT REG_TOKEN DC DOMAINS SEED_USER HERE
python3 - <<'PY'
import json, os

e = os.environ
W = e["W"]
tls = f"{W}/tls"
data = {
    "host": e["HOST"],
    "mail_host": e["MAIL_HOST"],
    "state_dir": W,
    "port_base": int(e["BASE"]),
    "issuer": e["I"],
    "discovery_url": f"{e['I']}/.well-known/openid-configuration",
    "auth_url": f"{e['I']}/auth",
    "token_url": f"{e['I']}/token",
    "revocation_url": f"{e['I']}/token/revocation",
    "introspection_url": f"{e['I']}/token/introspection",
    "device_authorization_url": f"{e['I']}/device/auth",
    "device_verification_url": f"{e['I']}/device",
    "registration_url": f"{e['I']}/reg",
    "registration_token": e["REG_TOKEN"],
    "userinfo_url": f"{e['I']}/me",
    "jwks_url": f"{e['I']}/jwks",
    "test_stats_url": f"{e['I']}/_test/stats",
    "test_stats_reset_url": f"{e['I']}/_test/stats/reset",
    "test_revoke_url": f"{e['I']}/_test/revoke",
    "test_token_behaviour_url": f"{e['I']}/_test/token_behaviour",
    "op_port": int(e["OP_PORT"]),
    "imap_port": int(e["IMAP_PORT"]),
    "imaps_port": int(e["IMAPS_PORT"]),
    "pop3_port": int(e["POP3_PORT"]),
    "pop3s_port": int(e["POP3S_PORT"]),
    "submission_port": int(e["SUBM_PORT"]),
    "submissions_port": int(e["SUBMS_PORT"]),
    "postfix_smtp_port": int(e["PF_SMTP_PORT"]),
    "postfix_submission_port": int(e["PF_SUBM_PORT"]),
    "redirect_port": int(e["REDIRECT_PORT"]),
    "ca_file": f"{tls}/ca.pem",
    "ca_key_file": f"{tls}/ca.key",
    "server_cert_file": f"{tls}/server-chain.pem",
    "server_key_file": f"{tls}/server.key",
    "tls_server_names": ["mail.example.test", "localhost", "127.0.0.1", e["MAIL_HOST"]],
    "domains": e["DOMAINS"].split(),
    "password_rule": "pw-<local part>, e.g. alice@example.test / pw-alice",
    "seeded_user": e["SEED_USER"],
    "clients": {
        "mailproxy": {
            "client_id": "mailproxy",
            "client_secret": "mailproxy-secret",
            "redirect_uris": [
                f"http://{e['HOST']}:{e['REDIRECT_PORT']}/callback",
                f"http://localhost:{e['REDIRECT_PORT']}/callback",
            ],
            "mailbox": e["SEED_USER"],
            "token_endpoint_auth_method": "client_secret_basic",
        },
        "dovecot": {
            "client_id": "dovecot",
            "client_secret": "dovecot-secret",
            "token_endpoint_auth_method": "client_secret_post",
        },
    },
    "dovecot_conf": e["DC"],
    "postfix_conf_dir": f"{W}/postfix/conf",
    "logs_dir": f"{W}/logs",
    "op_dir": f"{e['HERE']}/op",
    "pid_files": {n: f"{W}/pids/{n}.pid" for n in ("oidc-provider", "dovecot", "postfix")},
}
tmp = f"{W}/peers.json.tmp"
with open(tmp, "w") as f:
    json.dump(data, f, indent=2)
    f.write("\n")
os.replace(tmp, f"{W}/peers.json")
PY

T_END=$(date +%s.%N)
el() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%.1f", b-a}'; }
log "up: install check $(el "$T0" "$T_INSTALLED")s, start $(el "$T_INSTALLED" "$T_END")s, total $(el "$T0" "$T_END")s; $W/peers.json"
