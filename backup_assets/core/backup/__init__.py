"""Taking backups: a dump (or a SQLite copy, or a promotion to a longer tier) of one source x group x tier x
partition into the repository (take.py), and the server's roles and grants as data (roles.py)."""
