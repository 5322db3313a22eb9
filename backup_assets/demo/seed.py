"""Schemas and realistic rows for the demo, the tests and the benchmark.

MyloWare (PostgreSQL + pgvector): runs, artifacts, webhook_events, orchestration_checkpoints,
hitl_approvals, kb_documents, kb_embeddings (vector column + HNSW index), socials,
project_socials. Miyabi (SQLite): execution_runs, checkpoints, worktrees. Miyabi (PostgreSQL): users,
repositories, agent_executions, workflows, line_messages, websocket_connections.

Rows are generated server-side with generate_series so that the benchmark's gigabytes take
minutes, not hours. Timestamps spread over the past months so retention pruning has work to do.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path

MYLOWARE_SCHEMA = """
CREATE EXTENSION IF NOT EXISTS vector;

CREATE TABLE IF NOT EXISTS runs (
    id bigserial PRIMARY KEY,
    project text NOT NULL,
    persona text NOT NULL,
    status text NOT NULL CHECK (status IN ('pending', 'running', 'succeeded', 'failed', 'cancelled')),
    input jsonb NOT NULL DEFAULT '{}'::jsonb,
    result jsonb,
    created_at timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz
);
CREATE INDEX IF NOT EXISTS runs_created_at_idx ON runs (created_at);

