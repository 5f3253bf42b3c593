"""People: users, passwords, login throttling and the audit log."""
