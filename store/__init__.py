"""Storage: the database with its encrypted fields, and the vault of keys and instance files."""