CREATE TABLE IF NOT EXISTS artifacts (
    id bigserial PRIMARY KEY,
    run_id bigint NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    kind text NOT NULL,
    content text NOT NULL,
    metadata jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS artifacts_created_at_idx ON artifacts (created_at);

CREATE TABLE IF NOT EXISTS webhook_events (
    id bigserial PRIMARY KEY,
    provider text NOT NULL,
    event_type text NOT NULL,
    signature text NOT NULL,
    payload jsonb NOT NULL,
    raw_body text NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS webhook_events_received_at_idx ON webhook_events (received_at);

CREATE TABLE IF NOT EXISTS orchestration_checkpoints (
    id bigserial PRIMARY KEY,
    run_id bigint NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    step integer NOT NULL,
    state jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS hitl_approvals (
    id bigserial PRIMARY KEY,
    run_id bigint NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    approver text NOT NULL,
    decision text NOT NULL CHECK (decision IN ('approved', 'rejected', 'pending')),
    comment text,
    decided_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS kb_documents (
    id bigserial PRIMARY KEY,
    source_uri text NOT NULL,
    title text NOT NULL,
    body text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS kb_embeddings (
    id bigserial PRIMARY KEY,
    document_id bigint NOT NULL REFERENCES kb_documents (id) ON DELETE CASCADE,
    chunk_index integer NOT NULL,
    chunk text NOT NULL,
    embedding vector(%(dims)s),
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS socials (
    id bigserial PRIMARY KEY,
    platform text NOT NULL,
    handle text NOT NULL UNIQUE
);

CREATE TABLE IF NOT EXISTS project_socials (
    project text NOT NULL,
    social_id bigint NOT NULL REFERENCES socials (id),
    PRIMARY KEY (project, social_id)
);
"""

HNSW_INDEX = "CREATE INDEX IF NOT EXISTS kb_embeddings_embedding_hnsw ON kb_embeddings USING hnsw (embedding vector_cosine_ops)"


@dataclass(frozen=True)
class Scale:
    runs: int = 400
    artifacts_per_run: int = 3
    webhooks: int = 800
    checkpoints_per_run: int = 2
    documents: int = 60
    chunks_per_document: int = 5
    dims: int = 1536
    text_bytes: int = 400
    days: int = 180


DEMO_SCALE = Scale()


def _exec(conn, statement: str, params: dict | None = None) -> None:
    # always with a params mapping, so that %% means a literal % in every statement
    conn.execute(statement, params or {})


def create_myloware_schema(conn, dims: int = 1536) -> None:
    conn.execute(MYLOWARE_SCHEMA.replace("%(dims)s", str(int(dims))))


def seed_myloware(conn, scale: Scale = DEMO_SCALE, *, hnsw: bool = True) -> None:
    """Create the MyloWare schema in the connected database and fill it (autocommit conn)."""
    create_myloware_schema(conn, scale.dims)
    p = {
        "runs": scale.runs, "apr": scale.artifacts_per_run, "webhooks": scale.webhooks,
        "cpr": scale.checkpoints_per_run, "docs": scale.documents, "cpd": scale.chunks_per_document,
        "dims": scale.dims, "text": max(1, scale.text_bytes // 32), "days": scale.days,
    }
    _exec(conn, """
        INSERT INTO runs (project, persona, status, input, result, created_at, finished_at)
        SELECT 'project-' || (g %% 7), (ARRAY['editor','researcher','publisher','reviewer'])[1 + g %% 4],
               (ARRAY['succeeded','succeeded','succeeded','failed','cancelled'])[1 + g %% 5],
               jsonb_build_object('prompt', 'Write episode ' || g, 'temperature', 0.2 + (g %% 5) / 10.0),
               jsonb_build_object('tokens', 500 + g %% 3000, 'cost_usd', round(((g %% 900) / 1000.0)::numeric, 3)),
               now() - make_interval(secs => (random() * %(days)s * 86400)::int),
               now() - make_interval(secs => (random() * 3600)::int)
        FROM generate_series(1, %(runs)s) g
    """, p)
    _exec(conn, """
        INSERT INTO artifacts (run_id, kind, content, metadata, created_at)
        SELECT r.id, (ARRAY['script','notification','audit','thumbnail-prompt'])[1 + k %% 4],
               repeat(md5(r.id::text || '-' || k), %(text)s),
               jsonb_build_object('persona', r.persona, 'version', k),
               r.created_at + make_interval(secs => k * 60)
        FROM runs r CROSS JOIN generate_series(1, %(apr)s) k
    """, p)
    _exec(conn, """
        INSERT INTO webhook_events (provider, event_type, signature, payload, raw_body, received_at)
        SELECT (ARRAY['stripe','github','telegram','youtube'])[1 + g %% 4], 'event.' || (g %% 11),
               encode(sha256(g::text::bytea), 'hex'),
               jsonb_build_object('id', g, 'delivery', md5(g::text), 'attempt', 1 + g %% 3),
               repeat(md5(g::text), %(text)s),
               now() - make_interval(secs => (random() * 40 * 86400)::int)
        FROM generate_series(1, %(webhooks)s) g
    """, p)
    _exec(conn, """
        INSERT INTO orchestration_checkpoints (run_id, step, state, created_at)
        SELECT r.id, s, jsonb_build_object('node', 'step_' || s, 'messages', s * 3, 'digest', md5(r.id || ':' || s)),
               r.created_at + make_interval(secs => s * 30)
        FROM runs r CROSS JOIN generate_series(1, %(cpr)s) s
    """, p)
    _exec(conn, """
        INSERT INTO hitl_approvals (run_id, approver, decision, comment, decided_at)
        SELECT r.id, 'ops-' || (r.id %% 5), (ARRAY['approved','approved','rejected','pending'])[1 + r.id %% 4],
               'Checked output of run ' || r.id, r.created_at + interval '10 minutes'
        FROM runs r WHERE r.id %% 3 = 0
    """, p)
    _exec(conn, """
        INSERT INTO kb_documents (source_uri, title, body, created_at)
        SELECT 'https://docs.example.invalid/kb/' || g, 'Knowledge base article ' || g,
               repeat('Episode guidelines and style notes. ' || md5(g::text) || ' ', %(text)s),
               now() - make_interval(days => g %% 120)
        FROM generate_series(1, %(docs)s) g
    """, p)
    _exec(conn, """
        INSERT INTO kb_embeddings (document_id, chunk_index, chunk, embedding, created_at)
        SELECT d.id, c, left(d.body, 300) || ' #' || c,
               (SELECT array_agg(random()::real)::vector FROM generate_series(1, %(dims)s) WHERE d.id + c > 0),
               d.created_at
        FROM kb_documents d CROSS JOIN generate_series(1, %(cpd)s) c
    """, p)
    # a few chunks not yet embedded: a restore has to keep NULL vectors NULL
    _exec(conn, "UPDATE kb_embeddings SET embedding = NULL WHERE id %% 97 = 0")
    if hnsw:
        conn.execute(HNSW_INDEX)
    _exec(conn, """
        INSERT INTO socials (platform, handle)
        SELECT (ARRAY['youtube','tiktok','instagram'])[1 + g %% 3], '@myloware_' || g FROM generate_series(1, 12) g
        ON CONFLICT DO NOTHING
    """)
    _exec(conn, """
        INSERT INTO project_socials (project, social_id)
        SELECT 'project-' || (s.id %% 7), s.id FROM socials s ON CONFLICT DO NOTHING
    """)
    conn.execute("ANALYZE")


MIYABI_SCHEMA = """
CREATE TABLE IF NOT EXISTS execution_runs (
    id INTEGER PRIMARY KEY,
    agent TEXT NOT NULL,
    issue_number INTEGER,
    status TEXT NOT NULL,
    started_at TEXT NOT NULL,
    finished_at TEXT,
    output TEXT
);
CREATE INDEX IF NOT EXISTS execution_runs_started_at ON execution_runs (started_at);
CREATE TABLE IF NOT EXISTS checkpoints (
    id INTEGER PRIMARY KEY,
    run_id INTEGER NOT NULL REFERENCES execution_runs (id),
    step INTEGER NOT NULL,
    state BLOB NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS worktrees (
    id INTEGER PRIMARY KEY,
    path TEXT NOT NULL UNIQUE,
    branch TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at TEXT NOT NULL
);
"""


def seed_miyabi(path: Path, *, runs: int = 500, checkpoints_per_run: int = 3, worktrees: bool = True,
                payload_bytes: int = 256) -> None:
    """Create a Miyabi SQLite store in WAL mode and fill it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.executescript(MIYABI_SCHEMA if worktrees else MIYABI_SCHEMA.split("CREATE TABLE IF NOT EXISTS worktrees")[0])
        with conn:
            conn.execute(
                """
                WITH RECURSIVE g(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM g WHERE n < ?)
                INSERT INTO execution_runs (agent, issue_number, status, started_at, finished_at, output)
                SELECT (CASE n % 4 WHEN 0 THEN 'CoordinatorAgent' WHEN 1 THEN 'CodeGenAgent'
                        WHEN 2 THEN 'ReviewAgent' ELSE 'DeploymentAgent' END),
                       100 + n % 250, (CASE WHEN n % 9 = 0 THEN 'failed' ELSE 'completed' END),
                       datetime('now', '-' || (n % 180) || ' days'), datetime('now', '-' || (n % 180) || ' days', '+5 minutes'),
                       hex(randomblob(?))
                FROM g
                """,
                (runs, payload_bytes // 2),
            )
            conn.execute(
                """
                WITH RECURSIVE s(k) AS (SELECT 1 UNION ALL SELECT k + 1 FROM s WHERE k < ?)
                INSERT INTO checkpoints (run_id, step, state, created_at)
                SELECT r.id, s.k, randomblob(?), r.started_at FROM execution_runs r, s
                """,
                (checkpoints_per_run, payload_bytes),
            )
            if worktrees:
                conn.execute(
                    """
                    INSERT OR IGNORE INTO worktrees (path, branch, status, created_at)
                    SELECT '.worktrees/issue-' || issue_number, 'agent/issue-' || issue_number,
                           (CASE WHEN issue_number % 3 = 0 THEN 'active' ELSE 'merged' END), min(started_at)
                    FROM execution_runs GROUP BY issue_number
                    """
                )
    finally:
        conn.close()


MIYABI_PG_SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    id bigserial PRIMARY KEY,
    github_login text NOT NULL UNIQUE,
    email text NOT NULL,
    display_name text,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS repositories (
    id bigserial PRIMARY KEY,
    owner_id bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    full_name text NOT NULL UNIQUE,
    default_branch text NOT NULL DEFAULT 'main',
    connected_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS workflows (
    id bigserial PRIMARY KEY,
    repository_id bigint NOT NULL REFERENCES repositories (id) ON DELETE CASCADE,
    name text NOT NULL,
    definition jsonb NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS agent_executions (
    id bigserial PRIMARY KEY,
    repository_id bigint NOT NULL REFERENCES repositories (id) ON DELETE CASCADE,
    agent text NOT NULL,
    issue_number integer NOT NULL,
    status text NOT NULL,
    result jsonb,
    started_at timestamptz NOT NULL,
    finished_at timestamptz
);
CREATE INDEX IF NOT EXISTS agent_executions_started_at_idx ON agent_executions (started_at);
CREATE TABLE IF NOT EXISTS line_messages (
    id bigserial PRIMARY KEY,
    user_id bigint REFERENCES users (id) ON DELETE SET NULL,
    direction text NOT NULL CHECK (direction IN ('in', 'out')),
    body text NOT NULL,
    sent_at timestamptz NOT NULL
);
CREATE TABLE IF NOT EXISTS websocket_connections (
    id uuid PRIMARY KEY,
    user_id bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    connected_at timestamptz NOT NULL,
    last_seen_at timestamptz NOT NULL
);
"""


def seed_miyabi_pg(conn, *, users: int = 50, executions: int = 3000) -> None:
    """The Miyabi PostgreSQL database of the runbook (autocommit conn)."""
    conn.execute(MIYABI_PG_SCHEMA)
    p = {"users": users, "execs": executions}
    _exec(conn, """INSERT INTO users (github_login, email, display_name, created_at)
                   SELECT 'user' || n, 'user' || n || '@example.com', 'User ' || n, now() - n * interval '3 days'
                   FROM generate_series(1, %(users)s) n""", p)
    _exec(conn, """INSERT INTO repositories (owner_id, full_name, connected_at)
                   SELECT u.id, 'org/' || u.github_login || '-' || k, u.created_at + k * interval '1 hour'
                   FROM users u, generate_series(1, 2) k""", p)
    _exec(conn, """INSERT INTO workflows (repository_id, name, definition)
                   SELECT r.id, w, jsonb_build_object('steps', jsonb_build_array('plan', 'code', 'review', 'deploy'))
                   FROM repositories r, unnest(ARRAY['issue-to-pr', 'nightly-review']) w""", p)
    _exec(conn, """INSERT INTO agent_executions (repository_id, agent, issue_number, status, result, started_at, finished_at)
                   SELECT 1 + n %% (SELECT count(*) FROM repositories),
                          (ARRAY['CoordinatorAgent', 'CodeGenAgent', 'ReviewAgent', 'DeploymentAgent'])[1 + n %% 4],
                          100 + n %% 250, CASE WHEN n %% 9 = 0 THEN 'failed' ELSE 'completed' END,
                          jsonb_build_object('tokens', n * 17 %% 9000, 'summary', md5(n::text)),
                          now() - (n %% 180) * interval '1 day', now() - (n %% 180) * interval '1 day' + interval '5 minutes'
                   FROM generate_series(1, %(execs)s) n""", p)
    _exec(conn, """INSERT INTO line_messages (user_id, direction, body, sent_at)
                   SELECT 1 + n %% %(users)s, CASE WHEN n %% 2 = 0 THEN 'in' ELSE 'out' END,
                          'message ' || n || ' ' || md5(n::text), now() - n * interval '7 minutes'
                   FROM generate_series(1, %(execs)s) n""", p)
    _exec(conn, """INSERT INTO websocket_connections (id, user_id, connected_at, last_seen_at)
                   SELECT gen_random_uuid(), 1 + n %% %(users)s, now() - interval '1 hour', now()
                   FROM generate_series(1, 40) n""", p)
