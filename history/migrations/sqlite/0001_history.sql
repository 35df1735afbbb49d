-- The execution database (history/src/lib.rs). Times are microseconds
-- since the epoch, UTC; ids are UUIDs in text.

-- One row per job: its latest revision as the recorder saw it.
CREATE TABLE jobs (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    -- The job's revision in the jobs bucket (its stream sequence): a row
    -- is only ever replaced by a higher one.
    rev INTEGER NOT NULL,
    state TEXT NOT NULL,
    task TEXT NOT NULL,
    pool TEXT NOT NULL,
    priority INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    blame TEXT,
    detail TEXT,
    bot_id TEXT,
    source_message_id TEXT,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    -- 0 live, 1 archived (the bucket's copy is being removed),
    -- 2 removed from the bucket, 3 its delete marker purged too.
    archive_state INTEGER NOT NULL DEFAULT 0,
    -- 1 once archived (archive_state 1 to 3): what searches look at.
    archived INTEGER NOT NULL DEFAULT 0,
    archived_at INTEGER,
    -- What full-text search looks in: description and the crash's log
    -- tail and status file.
    search_text TEXT NOT NULL DEFAULT '',
    -- The job record as JSON, as the bucket held it.
    body TEXT NOT NULL
);
CREATE INDEX jobs_created ON jobs (archived, created_at DESC, id);
CREATE INDEX jobs_state ON jobs (state, archived, created_at DESC, id);
CREATE INDEX jobs_task ON jobs (task, archived, created_at DESC, id);
CREATE INDEX jobs_pool ON jobs (pool, archived, created_at DESC, id);
CREATE INDEX jobs_blame ON jobs (blame, archived, created_at DESC, id);
CREATE INDEX jobs_detail ON jobs (detail, archived, created_at DESC, id);
CREATE INDEX jobs_bot ON jobs (bot_id, archived, created_at DESC, id);
CREATE INDEX jobs_source ON jobs (source_message_id);
CREATE INDEX jobs_updated ON jobs (archived, updated_at);
-- The janitor's work list: only jobs between archival steps (1 and 2),
-- not the millions done with (3).
CREATE INDEX jobs_archive ON jobs (archive_state, archived_at) WHERE archive_state IN (1, 2);

CREATE VIRTUAL TABLE jobs_text USING fts5 (
    search_text, content = 'jobs', content_rowid = 'seq'
);
-- Only rows with words in them are indexed: most jobs end without a
-- crash or a description, and cost the text index nothing.
CREATE TRIGGER jobs_text_insert AFTER INSERT ON jobs WHEN new.search_text != '' BEGIN
    INSERT INTO jobs_text (rowid, search_text) VALUES (new.seq, new.search_text);
END;
CREATE TRIGGER jobs_text_delete AFTER DELETE ON jobs WHEN old.search_text != '' BEGIN
    INSERT INTO jobs_text (jobs_text, rowid, search_text) VALUES ('delete', old.seq, old.search_text);
END;
CREATE TRIGGER jobs_text_update AFTER UPDATE OF search_text ON jobs
    WHEN old.search_text IS NOT new.search_text BEGIN
    INSERT INTO jobs_text (jobs_text, rowid, search_text)
        SELECT 'delete', old.seq, old.search_text WHERE old.search_text != '';
    INSERT INTO jobs_text (rowid, search_text)
        SELECT new.seq, new.search_text WHERE new.search_text != '';
END;

-- Every history entry a job ever had, also those its record dropped
-- (idx counts from the job's first entry).
CREATE TABLE history (
    job_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    at INTEGER NOT NULL,
    action TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    from_state TEXT,
    to_state TEXT,
    actor TEXT NOT NULL,
    bot_id TEXT,
    resource TEXT,
    note TEXT,
    PRIMARY KEY (job_id, idx)
);

-- One row per attempt: who ran it and how it ended.
CREATE TABLE attempts (
    job_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    bot_id TEXT,
    resource TEXT,
    started_at INTEGER NOT NULL,
    ended_at INTEGER,
    ended_as TEXT,
    note TEXT,
    PRIMARY KEY (job_id, attempt)
);
CREATE INDEX attempts_bot ON attempts (bot_id, started_at);

-- Statistics of archived jobs: counts per minute of their last change.
CREATE TABLE stats_minute (
    minute INTEGER NOT NULL,
    state TEXT NOT NULL,
    blame TEXT NOT NULL,
    detail TEXT NOT NULL,
    retried INTEGER NOT NULL,
    n INTEGER NOT NULL,
    PRIMARY KEY (minute, state, blame, detail, retried)
);

-- The same counts per hour: a long window adds up hours, and minutes only
-- at its ends.
CREATE TABLE stats_hour (
    hour INTEGER NOT NULL,
    state TEXT NOT NULL,
    blame TEXT NOT NULL,
    detail TEXT NOT NULL,
    retried INTEGER NOT NULL,
    n INTEGER NOT NULL,
    PRIMARY KEY (hour, state, blame, detail, retried)
);
