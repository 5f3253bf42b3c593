"""Storage: the database with its encrypted fields, and the vault (keys in the instance folder)."""
