"""People: users, passwords, login throttling, the audit log and the instance settings."""
