"""Versioned, forward-only schema migrations.

``PRAGMA user_version`` holds the version a store is at. Each entry runs once, in order, inside the
transaction that bumps the version. Never edit a released migration: add a new one.
"""

from __future__ import annotations

MIGRATIONS: tuple[tuple[int, str], ...] = (
    (
        1,
        """
        CREATE TABLE meta (
            key   TEXT PRIMARY KEY,
            value TEXT NOT NULL
        ) WITHOUT ROWID;

        CREATE TABLE dossiers (
            id             INTEGER PRIMARY KEY,
            code           TEXT NOT NULL UNIQUE,
            receiving_unit TEXT NOT NULL,
            competent_unit TEXT NOT NULL,
            status         INTEGER,
            state          BLOB NOT NULL,
            record         TEXT NOT NULL,
            digest         TEXT NOT NULL,
            conflicts      TEXT NOT NULL DEFAULT '[]',
            created_at     TEXT NOT NULL,
            updated_at     TEXT NOT NULL,
            change_seq     INTEGER NOT NULL
        );
        CREATE INDEX dossiers_status ON dossiers (status, id);
        CREATE INDEX dossiers_competent ON dossiers (competent_unit, id);
        CREATE INDEX dossiers_change ON dossiers (change_seq);

        CREATE TABLE journal (
            seq    INTEGER PRIMARY KEY AUTOINCREMENT,
            code   TEXT NOT NULL,
            "update" BLOB NOT NULL,
            at     TEXT NOT NULL
        );
        CREATE INDEX journal_code ON journal (code, seq);

        CREATE TABLE day_counters (
            agency TEXT NOT NULL,
            day    TEXT NOT NULL,
            last   INTEGER NOT NULL,
            PRIMARY KEY (agency, day)
        ) WITHOUT ROWID;
        """,
    ),
    (
        2,
        """
        CREATE TABLE idempotency (
            scope        TEXT NOT NULL,
            key          TEXT NOT NULL,
            request_hash TEXT NOT NULL,
            status       INTEGER NOT NULL,
            body         TEXT NOT NULL,
            created_at   TEXT NOT NULL,
            PRIMARY KEY (scope, key)
        ) WITHOUT ROWID;
        CREATE INDEX dossiers_updated ON dossiers (updated_at, id);
        """,
    ),
    (
        3,
        """
        CREATE TABLE cursors (
            target TEXT PRIMARY KEY,
            seq    INTEGER NOT NULL
        ) WITHOUT ROWID;

        CREATE TABLE replication (
            target       TEXT NOT NULL,
            code         TEXT NOT NULL,
            state        TEXT NOT NULL,
            digest       TEXT,
            acked_digest TEXT,
            ack          BLOB,
            attempts     INTEGER NOT NULL DEFAULT 0,
            last_error   TEXT,
            next_at      INTEGER NOT NULL DEFAULT 0,
            updated_at   TEXT NOT NULL,
            PRIMARY KEY (target, code)
        ) WITHOUT ROWID;
        CREATE INDEX replication_state ON replication (target, state, next_at);
        """,
    ),
    (
        4,
        """
        CREATE TABLE failover_events (
            id          INTEGER PRIMARY KEY,
            at          TEXT NOT NULL,
            kind        TEXT NOT NULL,
            from_source TEXT,
            to_source   TEXT,
            reason      TEXT NOT NULL
        );
        """,
    ),
    (
        5,
        """
        CREATE TABLE pull_cursors (
            target TEXT PRIMARY KEY,
            seq    INTEGER NOT NULL
        ) WITHOUT ROWID;

        CREATE TABLE portal_base (
            code   TEXT PRIMARY KEY,
            record TEXT NOT NULL
        ) WITHOUT ROWID;
        """,
    ),
    (
        6,
        """
        CREATE TABLE tokens (
            id         INTEGER PRIMARY KEY,
            name       TEXT NOT NULL,
            roles      TEXT NOT NULL,
            hash       TEXT NOT NULL UNIQUE,
            created_at TEXT NOT NULL,
            revoked_at TEXT
        );
        """,
    ),
    (
        7,
        """
        CREATE TABLE audit_log (
            seq       INTEGER PRIMARY KEY,
            at        TEXT NOT NULL,
            kind      TEXT NOT NULL,
            code      TEXT NOT NULL,
            change    TEXT NOT NULL,
            digest    TEXT NOT NULL,
            prev_hash TEXT NOT NULL,
            hash      TEXT NOT NULL
        );
        CREATE INDEX audit_log_code ON audit_log (code, seq);
        CREATE TABLE audit_origin (change_seq INTEGER NOT NULL);
        INSERT INTO audit_origin (change_seq) SELECT coalesce(max(change_seq), 0) FROM dossiers
        """,
    ),
    (
        8,
        """
        CREATE TABLE document_fetches (
            sha256     TEXT PRIMARY KEY,
            code       TEXT NOT NULL,
            url        TEXT NOT NULL,
            size       INTEGER NOT NULL,
            attempts   INTEGER NOT NULL DEFAULT 0,
            last_error TEXT,
            next_at    INTEGER NOT NULL DEFAULT 0,
            created_at TEXT NOT NULL
        ) WITHOUT ROWID;
        CREATE INDEX document_fetches_due ON document_fetches (next_at);
        """,
    ),
    (
        9,
        """
        CREATE TABLE search_index (
            code      TEXT PRIMARY KEY,
            id_number TEXT,
            procedure TEXT,
            received  TEXT
        ) WITHOUT ROWID;
        CREATE INDEX search_index_id_number ON search_index (id_number);
        CREATE INDEX search_index_procedure ON search_index (procedure, received);
        CREATE INDEX search_index_received ON search_index (received);

        CREATE TABLE search_terms (
            term TEXT NOT NULL,
            code TEXT NOT NULL,
            PRIMARY KEY (term, code)
        ) WITHOUT ROWID;
        CREATE INDEX search_terms_code ON search_terms (code);
        """,
    ),
)

LATEST = MIGRATIONS[-1][0]
