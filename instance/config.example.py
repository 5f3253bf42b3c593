# Copy to instance/config.py and adjust. Environment variables AUTH_EMAIL_<NAME> override these.
# Secrets (session key, encryption key) are generated into this folder; never put them here.

PUBLIC_URL = "https://mail-bridge.example.org"  # what people type in the browser
BIND = "127.0.0.1:8080"  # the web UI, behind your reverse proxy
# DATABASE_URL = "postgresql://auth_email:password@db.internal/auth_email"
# MAIL_HOST = "mail-bridge.example.org"
# TLS_CERT = "/etc/letsencrypt/live/mail-bridge.example.org/fullchain.pem"
# TLS_KEY = "/etc/letsencrypt/live/mail-bridge.example.org/privkey.pem"
# IMAPS_LISTEN = "0.0.0.0:993"
# SMTPS_LISTEN = "0.0.0.0:465"
# NEW_USERS_CUSTOM_CLIENTS = False
