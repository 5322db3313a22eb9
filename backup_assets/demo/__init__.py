"""The embedded demo: a PostgreSQL 18 + pgvector cluster with the MyloWare schema and the
Miyabi SQLite stores, seeded with realistic rows, plus the packaged demo catalog."""
